"""Where a run starts: fresh, or from a checkpoint of its own lineage with a compatible config.

    plan = plan_start(cfg, resume=True)   # reads files only, before any weights load; may raise ResumeError
    session = build_session(cfg)
    plan.prepare(session.rank)            # rank 0: the only step that changes files
    step = restore(session, plan)         # loads the checkpoint into the engines; the step to continue from
    save_checkpoint(session, plan, step)  # a checkpoint of this lineage (the train loop, a signal handler)

A *lineage* is a fresh run and every resume of it; its id (`run_id`) is written into each of its
checkpoints (rlkd.engine.checkpoint.RECORD) and into the manifest. Without `resume` a folder that
already holds checkpoints is refused: they belong to another run and would be mixed with the new
one's. With `resume` the saved config is compared with the requested one: a difference in a key that
can change what is computed refuses with the list of keys; keys that cannot (logging, progress,
checkpoint cadence, the export switch, `train.max_steps` under a schedule that does not depend on it)
are allowed, printed and recorded in the manifest's `history`.
"""

from __future__ import annotations

import json
import os
import sys
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from rlkd.config import ConfigError, RunConfig
from rlkd.engine import checkpoint
from rlkd.provenance import atomic_write_text, file_sha256, utc_now


class ResumeError(ConfigError):
    """The run cannot start in its output folder as asked (foreign checkpoints, changed config)."""


# Keys that cannot change what a run computes; every other key (present or future) can.
HARMLESS = frozenset({
    "output_dir",                      # the same folder, perhaps copied or moved
    "log_every", "progress_bar", "export",
    "report_to", "agreement_every",    # extra metric sinks; CR@k read off the logits the loss already has
    "checkpoint.every_steps", "checkpoint.keep_last",
    "teacher_cache",                   # cached teacher logits are exact (rlkd.teacher_cache)
    "deepspeed.teacher_offload_params",  # where the frozen teacher's parameters wait between uses
})
# Where the data is read from: harmless when the data files' contents (sha256) are unchanged.
DATA_LOCATION = frozenset({"data.path", "data.data_dir", "data.source"})
UNSET = "<unset>"


def _flatten(tree: Any, prefix: str = "") -> dict[str, Any]:
    if isinstance(tree, dict):
        out: dict[str, Any] = {}
        for key, value in tree.items():
            out.update(_flatten(value, f"{prefix}.{key}" if prefix else str(key)))
        if not tree and prefix:
            out[prefix] = {}
        return out
    return {prefix: tree}


def _normalised(config: dict[str, Any]) -> dict[str, Any]:
    """A saved config with today's defaults filled in, so that a key added since compares equal."""
    try:
        return RunConfig.model_validate(config).model_dump(mode="json")
    except Exception:  # noqa: BLE001 - a config of an older schema: compare it as written
        return config


def data_hashes(cfg: RunConfig) -> dict[str, str]:
    from rlkd.engine.manifest import data_files

    return {str(p): file_sha256(p) for p in data_files(cfg.data) if p.is_file()}


def world_size_from_env() -> int:
    import torch.distributed as dist

    if dist.is_initialized():
        return dist.get_world_size()
    return int(os.environ.get("WORLD_SIZE", "1"))


def resolved_dtype(cfg: RunConfig) -> str:
    from rlkd.models import resolve_dtype

    return str(resolve_dtype(cfg.models.dtype)).removeprefix("torch.")


@dataclass
class Change:
    key: str
    old: Any
    new: Any
    reason: str = ""        # why it is refused, or why it is allowed
    allowed: bool = False
    forced: bool = False    # allowed only because the caller named it (--allow-change)

    def line(self) -> str:
        text = f"{self.key}: {self.old!r} -> {self.new!r}"
        return f"{text} ({self.reason})" if self.reason else text


