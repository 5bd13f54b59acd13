"""Ensembles: which checkpoints predict together, and averaging saved probabilities.

Prediction with several models averages their softmax probabilities. The members are chosen from the
run folders: folds (``--folds``), their final or SWA weights (``--weights``), or their cycle
snapshots (``--snapshots all`` / ``last:N``). Configurations are ensembled afterwards from saved
probability files (``segpipe ensemble DIR_A DIR_B -o OUT``), one case at a time as a streaming
sum: never more than one model's probabilities of a case beside the running sum.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from torch import nn

from segpipe.core.atomic import save_npz
from segpipe.core.errors import StageFailed
from segpipe.core.paths import WorkDir
from segpipe.data.nifti import InputError, label_file_dtype, load_nifti, save_nifti
from segpipe.inference.decode import label_map
from segpipe.planning.plans import Configuration, Plans
from segpipe.runs.checkpoint import BEST, FINAL, load_model, mirror_axes_of
from segpipe.runs.snapshots import SWA_FILE, list_snapshots

WEIGHTS = {"final": FINAL, "best": BEST, "swa": SWA_FILE}


@dataclass
class Members:
    """Which checkpoints form the ensemble."""

    folds: list[int] = field(default_factory=lambda: [0])
    weights: str = "final"  # "final" or "swa"
    snapshots: str | None = None  # None, "all" or "last:N": cycle snapshots instead of the weights

    def describe(self) -> str:
        what = f"snapshots {self.snapshots}" if self.snapshots else f"{self.weights} weights"
        return f"folds {','.join(map(str, self.folds))}, {what}"


def parse_snapshots(spec: str | None) -> int | None:
    """``None`` -> no snapshots, ``"all"`` -> 0 (all), ``"last:N"`` -> N. Errors say what is accepted."""
    if spec is None:
        return None
    if spec == "all":
        return 0
    if spec.startswith("last:") and spec[5:].isdigit() and int(spec[5:]) > 0:
        return int(spec[5:])
    raise ValueError(f"--snapshots {spec!r}: use 'all' or 'last:N'")


def member_paths(work: Path, config_name: str, members: Members) -> list[Path]:
    """The checkpoint files of an ensemble, fold by fold."""
    if members.weights not in WEIGHTS:
        raise ValueError(f"--weights {members.weights!r}: use one of {', '.join(WEIGHTS)}")
    last = parse_snapshots(members.snapshots)
    paths: list[Path] = []
    for fold in members.folds:
        run_dir = WorkDir(work).run(config_name, fold)
        if last is None:
            paths.append(run_dir / WEIGHTS[members.weights])
            continue
        snaps = list_snapshots(run_dir)
        if not snaps:
            raise FileNotFoundError(f"{run_dir}: no snapshots (train with --schedule cosine or cyclic)")
        paths.extend(snaps[-last:] if last else snaps)
    return paths


def load_members(
    work: Path, plans: Plans, config: Configuration, members: Members, device: torch.device
) -> list[nn.Module]:
    return [load_model(p, plans, config, device) for p in member_paths(work, config.name, members)]


def inference_mirror_axes(work: Path, config_name: str, members: Members) -> tuple[int, ...]:
    """The mirror axes test-time augmentation may use: those of the first member's training (as nnU-Net
    reads them from the first fold); every member of one configuration was trained alike."""
    return mirror_axes_of(member_paths(work, config_name, members)[0])


def ensemble_folders(
    inputs: list[Path],
    output: Path,
    labels: list[int],
    reference_dir: Path | None = None,
    regions_class_order: list[int] | None = None,
) -> dict:
    """Average the ``CASE.npz`` probabilities ``(C, X, Y, Z)`` of several prediction folders case by
    case and write ``CASE.npz`` (the float16 mean) and ``CASE.nii.gz`` (its argmax as label values,
    ``labels`` being the foreground values in ascending order; geometry from ``CASE.nii.gz`` of
    ``reference_dir``, by default the first folder).

    Only cases present in every folder are ensembled; the others, and cases whose probabilities do not
    match (shape, number of classes, reference grid), are reported together in :class:`StageFailed`
    after every other case is written.
    """
    if len(inputs) < 2:
        raise ValueError("ensemble needs at least two prediction folders")
    for folder in inputs:
        if not Path(folder).is_dir():
            raise InputError(folder, "prediction folder not found")
    case_sets = [{p.name[:-4] for p in Path(folder).glob("*.npz") if not p.name.startswith(".")} for folder in inputs]
    common = sorted(set.intersection(*case_sets))
    problems = {c: "missing in some folders" for c in sorted(set.union(*case_sets) - set(common))}
    if not common:
        raise InputError(
            inputs[0], "no case has probabilities (.npz) in every folder; predict with --save-probabilities"
        )
    dtype = label_file_dtype([*labels, *(regions_class_order or [])])
    channels = len(regions_class_order) if regions_class_order else len(labels) + 1
    for case in common:
        total = None
        for folder in inputs:
            with np.load(Path(folder) / f"{case}.npz") as f:
                p = f["probabilities"].astype(np.float32)
            if p.shape[0] != channels:
                problems[case] = f"{p.shape[0]} probability channels in {folder}, expected {channels}"
                break
            if total is not None and p.shape != total.shape:
                problems[case] = f"probability shapes differ ({folder})"
                break
            total = p if total is None else total + p
        if case in problems or total is None:
            continue
        mean = total / len(inputs)
        try:
            ref = load_nifti(Path(reference_dir or inputs[0]) / f"{case}.nii.gz", dtype=dtype)
        except InputError as exc:
            problems[case] = str(exc)
            continue
        if ref.data.shape[:3] != mean.shape[1:]:
            problems[case] = f"probabilities {mean.shape[1:]} do not match the reference grid {ref.data.shape[:3]}"
            continue
        save_npz(output / f"{case}.npz", probabilities=mean.astype(np.float16))
        seg = label_map(mean, sorted(labels), regions_class_order)
        save_nifti(output / f"{case}.nii.gz", seg, ref.affine, ref.header, dtype)
    if problems:
        raise StageFailed("ensemble", problems)
    return {"cases": len(common), "members": [str(p) for p in inputs], "output": str(output)}
