"""Measuring helpers shared by the benchmarks (fused_perf.py, peer_perf.py): the time and peak memory
of one step, and steps of several implementations alternating in rounds.

Peak memory on the CPU is the growth of the process' resident-set high-water mark (VmHWM, reset
through /proc/self/clear_refs) over the resident set before the step: it counts everything the step
allocates, gradients included. Run the process with ``MALLOC_MMAP_THRESHOLD_=1048576`` (see
``WORKER_ENV``) so that large frees go back to the OS at once and one step's peak is not hidden by
memory the allocator kept from an earlier one. On CUDA it is the allocator's high-water mark over
what is allocated before the step.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Callable

import torch

WORKER_ENV = {"MALLOC_MMAP_THRESHOLD_": "1048576"}


def rss_kib(field: str) -> int:
    """A field of /proc/self/status in KiB (VmRSS, VmHWM)."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise RuntimeError(field)


def timed_step(step: Callable[[], object], cuda: bool = False) -> tuple[float, int, object]:
    """``(seconds, peak bytes over the memory in use before, step's return value)`` of one call."""
    if cuda:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
    else:
        Path("/proc/self/clear_refs").write_text("5")
        base = rss_kib("VmRSS") * 1024
    start = time.perf_counter()
    value = step()
    if cuda:
        torch.cuda.synchronize()
    elapsed = time.perf_counter() - start
    peak = (torch.cuda.max_memory_allocated() if cuda else rss_kib("VmHWM") * 1024) - base
    return elapsed, peak, value


def alternating_rounds(steps: dict[str, Callable[[], object]], rounds: int, *, cuda: bool = False,
                       after_step: Callable[[], None] | None = None, rotate: bool = True,
                       progress: Callable[[str, float], None] | None = None) -> dict[str, dict]:
    """Run every step once per round, in turn, for ``rounds`` rounds; load on the machine then hits
    every implementation alike. With ``rotate`` each round starts one implementation later, so none is
    always first (after a cold cache) or last. ``after_step`` runs after each step, untimed (e.g. to
    drop gradients). Returns per name ``times_s``, ``peaks_bytes``, ``values`` (one per round),
    ``time_s`` (the minimum) and ``peak_bytes`` (the maximum)."""
    names = list(steps)
    results = {name: {"times_s": [], "peaks_bytes": [], "values": []} for name in names}
    for r in range(rounds):
        shift = r % len(names) if rotate and names else 0
        for name in names[shift:] + names[:shift]:
            elapsed, peak, value = timed_step(steps[name], cuda)
            if after_step is not None:
                after_step()
            entry = results[name]
            entry["times_s"].append(elapsed)
            entry["peaks_bytes"].append(peak)
            entry["values"].append(value)
            if progress is not None:
                progress(name, elapsed)
    for entry in results.values():
        entry["time_s"] = min(entry["times_s"]) if entry["times_s"] else None
        entry["peak_bytes"] = max(entry["peaks_bytes"]) if entry["peaks_bytes"] else None
    return results
