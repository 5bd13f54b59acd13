"""Tests for segpipe.data.dataset: both layouts load, and every broken input is reported naming its file.

Each breakage adds one new case to a private copy of the synthetic dataset and breaks one of its
files for real (truncated gzip, garbage bytes, wrong shape, ...). ``check_dataset`` and ``segpipe
check`` must report it, and report all of them when they come together.
"""

from __future__ import annotations

import gzip
import shutil
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
from conftest import NNUNET_LABELS, SYNTH_CASES, channel_data, run_cli, truncate

from segpipe.core.atomic import read_json, write_json
from segpipe.data.dataset import Dataset, check_dataset, list_prediction_inputs, load_dataset, read_case
from segpipe.data.nifti import InputError, Volume, load_nifti, save_nifti

SYNTH_LABELS = {"background": 0, "structure_1": 1, "structure_2": 2}
SYNTH_IDS = [f"synth_{k:03d}" for k in range(SYNTH_CASES)]

# ------------------------------------------------------------------------------------ loading


def _assert_absolute_existing(paths: list[str]) -> None:
    for p in paths:
        assert Path(p).is_absolute(), p
        assert Path(p).is_file(), p


def test_load_msd_layout(synthetic_dataset: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(synthetic_dataset.parent)
    ds = load_dataset(synthetic_dataset.name)  # relative path in, absolute paths out
    assert ds.layout == "msd"
    assert ds.root == str(synthetic_dataset.resolve())
    assert ds.name == "Synthetic"
    assert ds.channel_names == ["MRI"] and ds.num_channels == 1
    assert ds.labels == SYNTH_LABELS
    assert ds.foreground_labels == [1, 2]
    assert [c.case_id for c in ds.training] == SYNTH_IDS
    assert ds.test == []
    first = ds.training[0]
    assert first.images == [str(synthetic_dataset.resolve() / "imagesTr/synth_000.nii.gz")]
    assert first.label == str(synthetic_dataset.resolve() / "labelsTr/synth_000.nii.gz")
    for c in ds.training:
        _assert_absolute_existing([*c.images, c.label])
    assert Dataset.from_dict(ds.to_dict()) == ds  # what plan saves as WORK/dataset.json


def test_load_nnunet_layout(nnunet_dataset: Path) -> None:
    ds = load_dataset(nnunet_dataset)
    assert ds.layout == "nnunetv2"
    assert ds.name == "SynthNN"
    assert ds.channel_names == ["MRI"]
    assert ds.labels == NNUNET_LABELS
    assert [c.case_id for c in ds.training] == SYNTH_IDS[:3]
    root = nnunet_dataset.resolve()
    assert ds.training[1].images == [str(root / "imagesTr/synth_001_0000.nii.gz")]
    assert ds.training[1].label == str(root / "labelsTr/synth_001.nii.gz")
    for c in ds.training:
        _assert_absolute_existing([*c.images, c.label])
    assert check_dataset(nnunet_dataset) == []


def test_nnunet_two_channels_read_as_c_x_y_z(nnunet_dataset_2ch: Path, synthetic_dataset: Path) -> None:
    ds = load_dataset(nnunet_dataset_2ch)
    assert ds.channel_names == ["MRI", "T2"]
    assert ds.training[0].images == [
        str(nnunet_dataset_2ch.resolve() / "imagesTr/synth_000_0000.nii.gz"),
        str(nnunet_dataset_2ch.resolve() / "imagesTr/synth_000_0001.nii.gz"),
    ]
    original = load_nifti(synthetic_dataset / "imagesTr/synth_000.nii.gz").data
    data = read_case(ds.training[0], ds.num_channels, set(ds.labels.values()))
    assert data.image.shape == (2, *original.shape)
    assert data.image.dtype == np.float32
    np.testing.assert_array_equal(data.image[0], original)
    np.testing.assert_array_equal(data.image[1], channel_data(original, 1))
    assert data.label is not None and data.label.shape == original.shape
    assert set(np.unique(data.label).tolist()) == {0, 1, 2}
    assert check_dataset(nnunet_dataset_2ch) == []


def _write_msd_4d(msd: Path, out: Path, channels_in_files: int, cases: int = 2) -> Path:
    meta = read_json(msd / "dataset.json")
    meta["modality"] = {"0": "T1", "1": "T2"}
    meta["training"] = meta["training"][:cases]
    for entry in meta["training"]:
        img = load_nifti(msd / entry["image"])
        data = np.stack([channel_data(img.data, c) for c in range(channels_in_files)], axis=-1)
        save_nifti(out / entry["image"], data, img.affine)
        (out / entry["label"]).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(msd / entry["label"], out / entry["label"])
    write_json(out / "dataset.json", meta)
    return out


def test_msd_4d_two_channel_image(synthetic_dataset: Path, tmp_path: Path) -> None:
    root = _write_msd_4d(synthetic_dataset, tmp_path / "msd4d", channels_in_files=2)
    ds = load_dataset(root)
    assert ds.channel_names == ["T1", "T2"] and ds.num_channels == 2
    assert len(ds.training[0].images) == 1
    original = load_nifti(synthetic_dataset / "imagesTr/synth_001.nii.gz").data
    data = read_case(ds.training[1], 2, set(ds.labels.values()))
    assert data.image.shape == (2, *original.shape)
    np.testing.assert_array_equal(data.image[0], original)
    np.testing.assert_array_equal(data.image[1], 2 * original)
    assert check_dataset(root) == []


def test_msd_4d_wrong_channel_count(synthetic_dataset: Path, tmp_path: Path) -> None:
    root = _write_msd_4d(synthetic_dataset, tmp_path / "msd4d", channels_in_files=3)
    problems = check_dataset(root)
    assert [p.path for p in problems] == [str(root.resolve() / f"imagesTr/synth_00{k}.nii.gz") for k in range(2)]
    assert all("expected 3D per channel file, or 4D with 2 channels" in p.problem for p in problems)


def test_clean_dataset_passes_check(synthetic_dataset: Path) -> None:
    assert check_dataset(synthetic_dataset) == []
    result = run_cli("check", synthetic_dataset)
    assert result.exit_code == 0, result.output
    assert "no problems found" in result.output


# ---------------------------------------------------------------------- broken case files


@dataclass
class Source:
    """Case synth_000 of the dataset, copied into new cases and broken."""

    image: Volume
    label: Volume


def _add_case(
    root: Path,
    case_id: str,
    image: np.ndarray | None,
    label: np.ndarray | None,
    affine: np.ndarray,
    label_affine: np.ndarray | None = None,
    label_dtype: type = np.uint8,
) -> tuple[Path, Path]:
    """Write a new case's files (None: leave that file missing) and list it in dataset.json."""
    image_path, label_path = root / "imagesTr" / f"{case_id}.nii.gz", root / "labelsTr" / f"{case_id}.nii.gz"
    if image is not None:
        save_nifti(image_path, image, affine, dtype=np.float32)
    if label is not None:
        save_nifti(label_path, label, affine if label_affine is None else label_affine, dtype=label_dtype)
    meta = read_json(root / "dataset.json")
    meta["training"].append({"image": f"./imagesTr/{case_id}.nii.gz", "label": f"./labelsTr/{case_id}.nii.gz"})
    write_json(root / "dataset.json", meta)
    return image_path.resolve(), label_path.resolve()


Break = Callable[[Path, str, Source], tuple[Path, str]]  # (root, new case id, source) -> (file named, phrase)


def _missing_label(root: Path, case: str, src: Source) -> tuple[Path, str]:
    _, label = _add_case(root, case, src.image.data, None, src.image.affine)
    return label, "file not found"


def _missing_image(root: Path, case: str, src: Source) -> tuple[Path, str]:
    image, _ = _add_case(root, case, None, src.label.data, src.image.affine)
    return image, "file not found"


def _truncated_image(root: Path, case: str, src: Source) -> tuple[Path, str]:
    image, _ = _add_case(root, case, src.image.data, src.label.data, src.image.affine)
    truncate(image)  # a valid file, cut in half
    return image, "unreadable or truncated NIfTI"


def _garbage_image(root: Path, case: str, src: Source) -> tuple[Path, str]:
    image, _ = _add_case(root, case, None, src.label.data, src.image.affine)
    image.write_bytes(b"this is not a NIfTI file\n" * 40)
    return image, "unreadable or truncated NIfTI"


def _gzipped_garbage_label(root: Path, case: str, src: Source) -> tuple[Path, str]:
    _, label = _add_case(root, case, src.image.data, None, src.image.affine)
    label.write_bytes(gzip.compress(b"a valid gzip stream, but no NIfTI header inside\n" * 20))
    return label, "unreadable or truncated NIfTI"


def _shape_mismatch(root: Path, case: str, src: Source) -> tuple[Path, str]:
    _, label = _add_case(root, case, src.image.data, src.label.data[:-2], src.image.affine)
    shape = src.label.data.shape
    return label, f"label shape {(shape[0] - 2, *shape[1:])} differs from image shape {shape}"


def _shifted(affine: np.ndarray, mm: float) -> np.ndarray:
    out = affine.copy()
    out[0, 3] += mm
    return out


def _affine_mismatch(root: Path, case: str, src: Source) -> tuple[Path, str]:
    affine = src.image.affine
    _, label = _add_case(root, case, src.image.data, src.label.data, affine, label_affine=_shifted(affine, 2e-3))
    return label, "label affine differs from the image affine"


def _undeclared_label(root: Path, case: str, src: Source) -> tuple[Path, str]:
    label_data = src.label.data.astype(np.uint8)
    label_data[0, 0, 0] = 7
    _, label = _add_case(root, case, src.image.data, label_data, src.image.affine)
    return label, "label values [7] are not declared in dataset.json"


def _fractional_label(root: Path, case: str, src: Source) -> tuple[Path, str]:
    label_data = src.label.data.astype(np.float32)
    label_data[1, 1, 1] = 0.5
    _, label = _add_case(root, case, src.image.data, label_data, src.image.affine, label_dtype=np.float32)
    return label, "label holds non-integer values"


def _nan_image(root: Path, case: str, src: Source) -> tuple[Path, str]:
    data = src.image.data.copy()
    data[5, 6, 7] = np.nan
    image, _ = _add_case(root, case, data, src.label.data, src.image.affine)
    return image, "contains 1 NaN/Inf voxels"


def _inf_image(root: Path, case: str, src: Source) -> tuple[Path, str]:
    data = src.image.data.copy()
    data[5, 6, 7], data[8, 9, 10] = np.inf, -np.inf
    image, _ = _add_case(root, case, data, src.label.data, src.image.affine)
    return image, "contains 2 NaN/Inf voxels"


def _image_2d(root: Path, case: str, src: Source) -> tuple[Path, str]:
    data = src.image.data[:, :, 10]
    image, _ = _add_case(root, case, data, src.label.data, src.image.affine)
    return image, f"has shape {data.shape} (2D); expected 3D"


def _image_5d(root: Path, case: str, src: Source) -> tuple[Path, str]:
    data = np.stack([src.image.data, src.image.data], axis=-1)[:, :, :, None, :]
    image, _ = _add_case(root, case, data, src.label.data, src.image.affine)
    return image, f"has shape {data.shape} (5D); expected 3D"


BREAKAGES: dict[str, Break] = {
    "missing_label": _missing_label,
    "missing_image": _missing_image,
    "truncated_image": _truncated_image,
    "garbage_image": _garbage_image,
    "gzipped_garbage_label": _gzipped_garbage_label,
    "shape_mismatch": _shape_mismatch,
    "affine_mismatch": _affine_mismatch,
    "undeclared_label": _undeclared_label,
    "fractional_label": _fractional_label,
    "nan_image": _nan_image,
    "inf_image": _inf_image,
    "image_2d": _image_2d,
    "image_5d": _image_5d,
}


def _source(root: Path) -> Source:
    return Source(
        load_nifti(root / "imagesTr/synth_000.nii.gz"), load_nifti(root / "labelsTr/synth_000.nii.gz", dtype=np.uint8)
    )


def _assert_cli_lists(root: Path, expected: list[tuple[Path, str]]) -> None:
    result = run_cli("check", root)
    assert result.exit_code == 1, result.output
    lines = [line for line in result.output.splitlines() if line.startswith("- ")]
    assert len(lines) == len(expected), result.output
    for path, phrase in expected:
        assert any(line.startswith(f"- {path}: ") and phrase in line for line in lines), (path, phrase, result.output)
    assert f"{len(expected)} problem(s) found" in result.output


@pytest.mark.parametrize("name", list(BREAKAGES))
def test_check_reports_broken_case(name: str, msd_copy: Path) -> None:
    path, phrase = BREAKAGES[name](msd_copy, f"broken_{name}", _source(msd_copy))
    problems = check_dataset(msd_copy)
    assert len(problems) == 1, problems
    assert problems[0].path == str(path)
    assert phrase in problems[0].problem
    assert str(problems[0]).startswith(f"{path}: ")
    _assert_cli_lists(msd_copy, [(path, phrase)])


def test_check_lists_every_problem_at_once(msd_copy: Path) -> None:
    src = _source(msd_copy)
    expected = [brk(msd_copy, f"broken_{name}", src) for name, brk in BREAKAGES.items()]
    # and two of the original cases broken in place
    truncate(msd_copy / "imagesTr/synth_002.nii.gz")
    (msd_copy / "labelsTr/synth_004.nii.gz").unlink()
    expected += [
        ((msd_copy / "imagesTr/synth_002.nii.gz").resolve(), "unreadable or truncated NIfTI"),
        ((msd_copy / "labelsTr/synth_004.nii.gz").resolve(), "file not found"),
    ]
    problems = check_dataset(msd_copy)
    assert sorted(p.path for p in problems) == sorted(str(p) for p, _ in expected)
    _assert_cli_lists(msd_copy, expected)


def test_affine_difference_below_tolerance_is_accepted(msd_copy: Path) -> None:
    src = _source(msd_copy)
    affine = src.image.affine
    _add_case(msd_copy, "nearly_equal", src.image.data, src.label.data, affine, label_affine=_shifted(affine, 1e-4))
    assert check_dataset(msd_copy) == []
    data = read_case(load_dataset(msd_copy).training[-1], 1, {0, 1, 2})
    assert data.case_id == "nearly_equal"
    np.testing.assert_array_equal(data.label, src.label.data)


# ------------------------------------------------------------------------ broken dataset.json


def _edit_meta(root: Path, edit: Callable[[dict], None]) -> None:
    meta = read_json(root / "dataset.json")
    edit(meta)
    write_json(root / "dataset.json", meta)


def _duplicate_first(meta: dict) -> None:
    meta["training"].append(dict(meta["training"][0]))


META_BREAKAGES: dict[str, tuple[Callable[[Path], None], str]] = {
    "not_json": (lambda root: (root / "dataset.json").write_text('{"name": "x", "labels": '), "not valid JSON"),
    "not_an_object": (lambda root: (root / "dataset.json").write_text("[1, 2]"), "must hold a JSON object"),
    "missing_file": (lambda root: (root / "dataset.json").unlink(), "missing: a dataset folder needs a dataset.json"),
    "no_labels": (lambda root: _edit_meta(root, lambda m: m.pop("labels")), "lacks the key 'labels'"),
    "no_modality": (lambda root: _edit_meta(root, lambda m: m.pop("modality")), "lacks 'modality' (MSD layout)"),
    "no_training": (lambda root: _edit_meta(root, lambda m: m.pop("training")), "lacks the list 'training'"),
    "entry_without_label": (
        lambda root: _edit_meta(root, lambda m: m["training"][1].pop("label")),
        "needs 'image' and 'label'",
    ),
    "duplicate_case": (lambda root: _edit_meta(root, _duplicate_first), "case name 'synth_000' appears twice"),
}


@pytest.mark.parametrize("name", list(META_BREAKAGES))
def test_check_reports_broken_dataset_json(name: str, msd_copy: Path) -> None:
    breakage, phrase = META_BREAKAGES[name]
    breakage(msd_copy)
    meta_path = msd_copy.resolve() / "dataset.json"
    problems = check_dataset(msd_copy)
    assert len(problems) == 1, problems
    assert problems[0].path == str(meta_path)
    assert phrase in problems[0].problem
    with pytest.raises(InputError, match="dataset.json"):
        load_dataset(msd_copy)
    _assert_cli_lists(msd_copy, [(meta_path, phrase)])


def test_nnunet_dataset_json_lacking_file_ending(nnunet_dataset: Path) -> None:
    _edit_meta(nnunet_dataset, lambda m: m.pop("file_ending"))
    problems = check_dataset(nnunet_dataset)
    assert [(p.path, p.problem) for p in problems] == [
        (str(nnunet_dataset.resolve() / "dataset.json"), "lacks 'file_ending' (nnU-Net v2 layout)")
    ]


def test_nnunet_missing_and_mismatched_channel_files(nnunet_dataset_2ch: Path) -> None:
    root = nnunet_dataset_2ch.resolve()
    (root / "imagesTr/synth_001_0001.nii.gz").unlink()
    (root / "labelsTr/synth_002.nii.gz").unlink()
    first = load_nifti(root / "imagesTr/synth_000_0000.nii.gz")
    save_nifti(root / "imagesTr/synth_000_0001.nii.gz", first.data[:, :, :-1], first.affine)
    expected = [
        (root / "imagesTr/synth_001_0001.nii.gz", "file not found"),
        (root / "labelsTr/synth_002.nii.gz", "file not found"),
        (root / "imagesTr/synth_000_0001.nii.gz", "geometry differs from the case's first channel synth_000_0000"),
    ]
    ds = load_dataset(root)
    assert [c.case_id for c in ds.training] == ["synth_000", "synth_001", "synth_002"]  # still listed
    problems = check_dataset(root)
    assert sorted(p.path for p in problems) == sorted(str(p) for p, _ in expected)
    for path, phrase in expected:
        assert any(p.path == str(path) and phrase in p.problem for p in problems), (path, problems)
    _assert_cli_lists(root, expected)


# ------------------------------------------------------------------------ prediction inputs


def _touch_nifti(path: Path) -> None:
    save_nifti(path, np.ones((4, 4, 4), np.float32), np.eye(4))


def test_list_prediction_inputs_groups_channels(tmp_path: Path) -> None:
    for name in ["A_0000.nii.gz", "A_0001.nii.gz", "B.nii.gz", "C.nii", "D_0000.nii.gz"]:
        _touch_nifti(tmp_path / name)
    (tmp_path / "notes.txt").write_text("not an image")
    (tmp_path / "plans.json").write_text("{}")  # JSON files are tolerated silently
    (tmp_path / ".hidden.nii.gz").write_text("ignored")
    cases, problems = list_prediction_inputs(tmp_path, num_channels=2)
    assert [(c.case_id, [Path(i).name for i in c.images]) for c in cases] == [
        ("A", ["A_0000.nii.gz", "A_0001.nii.gz"]),
        ("B", ["B.nii.gz"]),
        ("C", ["C.nii"]),
        ("D", ["D_0000.nii.gz", "D_0001.nii.gz"]),  # the missing channel is listed; reading it names it
    ]
    assert all(c.label is None for c in cases)
    assert [(Path(p.path).name, p.problem) for p in problems] == [
        ("notes.txt", "not a NIfTI file (.nii/.nii.gz); skipped")
    ]
    with pytest.raises(InputError, match="file not found"):
        read_case(cases[3], 2)
    assert read_case(cases[0], 2).image.shape == (2, 4, 4, 4)


def test_list_prediction_inputs_single_channel(tmp_path: Path) -> None:
    for name in ["x_0000.nii.gz", "plain.nii.gz", "hippocampus_001.nii.gz"]:
        _touch_nifti(tmp_path / name)
    cases, problems = list_prediction_inputs(tmp_path, num_channels=1)
    assert [(c.case_id, [Path(i).name for i in c.images]) for c in cases] == [
        ("hippocampus_001", ["hippocampus_001.nii.gz"]),
        ("plain", ["plain.nii.gz"]),
        ("x", ["x_0000.nii.gz"]),
    ]
    assert problems == []
    with pytest.raises(InputError, match="input folder not found"):
        list_prediction_inputs(tmp_path / "nope", 1)


def test_list_prediction_inputs_no_phantom_case(tmp_path: Path) -> None:
    for name in ["scan_0001.nii.gz", "scan_0002.nii.gz"]:
        _touch_nifti(tmp_path / name)
    cases, problems = list_prediction_inputs(tmp_path, num_channels=1)
    assert [c.case_id for c in cases] == ["scan_0001", "scan_0002"]
    assert problems == []


def test_input_error_survives_pickling() -> None:
    """Worker processes send errors back pickled; the file name must survive (regression)."""
    import pickle

    err = pickle.loads(pickle.dumps(InputError("/data/x.nii.gz", "file not found")))
    assert isinstance(err, InputError)
    assert (err.path, err.problem, str(err)) == ("/data/x.nii.gz", "file not found", "/data/x.nii.gz: file not found")
