"""Tests for segpipe.evaluation.metrics: hand-computed Dice / HD95 values and the folder summary."""

from __future__ import annotations

import json
import math
import re
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from segpipe.data.nifti import InputError, save_nifti
from segpipe.evaluation.metrics import (
    EMPTY_POLICY,
    dice,
    evaluate_case,
    evaluate_folder,
    hd95,
    summary_table,
    volume_diagonal,
)

# ----------------------------------------------------------------------------------------- Dice


def test_dice_two_cubes_exact_fraction() -> None:
    pred = np.zeros((6, 6, 6), np.int32)
    gt = np.zeros((6, 6, 6), np.int32)
    pred[0:4, 0:4, 0:4] = 1  # 64 voxels
    gt[2:5, 0:4, 0:4] = 1  # 48 voxels, overlap [2:4] x 4 x 4 = 32
    assert dice(pred, gt, 1) == pytest.approx(2 * 32 / (64 + 48))  # 4/7
    assert dice(pred, gt, 1) == pytest.approx(4 / 7)


def test_dice_selects_label() -> None:
    pred = np.zeros((4, 4, 4), np.int32)
    gt = np.zeros((4, 4, 4), np.int32)
    pred[0, 0, 0:2] = 1
    gt[0, 0, 0:2] = 1
    pred[3, 3, 0:3] = 2  # 3 voxels
    gt[3, 3, 2:3] = 2  # 1 voxel, inside the prediction
    assert dice(pred, gt, 1) == 1.0
    assert dice(pred, gt, 2) == pytest.approx(2 * 1 / 4)


def test_dice_empty_conventions() -> None:
    empty = np.zeros((3, 3, 3), np.int32)
    one = empty.copy()
    one[1, 1, 1] = 1
    assert math.isnan(dice(empty, empty, 1))
    assert dice(one, empty, 1) == 0.0
    assert dice(empty, one, 1) == 0.0


# ----------------------------------------------------------------------------------------- HD95


def test_hd95_single_voxels_anisotropic_spacing() -> None:
    pred = np.zeros((5, 5, 5), np.int32)
    gt = np.zeros((5, 5, 5), np.int32)
    pred[2, 2, 1] = 1
    gt[2, 2, 3] = 1  # 2 voxels apart along axis 2
    assert hd95(pred, gt, 1, (1.0, 1.0, 3.0)) == pytest.approx(6.0)
    assert hd95(gt, pred, 1, (1.0, 1.0, 3.0)) == pytest.approx(6.0)
    # spacing applies per axis in (X, Y, Z) order: axis 0 spacing does not matter here
    assert hd95(pred, gt, 1, (7.0, 1.0, 0.5)) == pytest.approx(1.0)


def test_hd95_identical_masks_is_zero() -> None:
    mask = np.zeros((6, 6, 6), np.int32)
    mask[1:5, 2:4, 0:6] = 3
    assert hd95(mask, mask.copy(), 3, (1.0, 2.0, 3.0)) == 0.0


def test_hd95_concentric_cubes_uses_95th_percentile_not_max() -> None:
    # G = 7-cube [1:8]^3, P = 3-cube [3:6]^3, spacing 2 mm isotropic.
    # P's 26 surface voxels are all 2 voxels from G's shell -> p95(P->G) = 2 voxels.
    # G's 218 shell voxels: distance to P = |g - clip(g, 3, 5)|; sorted counts are
    # 2:54, sqrt5:72, sqrt6:24, sqrt8:36, 3:24, sqrt12:8, and the 95th percentile sits at
    # 0.95 * 217 = 206.15, inside the run of 3s (indices 186..209) -> p95(G->P) = 3 voxels = 6 mm.
    pred = np.zeros((9, 9, 9), np.int32)
    gt = np.zeros((9, 9, 9), np.int32)
    gt[1:8, 1:8, 1:8] = 1
    pred[3:6, 3:6, 3:6] = 1
    assert hd95(pred, gt, 1, (2.0, 2.0, 2.0)) == pytest.approx(6.0)
    assert hd95(gt, pred, 1, (2.0, 2.0, 2.0)) == pytest.approx(6.0)  # symmetric
    # the plain Hausdorff distance would be the corner distance 2 * sqrt(12) = 6.93 mm


