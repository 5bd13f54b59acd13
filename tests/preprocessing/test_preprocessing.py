"""Tests for preprocessing (CLI ``segpipe preprocess``), resampling, normalization and splits."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import SYNTH_CASES, run_cli, truncate

from segpipe.core.atomic import read_json, write_json
from segpipe.core.paths import CaseFilesOnDisk, WorkDir
from segpipe.data.dataset import Dataset, read_case
from segpipe.data.nifti import load_nifti, save_nifti
from segpipe.data.synth import generate_case
from segpipe.evaluation.metrics import dice
from segpipe.planning.plans import FULLRES, Normalization, load_plans
from segpipe.planning.splits import load_or_create_splits, make_splits
from segpipe.preprocessing.normalization import normalize
from segpipe.preprocessing.preprocess import CaseProperties, list_preprocessed, load_properties, preprocess_case
from segpipe.preprocessing.resampling import (
    resample_image,
    resample_label,
    resample_probabilities,
    resampled_shape,
    separate_axis,
)

CASE_IDS = [f"synth_{k:03d}" for k in range(SYNTH_CASES)]


def _preprocess(dataset: Path, work: Path, *extra: object) -> str:
    result = run_cli("preprocess", dataset, "-o", work, "--workers", 1, *extra)
    assert result.exit_code == 0, result.output
    return result.output


@pytest.fixture(scope="module")
def preprocessed(synthetic_dataset: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """WORK folder after ``segpipe preprocess`` (which plans first) on the synthetic dataset."""
    work = tmp_path_factory.mktemp("work") / "work"
    output = _preprocess(synthetic_dataset, work)
    assert "'done': 6" in output and "'failed': 0" in output
    return work


def _folder(work: Path) -> Path:
    return WorkDir(work).preprocessed(load_plans(WorkDir(work).plans).configuration(FULLRES).data_identifier)


def _raw(case: CaseProperties) -> tuple[np.ndarray, np.ndarray]:
    assert case.label_file is not None
    return load_nifti(case.image_files[0]).data, load_nifti(case.label_file, dtype=np.uint8).data


def back_to_original(seg: np.ndarray, props: CaseProperties, num_classes: int) -> np.ndarray:
    """Undo preprocessing of a label map: one-hot, resample to the crop box, argmax, paste into the original."""
    onehot = torch.from_numpy(np.eye(num_classes, dtype=np.float32)[seg.astype(np.int64)]).permute(3, 0, 1, 2)
    box = props.crop_box
    probs = resample_probabilities(onehot, [hi - lo for lo, hi in box])
    out = np.zeros(props.original_shape, np.uint8)
    out[tuple(slice(lo, hi) for lo, hi in box)] = probs.argmax(0).numpy()
    return out


# ------------------------------------------------------------------------------- case files


def test_preprocess_writes_case_files(preprocessed: Path, synthetic_dataset: Path) -> None:
    plans = load_plans(preprocessed / "plans.json")
    config = plans.configuration(FULLRES)
    folder = _folder(preprocessed)
    assert folder == preprocessed / "preprocessed" / "3d_fullres"
    assert list_preprocessed(folder) == CASE_IDS
    names = sorted(p.name for p in folder.iterdir())
    assert names == sorted(f"{c}{s}" for c in CASE_IDS for s in (".npy", "_seg.npy", "_fg.npz", ".json"))
    for case_id in CASE_IDS:
        files = CaseFilesOnDisk(folder, case_id)
        props = load_properties(files.properties)
        raw_image, raw_label = _raw(props)
        assert props.case_id == case_id
        assert props.image_files == [str((synthetic_dataset / "imagesTr" / f"{case_id}.nii.gz").resolve())]
        assert props.original_shape == list(raw_image.shape)
        assert props.target_spacing == config.spacing
        box = props.crop_box
        assert all(0 <= lo < hi <= n for (lo, hi), n in zip(box, raw_image.shape))
        inside = raw_image[tuple(slice(lo, hi) for lo, hi in box)]
        assert np.count_nonzero(inside) == np.count_nonzero(raw_image)  # the crop keeps every non-zero voxel
        assert props.shape == resampled_shape([hi - lo for lo, hi in box], props.original_spacing, config.spacing)

        image = np.load(files.image)
        assert image.dtype == np.float32 and image.shape == (1, *props.shape)
        assert np.isfinite(image).all()
        seg = np.load(files.label)
        assert seg.dtype == np.int8 and seg.shape == tuple(props.shape)
        # with non-zero-mask normalization, background outside the mask is -1 (nnU-Net's crop_to_nonzero)
        masked = plans.normalization[0].use_nonzero_mask
        assert set(np.unique(seg).tolist()) == ({-1, 0, 1, 2} if masked else {0, 1, 2})

        with np.load(files.foreground) as fg:
            assert sorted(fg.files) == ["class_1", "class_2"]
            for k in (1, 2):
                coords = fg[f"class_{k}"]
                assert coords.dtype == np.int32 and coords.ndim == 2 and coords.shape[1] == 3
                assert len(coords) == min(np.count_nonzero(seg == k), 10_000) > 0
                assert (seg[tuple(coords.T)] == k).all()
                assert len(np.unique(coords, axis=0)) == len(coords)


def test_in_memory_preprocessing_matches_stored_case(preprocessed: Path) -> None:
    """Inference preprocesses new images with preprocess_case: it must give what training read."""
    plans = load_plans(preprocessed / "plans.json")
    dataset = Dataset.from_dict(read_json(preprocessed / "dataset.json"))
    case = dataset.training[2]
    result = preprocess_case(read_case(case, 1), plans, plans.configuration(FULLRES), case)
    files = CaseFilesOnDisk(_folder(preprocessed), case.case_id)
    np.testing.assert_array_equal(result.image, np.load(files.image))
    np.testing.assert_array_equal(result.label, np.load(files.label))
    assert result.properties == load_properties(files.properties)


def test_second_run_skips_and_overwrite_redoes(synthetic_dataset: Path, tmp_path: Path) -> None:
    work = tmp_path / "work"
    _preprocess(synthetic_dataset, work)
    image = CaseFilesOnDisk(_folder(work), "synth_000").image
    before = image.stat().st_mtime_ns
    output = _preprocess(synthetic_dataset, work)
    assert "'done': 0, 'skipped': 6, 'failed': 0" in output
    assert image.stat().st_mtime_ns == before
    seg = np.load(CaseFilesOnDisk(_folder(work), "synth_000").label)
    output = _preprocess(synthetic_dataset, work, "--overwrite")
    assert "'done': 6, 'skipped': 0, 'failed': 0" in output
    assert image.stat().st_mtime_ns != before
    np.testing.assert_array_equal(np.load(CaseFilesOnDisk(_folder(work), "synth_000").label), seg)  # deterministic


def test_preprocess_unplanned_configuration_fails(preprocessed: Path, synthetic_dataset: Path) -> None:
    result = run_cli("preprocess", synthetic_dataset, "-o", preprocessed, "--configs", "3d_lowres", "--workers", 1)
    assert result.exit_code == 1
    assert "configuration '3d_lowres' is not planned; planned: 2d, 3d_fullres" in result.output


def test_preprocess_two_channels(nnunet_dataset_2ch: Path, tmp_path: Path) -> None:
    _preprocess(nnunet_dataset_2ch, tmp_path / "work")
    folder = _folder(tmp_path / "work")
    assert list_preprocessed(folder) == CASE_IDS[:3]
    image = np.load(CaseFilesOnDisk(folder, "synth_001").image)
    assert image.shape[0] == 2
    # channel 1 is channel 0 times 2: identical after per-image z-scoring
    np.testing.assert_allclose(image[1], image[0], atol=1e-4)


# ------------------------------------------------------------------- failures during preprocess


def test_corrupt_case_others_written_and_reported(msd_copy: Path, tmp_path: Path) -> None:
    work = tmp_path / "work"
    result = run_cli("plan", msd_copy, "-o", work, "--workers", 1)
    assert result.exit_code == 0, result.output
    bad = (msd_copy / "imagesTr" / "synth_003.nii.gz").resolve()
    truncate(bad)
    # two workers: the error must come back from the worker process naming the file
    result = run_cli("preprocess", msd_copy, "-o", work, "--workers", 2)
    assert result.exit_code == 1
    assert "preprocess: 1 problem(s)" in result.output
    assert f"synth_003: {bad}: unreadable or truncated NIfTI" in result.output
    assert list_preprocessed(_folder(work)) == [c for c in CASE_IDS if c != "synth_003"]
    assert not CaseFilesOnDisk(_folder(work), "synth_003").image.exists()
    assert not [p for p in _folder(work).iterdir() if p.name.startswith(".")]  # no temp files left


def test_corrupt_case_stops_plan_before_preprocess(msd_copy: Path, tmp_path: Path) -> None:
    bad = (msd_copy / "labelsTr" / "synth_001.nii.gz").resolve()
    bad.write_bytes(b"garbage")
    (msd_copy / "imagesTr" / "synth_004.nii.gz").unlink()
    work = tmp_path / "work"
    result = run_cli("preprocess", msd_copy, "-o", work, "--workers", 1)
    assert result.exit_code == 1
    assert "plan: 2 problem(s)" in result.output
    assert f"synth_001: {bad}: unreadable or truncated NIfTI" in result.output
    assert f"synth_004: {(msd_copy / 'imagesTr' / 'synth_004.nii.gz').resolve()}: file not found" in result.output
    assert not (work / "plans.json").exists()


# ------------------------------------------------------------- normalization and geometry


AFFINE = np.diag([1.2, 0.9, 1.5, 1.0])


@pytest.fixture(scope="module")
def uniform_work(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Preprocessed synthetic cases that all share one spacing, so no resampling happens."""
    root = tmp_path_factory.mktemp("uniform") / "ds"
    training = []
    for k in range(3):
        case = generate_case(k, (32, 32, 24), labels=2, seed=1)
        save_nifti(root / "imagesTr" / f"u_{k}.nii.gz", case.image, AFFINE, dtype=np.float32)
        save_nifti(root / "labelsTr" / f"u_{k}.nii.gz", case.label, AFFINE, dtype=np.uint8)
        training.append({"image": f"./imagesTr/u_{k}.nii.gz", "label": f"./labelsTr/u_{k}.nii.gz"})
    labels = {"0": "background", "1": "a", "2": "b"}
    write_json(root / "dataset.json", {"name": "U", "modality": {"0": "MR"}, "labels": labels, "training": training})
    work = tmp_path_factory.mktemp("uniform_work") / "work"
    _preprocess(root, work)
    return work


