"""Disk size of a teacher cache (rlkd.teacher_cache) for `rlkd plan`: exact (every logit, float32)
and top-K (rlkd.teacher_topk_cache: K ids, K log-probabilities, one float32 tail log-mass).

Sizes are per cached position; a run caches one row per token of each distinct training sequence,
which is at most samples x seq_len (sequences are usually shorter: that product is an upper bound).
"""

from __future__ import annotations

from rlkd.plan.memory import GIB
from rlkd.teacher_topk_cache import topk_bytes_per_position

DEFAULT_TOP_KS = (8, 32, 128)
MILLION = 1_000_000


def cache_size_lines(vocab: int, top_ks: tuple[int, ...], value_dtype: str, seq_len: int,
                     samples: int | None = None) -> list[str]:
    """The table `rlkd plan` prints under a teacher/student pair."""
    bound = f"   <= {samples} x {seq_len} positions" if samples else ""
    lines = [f"   teacher cache (vocab {vocab})        bytes/position   GiB per 1M positions{bound}"]
    rows = [("exact, float32 logits", 4 * vocab)]
    rows += [(f"top-{k}, {value_dtype} log-probs + tail", topk_bytes_per_position(vocab, k, value_dtype)) for k in top_ks]
    for label, size in rows:
        line = f"   {label:<35} {size:>14,}   {size * MILLION / GIB:>20.2f}"
        if samples:
            line += f"   {_human(size * samples * seq_len):>14}"
        lines.append(line)
    return lines


def _human(n_bytes: float) -> str:
    """GiB from one GiB up, MiB below (a top-K cache of a small preset is a few MiB, not "0.0 GiB")."""
    return f"{n_bytes / GIB:.1f} GiB" if n_bytes >= GIB else f"{n_bytes / 2**20:.1f} MiB"
