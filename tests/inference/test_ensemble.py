"""Ensembling saved probabilities of prediction folders (``segpipe ensemble``) and member selection."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from conftest import run_cli
from oof_work import AFFINE, make_plans, write_predictions

from segpipe.core.errors import StageFailed
from segpipe.core.paths import WorkDir
from segpipe.data.nifti import load_nifti
from segpipe.inference.ensemble import ensemble_folders, parse_snapshots
from segpipe.planning.plans import save_plans

LABELS = [1, 3]  # not contiguous: class index 2 is label value 3
VALUES = np.array([0, 1, 3], dtype=np.uint8)
SHAPE = (5, 6, 7)


def _random_probs(rng: np.random.Generator) -> np.ndarray:
    p = rng.random((3, *SHAPE)).astype(np.float32) ** 3
    return (p / p.sum(0, keepdims=True)).astype(np.float16)


def _folders(tmp_path: Path, n: int, cases: list[str], seed: int = 0) -> tuple[list[Path], dict[str, list[np.ndarray]]]:
    rng = np.random.default_rng(seed)
    probs: dict[str, list[np.ndarray]] = {c: [] for c in cases}
    folders = []
    for i in range(n):
        member = {c: _random_probs(rng) for c in cases}
        for c in cases:
            probs[c].append(member[c])
        segs = {c: VALUES[p.astype(np.float32).argmax(0)] for c, p in member.items()}
        folders.append(write_predictions(tmp_path / f"member_{i}", segs, member))
    return folders, probs


def test_ensemble_is_mean_of_probabilities_and_its_argmax(tmp_path: Path) -> None:
    folders, probs = _folders(tmp_path, 3, ["c0", "c1"])
    summary = ensemble_folders(folders, tmp_path / "out", LABELS)
    assert summary["cases"] == 2
    for case, members in probs.items():
        expected = np.mean([p.astype(np.float32) for p in members], axis=0)
        with np.load(tmp_path / "out" / f"{case}.npz") as f:
            got = f["probabilities"]
        assert got.dtype == np.float16 and got.shape == (3, *SHAPE)
        np.testing.assert_allclose(got.astype(np.float32), expected, atol=1e-3)
        seg = load_nifti(tmp_path / "out" / f"{case}.nii.gz", np.uint8)
        np.testing.assert_array_equal(seg.data, VALUES[expected.argmax(0)])
        np.testing.assert_allclose(seg.affine, AFFINE)
        assert set(np.unique(seg.data)) <= {0, 1, 3}
    # the mean differs from every member's own label map somewhere (else the test proves nothing)
    assert not all(
        np.array_equal(VALUES[members[0].argmax(0)], VALUES[np.mean(members, 0).argmax(0)])
        for members in probs.values()
    )


def test_ensemble_reports_incomplete_and_mismatched_cases(tmp_path: Path) -> None:
    folders, _ = _folders(tmp_path, 2, ["c0", "c1", "c2"])
    (folders[1] / "c1.npz").unlink()
    np.savez(folders[1] / "c2.npz", probabilities=np.ones((2, *SHAPE), np.float16))  # 2 classes, not 3
    with pytest.raises(StageFailed) as info:
        ensemble_folders(folders, tmp_path / "out", LABELS)
    assert set(info.value.problems) == {"c1", "c2"}
    assert (tmp_path / "out" / "c0.nii.gz").is_file() and not (tmp_path / "out" / "c2.nii.gz").exists()
    with pytest.raises(ValueError):
        ensemble_folders(folders[:1], tmp_path / "out", LABELS)


def test_ensemble_command(tmp_path: Path) -> None:
    folders, probs = _folders(tmp_path, 2, ["c0"])
    work = tmp_path / "work"
    save_plans(make_plans(["3d_fullres"], {"background": 0, "a": 1, "b": 3}), WorkDir(work).plans)
    result = run_cli("ensemble", *folders, "-o", tmp_path / "out", "-m", work)
    assert result.exit_code == 0, result.output
    expected = np.mean([p.astype(np.float32) for p in probs["c0"]], axis=0)
    np.testing.assert_array_equal(load_nifti(tmp_path / "out" / "c0.nii.gz", np.uint8).data, VALUES[expected.argmax(0)])
    assert run_cli("ensemble", folders[0], "-o", tmp_path / "o2", "-m", work).exit_code == 1


def test_parse_snapshots() -> None:
    assert parse_snapshots(None) is None
    assert parse_snapshots("all") == 0
    assert parse_snapshots("last:3") == 3
    for bad in ("last:0", "last:", "some"):
        with pytest.raises(ValueError):
            parse_snapshots(bad)