def test_zscore_inside_nonzero_mask(uniform_work: Path) -> None:
    plans = load_plans(uniform_work / "plans.json")
    assert plans.normalization == [Normalization("zscore", use_nonzero_mask=True)]
    assert plans.configuration(FULLRES).spacing == pytest.approx([1.2, 0.9, 1.5])
    folder = _folder(uniform_work)
    for case_id in ["u_0", "u_1", "u_2"]:
        files = CaseFilesOnDisk(folder, case_id)
        props = load_properties(files.properties)
        raw_image, _ = _raw(props)
        mask = raw_image[tuple(slice(lo, hi) for lo, hi in props.crop_box)] != 0
        image = np.load(files.image)[0]
        assert image.shape == mask.shape  # same spacing: cropped, not resampled
        assert abs(float(image[mask].mean())) < 1e-4
        assert float(image[mask].std()) == pytest.approx(1.0, abs=1e-4)
        assert (image[~mask] == 0).all()
        assert 0.1 < mask.mean() < 1.0


def test_geometry_round_trip_exact_at_target_spacing(uniform_work: Path) -> None:
    folder = _folder(uniform_work)
    for case_id in ["u_0", "u_1", "u_2"]:
        files = CaseFilesOnDisk(folder, case_id)
        props = load_properties(files.properties)
        _, raw_label = _raw(props)
        seg = np.maximum(np.load(files.label), 0)  # "outside the non-zero mask" (-1) is background
        np.testing.assert_array_equal(back_to_original(seg, props, 3), raw_label)


