"""benchmarks/ensemble_study.py from a clean folder: its table's numbers recomputed from the runs' files."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

from segpipe.core.paths import VALIDATION_FOLDERS

REPO = Path(__file__).resolve().parents[1]


def run_study(data: Path, work: Path) -> subprocess.CompletedProcess:
    command = [sys.executable, str(REPO / "benchmarks" / "ensemble_study.py"), "--data", str(data)]
    command += ["--work", str(work), "--preset", "cpu", "--folds", "0", "--num-folds", "3", "--budget", "4"]
    command += ["--recipes", "poly,fge", "--device", "cpu"]
    result = subprocess.run(command, capture_output=True, text=True, timeout=600, env=os.environ.copy())
    assert result.returncode == 0, result.stderr[-3000:]
    return result


def per_case_mean(summary: Path) -> dict[str, float]:
    """Each case's mean Dice over its labels, straight from a validation folder's summary.json."""
    cases = json.loads(summary.read_text())["per_case"]
    return {c["case"]: sum(c["dice"].values()) / len(c["dice"]) for c in cases}


def test_study_table_matches_the_run_folders_and_a_rerun_skips(synthetic_dataset: Path, tmp_path: Path) -> None:
    work = tmp_path / "study"
    run_study(synthetic_dataset, work)
    rows = {(r["recipe"], r["candidate"]): r for r in json.loads((work / "study.json").read_text())["rows"]}
    assert {("poly", "final"), ("fge", "final"), ("fge", "swa"), ("fge", "snapshots")} <= rows.keys()
    assert rows[("fge", "snapshots")]["forward_passes"] == 4  # FGE's four low points
    poly = per_case_mean(work / "poly" / "3d_fullres" / "fold_0" / "validation" / "summary.json")
    for (recipe, candidate), row in rows.items():
        if candidate not in VALIDATION_FOLDERS:
            continue
        cases = per_case_mean(work / recipe / "3d_fullres" / "fold_0" / VALIDATION_FOLDERS[candidate] / "summary.json")
        assert abs(row["mean_dice"] - sum(cases.values()) / len(cases)) < 1e-9
        if recipe == "poly":
            assert row["difference"] is None  # the baseline is not compared with itself
        else:
            expected = sum(cases[c] - poly[c] for c in poly) / len(poly)
            assert abs(row["difference"] - expected) < 1e-9
    table = (work / "study.md").read_text()
    assert "| poly | final |" in table and "| baseline |" in table
    assert (work / "study_curves.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    final = work / "fge" / "3d_fullres" / "fold_0" / "checkpoint_final.pt"
    written = final.stat().st_mtime_ns
    rerun = run_study(synthetic_dataset, work)
    assert "poly fold 0: done, skipped" in rerun.stderr and "fge fold 0: done, skipped" in rerun.stderr
    assert final.stat().st_mtime_ns == written
