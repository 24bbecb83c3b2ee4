"""Evaluation tasks: where their rows live, how a row becomes a prompt, and how it is scored.

Prompt styles:

* ``alpaca``: the RLKD official template (``rlkd.data.templates``), ending in ``### Response:``;
  what rlkd's own students are trained on. GSM8K questions are split as the official code does
  (first line = instruction, rest = input). XSum uses rlkd's own instruction (the paper's is not
  published).
* ``minillm``: MiniLLM's processed prompt, which is the same template plus a trailing newline
  (the files' ``prompt`` field when present).
* ``chat``: the checkpoint tokenizer's chat template, one user turn holding the instruction (and
  the input after a blank line), with the generation prompt appended; for instruct models such as
  SmolLM2-Instruct that were never trained on the Alpaca format.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from rlkd.data.jsonl import DataError, iter_jsonl, require
from rlkd.data.tasks import LOCAL_FILES
from rlkd.data.templates import XSUM_INSTRUCTION, alpaca_prompt, split_gsm8k_query

from . import gsm8k

PROMPT_STYLES = ("alpaca", "minillm", "chat")


@dataclass(frozen=True)
class Example:
    """One evaluation row in task-independent form."""

    index: int  # position in the task's file (0-based, counting non-blank lines)
    instruction: str
    input: str
    references: tuple[str, ...]  # GSM8K: the normalised gold number
    where: str  # file:line
    minillm_prompt: str | None = None


@dataclass(frozen=True)
class TaskSpec:
    name: str
    local: tuple[str, str]  # key into rlkd.data.tasks.LOCAL_FILES
    parse: Callable[[dict[str, Any], str], tuple[str, str, tuple[str, ...]]]
    metric: str  # "gsm8k" | "rouge"
    protocol: str  # default decoding protocol: "greedy" (paper) | "minillm"
    prompt_style: str  # default prompt style
    max_new_tokens: int
    max_prompt_tokens: int | None
    rouge_types: tuple[str, ...] = ("rouge1", "rouge2", "rougeL")
    hub: tuple[str, str | None, str] | None = None  # (dataset, config, split)
    description: str = ""
    extra: dict = field(default_factory=dict)


def _gsm8k(row, where):
    # The official repository's copy renames question/answer to query/response.
    renamed = "question" not in row and "query" in row
    question = require(row, "query" if renamed else "question", where)
    answer = require(row, "response" if renamed else "answer", where)
    instruction, extra = split_gsm8k_query(question)
    try:
        gold = gsm8k.gold_answer(answer)
    except ValueError as err:
        raise DataError(f"{where}: {err}") from None
    return instruction, extra, (gold,)


def _dolly(row, where):
    context = row.get("context", row.get("input", ""))
    if not isinstance(context, str):
        raise DataError(f"{where}: field 'context' should be str, got {type(context).__name__}")
    response_field = "response" if "response" in row or "output" not in row else "output"
    return require(row, "instruction", where), context, (require(row, response_field, where),)


def _xsum(row, where):
    return XSUM_INSTRUCTION, require(row, "document", where), (require(row, "summary", where),)


def _instruct(row, where):
    input_text = row.get("input", "") or ""
    if not isinstance(input_text, str):
        raise DataError(f"{where}: field 'input' should be str, got {type(input_text).__name__}")
    output = require(row, "output", where, (str, list))
    refs = (output,) if isinstance(output, str) else tuple(output)
    if not refs or not all(isinstance(r, str) for r in refs):
        raise DataError(f"{where}: field 'output' must be a string or a non-empty list of strings")
    return require(row, "instruction", where), input_text, refs


def _minillm_task(name, local, description):
    return TaskSpec(name=name, local=local, parse=_instruct, metric="rouge", protocol="minillm",
                    prompt_style="minillm", max_new_tokens=256, max_prompt_tokens=256,
                    rouge_types=("rougeL",), description=description)


TASKS: dict[str, TaskSpec] = {t.name: t for t in [
    TaskSpec("gsm8k", ("gsm8k", "test"), _gsm8k, "gsm8k", "greedy", "alpaca", 256, None,
             hub=("openai/gsm8k", "main", "test"), description="GSM8K test (1319), accuracy"),
    TaskSpec("dolly", ("dolly", "test"), _dolly, "rouge", "greedy", "alpaca", 256, None,
             description="the paper's 800-row Dolly split, ROUGE-1/2/L"),
    TaskSpec("xsum", ("xsum", "test"), _xsum, "rouge", "greedy", "alpaca", 128, 1024,
             hub=("EdinburghNLP/xsum", None, "test"), description="XSum test sample (1000), ROUGE-1/2/L"),
    _minillm_task("dolly_minillm", ("dolly", "minillm_test"), "MiniLLM DollyEval (500), ROUGE-L"),
    _minillm_task("selfinst", ("selfinst", "test"), "Self-Instruct user-oriented (242), ROUGE-L"),
    _minillm_task("vicuna", ("vicuna", "test"), "Vicuna 80 questions, ROUGE-L"),
    _minillm_task("sni", ("sni", "test"), "Super-NaturalInstructions (1694), ROUGE-L, max over refs"),
    _minillm_task("unni", ("unni", "test"), "Unnatural Instructions subset (1050), ROUGE-L"),
]}


def get_task(name: str) -> TaskSpec:
    if name not in TASKS:
        raise KeyError(f"unknown eval task {name!r}; choose from {sorted(TASKS)}")
    return TASKS[name]


def task_file(task: TaskSpec, data_dir: str | Path) -> Path:
    return Path(data_dir) / LOCAL_FILES[task.local]


def load_examples(task: TaskSpec | str, data_dir: str | Path | None = None,
                  path: str | Path | None = None, limit: int | None = None) -> list[Example]:
    """Rows of ``task`` from ``path``, else ``data_dir``'s standard file, else the default data
    dir, else the Hub (only for tasks with a Hub source; never reached offline)."""
    task = get_task(task) if isinstance(task, str) else task
    if limit is not None and limit < 1:
        raise ValueError(f"limit must be >= 1, got {limit}")
    if path is None:
        if data_dir is None:
            from rlkd.paths import default_data_dir

            data_dir = default_data_dir()
        if data_dir is not None:
            path = task_file(task, data_dir)
    if path is not None:
        rows = ((f"{path}:{lineno}", row) for lineno, row in iter_jsonl(path))
    elif task.hub is not None:
        import datasets

        name, config, split = task.hub
        table = datasets.load_dataset(name, config, split=split)
        rows = ((f"hub:{name}[{split}] row {i}", dict(r)) for i, r in enumerate(table))
    else:
        raise DataError(f"task {task.name!r} has no Hub source: give --data-dir or RLKD_DATA_DIR")
    examples = []
    for index, (where, row) in enumerate(rows):
        if limit is not None and index >= limit:
            break
        instruction, input_text, refs = task.parse(row, where)
        prompt = row.get("prompt") if isinstance(row.get("prompt"), str) else None
        examples.append(Example(index, instruction, input_text, refs, where, prompt))
    if not examples:
        raise DataError(f"{path or task.hub}: no rows")
    return examples


def build_prompt(example: Example, style: str, tokenizer=None) -> str:
    if style == "alpaca":
        return alpaca_prompt(example.instruction, example.input)
    if style == "minillm":
        return example.minillm_prompt or alpaca_prompt(example.instruction, example.input) + "\n"
    if style == "chat":
        if tokenizer is None or not getattr(tokenizer, "chat_template", None):
            raise ValueError("prompt style 'chat' needs a tokenizer that has a chat template")
        content = example.instruction + (f"\n\n{example.input}" if example.input else "")
        return tokenizer.apply_chat_template([{"role": "user", "content": content}],
                                             tokenize=False, add_generation_prompt=True)
    raise ValueError(f"unknown prompt style {style!r}; choose from {PROMPT_STYLES}")


def fit_prompt(example: Example, style: str, tokenizer, max_prompt_tokens: int | None) -> tuple[str, bool]:
    """The prompt of ``example``, with its input (e.g. an XSum article) cut at the end until the
    whole prompt fits ``max_prompt_tokens``; the instruction and the response cue are kept.

    Returns ``(prompt, input_was_cut)``. A prompt that is too long even with an empty input is
    returned whole; generation then keeps its last ``max_prompt_tokens`` tokens.
    """
    prompt = build_prompt(example, style, tokenizer)
    if max_prompt_tokens is None or not example.input:
        return prompt, False
    overflow = len(tokenizer(prompt)["input_ids"]) - max_prompt_tokens
    if overflow <= 0:
        return prompt, False
    input_ids = tokenizer(example.input, add_special_tokens=False)["input_ids"]
    keep = len(input_ids) - overflow
    while keep > 0:
        shorter = replace(example, input=tokenizer.decode(input_ids[:keep]).rstrip(),
                          minillm_prompt=None)
        prompt = build_prompt(shorter, style, tokenizer)
        excess = len(tokenizer(prompt)["input_ids"]) - max_prompt_tokens
        if excess <= 0:
            return prompt, True
        keep -= max(excess, 1)  # decoding and re-encoding can merge or split a few tokens
    return build_prompt(example, style, tokenizer), False


def examples_sha256(examples: list[Example]) -> str:
    """Hash of exactly the rows evaluated (content, not file bytes), so --limit runs differ."""
    digest = hashlib.sha256()
    for ex in examples:
        digest.update(json.dumps([ex.index, ex.instruction, ex.input, list(ex.references),
                                  ex.minillm_prompt], ensure_ascii=False).encode())
        digest.update(b"\n")
    return digest.hexdigest()