def test_geometry_round_trip_with_resampling(preprocessed: Path) -> None:
    folder = _folder(preprocessed)
    spacing = load_plans(preprocessed / "plans.json").configuration(FULLRES).spacing
    for case_id in CASE_IDS:
        files = CaseFilesOnDisk(folder, case_id)
        props = load_properties(files.properties)
        assert props.original_spacing != pytest.approx(spacing, abs=1e-3)  # really resampled
        _, raw_label = _raw(props)
        restored = back_to_original(np.maximum(np.load(files.label), 0), props, 3)
        for k in (1, 2):
            assert dice(restored, raw_label, k) > 0.95, (case_id, k, dice(restored, raw_label, k))


def test_normalize_schemes() -> None:
    image = np.zeros((2, 6, 6, 6), np.float32)
    image[:, 1:5, 1:5, 1:5] = np.arange(64, dtype=np.float32).reshape(4, 4, 4)
    image[1] = image[1] * 10 - 200
    out = normalize(image, [Normalization("zscore", use_nonzero_mask=True), Normalization("zscore")])
    mask = np.any(image != 0, axis=0)
    assert out[0][mask].mean() == pytest.approx(0, abs=1e-5) and out[0][mask].std() == pytest.approx(1, abs=1e-5)
    assert (out[0][~mask] == 0).all()
    assert out[1].mean() == pytest.approx(0, abs=1e-5) and out[1].std() == pytest.approx(1, abs=1e-5)
    ct = normalize(image[:1], [Normalization("ct", mean=10.0, std=5.0, lower=0.0, upper=20.0)])
    assert ct.min() == pytest.approx(-2.0) and ct.max() == pytest.approx(2.0)
    with pytest.raises(ValueError, match="image has 2 channels, plans expect 1"):
        normalize(image, [Normalization("zscore")])
    with pytest.raises(KeyError, match="unknown normalization scheme 'nope'"):
        normalize(image[:1], [Normalization("nope")])


