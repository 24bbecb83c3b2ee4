"""Atomic result files and what a result was made from (code version, packages, file hashes).

Every stage (training manifests, evaluation outputs, benchmark cells) writes through these, so a
kill at any instant leaves either the old file or the new one, never a torn one.
"""

from __future__ import annotations

import datetime as _dt
import fcntl
import hashlib
import json
import os
import platform
import shlex
import subprocess
import sys
import tempfile
from contextlib import contextmanager
from importlib import metadata
from pathlib import Path
from typing import Any, Iterator

from rlkd.paths import REPO_ROOT

PACKAGES = ("rlkd", "torch", "deepspeed", "transformers", "tokenizers", "datasets", "lm-eval", "rouge-score",
            "rouge", "pydantic", "numpy", "torchsort")


def atomic_write_text(path: str | Path, text: str) -> None:
    """Write via a temporary file in the same directory, fsync it, and ``os.replace`` it into place."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        os.chmod(tmp, 0o666 & ~_umask())  # mkstemp makes 0600; results should read like any file
        with os.fdopen(fd, "w", encoding="utf-8") as handle:
            handle.write(text)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def atomic_write_json(path: str | Path, obj: Any, *, sort_keys: bool = False) -> None:
    atomic_write_text(path, json.dumps(obj, indent=2, ensure_ascii=False, sort_keys=sort_keys, default=str) + "\n")


def atomic_write_jsonl(path: str | Path, rows: list[dict]) -> None:
    atomic_write_text(path, "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows))


def file_sha256(path: str | Path, block: int = 1 << 22) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        while chunk := handle.read(block):
            digest.update(chunk)
    return digest.hexdigest()


_CHECKPOINT_SUFFIXES = (".json", ".safetensors", ".bin", ".model", ".txt", ".jinja", ".py")


def checkpoint_fingerprint(checkpoint: str | Path, full: bool = True) -> dict[str, Any]:
    """Identity of a checkpoint directory.

    ``full``: sha256 over (relative name, sha256) of every config, weight and tokenizer file.
    Otherwise a cheaper fingerprint over names, sizes and modification times (labelled so).
    A Hub id that is not a local directory is recorded by name only.
    """
    path = Path(checkpoint)
    if not path.is_dir():
        return {"checkpoint": str(checkpoint), "hash_mode": "hub-id", "sha256": None}
    files = sorted(p for p in path.rglob("*") if p.is_file() and p.suffix in _CHECKPOINT_SUFFIXES)
    digest = hashlib.sha256()
    for f in files:
        rel = f.relative_to(path).as_posix()
        stat = f.stat()
        token = file_sha256(f) if full else f"{stat.st_size}:{stat.st_mtime_ns}"
        digest.update(f"{rel}\0{token}\n".encode())
    return {"checkpoint": str(path.resolve()), "hash_mode": "content" if full else "size-mtime",
            "sha256": digest.hexdigest(), "n_files": len(files)}


def package_versions(packages: tuple[str, ...] = PACKAGES) -> dict[str, str | None]:
    versions: dict[str, str | None] = {"python": platform.python_version()}
    for name in packages:
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            versions[name] = None
    return versions


def git_sha() -> str | None:
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], cwd=REPO_ROOT, capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.TimeoutExpired):
        return None
    return (out.stdout.strip() or None) if out.returncode == 0 else None


@contextmanager
def removable_lock(lock_path: Path, wait: bool = False) -> Iterator[bool]:
    """An exclusive lock on ``lock_path`` (a bench cell, a stage, a cache being built), yielding
    whether it was taken (``wait=False``: False at once if another process holds it). Its file is
    removed on release, so a finished run leaves no lock files; whoever locked a file that was
    removed meanwhile (its inode is no longer at the path) locks again, so two processes never
    both hold it."""
    while True:
        lock_path.parent.mkdir(parents=True, exist_ok=True)
        try:
            handle = open(lock_path, "a")
        except FileNotFoundError:  # another process removed the (empty) folder just now
            continue
        with handle:
            try:
                fcntl.flock(handle, fcntl.LOCK_EX | (0 if wait else fcntl.LOCK_NB))
            except BlockingIOError:
                yield False
                return
            try:
                current = os.stat(lock_path)
            except FileNotFoundError:
                current = None
            if current is None or current.st_ino != os.fstat(handle.fileno()).st_ino:
                fcntl.flock(handle, fcntl.LOCK_UN)
                continue  # the holder removed this file as it let go: lock the path's current file
            try:
                yield True
            finally:
                try:
                    lock_path.unlink()  # while still holding it: see above
                except OSError:
                    pass
                fcntl.flock(handle, fcntl.LOCK_UN)
            return


@contextmanager
def file_lock(path: str | Path) -> Iterator[None]:
    """Hold an exclusive lock on ``path`` (blocking): one process prepares a shared file or folder,
    the others wait, then find it made. The lock file is removed on release."""
    with removable_lock(Path(path), wait=True):
        yield


def git_state() -> dict[str, Any]:
    """The code that is running: HEAD's sha and whether tracked files outside ``results/`` differ
    from it (``dirty``): a benchmark re-renders the committed tables under ``results/`` while it
    runs, which changes no code. ``{"sha": None, "dirty": None}`` outside a git checkout (an
    installed wheel)."""
    sha = git_sha()
    if sha is None:
        return {"sha": None, "dirty": None}
    try:
        out = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no", "--", ".", ":(exclude)results"],
                             cwd=REPO_ROOT, capture_output=True, text=True, timeout=20)
    except (OSError, subprocess.TimeoutExpired):
        return {"sha": sha, "dirty": None}
    return {"sha": sha, "dirty": bool(out.stdout.strip()) if out.returncode == 0 else None}


def load_average() -> str:
    """The 1-, 5- and 15-minute load averages, e.g. ``"0.71 1.09 1.15"``: how busy the machine was
    around a timing, which every benchmark report states (a shared machine's timings swing 3x)."""
    try:
        return " ".join(f"{x:.2f}" for x in os.getloadavg())
    except OSError:
        return "unknown"


# Environment variables that pick the instruction set of torch's and its math libraries' CPU
# kernels. Set to AVX2 on an AVX-512 machine, they reproduce an AVX2 machine's fp32 bits (the
# healed student's export, for one: results/healed_student/heal.json), so a record must name them.
KERNEL_ISA_VARIABLES = ("ATEN_CPU_CAPABILITY", "MKL_ENABLE_INSTRUCTIONS", "MKL_CBWR", "ONEDNN_MAX_CPU_ISA")


def cpu_identity() -> dict[str, Any]:
    """The CPU's model name, the instruction set torch dispatches its CPU kernels to (``AVX2``,
    ``AVX512``, ...) and, where any is set, the variables of ``KERNEL_ISA_VARIABLES``. fp32 results
    on the CPU are bit-identical only where these agree: the same healing stage, same code and
    config, gave different exports on machines of different kinds."""
    import torch  # lazily, as in benchmark_meta

    model = platform.processor() or "unknown"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    identity: dict[str, Any] = {"cpu_model": model, "torch_cpu_capability": torch.backends.cpu.get_cpu_capability()}
    overrides = {name: os.environ[name] for name in KERNEL_ISA_VARIABLES if os.environ.get(name)}
    if overrides:  # absent when none is set, so records from before this field compare equal
        identity["kernel_isa_overrides"] = overrides
    return identity


def benchmark_meta(script: str, argv: list[str] | None = None) -> dict[str, Any]:
    """What every benchmark report says about its run: the machine, torch, the code version and the
    command that re-runs it (``script`` relative to the repository, ``argv`` its arguments: by
    default the process's own, ``sys.argv[1:]``)."""
    import torch  # lazily: importing torch takes seconds, and most of this module's callers never need it

    cpu = cpu_identity()
    overrides = "".join(f", {name}={value}" for name, value in cpu.get("kernel_isa_overrides", {}).items())
    return {"machine": f"{platform.machine()}, {os.cpu_count()} cores, {cpu['cpu_model']} "
                       f"({cpu['torch_cpu_capability']}{overrides})", "torch": torch.__version__,
            "git": git_state(), "command": shlex.join(["python", script, *(sys.argv[1:] if argv is None else argv)])}  # quoted: pastes back into a shell


def utc_now() -> str:
    return _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")
