"""Run overrides: ``segpipe train --overrides FILE`` changes the settings and the configuration a run trains,
the run folder records them, and prediction uses the recorded configuration. Unknown keys are refused."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from conftest import run_cli

from segpipe.core.atomic import read_json
from segpipe.planning.overrides import (
    RunOverrides,
    apply_run_overrides,
    load_overrides,
    scaled_patch,
    split_overrides,
    train_subset,
)
from segpipe.planning.plans import load_plans
from segpipe.runs.checkpoint import FINAL, load_checkpoint
from segpipe.runs.run_config import RUN_CONFIGURATION
from segpipe.runs.runlog import read_rows

CONFIG = "3d_fullres"


@pytest.fixture(scope="module")
def work(synthetic_dataset: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    work = tmp_path_factory.mktemp("overrides") / "work"
    for args in (
        ("plan", synthetic_dataset, "-o", work, "--preset", "cpu", "--workers", 1),
        ("preprocess", synthetic_dataset, "-o", work, "--configs", CONFIG, "--workers", 1),
    ):
        result = run_cli(*args)
        assert result.exit_code == 0, result.output
    return work


def test_split_overrides_sorts_keys_and_checks_types() -> None:
    o = split_overrides({"initial_lr": 0.003, "width_scale": 0.5, "batch_dice": True, "epochs": None})
    assert o.training == {"initial_lr": 0.003}
    assert o.run == RunOverrides(width_scale=0.5, batch_dice=True)
    assert o.as_dict() == {"initial_lr": 0.003, "width_scale": 0.5, "batch_dice": True}
    with pytest.raises(ValueError, match="expected int"):
        split_overrides({"iters_per_epoch": "many"})
    with pytest.raises(ValueError, match="train_fraction"):
        split_overrides({"train_fraction": 1.5})
    with pytest.raises(ValueError, match="initial_lr: expected a number"):
        split_overrides({"initial_lr": "fast"})


def test_unknown_key_in_an_override_file_names_key_and_file(tmp_path: Path) -> None:
    path = tmp_path / "o.json"
    path.write_text(json.dumps({"initial_lr": 0.01, "learning_rate": 0.1}))
    with pytest.raises(ValueError, match=r"o\.json.*learning_rate"):
        load_overrides(path)


def test_scaled_patch_rounds_to_the_divisor_and_keeps_a_sliced_axis() -> None:
    assert scaled_patch([28, 32, 20], [4, 4, 4], 0.75, None) == [20, 24, 16]
    assert scaled_patch([28, 32, 20], [4, 4, 4], 0.01, None) == [4, 4, 4]  # never below one divisor
    assert scaled_patch([28, 32, 1], [4, 4, 1], 2.0, 2) == [56, 64, 1]


def test_apply_run_overrides_and_train_subset(work: Path) -> None:
    config = load_plans(work / "plans.json").configuration(CONFIG)
    out = apply_run_overrides(config, RunOverrides(batch_size=3, width_scale=0.5, batch_dice=not config.batch_dice))
    assert out.batch_size == 3 and out.batch_dice != config.batch_dice
    assert out.topology.features == [max(4, round(f / 2)) for f in config.topology.features]
    assert out.patch_size == config.patch_size and config.batch_size != 3  # the planned one is untouched
    assert train_subset(list("abcdef"), 0.5) == ["a", "b", "c"]
    assert train_subset(list("abc"), 0.1) == ["a"]
    assert train_subset(list("abc"), None) == list("abc")


def test_train_overrides_file_changes_the_run_as_read_back_from_its_folder(work: Path, tmp_path: Path) -> None:
    plans = load_plans(work / "plans.json")
    planned = plans.configuration(CONFIG)
    overrides = {
        "initial_lr": 0.0031,
        "schedule": "cosine",
        "iters_per_epoch": 2,
        "val_iters": 1,
        "batch_size": 3,
        "patch_scale": 0.75,
        "width_scale": 0.5,
        "batch_dice": not planned.batch_dice,
    }
    path = tmp_path / "best.json"
    path.write_text(json.dumps(overrides))
    # an option given on the command line wins over the file
    result = run_cli("train", work, "--fold", 0, "--epochs", 2, "--overrides", path, "--no-val-tta", "--device", "cpu")
    assert result.exit_code == 0, result.output
    run_dir = work / CONFIG / "fold_0"
    settings = load_checkpoint(run_dir / FINAL)["settings"]
    assert settings["initial_lr"] == 0.0031 and settings["schedule"] == "cosine"
    assert settings["iters_per_epoch"] == 2 and settings["epochs"] == 2
    recorded = read_json(run_dir / RUN_CONFIGURATION)
    config = recorded["configuration"]
    assert config["batch_size"] == 3 and config["batch_dice"] == (not planned.batch_dice)
    assert config["topology"]["features"] == [max(4, round(f / 2)) for f in planned.topology.features]
    assert config["patch_size"] == scaled_patch(planned.patch_size, planned.topology.divisor(), 0.75, None)
    assert recorded["overrides"]["width_scale"] == 0.5
    # the validation inference built the narrower network from the run folder, not from plans.json
    assert read_json(run_dir / "validation" / "summary.json")["mean_dice"] is not None
    assert load_plans(work / "plans.json") == plans  # the plans are never changed


def test_train_refuses_an_unknown_override_key(work: Path, tmp_path: Path) -> None:
    path = tmp_path / "bad.json"
    path.write_text(json.dumps({"learning_rate": 0.1}))
    result = run_cli("train", work, "--fold", 1, "--overrides", path, "--device", "cpu")
    assert result.exit_code == 1
    assert "learning_rate" in result.output and "bad.json" in result.output
    assert not (work / CONFIG / "fold_1").exists()


def test_epoch_seconds_ends_epochs_on_time(work: Path, tmp_path: Path) -> None:
    """``epoch_seconds`` (what ``segpipe tune`` sets): epochs end on time, not only after iters_per_epoch."""
    path = tmp_path / "sliced.json"
    path.write_text(json.dumps({"iters_per_epoch": 10_000, "epoch_seconds": 0.5, "val_iters": 1, "num_workers": 0}))
    result = run_cli(
        "train", work, "--fold", 1, "--time-budget", 4, "--overrides", path, "--no-validation", "--device", "cpu"
    )
    assert result.exit_code == 0, result.output
    rows = read_rows(work / CONFIG / "fold_1" / "log.csv")
    assert len(rows) >= 3  # 4 s in epochs of 0.5 s; without the setting one epoch would be the whole run
    assert all(float(r["epoch_seconds"]) >= 0.5 for r in rows[:-1])  # each ran until its time was up
    assert int(rows[-1]["iteration"]) < 10_000
    assert float(rows[-1]["elapsed_seconds"]) == pytest.approx(4, abs=1.5)
