"""Largest-component postprocessing: the components, the nnU-Net decision rules, predict's hook, the CLI."""

from __future__ import annotations

from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
from conftest import run_cli
from oof_work import AFFINE, box, dice_by_hand, write_predictions, write_work

from segpipe.core.atomic import read_json
from segpipe.data.dataset import CaseData
from segpipe.data.nifti import Volume, load_nifti
from segpipe.evaluation.postprocessing_decision import decide_postprocessing
from segpipe.inference.postprocessing import apply_postprocessing, keep_largest_component, load_decision
from segpipe.inference.predict import write_prediction

SHAPE = (16, 16, 16)
A = box(SHAPE, (2, 2, 2), (6, 6, 6))  # 64 voxels
B_ATTACHED = box(SHAPE, (6, 2, 2), (8, 4, 4))  # 8 voxels, shares a face with A
B_APART = box(SHAPE, (2, 10, 2), (4, 12, 4))  # 8 voxels, apart from A
SPURIOUS = box(SHAPE, (10, 10, 10), (14, 14, 13))  # 48 voxels, far from everything


def _seg(*parts: tuple[np.ndarray, int]) -> np.ndarray:
    seg = np.zeros(SHAPE, dtype=np.uint8)
    for mask, label in parts:
        seg[mask] = label
    return seg


def _gt_paths(tmp_path: Path, gts: dict[str, np.ndarray]) -> dict[str, Path]:
    write_predictions(tmp_path / "gt", gts)
    return {case: tmp_path / "gt" / f"{case}.nii.gz" for case in gts}


def test_keep_largest_component_uses_full_connectivity() -> None:
    """nnU-Net (acvl_utils via skimage.measure.label): 26-connected components, ties all kept."""
    seg = _seg((A, 1), (B_ATTACHED, 2))
    seg[6, 6, 6] = 1  # touches A (ends at 5, 5, 5) only at a corner: part of A's component with 26 neighbours
    seg[12, 12, 12] = 2
    out = keep_largest_component(seg, None)
    expected = _seg((A, 1), (B_ATTACHED, 2))
    expected[6, 6, 6] = 1
    np.testing.assert_array_equal(out, expected)  # A + B + the corner voxel: one foreground component
    per_label = keep_largest_component(seg, [2])
    expected = seg.copy()
    expected[12, 12, 12] = 0
    np.testing.assert_array_equal(per_label, expected)
    assert seg[12, 12, 12] == 2  # input untouched
    # two components of 8 voxels tie for the largest: both stay, the single voxel goes
    tie = _seg((B_ATTACHED, 1), (B_APART, 1))
    tie[14, 14, 14] = 1
    np.testing.assert_array_equal(keep_largest_component(tie, None), _seg((B_ATTACHED, 1), (B_APART, 1)))


def test_decision_keeps_largest_foreground_when_it_helps(tmp_path: Path) -> None:
    gt = _seg((A, 1), (B_ATTACHED, 2))
    pred = _seg((A, 1), (B_ATTACHED, 2), (SPURIOUS, 1))
    gts = {"c0": gt, "c1": gt}
    write_predictions(tmp_path / "fold_0", {"c0": pred})
    write_predictions(tmp_path / "fold_1", {"c1": pred})
    decision = decide_postprocessing([tmp_path / "fold_0", tmp_path / "fold_1"], _gt_paths(tmp_path, gts), [1, 2])
    assert decision["foreground_largest_component"] is True
    assert decision["per_label_largest_component"] == []
    assert decision["num_cases"] == 2
    assert decision["dice_before"]["1"] == pytest.approx(dice_by_hand(pred, gt, 1))
    assert decision["dice_after"] == {"1": 1.0, "2": 1.0}
    np.testing.assert_array_equal(apply_postprocessing(pred, decision), gt)