# ------------------------------------------------------------------------------- resampling


def test_resampled_shape_arithmetic() -> None:
    assert resampled_shape([10, 20, 30], [1, 1, 2], [0.5, 2, 1]) == [20, 10, 60]
    assert resampled_shape([100, 100, 3], [0.5, 0.5, 5], [1, 1, 1]) == [50, 50, 15]
    assert resampled_shape([7, 7, 7], [1, 1, 1], [1.5, 1.5, 1.5]) == [5, 5, 5]  # 4.67 rounds to 5
    assert resampled_shape([3, 3, 3], [1, 1, 1], [10, 10, 10]) == [1, 1, 1]  # never below one voxel


def test_resample_to_same_spacing_is_identity() -> None:
    rng = np.random.default_rng(0)
    image = rng.standard_normal((2, 10, 12, 14)).astype(np.float32)
    out = resample_image(image, [0.7, 1.3, 2.2], [0.7, 1.3, 2.2])
    assert out.dtype == np.float32
    np.testing.assert_array_equal(out, image)
    label = rng.integers(0, 3, (10, 12, 14)).astype(np.uint8)
    np.testing.assert_array_equal(resample_label(label, [0.7, 1.3, 2.2], [0.7, 1.3, 2.2], 3), label)
    probs = torch.from_numpy(rng.random((3, 10, 12, 14)).astype(np.float32))
    assert torch.equal(resample_probabilities(probs, [10, 12, 14]), probs)


def test_resample_shapes_follow_resampled_shape() -> None:
    image = np.ones((1, 20, 16, 10), np.float32)
    out = resample_image(image, [1, 1, 2], [2, 2, 1])
    assert out.shape == (1, 10, 8, 20)
    np.testing.assert_allclose(out, 1.0, atol=1e-5)  # a constant stays constant
    label = np.zeros((20, 16, 10), np.uint8)
    label[4:14, 4:12, 3:7] = 2  # 10 x 8 x 8 mm, aligned with the 2 mm target grid
    small = resample_label(label, [1, 1, 2], [2, 2, 1], 3)
    assert small.shape == (10, 8, 20) and set(np.unique(small).tolist()) == {0, 2}
    assert np.count_nonzero(small) == 5 * 4 * 8  # the same 640 mm³ in 4 mm³ voxels
    where = np.argwhere(small)
    assert where.min(axis=0).tolist() == [2, 2, 6] and where.max(axis=0).tolist() == [6, 5, 13]


def test_separate_axis() -> None:
    assert separate_axis([0.8, 0.8, 2.5], [0.8, 0.8, 2.5]) == 2
    assert separate_axis([3.1, 1.0, 1.0], [1.0, 1.0, 1.0]) == 0
    assert separate_axis([1.0, 1.0, 1.0], [1.0, 3.5, 1.0]) == 1  # the target's anisotropy counts too
    assert separate_axis([1.0, 1.0, 2.9], [1.0, 1.0, 2.9]) is None
    assert separate_axis([1.0, 1.0, 1.0], [1.0, 1.0, 1.0]) is None
    # nnU-Net: two axes sharing the coarsest spacing -> no separate axis (e.g. (0.24, 1.25, 1.25))
    assert separate_axis([0.24, 1.25, 1.25], [0.24, 1.25, 1.25]) is None
    # the plans' threshold decides: 2.9 / 1.0 is anisotropic at 2.5, not at 3
    assert separate_axis([1.0, 1.0, 2.9], [1.0, 1.0, 2.9], threshold=2.5) == 2


