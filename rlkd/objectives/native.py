"""The compiled top-k of the ranking term (``native/topk_pair.cpp``), built at first use.

``topk_pair(student, teacher, k)`` gives, for fp32 CPU rows, what the ranking term needs from a
chunk - the union of the two top-k sets, its validity, the overlap and both models' logits there -
in one pass over each row. It returns None wherever the kernel does not apply (CUDA, other
dtypes, k > its limit) or could not be built; the caller then uses the tensor-op path
(``ranking.union_ids_for``), which gives the same ids up to ties.

Building: one ``c++ -O3 -march=native -shared`` of a file without torch headers (about a second),
into ``$RLKD_NATIVE_CACHE`` (default ``~/.cache/rlkd/native``), named by a hash of the source, the
compiler and this CPU's flags, so a home shared by nodes with different CPUs keeps one build per
kind; written under a temporary name and renamed, so concurrent ranks never load a partial file.
``RLKD_NATIVE=0`` turns the kernel off. ctypes releases the GIL during the call.
"""

from __future__ import annotations

import contextlib
import ctypes
import functools
import hashlib
import os
import platform
import shutil
import subprocess
import tempfile
import warnings
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import torch

SOURCE = Path(__file__).with_name("native") / "topk_pair.cpp"
FLAGS = ("-O3", "-march=native", "-shared", "-fPIC", "-std=c++17")
GROUP = 256  # the kernel's group width: its scratch holds one float per group
_enabled = True


def _cpu_signature() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith(("flags", "Features")):
                return line
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _cache_dir() -> Path:
    return Path(os.environ.get("RLKD_NATIVE_CACHE") or Path.home() / ".cache" / "rlkd" / "native")


def _compiler() -> str | None:
    return os.environ.get("CXX") or shutil.which("c++") or shutil.which("g++") or shutil.which("clang++")


def build(cache_dir: Path | None = None) -> Path:
    """The shared library for this source, compiler and CPU, compiling it if needed."""
    cxx = _compiler()
    if cxx is None:
        raise RuntimeError("no C++ compiler found (set CXX)")
    version = subprocess.run([cxx, "--version"], capture_output=True, text=True, check=True).stdout
    key = hashlib.sha256("\0".join([SOURCE.read_text(), cxx, version, " ".join(FLAGS),
                                    _cpu_signature()]).encode()).hexdigest()[:16]
    cache_dir = cache_dir or _cache_dir()
    target = cache_dir / f"topk_pair-{key}.so"
    if target.exists():
        return target
    cache_dir.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=cache_dir, suffix=".so.tmp")
    os.close(fd)
    try:
        done = subprocess.run([cxx, *FLAGS, str(SOURCE), "-o", tmp], capture_output=True, text=True)
        if done.returncode:
            raise RuntimeError(f"{cxx} failed on {SOURCE.name}:\n{done.stderr.strip()}")
        os.replace(tmp, target)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return target


@functools.lru_cache(maxsize=1)
def _library():
    if os.environ.get("RLKD_NATIVE", "1") == "0":
        return None
    try:
        lib = ctypes.CDLL(str(build()))
    except Exception as error:  # no compiler, read-only home, ...: the tensor-op path still works
        warnings.warn(f"rlkd: the compiled top-k is unavailable ({error}); using tensor ops", stacklevel=3)
        return None
    lib.rlkd_topk_max_k.restype = ctypes.c_int64
    i64, ptr = ctypes.c_int64, ctypes.c_void_p
    lib.rlkd_topk_pair_f32.argtypes = [ptr, i64, ptr, i64, i64, i64, i64, ptr, ptr, ptr, ptr, ptr, ptr]
    lib.rlkd_topk_pair_f32.restype = None
    return lib


def available() -> bool:
    return _library() is not None


@contextlib.contextmanager
def disabled():
    """Use the tensor-op path inside the block (parity tests, the cost benchmark)."""
    global _enabled
    before, _enabled = _enabled, False
    try:
        yield
    finally:
        _enabled = before


def topk_pair(student: torch.Tensor, teacher: torch.Tensor, k: int, out: tuple | None = None):
    """``(ids, valid, overlap, student_at, teacher_at)`` for [R, V] rows, or None where the kernel
    does not apply. ids [R, 2k]: the teacher's top-k, then the student's (unordered within each);
    valid [R, 2k] is False where a student id repeats a teacher id; overlap [R] counts those;
    ``student_at``/``teacher_at`` [R, 2k] are the inputs' values at ids. No gradient. ``out``:
    contiguous tensors of those shapes and dtypes to write into (returned), else new ones."""
    if not (student.device.type == teacher.device.type == "cpu"
            and student.dtype == teacher.dtype == torch.float32 and student.dim() == teacher.dim() == 2
            and student.shape == teacher.shape and student.stride(-1) == teacher.stride(-1) == 1
            and student.shape[0] > 0 and _enabled):
        return None
    lib = _library()
    if lib is None or k > lib.rlkd_topk_max_k():
        return None
    rows, vocab = student.shape
    if out is None:
        out = (torch.empty(rows, 2 * k, dtype=torch.int64), torch.empty(rows, 2 * k, dtype=torch.bool),
               torch.empty(rows, dtype=torch.int64), torch.empty(rows, 2 * k), torch.empty(rows, 2 * k))
    ids, valid, overlap, s_at, t_at = out
    expected = ((rows, 2 * k, torch.int64), (rows, 2 * k, torch.bool), (rows, torch.int64), (rows, 2 * k, torch.float32),
                (rows, 2 * k, torch.float32))
    for tensor, (*shape, dtype) in zip(out, expected):
        if tuple(tensor.shape) != tuple(shape) or tensor.dtype != dtype or not tensor.is_contiguous() \
                or tensor.device.type != "cpu":
            raise ValueError(f"topk_pair: an output is {tuple(tensor.shape)} {tensor.dtype}, expected "
                             f"{tuple(shape)} {dtype}, contiguous, on the CPU")
    n_groups = (vocab + GROUP - 1) // GROUP

    def run(first: int, count: int) -> None:
        scratch = torch.empty(n_groups)
        lib.rlkd_topk_pair_f32(student.data_ptr() + 4 * first * student.stride(0), student.stride(0),
                               teacher.data_ptr() + 4 * first * teacher.stride(0), teacher.stride(0), count, vocab,
                               k, ids.data_ptr() + 8 * first * 2 * k, valid.data_ptr() + first * 2 * k,
                               s_at.data_ptr() + 4 * first * 2 * k, t_at.data_ptr() + 4 * first * 2 * k,
                               overlap.data_ptr() + 8 * first, scratch.data_ptr())

    # As many threads as torch uses (ctypes drops the GIL), where each gets enough rows to pay.
    workers = min(torch.get_num_threads(), rows // MIN_ROWS_PER_THREAD)
    if workers <= 1:
        run(0, rows)
    else:
        bounds = [rows * i // workers for i in range(workers + 1)]
        list(_pool(workers).map(run, bounds[:-1], [b - a for a, b in zip(bounds, bounds[1:])]))
    return ids, valid, overlap, s_at, t_at


MIN_ROWS_PER_THREAD = 8


@functools.lru_cache(maxsize=None)
def _pool(workers: int) -> ThreadPoolExecutor:
    return ThreadPoolExecutor(workers, thread_name_prefix="rlkd-topk")
