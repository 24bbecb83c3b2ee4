"""Task loaders: rows from a local JSONL file (or the Hub) turned into prompt/response pairs or text.

Local files follow the layout of `../shared/data` (see its README); `path` in the data config
points at any other file with the same fields.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable, Iterator

from rlkd.data.jsonl import DataError, iter_jsonl, require
from rlkd.data.templates import XSUM_INSTRUCTION, alpaca_prompt, split_gsm8k_query

SFT_TASKS = ("gsm8k", "dolly", "xsum", "selfinst", "vicuna", "sni", "unni")
TASKS = SFT_TASKS + ("pretrain", "tokenized")

LOCAL_FILES: dict[tuple[str, str], str] = {
    ("gsm8k", "train"): "gsm8k/train.jsonl",
    ("gsm8k", "test"): "gsm8k/test.jsonl",
    ("dolly", "train"): "dolly/minillm_train.jsonl",
    ("dolly", "test"): "dolly/rlkd_dolly_test.jsonl",
    ("dolly", "minillm_dev"): "dolly/minillm_dev.jsonl",
    ("dolly", "minillm_test"): "dolly/minillm_test.jsonl",
    ("xsum", "test"): "xsum/test_1000.jsonl",
    ("xsum", "validation"): "xsum/validation_979.jsonl",
    ("selfinst", "test"): "instruct_eval/selfinst.jsonl",
    ("vicuna", "test"): "instruct_eval/vicuna.jsonl",
    ("sni", "test"): "instruct_eval/sni.jsonl",
    ("unni", "test"): "instruct_eval/unni.jsonl",
    ("pretrain", "train"): "pretrain/slimpajama_rlkd_demo.jsonl",
}

# (dataset name, config) on the Hugging Face Hub, for users with network access.
HUB_DATASETS: dict[str, tuple[str, str | None]] = {
    "gsm8k": ("openai/gsm8k", "main"),
    "dolly": ("databricks/databricks-dolly-15k", None),
    "xsum": ("EdinburghNLP/xsum", None),
    "pretrain": ("DKYoon/SlimPajama-6B", None),
}


@dataclass(frozen=True)
class PromptResponse:
    prompt: str
    response: str
    where: str  # file:line, for error messages further down the pipeline


@dataclass(frozen=True)
class TokenRow:
    input_ids: list[int]
    loss_mask: list[bool]  # over tokens: True where the token is a training target
    where: str


def resolve_local_file(task: str, split: str, data_dir: Path) -> Path:
    key = (task, split)
    if key not in LOCAL_FILES:
        known = sorted(s for t, s in LOCAL_FILES if t == task)
        raise DataError(f"no local file for task {task!r} split {split!r}; known splits: {known} "
                        "(or set data.path to a JSONL file)")
    return Path(data_dir) / LOCAL_FILES[key]


def _hub_rows(task: str, split: str) -> Iterator[tuple[str, dict[str, Any]]]:
    if task not in HUB_DATASETS:
        raise DataError(f"task {task!r} has no Hub dataset; give data.data_dir or data.path")
    import datasets  # imported here: only real Hub users pay for it

    name, config = HUB_DATASETS[task]
    table = datasets.load_dataset(name, config, split=split)
    for index, row in enumerate(table):
        yield f"hub:{name}[{split}] row {index}", dict(row)


def _file_rows(path: Path) -> Iterator[tuple[str, dict[str, Any]]]:
    for lineno, row in iter_jsonl(path):
        yield f"{path}:{lineno}", row


def _first_present(row: dict[str, Any], names: tuple[str, ...], where: str) -> str:
    for name in names:
        if name in row:
            return name
    raise DataError(f"{where}: missing field {names[0]!r} (or {', '.join(map(repr, names[1:]))}); "
                    f"fields present: {sorted(row)}")


def response_field(task: str, row: dict[str, Any], where: str = "row") -> str:
    """The field of a task's row that holds the reference response."""
    if task == "gsm8k":
        return "response" if "query" in row and "question" not in row else "answer"
    if task == "xsum":
        return "summary"
    if task == "dolly":
        return _first_present(row, ("response", "output"), where)
    return "output"


