"""`rlkd train --config run.yaml [key=value ...] [--resume]`."""

from __future__ import annotations

import argparse
import logging
import os
import sys

from rlkd.config import ConfigError, load_config
from rlkd.data.jsonl import DataError
from rlkd.models import VocabMismatchError


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="rlkd train", description="Distil a student from a teacher (DeepSpeed ZeRO-3).")
    parser.add_argument("--config", required=True, help="run config YAML (see examples/tiny_run.yaml)")
    parser.add_argument("overrides", nargs="*", metavar="key=value",
                        help="dotted overrides, e.g. train.max_steps=10 loss.ranking.enabled=true")
    parser.add_argument("--resume", action="store_true",
                        help="continue from the latest checkpoint in output_dir; refused if the saved config differs "
                             "in a key that changes results")
    parser.add_argument("--allow-change", action="append", default=[], metavar="KEY",
                        help="with --resume: accept a change of KEY (or a section, e.g. models) that would be refused; "
                             "recorded in the manifest (repeatable, or comma-separated)")
    parser.add_argument("--data-dir", help="local data directory (sets data.data_dir)")
    parser.add_argument("--plugin", action="append", default=[], metavar="MODULE_OR_FILE",
                        help="import a module or .py file that registers objectives (repeatable; recorded in "
                             "the run config's plugins)")
    parser.add_argument("--local_rank", "--local-rank", type=int, default=None, help=argparse.SUPPRESS)  # deepspeed launcher
    return parser


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_intermixed_args(argv)  # overrides may come before and after the flags
    overrides = list(args.overrides)
    if args.data_dir:
        overrides.append(f"data.data_dir={args.data_dir}")
    try:
        cfg = load_config(args.config, overrides, plugins=args.plugin)
    except ConfigError as exc:
        print(f"rlkd train: {exc}", file=sys.stderr)
        return 2
    from rlkd.engine.train import run_training

    allow = [key.strip() for value in args.allow_change for key in value.split(",") if key.strip()]
    try:
        result = run_training(cfg, resume=args.resume, allow_changes=allow)
    except (ConfigError, DataError, VocabMismatchError) as exc:  # incl. PreflightError, ResumeError
        if int(os.environ.get("RANK", "0")) == 0:
            print(f"rlkd train: {exc}", file=sys.stderr)
        return 2
    import torch.distributed as dist

    if not dist.is_initialized() or dist.get_rank() == 0:
        if result.stopped_early:
            print(f"run stopped on request after step {result.steps}; "
                  f"checkpoint in {result.output_dir / 'checkpoints'} (continue with --resume)")
        else:
            print(f"run finished: export {result.export_dir}; metrics {result.metrics_path}")
    if dist.is_initialized() and dist.get_world_size() > 1:
        # Every rank leaves together and closes its group before the interpreter exits: left to
        # process teardown, a rank's gloo threads can outlive a peer that exited first, and an
        # aborting rank fails a Slurm job whose run had finished (seen once in a full test run).
        dist.barrier()
        dist.destroy_process_group()
        # ...and skips the interpreter's finalisation. A gloo worker thread can still be releasing a
        # finished collective whose tensors hold Python references (a barrier holding ZeRO-3's
        # all-gathers); if finalisation has begun, its wait for the GIL ends the thread inside a
        # destructor and std::terminate aborts a rank whose run had finished (a core dump showed
        # ~AsyncBarrierWork -> decref -> take_gil -> pthread_exit; about 1 in 20 two-rank runs with
        # another beside it). The run's files are closed by now: flush what is buffered and exit.
        logging.shutdown()
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(0)
    return 0


if __name__ == "__main__":
    sys.exit(main())