def test_hd95_shifted_cube_anisotropic() -> None:
    # P = [2:5]^3, G = P shifted by 1 voxel along axis 0, spacing (3, 1, 1) mm.
    # P->G over P's 26 surface voxels: the x=2 face (9) is 3 mm away, P's face centre (4,3,3) is
    # G's interior centre, 1 mm from G's surface, the other 16 lie on G's surface (0 mm).
    # Sorted: 0 x16, 1 x1, 3 x9; p95 at 0.95 * 25 = 23.75 -> 3 mm. G->P is the mirror image.
    pred = np.zeros((8, 7, 7), np.int32)
    pred[2:5, 2:5, 2:5] = 1
    gt = np.roll(pred, 1, axis=0)
    assert hd95(pred, gt, 1, (3.0, 1.0, 1.0)) == pytest.approx(3.0)
    # wrong axis order would move the 3 mm onto axis 2, where nothing is shifted
    assert hd95(pred, gt, 1, (1.0, 1.0, 3.0)) == pytest.approx(1.0)


def test_hd95_mask_touching_border_counts_border_as_surface() -> None:
    # A full 3-block touching every border: all but the centre voxel are surface (erosion uses
    # border 0). G is the x=0 plane. P->G over 26 surface voxels: x=0 (9) 0 mm, x=1 (8) 1 mm,
    # x=2 (9) 2 mm; p95 at 0.95 * 25 = 23.75 -> 2 mm. G->P is 0 (G lies on P's surface).
    pred = np.ones((3, 3, 3), np.int32)
    gt = np.zeros((3, 3, 3), np.int32)
    gt[0, :, :] = 1
    assert hd95(pred, gt, 1, (1.0, 1.0, 1.0)) == pytest.approx(2.0)


def test_hd95_empty_conventions() -> None:
    empty = np.zeros((4, 5, 6), np.int32)
    one = empty.copy()
    one[1, 1, 1] = 1
    spacing = (1.0, 2.0, 3.0)
    diagonal = math.sqrt(4.0**2 + 10.0**2 + 18.0**2)
    assert math.isnan(hd95(empty, empty, 1, spacing))
    assert hd95(one, empty, 1, spacing) == pytest.approx(diagonal)
    assert hd95(empty, one, 1, spacing) == pytest.approx(diagonal)
    assert volume_diagonal((4, 5, 6), spacing) == pytest.approx(diagonal)


def test_hd95_rejects_wrong_spacing_length() -> None:
    mask = np.ones((2, 2, 2), np.int32)
    with pytest.raises(ValueError, match="spacing"):
        hd95(mask, mask, 1, (1.0, 1.0))


# ------------------------------------------------------------------------------------ files


AFFINE = np.diag([1.0, 1.0, 2.0, 1.0])  # spacing (1, 1, 2) mm


def _write(path: Path, data: np.ndarray, affine: np.ndarray = AFFINE) -> Path:
    save_nifti(path, data, affine, dtype=np.uint8)
    return path


def _nan_to_none(obj: Any) -> Any:
    if isinstance(obj, float) and math.isnan(obj):
        return None
    if isinstance(obj, dict):
        return {k: _nan_to_none(v) for k, v in obj.items()}
    if isinstance(obj, list):
        return [_nan_to_none(v) for v in obj]
    return obj


def _make_folders(tmp_path: Path) -> tuple[Path, Path]:
    pred_dir, gt_dir = tmp_path / "pred", tmp_path / "gt"
    pred_dir.mkdir()
    gt_dir.mkdir()
    shape = (6, 6, 6)

    # case_a: label 1 perfect, label 2 half-overlapping along axis 2 (spacing 2 mm there)
    gt_a = np.zeros(shape, np.uint8)
    gt_a[0:2, 0:2, 0:2] = 1
    gt_a[3:5, 3:5, 2:4] = 2  # 8 voxels
    pred_a = gt_a.copy()
    pred_a[pred_a == 2] = 0
    pred_a[3:5, 3:5, 3:5] = 2  # 8 voxels, 4 shared -> Dice 0.5
    _write(gt_dir / "case_a.nii.gz", gt_a)
    _write(pred_dir / "case_a.nii.gz", pred_a)

    # case_b: label 1 predicted (one voxel) where the reference has none; no label 2 anywhere
    gt_b = np.zeros(shape, np.uint8)
    pred_b = np.zeros(shape, np.uint8)
    pred_b[5, 5, 5] = 1
    _write(gt_dir / "case_b.nii.gz", gt_b)
    _write(pred_dir / "case_b.nii.gz", pred_b)
    return pred_dir, gt_dir


def test_evaluate_case_values_and_id(tmp_path: Path) -> None:
    pred_dir, gt_dir = _make_folders(tmp_path)
    result = evaluate_case(pred_dir / "case_a.nii.gz", gt_dir / "case_a.nii.gz", [1, 2])
    assert result["case"] == "case_a"
    assert result["dice"] == {"1": 1.0, "2": pytest.approx(0.5)}
    # label 2 slabs z=2..3 vs z=3..4: every surface voxel is 0 or 1 voxel (2 mm) along z away;
    # P->G: z=3 layer (4 voxels) 0 mm, z=4 layer (4 voxels) 2 mm -> p95 = 2 mm
    assert result["hd95"] == {"1": 0.0, "2": pytest.approx(2.0)}


