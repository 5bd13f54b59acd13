"""Deciding postprocessing by connected components on out-of-fold predictions (as nnU-Net).

Sits after training and validation: it reads the folds' out-of-fold predictions
(``WORK/<config>/fold_<k>/validation/CASE.nii.gz``) and the reference labels named in
``WORK/dataset.json``, tests whether keeping only the largest connected component (of all foreground
together, then of each label) raises the cross-validation Dice, and writes the decision to
``WORK/<config>/postprocessing.json``, which :mod:`segpipe.inference.postprocessing` applies.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from segpipe.core.atomic import read_json, write_json
from segpipe.core.paths import WorkDir
from segpipe.data.dataset import Dataset
from segpipe.data.nifti import InputError, strip_nifti_ending
from segpipe.evaluation.metrics import dice, load_label_map, mask_ignored, nanmean, target_key
from segpipe.inference.postprocessing import keep_largest_component
from segpipe.planning.plans import load_plans


def decide_postprocessing(
    pred_dirs: list[Path],
    gt_paths: dict[str, Path],
    labels: Sequence[int | list[int]],
    ignore_label: int | None = None,
) -> dict[str, Any]:
    """Decide, on out-of-fold predictions, which largest-component steps raise Dice.

    ``pred_dirs`` hold ``CASE.nii.gz`` predictions (e.g. every fold's ``validation/``); ``gt_paths``
    maps case ids to reference label files. Dice per label is averaged over cases ignoring NaN (both
    masks empty); the mean over labels ignores labels that are NaN everywhere. Rules (nnU-Net's):
    keep the largest foreground component when the mean Dice over labels rises strictly and no
    label's Dice falls; then, on top of that result, keep the largest component of a label when that
    label's Dice rises strictly. Each case is read once; removing components of one label does not
    change the Dice of another, so every variant is scored in that single pass. The reference's
    ``ignore_label`` voxels count for no label.
    """
    targets = {target_key(t): t for t in labels}  # labels, or regions (lists of label values)
    keys = list(targets)
    files = _prediction_files(pred_dirs, gt_paths)
    scores: dict[str, dict[str, list[float]]] = {k: {v: [] for v in keys} for k in ("raw", "fg", "raw_l", "fg_l")}
    for case, pred_path in files.items():
        pred, _ = load_label_map(pred_path)
        gt, _ = load_label_map(gt_paths[case])
        if pred.shape != gt.shape:
            raise InputError(pred_path, f"shape {pred.shape} differs from reference {gt_paths[case]} shape {gt.shape}")
        fg = keep_largest_component(pred, None)

        def score(seg: np.ndarray, target: int | list[int]) -> float:
            return dice(*mask_ignored(seg, gt, ignore_label), target)  # noqa: B023 - used at once, in this pass

        for key, target in targets.items():
            scores["raw"][key].append(score(pred, target))
            scores["fg"][key].append(score(fg, target))
            scores["raw_l"][key].append(score(keep_largest_component(pred, [target]), target))
            scores["fg_l"][key].append(score(keep_largest_component(fg, [target]), target))
    mean = {k: {v: nanmean(s) for v, s in per_label.items()} for k, per_label in scores.items()}

    before = mean["raw"]
    use_fg = nanmean(list(mean["fg"].values())) > nanmean(list(before.values())) and not any(
        _worse(mean["fg"][v], before[v]) for v in keys
    )
    current = dict(mean["fg"] if use_fg else before)
    candidate = mean["fg_l" if use_fg else "raw_l"]
    chosen = [v for v in keys if _better(candidate[v], current[v])]
    after = {v: candidate[v] if v in chosen else current[v] for v in keys}
    return {
        "foreground_largest_component": bool(use_fg),
        "per_label_largest_component": [targets[v] for v in chosen],
        "dice_before": dict(before),
        "dice_after": after,
        "mean_dice_before": nanmean(list(before.values())),
        "mean_dice_after": nanmean(list(after.values())),
        "num_cases": len(files),
        "connectivity": "full (26 neighbours)",
    }


def run_postprocessing_decision(work: Path, config: str) -> dict[str, Any]:
    """Decide postprocessing from every fold's ``validation/`` of ``config``; write and return it."""
    wd = WorkDir(work)
    plans = load_plans(wd.plans)
    plans.configuration(config)
    dataset = Dataset.from_dict(read_json(wd.dataset))
    gt_paths = {c.case_id: Path(c.label) for c in dataset.training if c.label}
    num_folds = len(read_json(wd.splits)) if wd.splits.is_file() else 0
    folds = [k for k in range(num_folds) if (wd.run(config, k) / "validation").is_dir()]
    if not folds:
        raise FileNotFoundError(f"{wd.root / config}: no fold_<k>/validation/ folder; train (with validation) first")
    pred_dirs = [wd.run(config, k) / "validation" for k in folds]
    decision = decide_postprocessing(pred_dirs, gt_paths, plans.evaluation_targets, plans.ignore_label)
    decision["folds"] = folds
    write_json(wd.postprocessing(config), decision)
    return decision


def describe_decision(decision: dict[str, Any]) -> str:
    """A few lines for the command line."""
    per_label = decision["per_label_largest_component"]
    lines = [
        f"largest foreground component: {'yes' if decision['foreground_largest_component'] else 'no'}",
        f"largest component per label: {', '.join(map(target_key, per_label)) if per_label else 'none'}",
    ]
    for key, value in decision["dice_before"].items():
        lines.append(f"label {key}: Dice {_fmt(value)} -> {_fmt(decision['dice_after'][key])}")
    lines.append(f"({decision['num_cases']} out-of-fold cases)")
    return "\n".join(lines)


# --------------------------------------------------------------------------------------------------


def _prediction_files(pred_dirs: list[Path], gt_paths: dict[str, Path]) -> dict[str, Path]:
    files: dict[str, Path] = {}
    for folder in pred_dirs:
        if not Path(folder).is_dir():
            raise InputError(folder, "prediction folder not found")
        for path in sorted(Path(folder).glob("*.nii.gz")):
            if path.name.startswith("."):
                continue
            case = strip_nifti_ending(path.name)
            if case in files:
                raise InputError(path, f"case {case} is also predicted in {files[case].parent}")
            if case not in gt_paths:
                raise InputError(path, f"no reference label for case {case} in the dataset")
            files[case] = path
    if not files:
        raise InputError(pred_dirs[0] if pred_dirs else Path("."), "no CASE.nii.gz predictions to decide on")
    return files


def _better(after: float, before: float) -> bool:
    return not math.isnan(after) and not math.isnan(before) and after > before


def _worse(after: float, before: float) -> bool:
    return not math.isnan(after) and not math.isnan(before) and after < before


def _fmt(value: float | None) -> str:
    return "n/a" if value is None or (isinstance(value, float) and math.isnan(value)) else f"{value:.4f}"
