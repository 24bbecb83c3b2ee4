"""Stop requests at step boundaries, so that a run can checkpoint before Slurm's time limit.

The Slurm script (`rlkd launch slurm`) asks for a warning signal (`--signal=B:USR1@N`). Only the
batch shell gets it. The shell creates the file named by $RLKD_STOP_FILE, and the training loop
asks `StopRequest.requested()` after every optimizer step. The answer is collective: every rank
looks for the file and the flags are summed over ranks, so all ranks stop at the same step, even
when only node 0 can see the file. A rank that stopped alone would hang the others in the next
collective.
"""

from __future__ import annotations

import os
from pathlib import Path

import torch

from rlkd.engine.distributed import all_reduce_sum

STOP_FILE_ENV = "RLKD_STOP_FILE"


class StopRequest:
    def __init__(self, stop_file: Path | None):
        self.stop_file = stop_file

    @classmethod
    def from_environment(cls) -> "StopRequest":
        value = os.environ.get(STOP_FILE_ENV)
        return cls(Path(value) if value else None)

    def seen_here(self) -> bool:
        return self.stop_file is not None and self.stop_file.exists()

    def requested(self, device: torch.device) -> bool:
        """Collective: every rank must call it at the same step. True on all ranks or on none."""
        flag = torch.tensor([1.0 if self.seen_here() else 0.0], dtype=torch.float64, device=device)
        return bool(all_reduce_sum(flag)[0] > 0)
