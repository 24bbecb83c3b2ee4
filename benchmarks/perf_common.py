"""Measuring helpers shared by the benchmarks (fused_perf.py, peer_perf.py): the time and peak memory
of one step, and steps of several implementations alternating in rounds.

Peak memory on the CPU is the growth of the process' resident-set high-water mark (VmHWM, reset
through /proc/self/clear_refs) over the resident set before the step: it counts everything the step
allocates, gradients included, provided the allocator holds no freed memory from an earlier step.
Two ways to ensure that: run the process with ``MALLOC_MMAP_THRESHOLD_=1048576`` (``WORKER_ENV``:
every buffer over 1 MiB is mapped afresh and returned on free, so every step also pays a page fault
per 4 KiB it touches), or keep glibc's default malloc and trim its heap before each step
(``trim=True``: buffers up to 32 MiB are then reused within a step, as in any process, and only the
first use in a step faults). On CUDA it is the allocator's high-water mark over what is allocated
before the step.
"""

from __future__ import annotations

import ctypes
import ctypes.util
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


def release_free_heap() -> bool:
    """glibc's ``malloc_trim(0)``: hand the heap's free memory back to the kernel, so that the next
    step's peak RSS growth counts all it allocates (memory the heap kept from an earlier step would
    hide that much of it). False where there is no glibc."""
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        return bool(libc.malloc_trim(0))
    except (OSError, AttributeError):
        return False


def timed_step(step: Callable[[], object], cuda: bool = False, trim: bool = False) -> tuple[float, int, object]:
    """``(seconds, peak bytes over the memory in use before, step's return value)`` of one call.
    ``trim``: release the heap's free memory first (:func:`release_free_heap`; for processes run
    with glibc's default malloc rather than ``WORKER_ENV``)."""
    if trim and not cuda:
        release_free_heap()
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
                       after_step: Callable[[], None] | None = None, rotate: bool = True, trim: bool = False,
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
            elapsed, peak, value = timed_step(steps[name], cuda, trim)
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
