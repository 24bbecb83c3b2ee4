"""``loss.compile``: the per-chunk element-wise maths of the built-in objectives and the ranking term
run through ``torch.compile``, with an eager fallback.

What is compiled: each built-in objective's function (softmaxes, logs, the divergence and its
backward, fused by the compiler into a few passes over the chunk instead of one kernel per
operation) and the ranking term's score-to-loss function (``rank_loss_from_scores``: soft ranks and
correlation). What stays eager: the chunk loop, top-k and gathers, the weighted sum of the terms
(on [rows] vectors) and plug-in objectives (whose code rlkd does not know to be compilable).

Shapes are kept stable so that a run compiles once per objective: the caller pads a chunk's rows
to the chunk size (``pad_rows`` of ``DistillLoss.chunk_loss_and_grad``; the padded rows are
zeros, label 0, and are cut off before anything is summed), and the ranking term, whose row count
is the batch's, is compiled with a dynamic row dimension.

A compile that fails (no C++ compiler or Triton, an unsupported operation) prints one line and
that function runs eagerly from then on; the result is the eager one.
"""

from __future__ import annotations

import functools
import sys
from typing import Callable

import torch

COMPILE_SETTINGS = ("auto", "true", "false")

_failed: set[Callable] = set()


def compile_wanted(setting: str | bool, device_type: str) -> bool:
    """Whether ``loss.compile`` asks for compiled maths on ``device_type``: ``auto`` compiles on CUDA
    only (on the CPU a compile costs tens of seconds per shape on a few cores, more than short CPU
    runs gain, and eager keeps CPU results bit-identical to the committed tables)."""
    setting = str(setting).lower()
    if setting == "auto":
        return device_type == "cuda"
    return setting == "true"


@functools.lru_cache(maxsize=None)
def compiled(fn: Callable, dynamic: bool = False) -> Callable:
    """``torch.compile(fn)``, one per function (the compiled code is cached by the function's code:
    a new shape, dtype or hyperparameter value compiles once more)."""
    return torch.compile(fn, dynamic=dynamic)


def usable(fn: Callable) -> bool:
    """False once compiling ``fn`` has failed in this process."""
    return fn not in _failed


def give_up(fns: list[Callable], exc: BaseException) -> None:
    """Record that ``fns`` could not be compiled, with one printed line; they run eagerly from now on."""
    new = [fn for fn in fns if fn not in _failed]
    if new:
        _failed.update(new)
        first = (str(exc).strip().splitlines() or [""])[0][:200]
        names = ", ".join(getattr(fn, "__qualname__", str(fn)) for fn in new)
        print(f"rlkd: loss.compile: torch.compile failed ({type(exc).__name__}: {first}); running {names} "
              "eagerly", file=sys.stderr, flush=True)


def pad_rows(x: torch.Tensor | None, rows: int) -> torch.Tensor | None:
    """``x`` [r, ...] padded with zero rows to ``rows`` rows (unchanged when it has them already)."""
    if x is None or x.shape[0] >= rows:
        return x
    return torch.cat([x, x.new_zeros((rows - x.shape[0], *x.shape[1:]))])
