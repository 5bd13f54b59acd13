"""Named schedule presets (``plans/schedules/*.json``) and the schedule shapes the SWA and FGE recipes
need: learning rates worked by hand, snapshot and averaging points, and ``train --schedule NAME``."""

from __future__ import annotations

from pathlib import Path

import pytest
from conftest import run_cli

import segpipe.training.loop as loop
from segpipe.core.atomic import read_json
from segpipe.core.serialization import from_dict, to_dict
from segpipe.planning.plans import TrainingSettings
from segpipe.runs.checkpoint import load_checkpoint
from segpipe.runs.snapshots import SWA_FILE, list_snapshots
from segpipe.training.schedules import (
    SCHEDULE_PRESET_DIR,
    SCHEDULE_PRESETS,
    SCHEDULES,
    cycle_ends,
    learning_rate,
    load_schedule_preset,
    schedule_overrides,
)

PRESETS = ["fge", "poly", "sgdr-grow", "sgdr3", "swa"]


def _settings(preset: str) -> TrainingSettings:
    return from_dict(TrainingSettings, {**to_dict(TrainingSettings()), **load_schedule_preset(preset)})


def test_every_preset_file_is_registered_and_loads() -> None:
    assert SCHEDULE_PRESETS.names() == PRESETS
    assert sorted(p.stem for p in SCHEDULE_PRESET_DIR.glob("*.json")) == PRESETS
    for name in PRESETS:
        data = read_json(SCHEDULE_PRESET_DIR / f"{name}.json")
        assert data["name"] == name and data["description"]
        assert _settings(name).schedule in SCHEDULES


def test_poly_constant_by_hand() -> None:
    s = TrainingSettings(schedule="poly_constant", initial_lr=0.01, swa_lr=0.002, cyclic_fraction=0.25)
    assert learning_rate(0.0, s) == pytest.approx(0.01)
    # half way through the poly part (progress 0.375 of 0.75): 0.002 + 0.008 * 0.5 ** 0.9
    assert learning_rate(0.375, s) == pytest.approx(0.002 + 0.008 * 0.5**0.9, rel=1e-12)
    assert learning_rate(0.75 - 1e-9, s) == pytest.approx(0.002, abs=1e-9)  # meets the SWA LR
    for p in (0.75, 0.9, 1.0):
        assert learning_rate(p, s) == 0.002
    assert cycle_ends(s) == []  # no snapshots: SWA averages epoch ends instead


def test_presets_set_the_recipes() -> None:
    sgdr = _settings("sgdr3")
    assert cycle_ends(sgdr) == pytest.approx([1 / 3, 2 / 3, 1.0]) and sgdr.swa
    assert cycle_ends(_settings("sgdr-grow")) == pytest.approx([1 / 7, 3 / 7, 1.0])
    fge = _settings("fge")
    length = 0.2 / 3.5  # 3.5 cycles in the last fifth, so training ends at a low point
    assert cycle_ends(fge) == pytest.approx([0.8 + 0.5 * length, 0.8 + 1.5 * length, 0.8 + 2.5 * length, 1.0])
    assert learning_rate(0.4, fge) == pytest.approx(0.005 + 0.005 * 0.5**0.9, rel=1e-12)  # poly towards the top
    assert learning_rate(0.8, fge) == pytest.approx(0.005)
    assert learning_rate(0.8 + length, fge) == pytest.approx(0.005)  # top between two snapshots
    for p in cycle_ends(fge):
        assert learning_rate(p, fge) == pytest.approx(1e-4)
    swa = _settings("swa")
    assert (swa.schedule, swa.swa, swa.cyclic_fraction, swa.swa_lr) == ("poly_constant", True, 0.25, 0.002)
    assert not _settings("poly").swa and cycle_ends(_settings("poly")) == []


def test_schedule_names_resolve_to_a_preset_or_a_schedule() -> None:
    assert schedule_overrides("cosine") == {"schedule": "cosine"}
    assert schedule_overrides("sgdr3")["cycles"] == 3
    with pytest.raises(KeyError, match="presets: fge, poly, sgdr-grow, sgdr3, swa; schedules: constant, cosine"):
        schedule_overrides("sgdr4")


def test_train_schedule_preset_gives_the_recipe_under_explicit_options(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    seen: list[dict] = []

    def fake_setup(work, config, fold, overrides, *args):  # noqa: ANN001, ANN202 - stands in for loop.setup
        seen.append(dict(overrides))
        raise ValueError("stop here")

    monkeypatch.setattr(loop, "setup", fake_setup)
    result = run_cli("train", tmp_path, "--fold", "0", "--schedule", "fge", "--cycles", "6", "--no-validation")
    assert "stop here" in result.output and result.exit_code == 1
    recipe = load_schedule_preset("fge")
    given = {k: v for k, v in seen[0].items() if v is not None}
    assert given == {**recipe, "cycles": 6}  # the explicit --cycles wins over the preset's 4
    result = run_cli("train", tmp_path, "--fold", "0", "--schedule", "cosine", "--no-validation")
    assert {k: v for k, v in seen[1].items() if v is not None} == {"schedule": "cosine"}
    result = run_cli("train", tmp_path, "--fold", "0", "--schedule", "sgdr4")
    assert result.exit_code == 1 and "presets: fge" in result.output and "schedules: constant" in result.output
    assert len(seen) == 2


def test_swa_preset_averages_every_epoch_end_of_the_constant_part(synthetic_dataset: Path, tmp_path: Path) -> None:
    work = tmp_path / "work"
    assert run_cli("plan", synthetic_dataset, "-o", work, "--preset", "cpu", "--workers", 1).exit_code == 0
    assert run_cli("preprocess", synthetic_dataset, "-o", work, "--workers", 1).exit_code == 0
    overrides = {**load_schedule_preset("swa"), "cyclic_fraction": 0.5}
    overrides.update(epochs=4, iters_per_epoch=2, val_iters=1, num_workers=0, num_folds=2)
    run = loop.setup(work, "3d_fullres", 0, overrides, device="cpu")
    loop.fit(run, num_workers=0)
    # epochs end at progress 1/4, 1/2, 3/4, 1: the last three are in the final half
    assert load_checkpoint(run.run_dir / SWA_FILE)["swa_count"] == 3
    assert list_snapshots(run.run_dir) == []
    lrs = [float(r["lr"]) for r in loop.runlog.read_rows(run.run_dir / "log.csv")]
    assert lrs[-1] == pytest.approx(0.002) and lrs[0] > 0.005
