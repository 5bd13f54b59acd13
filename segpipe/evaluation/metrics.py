"""Evaluation of predicted label maps against reference (ground-truth) label maps.

This is the last stage before reports: it reads the prediction NIfTIs written by inference and the
ground-truth NIfTIs of the same cases, checks that each pair shares one voxel grid (shape and
affine), and computes per-label Dice and 95th-percentile Hausdorff distance (HD95, in mm, using the
voxel spacing of the reference's affine). Arrays are in nibabel's voxel order ``(X, Y, Z)``, exactly
as :func:`segpipe.data.nifti.load_nifti` returns them. :func:`evaluate_folder` pairs a prediction folder
with a reference folder, averages over cases (NaN-aware, as nnU-Net does) and writes one JSON
summary atomically; :func:`summary_table` renders that summary for the command line.
"""

from __future__ import annotations

import math
import os
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
from scipy import ndimage

from segpipe.core.atomic import write_json
from segpipe.data.nifti import InputError, is_nifti, load_nifti, spacing_from_affine, strip_nifti_ending

EMPTY_POLICY = (
    "Dice is NaN (excluded from means) when prediction and reference are both empty; "
    "HD95 is NaN then, and the volume diagonal in mm when exactly one is empty"
)

AFFINE_TOLERANCE = 1e-3  # largest allowed absolute difference between prediction and reference affines


Target = int | Sequence[int]  # a label value, or a region: the label values it unites


def target_key(target: Target) -> str:
    """How an evaluation target is named in summaries and logs: ``"2"`` for a label, ``"1+2"`` for a region."""
    return "+".join(str(int(v)) for v in target) if isinstance(target, Sequence) else str(int(target))


def target_mask(seg: np.ndarray, target: Target) -> np.ndarray:
    """Voxels of ``seg`` (label values) that belong to a label, or to a region (any of its values)."""
    return np.isin(seg, list(target)) if isinstance(target, Sequence) else seg == target


def dice(pred: np.ndarray, gt: np.ndarray, label: Target) -> float:
    """Dice coefficient ``2|P∩G| / (|P| + |G|)`` of one label.

    ``pred`` and ``gt`` are integer label maps of the same shape, ``(X, Y, Z)``; ``P`` and ``G`` are
    the voxels equal to ``label``. Returns NaN when both masks are empty (as nnU-Net, such cases
    are left out of means) and 0.0 when exactly one is empty.
    """
    pred, gt = _check_pair(pred, gt)
    p = target_mask(pred, label)
    g = target_mask(gt, label)
    total = int(np.count_nonzero(p)) + int(np.count_nonzero(g))
    if total == 0:
        return float("nan")
    return 2.0 * int(np.count_nonzero(p & g)) / total


def mask_ignored(pred: np.ndarray, gt: np.ndarray, ignore_label: int | None) -> tuple[np.ndarray, np.ndarray]:
    """``pred`` and ``gt`` with the reference's ``ignore`` voxels set to background in both, so they
    count in no label's true/false positives or negatives (nnU-Net's ``compute_metrics``, which takes
    TP/FP/FN only where the reference is not ``ignore``); unchanged when ``ignore_label`` is None."""
    if ignore_label is None:
        return pred, gt
    ignored = gt == ignore_label
    return np.where(ignored, 0, pred), np.where(ignored, 0, gt)


def hd95(pred: np.ndarray, gt: np.ndarray, label: Target, spacing: Sequence[float]) -> float:
    """Symmetric 95th-percentile Hausdorff distance in mm between the surfaces of one label.

    ``pred`` and ``gt`` are integer label maps ``(X, Y, Z)`` of the same shape; ``spacing`` is the
    voxel size in mm along those same axes. A mask's surface is the mask minus its binary erosion
    with the connectivity-1 structure (voxels on the array border count as surface). For each
    surface voxel of one mask the Euclidean distance (mm) to the nearest surface voxel of the other
    is taken; the result is ``max(p95(d(P->G)), p95(d(G->P)))`` with numpy's linearly interpolated
    percentile. This is the definition of MONAI's
    ``compute_hausdorff_distance(..., percentile=95, spacing=spacing)``.

    Conventions: both masks empty -> NaN; exactly one empty -> the diagonal of the whole volume,
    ``sqrt(sum((shape[i] * spacing[i]) ** 2))`` mm, a finite worst case (MONAI returns inf there).
    """
    # Own implementation rather than a call to MONAI: on the same inputs it gives the same numbers
    # (float32 rounding aside), but MONAI needs one-hot torch tensors, returns inf (not a finite
    # worst case) when one mask is empty, and importing it costs several seconds per process.
    pred, gt = _check_pair(pred, gt)
    spacing = tuple(float(s) for s in spacing)
    if len(spacing) != pred.ndim:
        raise ValueError(f"spacing {spacing} has {len(spacing)} values for a {pred.ndim}D array")
    p = target_mask(pred, label)
    g = target_mask(gt, label)
    p_any, g_any = bool(p.any()), bool(g.any())
    if not p_any and not g_any:
        return float("nan")
    if not p_any or not g_any:
        return volume_diagonal(pred.shape, spacing)

    # Crop to the masks' joint bounding box; exact: a mask voxel on the box edge has a non-mask
    # neighbour outside it (or is on the array border), so it is surface either way, and the EDT
    # measures straight-line distance to surface voxels, all of which lie inside the box.
    box = ndimage.find_objects((p | g).astype(np.uint8))[0]
    p, g = p[box], g[box]
    structure = ndimage.generate_binary_structure(p.ndim, 1)
    surf_p = p & ~ndimage.binary_erosion(p, structure=structure, border_value=0)
    surf_g = g & ~ndimage.binary_erosion(g, structure=structure, border_value=0)
    d_pg = ndimage.distance_transform_edt(~surf_g, sampling=spacing)[surf_p]
    d_gp = ndimage.distance_transform_edt(~surf_p, sampling=spacing)[surf_g]
    return float(max(np.percentile(d_pg, 95), np.percentile(d_gp, 95)))