def compare(saved: dict[str, Any], cfg: RunConfig, *, step: int, saved_meta: dict[str, Any],
            meta: dict[str, Any], allow: frozenset[str] = frozenset()) -> list[Change]:
    """Every difference between the saved config (+ world size, resolved dtype, data file hashes) and
    the requested one, each marked allowed or not. `allow`: keys (or sections) allowed regardless."""
    old, new = _flatten(_normalised(saved)), _flatten(cfg.model_dump(mode="json"))
    old_hashes = sorted((saved_meta.get("data_files_sha256") or {}).values())
    new_hashes = sorted((meta.get("data_files_sha256") or {}).values())
    same_data = bool(old_hashes) and old_hashes == new_hashes
    changes = []
    for key in sorted(set(old) | set(new)):
        a, b = old.get(key, UNSET), new.get(key, UNSET)
        if a == b:
            continue
        change = Change(key, a, b)
        if key in HARMLESS:
            change.allowed = True
        elif key == "train.max_steps":
            if isinstance(b, int) and b <= step:
                change.reason = f"not beyond the checkpoint's step {step}"
            elif cfg.train.schedule != "constant" and cfg.train.schedule == old.get("train.schedule"):
                change.reason = f"the {cfg.train.schedule} schedule's learning rate at every later step depends on it"
            else:
                change.allowed = True
        elif key in DATA_LOCATION and same_data:
            change.allowed, change.reason = True, "same data file contents (sha256)"
        changes.append(change)
    for key, label in (("world_size", "world size (ranks)"), ("dtype", "resolved models.dtype")):
        a, b = saved_meta.get(key), meta.get(key)
        if a is not None and b is not None and a != b:
            changes.append(Change(key, a, b, reason=label))
    if old_hashes and new_hashes and old_hashes != new_hashes:
        changes.append(Change("data_files_sha256", saved_meta["data_files_sha256"], meta["data_files_sha256"],
                              reason="the data files' contents differ"))
    for change in changes:
        if not change.allowed and _named(change.key, allow):
            change.allowed = change.forced = True
    return changes


def _named(key: str, allow: frozenset[str]) -> bool:
    return any(key == a or key.startswith(a + ".") for a in allow)


def new_run_id() -> str:
    return f"{utc_now().replace(':', '').replace('-', '')[:15]}-{uuid.uuid4().hex[:8]}"


def _read_json(path: Path) -> dict[str, Any] | None:
    try:
        value = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return value if isinstance(value, dict) else None


def read_metrics(path: Path, last_step: int) -> tuple[list[str], list[str]]:
    """The rows of `metrics.jsonl` up to `last_step`, and warnings. A torn last line (a kill during
    a write) is dropped with a warning; a malformed line before it is an error naming the line."""
    if not path.is_file():
        return [], []
    lines = path.read_text(encoding="utf-8").splitlines()
    numbered = [(i, line) for i, line in enumerate(lines, start=1) if line.strip()]
    kept, warnings = [], []
    for position, (lineno, line) in enumerate(numbered):
        try:
            row = json.loads(line)
            step = int(row["step"])
        except (ValueError, KeyError, TypeError):
            if position == len(numbered) - 1:
                shown = line if len(line) <= 60 else line[:57] + "..."
                warnings.append(f"{path}:{lineno}: dropped a torn last line (left by a kill during a write): {shown}")
                continue
            raise ResumeError(f"{path}:{lineno}: malformed metrics row before the last line; "
                              "the log is damaged, not just torn") from None
        if step <= last_step:
            kept.append(line)
    return kept, warnings