def _prompt_response(task: str, row: dict[str, Any], where: str) -> PromptResponse:
    if task == "gsm8k":
        if "query" in row and "question" not in row:  # the official repo's renamed copy
            instruction, extra = split_gsm8k_query(require(row, "query", where))
        else:
            instruction, extra = split_gsm8k_query(require(row, "question", where))
        return PromptResponse(alpaca_prompt(instruction, extra), require(row, response_field(task, row), where), where)
    if task == "xsum":
        document = require(row, "document", where)
        return PromptResponse(alpaca_prompt(XSUM_INSTRUCTION, document), require(row, "summary", where), where)
    if task == "dolly":
        context = row.get(_first_present(row, ("context", "input"), where))
        if not isinstance(context, str):
            raise DataError(f"{where}: field 'context'/'input' should be str, got {type(context).__name__}")
        response = require(row, response_field(task, row, where), where)
        return PromptResponse(alpaca_prompt(require(row, "instruction", where), context), response, where)
    # Instruction-following sets: instruction, optional input, output (S-NI: a list of references).
    instruction = require(row, "instruction", where)
    input_text = row.get("input", "") or ""
    output = require(row, response_field(task, row, where), where, (str, list))
    if isinstance(output, list):
        if not output or not isinstance(output[0], str):
            raise DataError(f"{where}: field 'output' is an empty list or not a list of str")
        output = output[0]
    return PromptResponse(alpaca_prompt(instruction, input_text), output, where)


def _token_row(row: dict[str, Any], where: str) -> TokenRow:
    ids = require(row, "input_ids", where, list)
    mask = require(row, "loss_mask", where, list)
    if len(ids) != len(mask):
        raise DataError(f"{where}: input_ids has {len(ids)} entries but loss_mask has {len(mask)}")
    if not all(isinstance(i, int) and i >= 0 for i in ids):
        raise DataError(f"{where}: input_ids must be non-negative integers")
    return TokenRow([int(i) for i in ids], [bool(m) for m in mask], where)


def load_rows(task: str, split: str, *, path: str | Path | None = None, data_dir: str | Path | None = None,
              source: str = "auto", exclude_eval_overlap: bool = True,
              limit: int | None = None, skip: int = 0) -> list[PromptResponse] | list[str] | list[TokenRow]:
    """Load one split of a task.

    Returns PromptResponse items for SFT tasks, document strings for `pretrain`, TokenRow items for
    `tokenized`. `exclude_eval_overlap` drops Dolly training rows flagged `in_rlkd_dolly_test`.
    `skip` source rows are passed over before up to `limit` rows are read.
    """
    if task not in TASKS:
        raise DataError(f"unknown task {task!r}; choose from {list(TASKS)}")
    rows: Iterable[tuple[str, dict[str, Any]]]
    if path is not None:
        rows = _file_rows(Path(path))
    elif source == "hub":
        rows = _hub_rows(task, split)
    else:
        if data_dir is None:
            from rlkd.paths import default_data_dir

            data_dir = default_data_dir()
        if data_dir is not None:
            rows = _file_rows(resolve_local_file(task, split, Path(data_dir)))
        elif source == "auto":
            rows = _hub_rows(task, split)
        else:
            raise DataError("data.source is 'local' but no data dir was found (set --data-dir or RLKD_DATA_DIR)")

    overlap = _OverlapFilter(data_dir) if task == "dolly" and split == "train" and exclude_eval_overlap else None
    out: list = []
    for index, (where, row) in enumerate(rows):
        if index < skip:
            continue
        if limit is not None and len(out) >= limit:
            break
        if task == "tokenized":
            out.append(_token_row(row, where))
        elif task == "pretrain":
            out.append(require(row, "text", where))
        else:
            item = _prompt_response(task, row, where)
            if overlap is not None and overlap.excluded(row, where):
                continue
            out.append(item)
    return out


class _OverlapFilter:
    """Drops Dolly training rows that are in RLKD's test split: by the file's `in_rlkd_dolly_test`
    flag when present, else by matching against the local test file (see rlkd.data.dolly_overlap)."""

    def __init__(self, data_dir):
        self.data_dir = data_dir
        self._matcher = None

    def excluded(self, row: dict[str, Any], where: str) -> bool:
        flag = row.get("in_rlkd_dolly_test")
        if isinstance(flag, bool):
            return flag
        if self._matcher is None:
            from rlkd.data.dolly_overlap import TEST_FILE, DollyTestOverlap
            from rlkd.paths import default_data_dir

            base = self.data_dir or default_data_dir()
            test_file = Path(base) / TEST_FILE if base is not None else None
            if test_file is None or not test_file.is_file():
                raise DataError(f"{where}: row has no 'in_rlkd_dolly_test' flag and the RLKD Dolly test split "
                                f"({TEST_FILE}) is not in the data dir to match against; set "
                                "data.exclude_eval_overlap=false to train on every row")
            self._matcher = DollyTestOverlap.from_file(test_file)
        context = row.get("context", row.get("input", "")) or ""
        response = row.get("response", row.get("output", "")) or ""
        return self._matcher.contains(row["instruction"], context, response)
