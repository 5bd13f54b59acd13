"""Checkpoints of a training run: written atomically, loaded for resume and for prediction.

A checkpoint holds the model, optimizer, AMP scaler, epoch/iteration counters, seconds spent,
RNG states and a hash of the plans, so ``--resume`` continues exactly and refuses mismatched plans.
"""

from __future__ import annotations

import random
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from segpipe.core.atomic import atomic_path
from segpipe.networks.build import build_network
from segpipe.planning.plans import Configuration, Plans

# What a checkpoint written before mirror axes were stored allowed: every axis (3d training).
DEFAULT_MIRROR_AXES = (0, 1, 2)
LATEST = "checkpoint_latest.pt"
BEST = "checkpoint_best.pt"  # the epoch with the best moving average of the pseudo-Dice (as nnU-Net)
FINAL = "checkpoint_final.pt"


def save_checkpoint(path: Path, state: dict[str, Any]) -> None:
    """``torch.save`` to a temporary file, then rename over ``path``."""
    with atomic_path(path) as tmp:
        torch.save(state, tmp)


def load_checkpoint(path: Path) -> dict[str, Any]:
    if not path.is_file():
        raise FileNotFoundError(f"{path}: checkpoint not found")
    try:
        return torch.load(path, map_location="cpu", weights_only=False)
    except Exception as exc:  # noqa: BLE001 - re-raised with the file named
        raise RuntimeError(f"{path}: unreadable checkpoint ({exc})") from exc


def rng_state() -> dict[str, Any]:
    return {
        "python": random.getstate(),
        "numpy": np.random.get_state(),
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None,
    }


def set_rng_state(state: dict[str, Any]) -> None:
    """Restore the RNG states of a checkpoint on the devices that exist now: a run saved with more GPUs
    (or by a torchrun rank 0) restores the ones present, one saved with fewer (or on a CPU machine)
    leaves the others as seeded; ``torch.cuda.set_rng_state_all`` would fail on a count mismatch."""
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    saved = state.get("cuda") or []
    if saved and torch.cuda.is_available():
        for index, device_state in enumerate(saved[: torch.cuda.device_count()]):
            torch.cuda.set_rng_state(device_state, index)


def mirror_axes_of(path: Path) -> tuple[int, ...]:
    """The axes the model in ``path`` was mirrored along in training, so prediction may mirror them
    (nnU-Net stores ``inference_allowed_mirroring_axes`` in its checkpoints the same way)."""
    return tuple(int(a) for a in load_checkpoint(path).get("mirror_axes", DEFAULT_MIRROR_AXES))


def load_model(path: Path, plans: Plans, config: Configuration, device: torch.device) -> nn.Module:
    """The network stored in a checkpoint file (final, latest, snapshot or SWA), in eval mode."""
    if not path.exists():
        hint = " (this fold has not finished training)" if path.name == FINAL else ""
        raise FileNotFoundError(f"{path}: checkpoint not found{hint}")
    ckpt = load_checkpoint(path)
    extra = len(plans.foreground_labels) if config.previous_stage else 0
    # built as trained (any registered network, its deep-supervision heads included; eval mode does not
    # use them); weights of heads an older layout had are the only ones allowed to be left over
    model = build_network(config, len(plans.channel_names), plans.num_classes, True, extra)
    result = model.load_state_dict(ckpt["model"], strict=False)
    unexpected = [k for k in result.unexpected_keys if "head" not in k]
    if result.missing_keys or unexpected:
        raise RuntimeError(
            f"{path}: weights do not match the network: missing {result.missing_keys[:3]}, unexpected {unexpected[:3]}"
        )
    return model.to(device).eval()