def volume_diagonal(shape: Sequence[int], spacing: Sequence[float]) -> float:
    """Length in mm of the diagonal of a volume of ``shape`` voxels of size ``spacing`` mm."""
    return float(math.sqrt(sum((int(n) * float(s)) ** 2 for n, s in zip(shape, spacing, strict=True))))


def evaluate_case(
    pred_path: str | os.PathLike, gt_path: str | os.PathLike, labels: Sequence[Target], ignore_label: int | None = None
) -> dict[str, Any]:
    """Dice and HD95 (mm) of each label for one prediction file against its reference file.

    Both files are label maps ``(X, Y, Z)``; they must have the same shape and affines equal within
    ``1e-3``, else :class:`InputError` naming the prediction file is raised. The spacing comes from
    the reference's affine. Returns ``{"case": id, "dice": {"1": ..}, "hd95": {"1": ..}}`` where
    ``id`` is the prediction's file name without ``.nii``/``.nii.gz``. Voxels where the reference is
    ``ignore_label`` count for no label (:func:`mask_ignored`).
    """
    pred_path, gt_path = Path(pred_path), Path(gt_path)
    pred, pred_affine = _load_labels(pred_path)
    gt, gt_affine = _load_labels(gt_path)
    if pred.shape == gt.shape:
        pred, gt = mask_ignored(pred, gt, ignore_label)
    return _evaluate_arrays(pred_path, gt_path, pred, pred_affine, gt, gt_affine, _label_list(labels))


def evaluate_folder(
    pred_dir: str | os.PathLike,
    gt_dir: str | os.PathLike,
    labels: Sequence[Target] | None = None,
    output: str | os.PathLike | None = None,
    ignore_label: int | None = None,
) -> dict[str, Any]:
    """Evaluate every NIfTI prediction in ``pred_dir`` against the same-named file in ``gt_dir``.

    The reference for ``case.nii.gz`` is ``case.nii.gz`` (or ``case.nii``) in ``gt_dir``; a missing
    one raises :class:`InputError` naming it. ``labels`` defaults to every non-zero value present in
    the reference files, sorted. Returns (and, when ``output`` is given, writes atomically as JSON,
    NaN as null) ``{"labels", "per_case", "mean": {"dice": {..}, "hd95": {..}}, "mean_dice",
    "num_cases", "empty_policy"}``. Means over cases ignore NaN; a label with only NaN values gets
    NaN. ``mean_dice`` is the mean over labels of the per-label mean Dice (NaN labels left out).
    HD95 values are in mm.
    """
    pred_dir, gt_dir = Path(pred_dir), Path(gt_dir)
    if not pred_dir.is_dir():
        raise InputError(pred_dir, "prediction folder not found")
    if not gt_dir.is_dir():
        raise InputError(gt_dir, "reference folder not found")
    pred_files = sorted(p for p in pred_dir.iterdir() if p.is_file() and is_nifti(p.name))
    if not pred_files:
        raise InputError(pred_dir, "no NIfTI predictions (.nii or .nii.gz) in this folder")
    pairs = [(p, _reference_for(p, gt_dir)) for p in pred_files]

    if labels is None:
        found: set[int] = set()
        for _, gt_path in pairs:
            gt, _ = _load_labels(gt_path)
            found.update(int(v) for v in np.unique(gt) if v not in (0, ignore_label))
        label_list = sorted(found)
    else:
        label_list = _label_list(labels)

    per_case = [evaluate_case(p, g, label_list, ignore_label) for p, g in pairs]
    mean: dict[str, dict[str, float]] = {"dice": {}, "hd95": {}}
    for metric in ("dice", "hd95"):
        for label in label_list:
            key = target_key(label)
            mean[metric][key] = nanmean([case[metric][key] for case in per_case])
    summary: dict[str, Any] = {
        "labels": label_list,
        "per_case": per_case,
        "mean": mean,
        "mean_dice": nanmean(mean["dice"].values()),
        "num_cases": len(per_case),
        "empty_policy": EMPTY_POLICY,
        "ignore_label": ignore_label,
    }
    if output is not None:
        write_json(output, summary)
    return summary


