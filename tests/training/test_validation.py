"""One-pass validation of a fold's candidates (final, SWA, snapshot ensembles) on a tiny trained run:
the same files as one ``predict_folder`` per candidate, identical weights run once, failures reported."""

from __future__ import annotations

import shutil
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
from conftest import run_cli

from segpipe.core.atomic import read_json, write_json
from segpipe.core.errors import StageFailed
from segpipe.data.dataset import Dataset
from segpipe.inference.candidates import distinct_weights
from segpipe.inference.ensemble import Members
from segpipe.inference.predict import PredictOptions, predict_folder
from segpipe.runs.checkpoint import FINAL
from segpipe.runs.snapshots import SWA_FILE, list_snapshots
from segpipe.training.loop import fit, setup
from segpipe.training.validation import TIMING_FILE, validate_fold

CONFIG = "3d_fullres"
# what today's validation predicted for each candidate folder, one predict_folder each
MEMBERS = {
    "validation": Members([0]),
    "validation_swa": Members([0], weights="swa"),
    "validation_snapshots": Members([0], snapshots="all"),
    "validation_snapshots_last2": Members([0], snapshots="last:2"),
}


@pytest.fixture(scope="module")
def cyclic_run(synthetic_dataset: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Fold 0 of 2, cosine with 3 cycles and SWA, 6 iterations: 3 snapshots, swa.pt, final weights."""
    work = tmp_path_factory.mktemp("validation") / "work"
    for command in ("plan", "preprocess"):
        extra = ["--preset", "cpu"] if command == "plan" else []
        result = run_cli(command, synthetic_dataset, "-o", work, "--workers", 1, *extra)
        assert result.exit_code == 0, result.output
    overrides = {
        "epochs": 3,
        "iters_per_epoch": 2,
        "val_iters": 1,
        "num_workers": 0,
        "num_folds": 2,
        "schedule": "cosine",
        "cycles": 3,
        "swa": True,
    }
    fit(setup(work, CONFIG, 0, overrides, device="cpu"), num_workers=0)
    return work


def _validation_cases(work: Path) -> list:
    val = set(read_json(work / "splits.json")[0]["val"])
    return [c for c in Dataset.from_dict(read_json(work / "dataset.json")).training if c.case_id in val]


def test_one_pass_writes_what_one_predict_folder_per_candidate_writes(cyclic_run: Path, tmp_path: Path) -> None:
    work = cyclic_run
    run_dir = work / CONFIG / "fold_0"
    summary = validate_fold(work, CONFIG, 0, device="cpu", tta=True)
    cases = _validation_cases(work)
    assert summary is not None and summary["num_cases"] == len(cases) == 3
    # validation predicts in fp32 on a CPU (scores comparable across machines): so does the reference
    options = PredictOptions(tta=True, save_probabilities=True, overwrite=True, postprocess=False, precision="fp32")
    for folder, members in MEMBERS.items():
        reference = tmp_path / folder
        predict_folder(reference, reference, work, CONFIG, members, options, "cpu", cases=cases)
        for case in cases:
            ours = nib.load(run_dir / folder / f"{case.case_id}.nii.gz")
            theirs = nib.load(reference / f"{case.case_id}.nii.gz")
            np.testing.assert_array_equal(np.asarray(ours.dataobj), np.asarray(theirs.dataobj))
            np.testing.assert_array_equal(ours.affine, theirs.affine)
            name = f"{case.case_id}.npz"
            with np.load(run_dir / folder / name) as a, np.load(reference / name) as b:
                # float16 files: equal sums round alike; a different summation order would differ by ~1e-3
                np.testing.assert_array_equal(a["probabilities"], b["probabilities"])
        assert read_json(run_dir / folder / "summary.json")["num_cases"] == 3
        assert (run_dir / folder / ".segpipe_manifest.json").is_file()
    timing = read_json(run_dir / TIMING_FILE)["candidates"]
    passes = {name: t["forward_passes"] for name, t in timing.items()}
    assert passes == {"snapshots": 3, "snapshots_last2": 2, "final": 1, "swa": 1}
    assert all(t["seconds_per_case"] > 0 for t in timing.values())
    assert timing["snapshots"]["seconds_per_case"] > timing["final"]["seconds_per_case"]


def test_identical_weights_run_once(cyclic_run: Path) -> None:
    run_dir = cyclic_run / CONFIG / "fold_0"
    snaps = list_snapshots(run_dir)
    paths, index = distinct_weights([*snaps, run_dir / FINAL, run_dir / SWA_FILE])
    # the last cycle ends with training: the final checkpoint holds the last snapshot's weights
    assert index == [0, 1, 2, 2, 3] and paths == [*snaps, run_dir / SWA_FILE]


def test_a_bad_case_is_reported_in_every_folder_and_the_others_are_written(cyclic_run: Path, tmp_path: Path) -> None:
    work = Path(shutil.copytree(cyclic_run, tmp_path / "work"))
    dataset = read_json(work / "dataset.json")
    bad = _validation_cases(work)[1]
    broken = tmp_path / "broken.nii.gz"
    broken.write_bytes(b"not a nifti file")
    for entry in dataset["training"]:
        if entry["case_id"] == bad.case_id:
            entry["images"] = [str(broken)]
    write_json(work / "dataset.json", dataset)
    with pytest.raises(StageFailed) as info:
        validate_fold(work, CONFIG, 0, device="cpu", tta=False)
    assert sorted(info.value.problems) == sorted(f"{folder}/{bad.case_id}" for folder in MEMBERS)
    for folder in MEMBERS:
        out = work / CONFIG / "fold_0" / folder
        assert bad.case_id in read_json(out / "failures.json")["failures"]
        assert not (out / f"{bad.case_id}.nii.gz").exists() and not (out / f"{bad.case_id}.npz").exists()
        for case in _validation_cases(work):
            if case.case_id != bad.case_id:
                assert (out / f"{case.case_id}.nii.gz").is_file() and (out / f"{case.case_id}.npz").is_file()