def test_decision_refuses_foreground_step_that_hurts_one_label(tmp_path: Path) -> None:
    """Keeping the largest foreground component raises the mean Dice here, but removes label 2 of one
    case (it lies apart); nnU-Net's rule then rejects it, and keeps the per-label step for label 1."""
    attached_gt, attached_pred = _seg((A, 1), (B_ATTACHED, 2)), _seg((A, 1), (B_ATTACHED, 2), (SPURIOUS, 1))
    apart_gt, apart_pred = _seg((A, 1), (B_APART, 2)), _seg((A, 1), (B_APART, 2), (SPURIOUS, 1))
    gts = {"c0": attached_gt, "c1": attached_gt, "c2": attached_gt, "c3": apart_gt}
    preds = {"c0": attached_pred, "c1": attached_pred, "c2": attached_pred, "c3": apart_pred}
    write_predictions(tmp_path / "oof", preds)
    # the premise: the foreground step alone raises the mean over labels while label 2 falls
    fg = {c: keep_largest_component(p, None) for c, p in preds.items()}
    mean_before = np.mean([np.mean([dice_by_hand(preds[c], gts[c], v) for c in gts]) for v in (1, 2)])
    mean_fg = np.mean([np.mean([dice_by_hand(fg[c], gts[c], v) for c in gts]) for v in (1, 2)])
    assert mean_fg > mean_before and np.mean([dice_by_hand(fg[c], gts[c], 2) for c in gts]) < 1.0

    decision = decide_postprocessing([tmp_path / "oof"], _gt_paths(tmp_path, gts), [1, 2])
    assert decision["foreground_largest_component"] is False
    assert decision["per_label_largest_component"] == [1]
    assert decision["dice_after"] == {"1": 1.0, "2": 1.0}
    for case in gts:
        np.testing.assert_array_equal(apply_postprocessing(preds[case], decision), gts[case])


def test_decision_keeps_everything_when_removing_components_hurts(tmp_path: Path) -> None:
    gt = _seg((A, 1), (SPURIOUS, 1), (B_APART, 2))  # label 1 really has two separate blobs
    write_predictions(tmp_path / "oof", {"c0": gt, "c1": gt})
    decision = decide_postprocessing([tmp_path / "oof"], _gt_paths(tmp_path, {"c0": gt, "c1": gt}), [1, 2])
    assert decision["foreground_largest_component"] is False
    assert decision["per_label_largest_component"] == []
    assert decision["dice_before"] == decision["dice_after"] == {"1": 1.0, "2": 1.0}
    np.testing.assert_array_equal(apply_postprocessing(gt, decision), gt)
    np.testing.assert_array_equal(apply_postprocessing(gt, None), gt)


def test_write_prediction_applies_decision_to_labels_not_probabilities(tmp_path: Path) -> None:
    seg = _seg((A, 1), (B_ATTACHED, 2), (SPURIOUS, 1))
    probs = np.stack([(seg == v).astype(np.float32) for v in (0, 1, 2)])
    header = nib.Nifti1Header()
    data = CaseData("c0", np.zeros((1, *SHAPE), np.float32), None, Volume(np.zeros(SHAPE), AFFINE, header, tmp_path))
    decision = {"foreground_largest_component": True, "per_label_largest_component": []}
    write_prediction(tmp_path / "pp", data, probs, [1, 2], True, decision)
    write_prediction(tmp_path / "raw", data, probs, [1, 2], False, None)
    kept = _seg((A, 1), (B_ATTACHED, 2))
    np.testing.assert_array_equal(load_nifti(tmp_path / "pp" / "c0.nii.gz", np.uint8).data, kept)
    np.testing.assert_array_equal(load_nifti(tmp_path / "raw" / "c0.nii.gz", np.uint8).data, seg)
    with np.load(tmp_path / "pp" / "c0.npz") as f:
        np.testing.assert_array_equal(f["probabilities"], probs.astype(np.float16))


def test_postprocess_command_writes_decision(tmp_path: Path) -> None:
    gt = _seg((A, 1), (B_ATTACHED, 2))
    pred = _seg((A, 1), (B_ATTACHED, 2), (SPURIOUS, 1))
    work = write_work(
        tmp_path,
        {"c0": gt, "c1": gt},
        [{"train": ["c1"], "val": ["c0"]}, {"train": ["c0"], "val": ["c1"]}],
        ["3d_fullres"],
    )
    write_predictions(work / "3d_fullres" / "fold_0" / "validation", {"c0": pred})
    write_predictions(work / "3d_fullres" / "fold_1" / "validation", {"c1": gt})
    result = run_cli("postprocess", work)
    assert result.exit_code == 0, result.output
    assert "largest foreground component: yes" in result.output
    stored = read_json(work / "3d_fullres" / "postprocessing.json")
    assert stored == load_decision(work / "3d_fullres" / "postprocessing.json")
    assert stored["foreground_largest_component"] is True and stored["folds"] == [0, 1]
    assert stored["num_cases"] == 2
    assert load_decision(work / "3d_lowres" / "postprocessing.json") is None
    assert run_cli("postprocess", work, "--config", "3d_lowres").exit_code == 1
