"""``rlkd eval``: score checkpoints on tasks, through lm-eval, or against a teacher.

    rlkd eval --checkpoint C --task gsm8k dolly [--data-dir D] [--limit N] [--out DIR]
    rlkd eval --checkpoint C --lm-eval hellaswag,arc_easy [--lm-eval-include DIR]
    rlkd eval --checkpoint STUDENT --teacher TEACHER --alignment-data corpus.jsonl
    rlkd eval --list-tasks
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from rlkd.data.jsonl import DataError

from .generate import CheckpointNotFoundError
from .tasks import PROMPT_STYLES, TASKS


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="rlkd eval", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--checkpoint", help="HF checkpoint directory (or Hub id) to evaluate")
    p.add_argument("--task", nargs="+", choices=sorted(TASKS), help="rlkd evaluation task(s)")
    p.add_argument("--list-tasks", action="store_true", help="print the tasks and exit")
    p.add_argument("--data-dir", help="local data directory (default: $RLKD_DATA_DIR or ../shared/data)")
    p.add_argument("--data-path", help="JSONL file to use instead of the task's standard file")
    p.add_argument("--limit", type=int, help="evaluate the first N examples only")
    p.add_argument("--out", help="output directory (default: results/eval/<checkpoint name>)")
    p.add_argument("--protocol", choices=["greedy", "minillm"],
                   help="decoding protocol (default: the task's; gsm8k/dolly/xsum greedy)")
    p.add_argument("--seeds", type=int, nargs="+", help="seeds for --protocol minillm (default 10..50)")
    p.add_argument("--prompt-style", choices=PROMPT_STYLES, help="default: the task's")
    p.add_argument("--max-new-tokens", type=int)
    p.add_argument("--max-prompt-tokens", type=int)
    p.add_argument("--stop", nargs="+", default=[], help="cut predictions at these strings")
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--device", default=None, help="default: cuda when rlkd runs on a GPU (rlkd.device), else cpu")
    p.add_argument("--dtype", default=None, choices=["float32", "bfloat16", "float16"],
                   help="default: bfloat16 on a GPU, float32 on the CPU")
    p.add_argument("--no-rouge-pkg", action="store_true", help="skip the `rouge` package variant")
    p.add_argument("--fast-checkpoint-hash", action="store_true",
                   help="fingerprint weights by size and mtime instead of content")
    p.add_argument("--overwrite", action="store_true", help="replace a run made with other settings")
    p.add_argument("--rescore", action="store_true",
                   help="score the finished predictions in --out again (no model, no generation)")
    p.add_argument("--lm-eval", metavar="TASKS", help="comma-separated lm-eval task names")
    p.add_argument("--lm-eval-include", help="directory of extra lm-eval task YAMLs")
    p.add_argument("--num-fewshot", type=int)
    p.add_argument("--chat-template", action="store_true", help="lm-eval: apply the chat template")
    p.add_argument("--teacher", help="alignment metrics: teacher checkpoint")
    p.add_argument("--alignment-data", help="alignment metrics: JSONL corpus with a 'text' field")
    p.add_argument("--slice-len", type=int, default=400, help="alignment: tokens per slice")
    p.add_argument("--n-slices", type=int, default=5000, help="alignment: number of slices")
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    return p


def _default_out(checkpoint: str) -> Path:
    return Path("results") / "eval" / Path(checkpoint.rstrip("/")).name


def _run_alignment(args) -> dict:
    from rlkd.data.jsonl import iter_jsonl, require

    from .alignment import compare_models, make_token_slices
    from .generate import load_checkpoint
    from .provenance import atomic_write_json, checkpoint_fingerprint, package_versions, utc_now

    student, tokenizer = load_checkpoint(args.checkpoint, args.dtype, args.device)
    teacher, _ = load_checkpoint(args.teacher, args.dtype, args.device)
    texts = (require(row, "text", f"{args.alignment_data}:{n}")
             for n, row in iter_jsonl(args.alignment_data))
    slices = make_token_slices(texts, tokenizer, args.slice_len, args.n_slices)
    if not slices:
        raise DataError(f"{args.alignment_data}: too little text for one slice of {args.slice_len} tokens")
    result = compare_models(student, teacher, slices, batch_size=args.batch_size,
                            show_progress=not args.quiet).as_dict()
    result["provenance"] = {"student": checkpoint_fingerprint(args.checkpoint, not args.fast_checkpoint_hash),
                            "teacher": checkpoint_fingerprint(args.teacher, not args.fast_checkpoint_hash),
                            "data": args.alignment_data, "slice_len": args.slice_len,
                            "tokenizer": "student's", "versions": package_versions(),
                            "created_at": utc_now()}
    atomic_write_json(Path(args.out or _default_out(args.checkpoint)) / "alignment" / "metrics.json", result)
    return result


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    if args.list_tasks:
        for name, spec in TASKS.items():
            print(f"{name:14s} {spec.protocol:8s} {spec.prompt_style:8s} {spec.description}")
        return 0
    if args.rescore:
        if not (args.out and args.task):
            print("rlkd eval: --rescore needs --out and --task", file=sys.stderr)
            return 2
        from .runner import rescore

        try:
            for task in args.task:
                result = rescore(args.out, task, with_rouge_pkg=not args.no_rouge_pkg)
                print(json.dumps({"task": task, "n": result["n"], **result["metrics"]}))
        except FileNotFoundError as err:
            print(f"rlkd eval: error: {err}", file=sys.stderr)
            return 1
        return 0
    if not args.checkpoint:
        print("rlkd eval: --checkpoint is required", file=sys.stderr)
        return 2
    if not (args.task or args.lm_eval or args.teacher):
        print("rlkd eval: give --task, --lm-eval or --teacher", file=sys.stderr)
        return 2
    out = Path(args.out) if args.out else _default_out(args.checkpoint)
    from rlkd.device import eval_placement

    args.device, args.dtype = eval_placement(args.device, args.dtype)
    try:
        if args.task:
            from .runner import evaluate_task

            for task in args.task:
                result = evaluate_task(
                    args.checkpoint, task, out_dir=out, data_dir=args.data_dir,
                    data_path=args.data_path, limit=args.limit, protocol=args.protocol,
                    prompt_style=args.prompt_style, seeds=args.seeds,
                    max_new_tokens=args.max_new_tokens, max_prompt_tokens=args.max_prompt_tokens,
                    batch_size=args.batch_size, stop_strings=args.stop, device=args.device,
                    dtype=args.dtype, with_rouge_pkg=not args.no_rouge_pkg,
                    full_checkpoint_hash=not args.fast_checkpoint_hash, overwrite=args.overwrite,
                    show_progress=not args.quiet)
                print(json.dumps({"task": task, "n": result["n"], **result["metrics"]}))
        if args.lm_eval:
            from .lm_eval_bridge import run_lm_eval

            result = run_lm_eval(args.checkpoint, [t for t in args.lm_eval.split(",") if t],
                                 out_dir=out, include_path=args.lm_eval_include, limit=args.limit,
                                 num_fewshot=args.num_fewshot, batch_size=args.batch_size,
                                 device=args.device, dtype=args.dtype,
                                 apply_chat_template=args.chat_template,
                                 full_checkpoint_hash=not args.fast_checkpoint_hash)
            print(json.dumps(result.get("results", {})))
        if args.teacher:
            if not args.alignment_data:
                print("rlkd eval: --teacher needs --alignment-data", file=sys.stderr)
                return 2
            print(json.dumps(_run_alignment(args)))
    except (CheckpointNotFoundError, DataError, KeyError, ValueError) as err:
        message = err.args[0] if isinstance(err, KeyError) and err.args else err
        print(f"rlkd eval: error: {message}", file=sys.stderr)
        return 1
    return 0