def summary_table(summary: dict[str, Any]) -> str:
    """A short text table (label, mean Dice, mean HD95 in mm) of an :func:`evaluate_folder` summary.

    Accepts the returned dict or the same summary re-read from JSON (where NaN became null);
    missing values print as ``n/a``.
    """
    rows = [("label", "mean Dice", "mean HD95 (mm)")]
    for label in summary["labels"]:
        key = target_key(label)
        rows.append((key, _fmt(summary["mean"]["dice"].get(key)), _fmt(summary["mean"]["hd95"].get(key))))
    rows.append(("all", _fmt(summary.get("mean_dice")), ""))
    widths = [max(len(row[i]) for row in rows) for i in range(3)]
    lines = [f"{r[0]:<{widths[0]}}  {r[1]:>{widths[1]}}  {r[2]:>{widths[2]}}".rstrip() for r in rows]
    lines.insert(1, "  ".join("-" * w for w in widths))
    lines.append(f"({summary.get('num_cases', len(summary.get('per_case', [])))} cases)")
    return "\n".join(lines)


def load_label_map(path: str | os.PathLike) -> tuple[np.ndarray, np.ndarray]:
    """Read a label map as ``(X, Y, Z)`` int32 plus its 4x4 affine (mm); non-integer values raise
    :class:`InputError` naming the file."""
    return _load_labels(Path(path))


# --------------------------------------------------------------------------------------------------


def _check_pair(pred: np.ndarray, gt: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    pred, gt = np.asarray(pred), np.asarray(gt)
    if pred.shape != gt.shape:
        raise ValueError(f"prediction shape {pred.shape} differs from reference shape {gt.shape}")
    return pred, gt


def _label_list(labels: Sequence[Target]) -> list[int | list[int]]:
    """Labels as ints and regions as lists of ints, duplicates dropped, order kept."""
    out: dict[str, int | list[int]] = {}
    for label in labels:
        value = [int(v) for v in label] if isinstance(label, Sequence) else int(label)
        out.setdefault(target_key(value), value)
    return list(out.values())


def _load_labels(path: Path) -> tuple[np.ndarray, np.ndarray]:
    """Read a label map as ``(X, Y, Z)`` int32 plus its affine; non-integer values are an error."""
    vol = load_nifti(path, dtype=np.float32)
    data = vol.data
    if data.ndim == 4 and data.shape[3] == 1:
        data = data[..., 0]
    if data.ndim != 3:
        raise InputError(path, f"expected a 3D label map (X, Y, Z), got shape {vol.data.shape}")
    rounded = np.rint(data)
    if not np.all(np.isfinite(data)) or np.any(np.abs(data - rounded) > 1e-3):
        raise InputError(path, "not a label map: contains non-integer values")
    return rounded.astype(np.int32), vol.affine


def _reference_for(pred_path: Path, gt_dir: Path) -> Path:
    case = strip_nifti_ending(pred_path.name)
    same_name = gt_dir / pred_path.name
    if same_name.is_file():
        return same_name
    for ending in (".nii.gz", ".nii"):
        candidate = gt_dir / f"{case}{ending}"
        if candidate.is_file():
            return candidate
    raise InputError(same_name, f"reference missing for prediction {pred_path.name}")


def _evaluate_arrays(
    pred_path: Path,
    gt_path: Path,
    pred: np.ndarray,
    pred_affine: np.ndarray,
    gt: np.ndarray,
    gt_affine: np.ndarray,
    labels: list[int],
) -> dict[str, Any]:
    if pred.shape != gt.shape:
        raise InputError(pred_path, f"shape {pred.shape} differs from reference {gt_path.name} shape {gt.shape}")
    diff = float(np.max(np.abs(pred_affine - gt_affine)))
    if not diff <= AFFINE_TOLERANCE:
        raise InputError(pred_path, f"affine differs from reference {gt_path.name} (max abs difference {diff:.3g})")
    spacing = spacing_from_affine(gt_affine)
    return {
        "case": strip_nifti_ending(pred_path.name),
        "dice": {target_key(label): dice(pred, gt, label) for label in labels},
        "hd95": {target_key(label): hd95(pred, gt, label, spacing) for label in labels},
    }


def nanmean(values: Iterable[float | None]) -> float:
    """Mean of the values that are neither None nor NaN (NaN when none is)."""
    arr = np.array([np.nan if v is None else v for v in values], dtype=np.float64)
    finite = arr[~np.isnan(arr)]
    return float(finite.mean()) if finite.size else float("nan")


def case_mean_dice(case: dict[str, Any]) -> float:
    """One ``per_case`` entry of an evaluation summary: its mean Dice over labels (NaN ones left out)."""
    return nanmean(case["dice"].values())


def _fmt(value: float | None) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "n/a"
    return f"{value:.4f}"
