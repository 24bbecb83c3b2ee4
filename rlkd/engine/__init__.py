"""ZeRO-3 teacher/student distillation engine. Entry point: `rlkd.engine.train.run_training`."""
