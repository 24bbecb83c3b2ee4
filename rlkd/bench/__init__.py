"""Benchmark harness: grid specs, the resumable cell runner, tables beside the paper, and the
embedded offline benchmark behind a bare `rlkd bench`."""
