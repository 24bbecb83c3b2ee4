"""Benchmark harness: grid specs, the resumable cell runner, tables beside the paper, and the
embedded offline benchmark behind a bare `rlkd bench`.

Running (a spec -> cells -> stages -> a run -> the store): spec, records, layout_schema, stages,
executor, runner, cell, worker, store. Reporting (the store -> effects and statistics -> tables and
plots): the ``report`` package. Commands that compose both: cli, table_cli, orchestrate, default.
"""