def test_resampling_uses_the_plans_threshold() -> None:
    """A plans threshold of 2.0 resamples 1 x 1 x 2.5 mm data with the z axis on its own (order 0):
    every output slice then equals one input slice's in-plane resampling, which a joint 3D spline
    (threshold 3) does not give."""
    image = np.random.default_rng(0).normal(size=(1, 16, 16, 8)).astype(np.float32)
    joint = resample_image(image, [1.0, 1.0, 2.5], [1.0, 1.0, 1.25])
    separate = resample_image(image, [1.0, 1.0, 2.5], [1.0, 1.0, 1.25], threshold=2.0)
    assert separate.shape == joint.shape == (1, 16, 16, 16)
    # order 0 along z on the pixel-edge grid: output slice k takes input slice floor(k / 2)
    for k in range(16):
        np.testing.assert_allclose(separate[0, :, :, k], image[0, :, :, k // 2], atol=1e-5)
    assert not np.allclose(joint[0, :, :, 1], image[0, :, :, 0], atol=1e-3)


def test_anisotropic_axis_resampled_with_nearest_neighbour() -> None:
    rng = np.random.default_rng(1)
    slices = rng.uniform(0, 100, size=5).astype(np.float32)
    image = np.broadcast_to(slices, (1, 12, 12, 5)).copy()  # constant in-plane, one value per z slice
    out = resample_image(image, [1.0, 1.0, 4.0], [1.0, 1.0, 2.0])  # 4 / 1 > 3: z on its own, order 0
    assert out.shape == (1, 12, 12, 10)
    for k in range(10):
        np.testing.assert_allclose(out[0, :, :, k], slices[k // 2], rtol=1e-5)
    smooth = resample_image(image, [1.0, 1.0, 2.0], [1.0, 1.0, 1.0])  # 2 / 1 < 3: cubic on all axes
    assert not np.isin(np.round(smooth[0, 6, 6], 3), np.round(slices, 3)).all()


# ----------------------------------------------------------------------------------- splits


def test_make_splits_disjoint_covering_deterministic() -> None:
    ids = [f"case_{i:02d}" for i in range(11)]
    splits = make_splits(ids, 5, seed=12345)
    assert len(splits) == 5
    vals = [s["val"] for s in splits]
    assert sorted(len(v) for v in vals) == [2, 2, 2, 2, 3]
    assert sorted(c for v in vals for c in v) == ids  # every case validated exactly once
    for s in splits:
        assert not set(s["train"]) & set(s["val"])
        assert sorted(s["train"] + s["val"]) == ids
    assert make_splits(list(reversed(ids)), 5, seed=12345) == splits  # input order does not matter
    assert make_splits(ids, 5, seed=1) != splits
    with pytest.raises(ValueError, match="at least 2 folds"):
        make_splits(ids, 1, seed=0)
    with pytest.raises(ValueError, match="3 cases cannot be split into 5 folds"):
        make_splits(ids[:3], 5, seed=0)


def test_load_or_create_splits_reuses_file(tmp_path: Path) -> None:
    ids = [f"c{i}" for i in range(10)]
    path = tmp_path / "splits.json"
    first = load_or_create_splits(path, ids, 5, seed=0)
    assert json.loads(path.read_text()) == first
    assert load_or_create_splits(path, ids, 5, seed=99) == first  # never re-drawn
    custom = [{"train": ids[:8], "val": ids[8:]}, {"train": ids[2:], "val": ids[:2]}]
    write_json(path, custom)
    assert load_or_create_splits(path, ids, 5, seed=0) == custom  # a user's own file is used as is
    with pytest.raises(ValueError, match=r"not preprocessed: \['c8', 'c9'\]") as info:
        load_or_create_splits(path, ids[:8], 5, seed=0)
    assert str(path) in str(info.value)
    path.write_text('[{"train": []}]')
    with pytest.raises(ValueError, match="expected a list of"):
        load_or_create_splits(path, ids, 5, seed=0)
    assert read_json(path) == [{"train": []}]  # a bad file is reported, not overwritten


def test_splits_file_folder_is_created(tmp_path: Path) -> None:
    splits = load_or_create_splits(tmp_path / "sub" / "splits.json", ["a", "b", "c"], 3, seed=0)
    assert sorted(s["val"][0] for s in splits) == ["a", "b", "c"]