@dataclass
class StartPlan:
    cfg: RunConfig
    output_dir: Path
    checkpoint_dir: Path
    run_id: str
    tag: str | None = None           # the checkpoint to resume from
    step: int | None = None          # its step
    changes: list[Change] = field(default_factory=list)  # allowed differences from the saved config
    world_size: int = 1
    dtype: str = "float32"
    data_files_sha256: dict[str, str] = field(default_factory=dict)
    history: list[dict[str, Any]] = field(default_factory=list)  # the manifest's, this start included
    move_aside: Path | None = None   # incomplete checkpoints (no `latest`) to move out of the way
    metrics_rows: list[str] | None = None  # metrics.jsonl to keep on resume; None: start a new log
    notes: list[str] = field(default_factory=list)  # printed by rank 0 when the run starts

    @property
    def checkpoint_path(self) -> Path | None:
        return self.checkpoint_dir / self.tag if self.tag else None

    def record(self) -> dict[str, Any]:
        """What each checkpoint of this lineage carries (rlkd.engine.checkpoint.RECORD)."""
        return {"run_id": self.run_id, "config": self.cfg.model_dump(mode="json"), "world_size": self.world_size,
                "dtype": self.dtype, "data_files_sha256": self.data_files_sha256, "saved_at": utc_now()}

    def manifest_fields(self, status: str, **extra: Any) -> dict[str, Any]:
        fields = {"status": status, "run_id": self.run_id, "resumed_from": self.step,
                  "resumed_checkpoint": str(self.checkpoint_path) if self.tag else None, "history": self.history}
        fields.update(extra)
        return fields

    def prepare(self, rank: int) -> None:
        """Rank 0: move incomplete checkpoints aside, trim or restart the metrics log, and print where
        the run starts. Other ranks do nothing. The checkpoint folder is made by the first save
        (rlkd.engine.checkpoint.save), so a run that fails before one leaves no empty folder."""
        if rank != 0:
            return
        if self.move_aside is not None:
            os.replace(self.checkpoint_dir, self.move_aside)
        metrics = self.output_dir / "metrics.jsonl"
        if self.metrics_rows is None:
            metrics.unlink(missing_ok=True)
        else:
            atomic_write_text(metrics, "".join(line + "\n" for line in self.metrics_rows))
        for note in self.notes:
            print(f"rlkd train: {note}", file=sys.stderr if note.startswith("warning") else sys.stdout, flush=True)


def _foreign_message(checkpoint_dir: Path, present: list[str]) -> str:
    shown = ", ".join(present[:4]) + (f", ... ({len(present)} in all)" if len(present) > 4 else "")
    records = {(checkpoint.read_record(checkpoint_dir, t) or {}).get("run_id") for t in present} - {None}
    owner = f" of run {', '.join(sorted(records))}" if records else ""
    return (f"{checkpoint_dir} already holds checkpoints{owner} ({shown or 'only a latest marker'}); a new run "
            "there would mix its checkpoints with them. Continue that run with --resume, choose another "
            f"output_dir, or move {checkpoint_dir} away first")


