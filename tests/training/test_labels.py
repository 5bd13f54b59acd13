"""The label setups users have, end to end through the CLI on synthetic data: nnU-Net v2's ``ignore``
label, and label values above 255 (no silent wrap-around)."""

from __future__ import annotations

import shutil
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
from click.testing import Result
from conftest import run_cli, write_nnunet_dataset

from segpipe.core.atomic import read_json, write_json
from segpipe.data.nifti import load_nifti, save_nifti
from segpipe.planning.plans import FULLRES, Plans, load_plans

TRAIN = "--fold 0 --epochs 1 --iters-per-epoch 2 --val-iters 1 --num-folds 2 --device cpu --workers 0 --no-val-tta"
IGNORE = 3


def ok(result: Result) -> str:
    assert result.exit_code == 0, f"exit {result.exit_code}\n{result.output}\n{result.exception!r}"
    return result.output


@pytest.fixture(scope="module")
def ignore_dataset(synthetic_dataset: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """6 cases, nnU-Net v2 layout, labels a=1, b=2 and ignore=3 on the first 8 slices along X."""
    root = write_nnunet_dataset(synthetic_dataset, tmp_path_factory.mktemp("ignore") / "nn", cases=6)
    meta = read_json(root / "dataset.json")
    meta["labels"] = {"background": 0, "a": 1, "b": 2, "ignore": IGNORE}
    write_json(root / "dataset.json", meta)
    for path in sorted((root / "labelsTr").glob("*.nii.gz")):
        vol = load_nifti(path, dtype=np.uint8)
        data = vol.data.copy()
        data[:8] = IGNORE
        save_nifti(path, data, vol.affine, dtype=np.uint8)
    return root


def checked_and_preprocessed(dataset: Path, work: Path) -> Plans:
    """``check`` passes, then ``preprocess`` with the CPU preset; the plans."""
    ok(run_cli("check", dataset))
    ok(run_cli("preprocess", dataset, "-o", work, "--preset", "cpu", "--workers", 1))
    return load_plans(work / "plans.json")


def test_ignore_label_end_to_end(ignore_dataset: Path, tmp_path: Path) -> None:
    work = tmp_path / "work"
    plans = checked_and_preprocessed(ignore_dataset, work)
    assert plans.ignore_label == IGNORE and plans.num_classes == 3 and plans.labels == {"background": 0, "a": 1, "b": 2}
    seg = np.load(work / "preprocessed" / FULLRES / "synth_000_seg.npy")
    assert plans.ignore_class == 3 and (seg == 3).any()  # kept through resampling as its own class
    ok(run_cli("train", work, *TRAIN.split()))
    val = work / FULLRES / "fold_0" / "validation"
    predictions = sorted(val.glob("*.nii.gz"))
    assert predictions
    for path in predictions:
        assert IGNORE not in np.unique(np.asarray(nib.load(str(path)).dataobj))  # never predicted
    # evaluate --ignore: Dice over the annotated voxels only, checked by hand for one case
    ok(run_cli("evaluate", val, ignore_dataset / "labelsTr", "--ignore", IGNORE, "-o", tmp_path / "s.json"))
    summary = read_json(tmp_path / "s.json")
    case = summary["per_case"][0]
    pred = np.asarray(nib.load(str(val / f"{case['case']}.nii.gz")).dataobj)
    gt = np.asarray(nib.load(str(ignore_dataset / "labelsTr" / f"{case['case']}.nii.gz")).dataobj)
    for label in (1, 2):
        p, g = (pred == label) & (gt != IGNORE), gt == label
        expected = 2 * np.sum(p & g) / (p.sum() + g.sum()) if p.sum() + g.sum() else None
        assert case["dice"][str(label)] == pytest.approx(expected)
    assert summary["ignore_label"] == IGNORE
    ok(run_cli("report", work))
    assert read_json(work / "report" / "report.json")["recommended"]
    # segpipe predict on new images (here: the training images) never writes the ignore value either
    ok(run_cli("predict", "-i", ignore_dataset / "imagesTr", "-o", tmp_path / "pred", "-m", work, "--no-tta"))
    written = sorted((tmp_path / "pred").glob("*.nii.gz"))
    assert len(written) == 6
    assert all(IGNORE not in np.unique(np.asarray(nib.load(str(w)).dataobj)) for w in written)


def test_ignore_must_be_a_new_value(ignore_dataset: Path, tmp_path: Path) -> None:
    broken = Path(shutil.copytree(ignore_dataset, tmp_path / "broken"))
    meta = read_json(ignore_dataset / "dataset.json")
    meta["labels"] = {"background": 0, "a": 1, "b": 2, "ignore": 2}
    write_json(broken / "dataset.json", meta)
    result = run_cli("check", broken)
    assert result.exit_code == 1 and "dataset.json" in result.output and "'ignore' label 2" in result.output


def test_label_values_above_255_are_kept(synthetic_dataset: Path, tmp_path: Path) -> None:
    """MM-WHS-like values 300 and 301: planned, trained, predicted as uint16 with exactly those values."""
    data = tmp_path / "Task07_Big"
    shutil.copytree(synthetic_dataset, data)
    meta = read_json(data / "dataset.json")
    meta["labels"] = {"0": "background", "300": "a", "301": "b"}
    write_json(data / "dataset.json", meta)
    for path in sorted((data / "labelsTr").glob("*.nii.gz")):
        vol = load_nifti(path, dtype=np.uint8)
        relabelled = np.select([vol.data == 1, vol.data == 2], [300, 301], 0).astype(np.uint16)
        save_nifti(path, relabelled, vol.affine, dtype=np.uint16)
    work = tmp_path / "work"
    ok(run_cli("preprocess", data, "-o", work, "--preset", "cpu", "--workers", 1))
    assert load_plans(work / "plans.json").foreground_labels == [300, 301]
    ok(run_cli("train", work, *TRAIN.split()))
    for path in sorted((work / FULLRES / "fold_0" / "validation").glob("*.nii.gz")):
        img = nib.load(str(path))
        assert img.get_data_dtype() == np.uint16
        assert set(np.unique(np.asarray(img.dataobj)).tolist()) <= {0, 300, 301}
    # a value beyond what int16 class maps and uint16 files hold is refused, naming the file
    first = sorted((data / "labelsTr").glob("*.nii.gz"))[0]
    vol = load_nifti(first, dtype=np.uint16)
    big = vol.data.astype(np.int32)
    big[0, 0, 0] = 40000
    save_nifti(first, big, vol.affine, dtype=np.int32)
    result = run_cli("check", data)
    assert result.exit_code == 1 and first.name in result.output and "40000" in result.output


@pytest.fixture(scope="module")
def region_dataset(synthetic_dataset: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """6 cases, nnU-Net v2 layout, regions as BraTS declares them: "both" = labels 1 and 2, "b" = 2."""
    root = write_nnunet_dataset(synthetic_dataset, tmp_path_factory.mktemp("regions") / "nn", cases=6)
    meta = read_json(root / "dataset.json")
    meta["labels"] = {"background": 0, "both": [1, 2], "b": 2}
    meta["regions_class_order"] = [1, 2]
    write_json(root / "dataset.json", meta)
    return root


def test_regions_end_to_end(region_dataset: Path, tmp_path: Path) -> None:
    work = tmp_path / "work"
    plans = checked_and_preprocessed(region_dataset, work)
    assert plans.regions == [[1, 2], [2]] and plans.regions_class_order == [1, 2] and plans.num_classes == 2
    out = ok(run_cli("train", work, *TRAIN.split()))
    assert "dice_1+2" in (work / FULLRES / "fold_0" / "log.csv").read_text().splitlines()[0]
    val = work / FULLRES / "fold_0" / "validation"
    summary = read_json(val / "summary.json")
    assert set(summary["mean"]["dice"]) == {"1+2", "2"}, out
    # the region Dice by hand on one case: the union of labels 1 and 2 in prediction and reference
    case = summary["per_case"][0]
    pred = np.asarray(nib.load(str(val / f"{case['case']}.nii.gz")).dataobj)
    gt = np.asarray(nib.load(str(region_dataset / "labelsTr" / f"{case['case']}.nii.gz")).dataobj)
    assert set(np.unique(pred).tolist()) <= {0, 1, 2}
    p, g = pred > 0, gt > 0
    assert case["dice"]["1+2"] == pytest.approx(2 * np.sum(p & g) / (p.sum() + g.sum()))
    # sigmoid probabilities saved, decoded back by region order; report and ensemble work on them
    npz = np.load(val / f"{case['case']}.npz")["probabilities"].astype(np.float32)
    expected = np.where(npz[1] > 0.5, 2, np.where(npz[0] > 0.5, 1, 0))
    clear = (np.abs(npz - 0.5) > 2e-3).all(axis=0)  # the file is float16: leave out values at 0.5 +- rounding
    np.testing.assert_array_equal(pred[clear], expected[clear])
    ok(run_cli("ensemble", val, val, "-o", tmp_path / "ens", "-m", work))
    ensembled = np.asarray(nib.load(str(tmp_path / "ens" / f"{case['case']}.nii.gz")).dataobj)
    np.testing.assert_array_equal(ensembled[clear], pred[clear])
    ok(run_cli("postprocess", work))
    ok(run_cli("report", work))
    ok(run_cli("predict", "-i", region_dataset / "imagesTr", "-o", tmp_path / "pred", "-m", work, "--no-tta"))
    ok(run_cli("evaluate", tmp_path / "pred", region_dataset / "labelsTr", "-o", tmp_path / "per_label.json"))
    per_label = read_json(tmp_path / "per_label.json")  # regions written back to label values 1 and 2
    assert per_label["labels"] == [1, 2] and per_label["num_cases"] == 6
    report = read_json(work / "report" / "report.json")
    assert set(report["candidates"][0]["dice"]) == {"1+2", "2"} and report["labels"] == {"both": "1+2", "b": "2"}


def test_regions_need_a_class_order(region_dataset: Path, tmp_path: Path) -> None:
    broken = Path(shutil.copytree(region_dataset, tmp_path / "broken"))
    meta = read_json(broken / "dataset.json")
    del meta["regions_class_order"]
    write_json(broken / "dataset.json", meta)
    result = run_cli("check", broken)
    assert result.exit_code == 1 and "regions_class_order" in result.output
