"""Task data: loaders, Alpaca prompts, response masks, packing and resumable batches."""

from rlkd.data.encode import IGNORE_INDEX, Encoded, encode_prompt_response, encode_token_row, logit_mask, pack_documents
from rlkd.data.jsonl import DataError, iter_jsonl
from rlkd.data.loader import Batch, ResumableBatches, collate
from rlkd.data.tasks import SFT_TASKS, TASKS, PromptResponse, TokenRow, load_rows

__all__ = ["IGNORE_INDEX", "Encoded", "encode_prompt_response", "encode_token_row", "logit_mask", "pack_documents",
           "DataError", "iter_jsonl", "Batch", "ResumableBatches", "collate", "SFT_TASKS", "TASKS",
           "PromptResponse", "TokenRow", "load_rows", "build_samples"]


def build_samples(data_cfg, tokenizer) -> list[Encoded]:
    """Load and encode the rows named by a `DataConfig` (see rlkd.config)."""
    counts: dict = {}
    rows = load_rows(data_cfg.task, data_cfg.split, path=data_cfg.path, data_dir=data_cfg.data_dir,
                     source=data_cfg.source, exclude_eval_overlap=data_cfg.exclude_eval_overlap,
                     limit=data_cfg.limit, skip=data_cfg.skip, counts=counts)
    if not rows:
        raise DataError(_no_rows_message(data_cfg, counts))
    convention = data_cfg.mask_convention
    if data_cfg.task == "tokenized":
        encoded = [encode_token_row(r, data_cfg.max_length, convention) for r in rows]
    else:
        if tokenizer is None:
            raise DataError(f"task {data_cfg.task!r} needs a tokenizer (models.tokenizer)")
        if data_cfg.task == "pretrain":
            blocks = pack_documents(rows, tokenizer, data_cfg.max_length, convention, data_cfg.max_document_tokens)
            if not blocks:
                raise DataError(f"{counts['source']}: the {len(rows)} documents read hold fewer tokens than one "
                                f"packed sequence of data.max_length={data_cfg.max_length}")
            return blocks[: data_cfg.max_samples]
        encoded = [encode_prompt_response(r, tokenizer, data_cfg.max_length, convention) for r in rows]
    kept = [e for e in encoded if e is not None]
    if not kept:
        raise DataError(f"{counts['source']} (task {data_cfg.task!r}): none of the {len(rows)} rows read has a "
                        f"response token within data.max_length={data_cfg.max_length}")
    return kept[: data_cfg.max_samples]


def _no_rows_message(data_cfg, counts: dict) -> str:
    source, seen, skip = counts.get("source", "the data source"), counts.get("seen", 0), data_cfg.skip
    if seen == 0:
        return f"{source}: 0 rows read (task {data_cfg.task!r}): the data file is empty"
    if seen <= skip:
        return f"{source}: 0 rows read: it has {seen} rows and data.skip={skip} passes over all of them"
    return (f"{source}: 0 rows left of the {seen - skip} read: all are in RLKD's Dolly test split "
            "(data.exclude_eval_overlap)")