def plan_start(cfg: RunConfig, *, resume: bool, allow_changes: tuple[str, ...] | list[str] = (),
               world_size: int | None = None) -> StartPlan:
    """Decide where the run starts, reading files only (call it before any weights load)."""
    output_dir = Path(cfg.output_dir)
    checkpoint_dir = output_dir / "checkpoints"
    plan = StartPlan(cfg=cfg, output_dir=output_dir, checkpoint_dir=checkpoint_dir, run_id=new_run_id(),
                     world_size=world_size or world_size_from_env(), dtype=resolved_dtype(cfg),
                     data_files_sha256=data_hashes(cfg))
    now = {"at": utc_now(), "argv": list(sys.argv), "config": cfg.model_dump(mode="json")}
    present, marker = checkpoint.tags(checkpoint_dir), checkpoint.latest_marker(checkpoint_dir)
    if not resume and (present or marker):
        raise ResumeError(_foreign_message(checkpoint_dir, present))
    if resume and marker is None:
        if present:  # killed before its first checkpoint was complete: nothing to resume, nothing to mix with
            plan.move_aside = checkpoint_dir.with_name(f"checkpoints.incomplete-{plan.run_id}")
            plan.notes.append(f"warning: {checkpoint_dir} holds no complete checkpoint ({', '.join(present)} "
                              f"without a latest marker); moved aside to {plan.move_aside}")
        plan.notes.append(f"no checkpoint to resume from in {checkpoint_dir}; starting at step 0")
    if marker is None:
        plan.history = [dict(event="start", **now)]
        return plan

    if not (checkpoint_dir / marker).is_dir():
        raise ResumeError(f"{checkpoint_dir}/latest names {marker}, which does not exist (checkpoints present: "
                          f"{', '.join(present) or 'none'}); nothing consistent to resume from")
    record = checkpoint.read_record(checkpoint_dir, marker)
    manifest = _read_json(output_dir / "manifest.json") or {}
    if record is None:  # written before checkpoints carried a record: the manifest says what wrote it
        saved, saved_meta = manifest.get("config"), {"world_size": manifest.get("world_size"),
                                                       "data_files_sha256": manifest.get("data_files_sha256")}
        plan.run_id = manifest.get("run_id") or plan.run_id
        if saved is None:
            plan.notes.append(f"warning: {checkpoint_dir / marker} has no saved config to compare with")
    else:
        saved, saved_meta, plan.run_id = record.get("config"), record, record["run_id"]
    plan.tag, plan.step = marker, checkpoint.step_of(marker)
    changes = compare(saved, cfg, step=plan.step, saved_meta=saved_meta,
                      meta={"world_size": plan.world_size, "dtype": plan.dtype,
                            "data_files_sha256": plan.data_files_sha256},
                      allow=frozenset(allow_changes)) if saved is not None else []
    refused = [c for c in changes if not c.allowed]
    if refused:
        raise ResumeError(
            f"--resume: {checkpoint_dir / marker} (step {plan.step}) was written with another config; "
            "these settings change what is computed:\n"
            + "".join(f"  {c.line()}\n" for c in refused)
            + "Resume with the saved values, start a new run in another output_dir, or accept a change "
              "with --allow-change KEY")
    plan.changes = changes
    plan.metrics_rows, warnings = read_metrics(output_dir / "metrics.jsonl", plan.step)
    plan.notes += [f"warning: {w}" for w in warnings]
    total = f" of {cfg.train.max_steps}" if getattr(cfg.train, "epochs", None) is None else ""
    plan.notes.append(f"resuming from step {plan.step}{total} (checkpoint {checkpoint_dir / marker})")
    if changes:
        plan.notes.append("config changes on resume: " + "; ".join(
            c.line() + (" [forced by --allow-change]" if c.forced else "") for c in changes))

    if manifest.get("run_id") == plan.run_id and isinstance(manifest.get("history"), list):
        history = list(manifest["history"])
    else:
        history = [{"event": "start", "config": saved, "note": "reconstructed at the first resume"}]
    history.append(dict(event="resume", step=plan.step, checkpoint=str(checkpoint_dir / marker),
                        changes={c.key: [c.old, c.new] for c in changes},
                        forced=[c.key for c in changes if c.forced], **now))
    plan.history = history
    return plan


def restore(session, plan: StartPlan) -> int:
    """Load the planned checkpoint into the student engine and the loader; returns the step to
    continue from (0 for a fresh start). Collective."""
    if plan.tag is None:
        return 0
    state = checkpoint.load(session.student, plan.checkpoint_dir, session.rank, tag=plan.tag)
    step = int(state["step"])
    if step != plan.step:
        raise ResumeError(f"{plan.checkpoint_path}: holds step {step}, its name says {plan.step}")
    session.batches.load_state(state["loader"])
    return step


def save_checkpoint(session, plan: StartPlan, step: int) -> Path:
    """Checkpoint the student after `step` optimizer steps as part of this lineage. Collective."""
    return checkpoint.save(session.student, plan.checkpoint_dir, step, session.batches.state(), session.rank,
                           session.cfg.checkpoint.keep_last, plan.record())


__all__ = ["ResumeError", "StartPlan", "plan_start", "restore", "save_checkpoint", "compare", "read_metrics",
           "HARMLESS", "DATA_LOCATION"]