def test_evaluate_folder_summary_and_json(tmp_path: Path) -> None:
    pred_dir, gt_dir = _make_folders(tmp_path)
    out = tmp_path / "reports" / "summary.json"
    summary = evaluate_folder(pred_dir, gt_dir, output=out)

    assert summary["labels"] == [1, 2]  # inferred from the reference files
    assert summary["num_cases"] == 2
    assert [c["case"] for c in summary["per_case"]] == ["case_a", "case_b"]
    case_b = summary["per_case"][1]
    assert case_b["dice"]["1"] == 0.0
    assert case_b["hd95"]["1"] == pytest.approx(math.sqrt(6.0**2 + 6.0**2 + 12.0**2))
    assert math.isnan(case_b["dice"]["2"]) and math.isnan(case_b["hd95"]["2"])

    for metric in ("dice", "hd95"):
        for key in ("1", "2"):
            values = np.array([c[metric][key] for c in summary["per_case"]], dtype=float)
            assert summary["mean"][metric][key] == pytest.approx(float(np.nanmean(values)))
    assert summary["mean"]["dice"] == {"1": pytest.approx(0.5), "2": pytest.approx(0.5)}
    assert summary["mean_dice"] == pytest.approx(0.5)
    assert summary["empty_policy"] == EMPTY_POLICY

    on_disk = json.loads(out.read_text())
    assert on_disk == _nan_to_none(summary)
    assert on_disk["per_case"][1]["dice"]["2"] is None


def test_evaluate_folder_explicit_labels_and_all_nan_label(tmp_path: Path) -> None:
    pred_dir, gt_dir = _make_folders(tmp_path)
    summary = evaluate_folder(pred_dir, gt_dir, labels=[1, 7])
    assert summary["labels"] == [1, 7]
    assert set(summary["per_case"][0]["dice"]) == {"1", "7"}
    assert math.isnan(summary["mean"]["dice"]["7"]) and math.isnan(summary["mean"]["hd95"]["7"])
    assert summary["mean_dice"] == pytest.approx(0.5)  # the all-NaN label is left out
    table = summary_table(summary)
    assert "n/a" in table and "0.5000" in table and "(2 cases)" in table
    assert [line.split()[0] for line in table.splitlines()[2:4]] == ["1", "7"]


def test_summary_table_accepts_json_nulls(tmp_path: Path) -> None:
    pred_dir, gt_dir = _make_folders(tmp_path)
    out = tmp_path / "s.json"
    evaluate_folder(pred_dir, gt_dir, labels=[2, 9], output=out)
    table = summary_table(json.loads(out.read_text()))
    assert "n/a" in table and "0.5000" in table


def test_missing_reference_names_the_file(tmp_path: Path) -> None:
    pred_dir, gt_dir = _make_folders(tmp_path)
    (gt_dir / "case_b.nii.gz").unlink()
    with pytest.raises(InputError, match=re.escape("case_b.nii.gz")) as info:
        evaluate_folder(pred_dir, gt_dir)
    assert info.value.path == str(gt_dir / "case_b.nii.gz")  # the missing reference itself


def test_shape_mismatch_names_the_prediction(tmp_path: Path) -> None:
    pred = _write(tmp_path / "p" / "odd_case.nii.gz", np.zeros((6, 6, 5), np.uint8))
    gt = _write(tmp_path / "g" / "odd_case.nii.gz", np.zeros((6, 6, 6), np.uint8))
    with pytest.raises(InputError, match=re.escape("odd_case.nii.gz")) as info:
        evaluate_case(pred, gt, [1])
    assert info.value.path == str(pred)
    assert "shape" in str(info.value)


def test_affine_mismatch_raises(tmp_path: Path) -> None:
    data = np.zeros((4, 4, 4), np.uint8)
    shifted = AFFINE.copy()
    shifted[0, 3] = 0.01
    pred = _write(tmp_path / "p" / "c1.nii", data, shifted)
    gt = _write(tmp_path / "g" / "c1.nii", data)
    with pytest.raises(InputError, match="affine") as info:
        evaluate_case(pred, gt, [1])
    assert info.value.path == str(pred)
    # within tolerance is accepted
    nearly = AFFINE.copy()
    nearly[0, 3] = 1e-4
    ok = _write(tmp_path / "p" / "c2.nii", data, nearly)
    assert evaluate_case(ok, gt, [1])["case"] == "c2"
