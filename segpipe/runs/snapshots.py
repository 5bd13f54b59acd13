"""Snapshot checkpoints and stochastic weight averaging (SWA) during training.

With a cyclic schedule (``cosine``, ``cyclic``) the weights at the end of every cycle are saved as
``fold_k/snapshots/cycle_<K>.pt`` with their validation pseudo-Dice; with ``--swa`` a running average
of those weights (or, for non-cyclic schedules, of the weights at every epoch end in the final
``cyclic_fraction`` of training, as Izmailov et al.) is kept and saved as ``fold_k/swa.pt``.
All three files load like any checkpoint (``checkpoint.load_model``).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from torch import nn

SNAPSHOT_DIR = "snapshots"
SWA_FILE = "swa.pt"


def snapshot_path(run_dir: Path, cycle: int) -> Path:
    return run_dir / SNAPSHOT_DIR / f"cycle_{cycle}.pt"


def run_dir_of(checkpoint: Path) -> Path:
    """The run folder a checkpoint belongs to (snapshots live one folder down)."""
    return checkpoint.parent.parent if checkpoint.parent.name == SNAPSHOT_DIR else checkpoint.parent


def list_snapshots(run_dir: Path) -> list[Path]:
    """Snapshot files of a run, in cycle order."""
    return sorted((run_dir / SNAPSHOT_DIR).glob("cycle_*.pt"), key=lambda p: int(p.stem.split("_")[1]))


class WeightAverage:
    """Arithmetic mean of the model weights seen by :meth:`update` (buffers too, as floats)."""

    def __init__(self) -> None:
        self.count = 0
        self.average: dict[str, torch.Tensor] = {}

    @torch.no_grad()
    def update(self, model: nn.Module) -> None:
        self.count += 1
        for name, value in model.state_dict().items():
            v = value.detach().float().cpu()
            if name not in self.average:
                self.average[name] = v.clone()
            else:
                self.average[name] += (v - self.average[name]) / self.count

    def state_dict(self) -> dict[str, Any]:
        return {"count": self.count, "average": self.average}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.count = int(state["count"])
        self.average = dict(state["average"])

    def weights_for(self, model: nn.Module) -> dict[str, torch.Tensor]:
        """The averaged weights cast to the model's dtypes, ready for ``load_state_dict``."""
        reference = model.state_dict()
        return {k: self.average[k].to(reference[k].dtype) for k in reference}


def has_batch_norm(model: nn.Module) -> bool:
    """Averaged weights need fresh running statistics only for batch norm; instance norm (our
    default) normalizes with per-sample statistics and has none to recompute."""
    return any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in model.modules())
