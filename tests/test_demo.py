"""The demo command end to end with the smallest budget: every stage runs and leaves its files."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from click.testing import CliRunner

from cli import main


@pytest.mark.slow
def test_demo_runs_every_stage(tmp_path: Path) -> None:
    result = CliRunner().invoke(main, ["demo", "--out", str(tmp_path), "--minutes", "0.5", "--device", "cpu"])
    assert result.exit_code == 0, result.output
    assert "[5/5] predict the held-out cases and evaluate" in result.output
    work = tmp_path / "work"
    splits = json.loads((work / "splits.json").read_text())
    summary = json.loads((work / "3d_fullres" / "fold_0" / "validation" / "summary.json").read_text())
    assert sorted(c["case"] for c in summary["per_case"]) == sorted(splits[0]["val"])
    assert len(summary["per_case"]) == 4
    assert all(0.0 <= d <= 1.0 for c in summary["per_case"] for d in c["dice"].values() if d is not None)
    assert (work / "3d_fullres" / "fold_0" / "checkpoint_final.pt").is_file()
    assert "mean Dice" in result.output
