"""Evaluation: downstream tasks (GSM8K, Dolly, XSum, MiniLLM's instruction sets), the paper's
distribution-alignment metrics (CR, OR/MOR, top-1 agreement, perplexity) and an lm-eval bridge.

    from rlkd.eval import evaluate_task, compare_models
    metrics = evaluate_task("runs/kl_r/export", "gsm8k", out_dir="results/eval/kl_r")
"""

from .alignment import (AlignmentAccumulator, AlignmentResult, alignment_from_logits, compare_many,
                        compare_models, make_token_slices, position_agreement)
from .generate import (MINILLM_SEEDS, CheckpointNotFoundError, DecodingConfig, Generation,
                       generate_distributed, generate_texts, greedy, load_checkpoint,
                       merge_shards, minillm_sampling, shard_indices)
from .gsm8k import extract_answer, gold_answer, is_correct, score_gsm8k
from .rouge import corpus_rouge, rouge_example
from .runner import RunMismatchError, evaluate_task, score_predictions
from .tasks import PROMPT_STYLES, TASKS, build_prompt, get_task, load_examples

__all__ = [
    "AlignmentAccumulator", "AlignmentResult", "alignment_from_logits", "compare_many", "compare_models",
    "make_token_slices", "position_agreement", "MINILLM_SEEDS", "CheckpointNotFoundError",
    "DecodingConfig", "Generation", "generate_distributed", "generate_texts", "greedy",
    "load_checkpoint", "merge_shards", "minillm_sampling", "shard_indices", "extract_answer",
    "gold_answer", "is_correct", "score_gsm8k", "corpus_rouge", "rouge_example",
    "RunMismatchError", "evaluate_task", "score_predictions", "PROMPT_STYLES", "TASKS",
    "build_prompt", "get_task", "load_examples", "run_lm_eval",
]


def run_lm_eval(*args, **kwargs):
    """See :func:`rlkd.eval.lm_eval_bridge.run_lm_eval` (imported on use: lm-eval is heavy)."""
    from .lm_eval_bridge import run_lm_eval as _run

    return _run(*args, **kwargs)
