"""Tests for segpipe.data.synth: MSD layout, label/geometry invariants, determinism, learnability."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from scipy import ndimage

from segpipe.core.atomic import read_json
from segpipe.data.nifti import load_nifti, spacing_from_affine
from segpipe.data.synth import generate_case, make_synthetic_dataset

SHAPE = (32, 32, 24)
SPACING = (1.5, 0.8, 2.0)
LABELS = 3


@pytest.fixture(scope="module")
def dataset(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("synth") / "Task01_Synth"
    result = make_synthetic_dataset(
        out, cases=3, shape=SHAPE, spacing=SPACING, labels=LABELS, test_cases=2, seed=7, name="Demo"
    )
    assert result == out
    return out


def _training_pairs(root: Path) -> list[tuple[Path, Path]]:
    meta = read_json(root / "dataset.json")
    return [(root / e["image"], root / e["label"]) for e in meta["training"]]


def test_msd_layout_and_dataset_json(dataset: Path) -> None:
    meta = read_json(dataset / "dataset.json")
    assert meta["name"] == "Demo"
    assert meta["tensorImageSize"] == "3D"
    assert meta["modality"] == {"0": "MRI"}
    assert meta["labels"] == {"0": "background", "1": "structure_1", "2": "structure_2", "3": "structure_3"}
    assert meta["numTraining"] == 3 and meta["numTest"] == 2
    assert meta["training"][0] == {
        "image": "./imagesTr/synth_000.nii.gz",
        "label": "./labelsTr/synth_000.nii.gz",
    }
    assert meta["test"] == ["./imagesTs/synth_003.nii.gz", "./imagesTs/synth_004.nii.gz"]
    listed = {e["image"] for e in meta["training"]} | {e["label"] for e in meta["training"]} | set(meta["test"])
    on_disk = {f"./{p.relative_to(dataset)}" for p in dataset.rglob("*.nii.gz")}
    assert listed == on_disk  # everything listed exists, nothing unlisted (no temp files left)
    assert not (dataset / "labelsTs").exists()
    assert sorted(p.name for p in dataset.iterdir()) == ["dataset.json", "imagesTr", "imagesTs", "labelsTr"]


def test_cases_content_and_geometry(dataset: Path) -> None:
    spacings = []
    for image_path, label_path in _training_pairs(dataset):
        image, label = load_nifti(image_path), load_nifti(label_path, dtype=np.int64)
        assert image.header.get_data_dtype() == np.float32
        assert label.header.get_data_dtype() == np.uint8
        assert image.data.shape == label.data.shape
        np.testing.assert_array_equal(image.affine, label.affine)
        for got, want in zip(image.data.shape, SHAPE):
            assert 0.9 * want - 1 <= got <= 1.1 * want + 1, (got, want)
        values = set(np.unique(label.data).tolist())
        assert values == set(range(LABELS + 1)), values  # subset of 0..labels, and every label present
        spacing = spacing_from_affine(image.affine)
        spacings.append(spacing)
        for got, want in zip(spacing, SPACING):
            assert 0.9 * want - 1e-4 <= got <= 1.1 * want + 1e-4
        assert not np.allclose(image.affine[:3, :3], np.diag(spacing))  # rotated, not axis-aligned
        body = image.data != 0
        assert 0.1 < body.mean() < 0.6  # background outside the body is exactly 0
        assert np.all(image.data[label.data > 0] != 0)  # structures lie inside the body
        np.testing.assert_array_equal(ndimage.binary_fill_holes(body), body)  # no zeros inside the body
        assert ndimage.label(body)[1] == 1  # one body
        assert np.all(image.data[body] > 0)
        # border slices are background: cropping to the non-zero bounding box does something
        assert not body[[0, -1]].any() and not body[:, [0, -1]].any() and not body[:, :, [0, -1]].any()
    assert not np.allclose(np.asarray(spacings), 1.0)
    assert len(set(spacings)) == len(spacings)  # spacing jittered per case
    for test_image in sorted((dataset / "imagesTs").glob("*.nii.gz")):
        vol = load_nifti(test_image)
        assert vol.data.dtype == np.float32 and (vol.data != 0).any()


def test_label_intensities_differ(dataset: Path) -> None:
    means = np.zeros((3, LABELS + 1))
    for i, (image_path, label_path) in enumerate(_training_pairs(dataset)):
        image, label = load_nifti(image_path).data, load_nifti(label_path, dtype=np.int64).data
        body = image != 0
        means[i, 0] = image[body & (label == 0)].mean()  # body tissue outside the structures
        for k in range(1, LABELS + 1):
            means[i, k] = image[label == k].mean()
    per_class = means.mean(axis=0)
    gaps = np.abs(per_class[:, None] - per_class[None, :])[np.triu_indices(LABELS + 1, 1)]
    assert gaps.min() > 10.0, per_class  # with noise std ~12: distinct yet overlapping classes


def test_deterministic_and_seeded(tmp_path: Path) -> None:
    a = make_synthetic_dataset(tmp_path / "a", cases=1, shape=SHAPE, test_cases=1, seed=3)
    b = make_synthetic_dataset(tmp_path / "b", cases=1, shape=SHAPE, test_cases=1, seed=3)
    c = make_synthetic_dataset(tmp_path / "c", cases=1, shape=SHAPE, test_cases=1, seed=4)
    for rel in ("imagesTr/synth_000.nii.gz", "labelsTr/synth_000.nii.gz", "imagesTs/synth_001.nii.gz"):
        va, vb, vc = (load_nifti(root / rel) for root in (a, b, c))
        np.testing.assert_array_equal(va.data, vb.data)
        np.testing.assert_array_equal(va.affine, vb.affine)
        assert va.data.shape != vc.data.shape or not np.array_equal(va.data, vc.data)
    assert read_json(a / "dataset.json") == read_json(b / "dataset.json")
    spacing = spacing_from_affine(load_nifti(a / "imagesTr/synth_000.nii.gz").affine)
    assert all(0.9 - 1e-4 <= v <= 1.1 + 1e-4 for v in spacing)  # default spacing 1.0, jittered
    assert not np.allclose(spacing, 1.0)


def test_case_independent_of_dataset_size() -> None:
    first = generate_case(1, SHAPE, labels=2, seed=5)
    again = generate_case(1, SHAPE, labels=2, seed=5)
    other = generate_case(2, SHAPE, labels=2, seed=5)
    np.testing.assert_array_equal(first.image, again.image)
    np.testing.assert_array_equal(first.label, again.label)
    assert first.image.shape != other.image.shape or not np.array_equal(first.image, other.image)
    assert first.image.dtype == np.float32 and first.label.dtype == np.uint8


@pytest.mark.parametrize("labels", [1, 8])
def test_label_counts_and_sizes(labels: int) -> None:
    for index in range(2):
        case = generate_case(index, SHAPE, labels=labels, seed=11)
        counts = np.bincount(case.label.ravel(), minlength=labels + 1)
        assert len(counts) == labels + 1 and counts[1:].min() > 0
        if labels == 1:
            assert 0.005 < counts[1] / case.label.size < 0.08  # a meaningful fraction of the volume


def test_rejects_bad_arguments(tmp_path: Path) -> None:
    with pytest.raises(ValueError):
        make_synthetic_dataset(tmp_path, cases=1, labels=0)
    with pytest.raises(ValueError):
        make_synthetic_dataset(tmp_path, cases=1, shape=(4, 32, 32))
    with pytest.raises(ValueError):
        make_synthetic_dataset(tmp_path, cases=-1)
