"""Tests for training: the whole CLI chain, kill-and-resume, extending a run, reproducibility, schedules.

Everything runs on the CPU with tiny volumes and a handful of iterations; what is checked is the
bookkeeping (checkpoints, counters, logs, learning rates, output geometry), not model quality.
"""

from __future__ import annotations

import csv
import math
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch
from click.testing import Result
from conftest import run_cli

from segpipe.augmentation.draw import AUGMENTATIONS, AugmentationConfig
from segpipe.core.atomic import read_json
from segpipe.planning.plans import TrainingSettings, load_plans
from segpipe.runs.checkpoint import FINAL, LATEST, load_checkpoint
from segpipe.runs.snapshots import SWA_FILE, list_snapshots
from segpipe.training.loop import fit, setup, train_step
from segpipe.training.sampling import PatchBatches
from segpipe.training.schedules import cycle_ends, learning_rate, poly, sgdr_cycle_ends, training_progress

REPO = Path(__file__).resolve().parents[2]
CONFIG = "3d_fullres"
LOG_COLUMNS = [
    "epoch",
    "iteration",
    "train_loss",
    "val_loss",
    "dice_1",
    "dice_2",
    "mean_dice",
    "ema_dice",
    "lr",
    "epoch_seconds",
    "elapsed_seconds",
]
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
# nnU-Net's poly schedule, written out here rather than taken from segpipe
INITIAL_LR, POLY_EXPONENT = 0.01, 0.9


def expected_poly_lr(iteration: int, total: int) -> float:
    return INITIAL_LR * (1 - iteration / total) ** POLY_EXPONENT


def read_log(run_dir: Path) -> tuple[list[str], list[dict[str, str]]]:
    with open(run_dir / "log.csv", newline="") as fh:
        reader = csv.DictReader(fh)
        rows = list(reader)
        return list(reader.fieldnames or []), rows


def ok(result: Result) -> str:
    """The output of a CLI call that must have succeeded (else fail showing it)."""
    assert result.exit_code == 0, f"exit {result.exit_code}\n{result.output}\n{result.exception!r}"
    return result.output


@pytest.fixture(scope="module")
def prepared_work(synthetic_dataset: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The shared synthetic dataset planned (cpu preset) and preprocessed. Read-only: copy it."""
    work = tmp_path_factory.mktemp("train_work") / "work"
    ok(run_cli("plan", synthetic_dataset, "-o", work, "--preset", "cpu", "--workers", 1))
    ok(run_cli("preprocess", synthetic_dataset, "-o", work, "--workers", 1))
    plans = load_plans(work / "plans.json")
    # the expected learning rates below assume nnU-Net's poly defaults
    assert plans.training.schedule == "poly"
    assert plans.training.initial_lr == INITIAL_LR
    assert plans.training.poly_exponent == POLY_EXPONENT
    assert plans.training.warmup_fraction == 0
    return work


def copy_work(src: Path, dst: Path) -> Path:
    return Path(shutil.copytree(src, dst))


# ------------------------------------------------------------------------------------------ CLI chain


def test_cli_chain_synth_plan_preprocess_train_predict_evaluate(tmp_path: Path) -> None:
    data, work, out = tmp_path / "Task01_Chain", tmp_path / "work", tmp_path / "pred"
    ok(run_cli("synth", data, "--cases", 8, "--test-cases", 2, "--shape", "32,32,24", "--seed", 3))
    ok(run_cli("plan", data, "-o", work, "--preset", "cpu", "--workers", 1))
    ok(run_cli("preprocess", data, "-o", work, "--workers", 1))
    train_args = "--fold 0 --epochs 2 --iters-per-epoch 3 --val-iters 1 --num-folds 2 --device cpu --workers 0"
    ok(run_cli("train", work, *train_args.split()))
    run_dir = work / CONFIG / "fold_0"

    # checkpoints
    assert (run_dir / LATEST).is_file()
    final = load_checkpoint(run_dir / FINAL)
    assert final["state"]["epoch"] == 2
    assert final["state"]["iteration"] == 6
    assert final["state"]["done"] is True

    # log.csv: one row per epoch, the documented columns
    columns, rows = read_log(run_dir)
    assert columns == LOG_COLUMNS
    assert [int(r["epoch"]) for r in rows] == [0, 1]
    assert [int(r["iteration"]) for r in rows] == [3, 6]
    for r in rows:
        assert math.isfinite(float(r["train_loss"])) and math.isfinite(float(r["val_loss"]))

    # progress.png: a real PNG that decodes to the figure size (9 x 7 inches at 80 dpi)
    png = run_dir / "progress.png"
    assert png.read_bytes()[:8] == PNG_SIGNATURE
    import matplotlib.image as mpimg

    assert mpimg.imread(png).shape[:2] == (560, 720)

    # validation: exactly the fold's held-out cases were predicted and scored
    splits = read_json(work / "splits.json")
    assert len(splits) == 2
    val_ids = sorted(splits[0]["val"])
    assert set(val_ids).isdisjoint(splits[0]["train"])
    summary = read_json(run_dir / "validation" / "summary.json")
    assert sorted(c["case"] for c in summary["per_case"]) == val_ids
    assert summary["num_cases"] == len(val_ids)
    predicted = sorted(p.name[: -len(".nii.gz")] for p in (run_dir / "validation").glob("*.nii.gz"))
    assert predicted == val_ids

    # predict the test images: one uint8 label map per input, in the input's exact geometry
    ok(run_cli("predict", "-i", data / "imagesTs", "-o", out, "-m", work, "--folds", 0, "--device", "cpu"))
    inputs = sorted((data / "imagesTs").glob("*.nii.gz"))
    assert len(inputs) == 2
    assert sorted(p.name for p in out.glob("*.nii.gz")) == [p.name for p in inputs]
    for image_path in inputs:
        image = nib.load(str(image_path))
        pred = nib.load(str(out / image_path.name))
        assert pred.shape == image.shape
        assert np.allclose(pred.affine, image.affine)
        assert pred.get_data_dtype() == np.uint8
        assert set(np.unique(np.asarray(pred.dataobj)).tolist()) <= {0, 1, 2}

    # evaluate the validation predictions against the references
    report = tmp_path / "eval.json"
    ok(run_cli("evaluate", run_dir / "validation", data / "labelsTr", "-o", report))
    evaluated = read_json(report)
    assert sorted(c["case"] for c in evaluated["per_case"]) == val_ids
    assert evaluated["labels"] == [1, 2]
    for c in evaluated["per_case"]:
        for value in c["dice"].values():
            assert value is None or 0.0 <= value <= 1.0

    # the best checkpoint follows nnU-Net's moving average: ema_0 = d_0, ema_1 = 0.9 d_0 + 0.1 d_1
    d0, d1 = (float(r["mean_dice"]) for r in rows)
    assert float(rows[0]["ema_dice"]) == pytest.approx(d0)
    assert float(rows[1]["ema_dice"]) == pytest.approx(0.9 * d0 + 0.1 * d1)
    best = load_checkpoint(run_dir / "checkpoint_best.pt")
    assert best["state"]["epoch"] == (2 if 0.9 * d0 + 0.1 * d1 > d0 else 1)
    # train.log: every line the console showed, timestamped
    log_lines = (run_dir / "train.log").read_text().splitlines()
    assert any("epoch 1: loss" in line for line in log_lines) and any(
        "fold 0: 6 iterations" in line for line in log_lines
    )
    assert all(re.match(r"\d{4}-\d\d-\d\d \d\d:\d\d:\d\d ", line) for line in log_lines)

    # predict without --folds takes every trained fold (here fold 0), --checkpoint best its best weights
    again = tmp_path / "pred_best"
    ok(run_cli("predict", "-i", data / "imagesTs", "-o", again, "-m", work, "--checkpoint", "best", "--no-tta"))
    assert sorted(p.name for p in again.glob("*.nii.gz")) == [p.name for p in inputs]
    refused = run_cli("predict", "-i", data / "imagesTs", "-o", again, "-m", work, "--step", "0")
    assert refused.exit_code == 2 and "--step" in refused.output and "0<x<=1" in refused.output


# ------------------------------------------------------------------------------------------ resume


@dataclass
class ResumedRun:
    work: Path
    killed_at_epoch: int  # epochs completed in the checkpoint the killed run left
    killed_at_iteration: int
    rows_before_resume: list[int]  # epochs in log.csv right after the kill
    resume_output: str
    command: list[str]  # the uninterrupted run's command line
    env: dict[str, str]


TRAIN_ARGS = ["--fold", "0", "--val-iters", "1", "--num-folds", "2", "--workers", "0", "--device", "cpu"]


@pytest.fixture(scope="module")
def resumed_run(prepared_work: Path, tmp_path_factory: pytest.TempPathFactory) -> ResumedRun:
    """Train 3 epochs x 4 iterations in a subprocess, SIGKILL it as soon as the first epoch's checkpoint
    appears (so during the second epoch), then finish the run with ``--resume``."""
    root = tmp_path_factory.mktemp("resume")
    work = copy_work(prepared_work, root / "work")
    run_dir = work / CONFIG / "fold_0"
    latest = run_dir / LATEST
    err = (root / "train.log").open("w")
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    extra = ["--epochs", "3", "--iters-per-epoch", "4", "--no-validation"]
    cmd = [sys.executable, str(REPO / "cli.py"), "train", str(work), *TRAIN_ARGS, *extra]
    proc = subprocess.Popen(cmd, cwd=REPO, stdout=err, stderr=subprocess.STDOUT, env=env)
    try:
        deadline = time.monotonic() + 180
        while not latest.exists():
            if proc.poll() is not None:
                pytest.fail(
                    f"training exited ({proc.returncode}) before its first checkpoint:\n"
                    + (root / "train.log").read_text()[-3000:]
                )
            if time.monotonic() > deadline:
                pytest.fail("no checkpoint after 180 s")
            time.sleep(0.02)
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        err.close()
    assert proc.returncode == -signal.SIGKILL, "the run finished before it could be killed"
    state = load_checkpoint(latest)["state"]
    _, rows = read_log(run_dir)
    rows_before = [int(r["epoch"]) for r in rows]
    assert not (run_dir / FINAL).exists()

    # resumed in a process like the killed one (one thread: the same float summation order)
    resume = subprocess.run(
        [*cmd[: -len(extra)], "--resume", "--no-validation"], cwd=REPO, env=env, capture_output=True, text=True
    )
    assert resume.returncode == 0, resume.stdout + resume.stderr
    return ResumedRun(work, state["epoch"], state["iteration"], rows_before, resume.stdout + resume.stderr, cmd, env)


def test_resume_after_kill_continues_from_checkpoint(resumed_run: ResumedRun) -> None:
    k = resumed_run.killed_at_epoch
    assert 1 <= k < 3, f"killed with {k} epochs done; expected during the second or third epoch"
    assert resumed_run.killed_at_iteration == 4 * k
    assert resumed_run.rows_before_resume[:k] == list(range(k))

    # the resumed process trained the missing epochs only (fit prints one line per epoch)
    out = resumed_run.resume_output
    for epoch in range(3):
        assert (f"epoch {epoch}: loss" in out) == (epoch >= k), (epoch, k, out)
    assert "fold 0: 12 iterations" in out

    run_dir = resumed_run.work / CONFIG / "fold_0"
    columns, rows = read_log(run_dir)
    assert columns == LOG_COLUMNS
    assert [int(r["epoch"]) for r in rows] == [0, 1, 2]  # each epoch exactly once
    assert [int(r["iteration"]) for r in rows] == [4, 8, 12]
    elapsed = [float(r["elapsed_seconds"]) for r in rows]
    assert elapsed == sorted(elapsed)  # resumed time adds to the checkpoint's

    final = load_checkpoint(run_dir / FINAL)
    assert final["state"]["epoch"] == 3
    assert final["state"]["iteration"] == 12
    assert final["state"]["done"] is True

    # fit logs the lr of the epoch's last step, set before that step from progress = iteration / total:
    # the last step of epoch e starts at iteration 4 (e + 1) - 1 of 12
    for e, r in enumerate(rows):
        assert float(r["lr"]) == pytest.approx(expected_poly_lr(4 * (e + 1) - 1, 12), rel=1e-9)
    assert float(rows[-1]["lr"]) == pytest.approx(0.01 * (1 / 12) ** 0.9, rel=1e-9)


def test_a_resumed_run_ends_with_the_weights_of_an_uninterrupted_one(
    resumed_run: ResumedRun, prepared_work: Path, tmp_path: Path
) -> None:
    """Killed during its second epoch and resumed, or never interrupted: the same 12 steps, bit for bit
    (optimizer momentum, RNG states and the data order all come back from the checkpoint)."""
    work = copy_work(prepared_work, tmp_path / "work")
    command = [str(work) if arg == str(resumed_run.work) else arg for arg in resumed_run.command]
    proc = subprocess.run(command, cwd=REPO, env=resumed_run.env, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    resumed = load_checkpoint(resumed_run.work / CONFIG / "fold_0" / FINAL)
    straight = load_checkpoint(work / CONFIG / "fold_0" / FINAL)
    assert resumed["state"]["iteration"] == straight["state"]["iteration"] == 12
    assert resumed["model"].keys() == straight["model"].keys()
    different = [k for k, v in straight["model"].items() if not torch.equal(v, resumed["model"][k])]
    assert different == []
    momentum = [s["momentum_buffer"] for s in straight["optimizer"]["state"].values()]
    assert all(torch.equal(a, s["momentum_buffer"]) for a, s in zip(momentum, resumed["optimizer"]["state"].values()))


@pytest.mark.parametrize(("saved_gpus", "gpus_now"), [(4, 1), (1, 2), (0, 2), (2, 0)])
def test_rng_states_restore_on_the_devices_there_are_now(
    saved_gpus: int, gpus_now: int, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A checkpoint of a 4-GPU torchrun resumed in one process, of one GPU on two, of a CPU run on a GPU
    machine and the other way round (fake CUDA: only the calls are recorded)."""
    from segpipe.runs.checkpoint import rng_state, set_rng_state

    restored: list[tuple[int, torch.Tensor]] = []
    monkeypatch.setattr(torch.cuda, "is_available", lambda: gpus_now > 0)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: gpus_now)
    monkeypatch.setattr(torch.cuda, "set_rng_state", lambda state, device: restored.append((device, state)))
    monkeypatch.setattr(torch.cuda, "set_rng_state_all", lambda states: pytest.fail("count-sensitive call"))
    state = rng_state()
    state["cuda"] = [torch.full((4,), i, dtype=torch.uint8) for i in range(saved_gpus)] or None  # as saved then
    expected_numbers = [float(np.random.rand()) for _ in range(3)]
    set_rng_state(state)
    assert [float(np.random.rand()) for _ in range(3)] == expected_numbers  # the CPU generators came back too
    assert [d for d, _ in restored] == list(range(min(saved_gpus, gpus_now)))
    assert all(torch.equal(s, torch.full((4,), d, dtype=torch.uint8)) for d, s in restored)


def test_more_epochs_extend_a_finished_run(resumed_run: ResumedRun, tmp_path: Path) -> None:
    work = copy_work(resumed_run.work, tmp_path / "work")
    run_dir = work / CONFIG / "fold_0"
    assert load_checkpoint(run_dir / FINAL)["state"]["epoch"] == 3
    # A stale row for epoch 3, as left by a run killed after logging an epoch but before saving its
    # checkpoint: the resume must drop it and log epoch 3 once.
    columns, rows = read_log(run_dir)
    with open(run_dir / "log.csv", "a", newline="") as fh:
        csv.DictWriter(fh, fieldnames=columns).writerow({**rows[-1], "epoch": "3", "train_loss": "999.0"})
    output = ok(run_cli("train", work, *TRAIN_ARGS, "--resume", "--epochs", 4, "--no-validation"))
    assert "epoch 3: loss" in output and "epoch 2: loss" not in output
    final = load_checkpoint(run_dir / FINAL)
    assert final["state"]["epoch"] == 4
    assert final["state"]["iteration"] == 16
    assert final["settings"]["epochs"] == 4
    assert final["settings"]["iters_per_epoch"] == 4  # kept from the checkpoint
    _, rows = read_log(run_dir)
    assert [int(r["epoch"]) for r in rows] == [0, 1, 2, 3]
    assert [int(r["iteration"]) for r in rows] == [4, 8, 12, 16]
    assert float(rows[-1]["train_loss"]) != 999.0
    # the schedule now runs over 16 iterations: the last step starts at 15
    assert float(rows[-1]["lr"]) == pytest.approx(expected_poly_lr(15, 16), rel=1e-9)


def test_train_on_existing_run_without_resume_fails(resumed_run: ResumedRun) -> None:
    final = resumed_run.work / CONFIG / "fold_0" / FINAL
    before = final.stat().st_mtime_ns
    result = run_cli("train", resumed_run.work, *TRAIN_ARGS, "--epochs", 3, "--no-validation")
    assert result.exit_code == 1
    assert "--resume" in result.output
    assert "already holds a run" in result.output
    assert final.stat().st_mtime_ns == before  # nothing was overwritten


# ------------------------------------------------------------------------------------------ reproducibility


def test_same_seed_same_weights(prepared_work: Path, tmp_path: Path) -> None:
    overrides = {"epochs": 1, "iters_per_epoch": 2, "val_iters": 1, "num_workers": 0, "num_folds": 2}
    weights = []
    for name in ("a", "b"):
        work = copy_work(prepared_work, tmp_path / name)
        run = setup(work, CONFIG, 0, overrides, device="cpu")
        initial = {k: v.clone() for k, v in run.model.state_dict().items()}
        state = fit(run, num_workers=0)
        assert state.iteration == 2
        trained = run.model.state_dict()
        assert any(not torch.equal(initial[k], trained[k]) for k in initial), "training changed nothing"
        weights.append(trained)
    a, b = weights
    assert a.keys() == b.keys()
    different = [k for k in a if not torch.equal(a[k], b[k])]
    assert not different, f"tensors differ between identical runs: {different[:5]}"


# ------------------------------------------------------------------------------------------ schedules


def test_poly_schedule_end_points() -> None:
    settings = TrainingSettings(initial_lr=0.02, poly_exponent=0.9)
    assert poly(0.0, settings) == 0.02
    assert poly(1.0, settings) == 0.0
    assert poly(0.5, settings) == pytest.approx(0.02 * 0.5**0.9, rel=1e-12)
    assert learning_rate(0.0, settings) == 0.02
    assert learning_rate(1.0, settings) == 0.0
    assert learning_rate(1.5, settings) == 0.0  # progress is clipped to [0, 1]


def test_warmup_scales_the_start() -> None:
    settings = TrainingSettings(initial_lr=0.01, warmup_fraction=0.1)
    assert learning_rate(0.0, settings) == 0.0
    assert learning_rate(0.05, settings) == pytest.approx(0.5 * 0.01 * 0.95**0.9, rel=1e-12)
    assert learning_rate(0.5, settings) == pytest.approx(0.01 * 0.5**0.9, rel=1e-12)


def test_training_progress_takes_the_further_of_iterations_and_time() -> None:
    assert training_progress(25, 100, 0.0, None) == 0.25
    assert training_progress(25, 100, 999.0, None) == 0.25  # no budget: time does not count
    assert training_progress(10, 100, 50.0, 100.0) == 0.5  # time is further
    assert training_progress(60, 100, 5.0, 100.0) == 0.6  # iterations are further
    assert training_progress(150, 100, 0.0, None) == 1.0  # clipped
    assert training_progress(0, 100, 250.0, 100.0) == 1.0


def test_cosine_restarts_at_cycle_boundaries() -> None:
    s = TrainingSettings(schedule="cosine", cycles=3, initial_lr=0.01, min_lr=0.001)
    assert sgdr_cycle_ends(s) == pytest.approx([1 / 3, 2 / 3, 1.0])
    assert learning_rate(0.0, s) == pytest.approx(0.01)
    assert learning_rate(1 / 6, s) == pytest.approx(0.001 + 0.009 * 0.5)  # half way down the first cycle
    assert learning_rate(1 / 3 - 1e-9, s) == pytest.approx(0.001, abs=1e-9)  # bottom of cycle 1
    assert learning_rate(1 / 3 + 1e-9, s) == pytest.approx(0.01, abs=1e-7)  # restart
    assert learning_rate(1.0, s) == pytest.approx(0.001)


def test_sgdr_cycle_mult_lengths() -> None:
    s = TrainingSettings(schedule="cosine", cycles=3, cycle_mult=2.0)
    ends = sgdr_cycle_ends(s)
    lengths = np.diff([0.0, *ends])
    assert lengths == pytest.approx([1 / 7, 2 / 7, 4 / 7])


def test_cyclic_schedule_snapshots_at_low_points() -> None:
    s = TrainingSettings(schedule="cyclic", cycles=3, cyclic_fraction=0.25, cyclic_lr_high=0.005, cyclic_lr_low=1e-4)
    ends = cycle_ends(s)
    assert ends[-1] == 1.0 and len(ends) == 3
    assert ends == pytest.approx([0.75 + 0.05, 0.75 + 0.15, 1.0])  # cycle length 0.25 / 2.5 = 0.1
    for p in ends:
        assert learning_rate(p, s) == pytest.approx(1e-4)
    assert learning_rate(0.75, s) == pytest.approx(0.005)  # top of the first cycle
    assert learning_rate(0.85, s) == pytest.approx(0.005)  # top again between snapshots
    assert learning_rate(0.0, s) == pytest.approx(s.initial_lr)
    assert cycle_ends(TrainingSettings(schedule="poly")) == []


def test_snapshots_at_cycle_ends_and_swa_is_their_mean(prepared_work: Path, tmp_path: Path) -> None:
    work = copy_work(prepared_work, tmp_path / "w")
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
    run = setup(work, CONFIG, 0, overrides, device="cpu")
    fit(run, num_workers=0)
    snaps = list_snapshots(run.run_dir)
    assert [p.name for p in snaps] == ["cycle_1.pt", "cycle_2.pt", "cycle_3.pt"]
    states = [load_checkpoint(p) for p in snaps]
    assert [s["state"]["iteration"] for s in states] == [2, 4, 6]  # progress 1/3, 2/3, 1 of 6 iterations
    swa = load_checkpoint(run.run_dir / SWA_FILE)["model"]
    assert load_checkpoint(run.run_dir / SWA_FILE)["swa_count"] == 3
    for key, value in swa.items():
        if value.is_floating_point():
            mean = sum(s["model"][key].float() for s in states) / 3
            torch.testing.assert_close(value, mean, rtol=1e-5, atol=1e-6)
    assert not torch.equal(states[0]["model"][next(iter(swa))], states[2]["model"][next(iter(swa))])


def test_gradient_accumulation_matches_the_large_batch(prepared_work: Path, tmp_path: Path) -> None:
    """Two batches accumulated (loss / 2 each) give the gradient of their mean: one SGD step on it."""
    run = setup(copy_work(prepared_work, tmp_path / "w"), CONFIG, 0, {"accumulate": 2, "num_workers": 0}, device="cpu")
    run.model.train()
    for group in run.optimizer.param_groups:
        group["momentum"], group["nesterov"], group["weight_decay"] = 0.0, False, 0.0
    torch.manual_seed(0)
    batches = [
        {
            "image": torch.randn(1, 1, *run.config.patch_size),
            "label": torch.randint(0, 3, (1, 1, *run.config.patch_size)),
        }
        for _ in range(2)
    ]
    before = {k: v.clone() for k, v in run.model.state_dict().items()}
    for b in batches:
        train_step(run, b)
        run.state.iteration += 1
    after_accumulated = {k: v.clone() for k, v in run.model.state_dict().items()}
    # reference: the same step from the mean of the two losses, computed by hand
    run.model.load_state_dict(before)
    run.optimizer.zero_grad(set_to_none=True)
    loss = sum(run.loss(run.model(b["image"]), b["label"].long()) for b in batches) / 2
    loss.backward()
    torch.nn.utils.clip_grad_norm_(run.model.parameters(), run.settings.grad_clip)
    run.optimizer.step()
    changed = 0
    for k, v in run.model.state_dict().items():
        torch.testing.assert_close(after_accumulated[k], v, rtol=1e-4, atol=1e-6)
        changed += int(not torch.equal(before[k], v))
    assert changed > 0


def test_augmentation_on_the_device_trains_like_augmentation_in_workers(prepared_work: Path, tmp_path: Path) -> None:
    """``augment_on=device`` (the GPU path: workers only crop, the training process augments the batch)
    gives the same weights as augmenting in the workers, for the same seed (noise too: it has its own seed)."""
    if "test-frequent" not in AUGMENTATIONS.names():
        AUGMENTATIONS.register("test-frequent")(AugmentationConfig(p_noise=0.5, p_rotation=0.5, p_scale=0.5))
    weights = {}
    for where in ("workers", "device"):
        overrides = {
            "epochs": 1,
            "iters_per_epoch": 3,
            "val_iters": 1,
            "num_workers": 0,
            "num_folds": 2,
            "augmentation": "test-frequent",
            "augment_on": where,
        }
        run = setup(copy_work(prepared_work, tmp_path / where), CONFIG, 0, overrides, device="cpu")
        fit(run, num_workers=0)
        weights[where] = run.model.state_dict()
    for key, value in weights["workers"].items():
        assert torch.allclose(value, weights["device"][key], atol=1e-5), key


def test_ranks_agree_on_the_clock_every_tenth_iteration_and_see_the_same_seconds() -> None:
    """Two DDP ranks with different local clocks (rank 1 runs 30% slow and started 50 s late): they
    broadcast rank 0's reading only every 10th iteration and between broadcasts extrapolate identically."""
    from segpipe.training.loop import SharedClock

    step = {"rank0": 0, "rank1": 0}  # iterations done, for the fake clocks (rank 0: 2 s an iteration)
    broadcast: list[float] = []  # rank 0's readings, in order: what dist.broadcast hands every rank

    def run(rank: str, now, agree) -> list[float]:
        clock = SharedClock(100.0, 0.0, 10, True, agree, now=now)
        seen = []
        for i in range(1, 36):
            step[rank] = i
            seen.append(clock.tick(i))
        return [*seen, clock.sync(35)]  # the epoch's end

    def agree0(local: float) -> float:
        broadcast.append(local)
        return local

    seen0 = run("rank0", lambda: 2.0 * step["rank0"], agree0)
    assert len(broadcast) == 4  # iterations 10, 20, 30 and the end: not 35
    replay = iter(broadcast)
    seen1 = run("rank1", lambda: 50 + 2.6 * step["rank1"], lambda local: next(replay))
    assert seen0 == seen1  # the same seconds, hence the same learning rates and stop, on both ranks
    assert seen0 == sorted(seen0)  # never runs backwards
    assert seen0[9] == 120.0 and seen0[19] == 140.0  # the agreed readings: 100 s before + 2 s x iterations
    # between agreements the clock advances at the last agreed pace (2 s per iteration; none before the first)
    assert seen0[10:19] == pytest.approx([120.0 + 2 * k for k in range(1, 10)])
    assert seen0[:9] == [100.0] * 9
    # one process: the plain wall clock, never a broadcast
    readings = iter([0.0, 1.5, 3.0])
    plain = SharedClock(5.0, 0.0, 10, False, lambda v: pytest.fail("no broadcast"), now=lambda: next(readings))
    assert [plain.tick(1), plain.tick(2)] == [6.5, 8.0]


def test_on_device_augmentation_sends_each_sample_only_its_own_crop(prepared_work: Path, tmp_path: Path) -> None:
    """The workers crop each sample to its own source extent (not the batch's largest); padded on the
    device to the common extent, the augmented batch is the one the workers would have made."""
    from segpipe.augmentation.batched import augment_batch, batch_extent
    from segpipe.training.sampling import batch_bytes, stack_crops

    if "test-rotating" not in AUGMENTATIONS.names():
        AUGMENTATIONS.register("test-rotating")(AugmentationConfig(p_noise=0.5, p_rotation=0.7, p_scale=0.5))
    overrides = {"num_workers": 0, "num_folds": 2, "augmentation": "test-rotating"}
    run = setup(copy_work(prepared_work, tmp_path / "w"), CONFIG, 0, overrides, device="cpu")
    patch, saved = run.config.patch_size, 0
    for seed in range(4):
        workers, device = (
            PatchBatches(run.train_spec, 1, 0, 0, run.augmenter, augment_in_workers=w).make_batch(
                np.random.default_rng(seed)
            )
            for w in (True, False)
        )
        extent = batch_extent(patch, device["params"])
        sizes = [list(c.shape[1:]) for c in device["image"]]
        assert [list(c.shape[1:]) for c in device["label"]] == sizes
        assert all(s == patch for s, p in zip(sizes, device["params"]) if not p.spatial)
        image = stack_crops(device["image"], extent, torch.device("cpu"))
        label = stack_crops(device["label"], extent, torch.device("cpu"))
        image, label = augment_batch(run.augmenter, image, label, device["params"], patch)
        torch.testing.assert_close(image, workers["image"], atol=1e-5, rtol=0)
        assert torch.equal(label, workers["label"])
        common = len(sizes) * math.prod(extent) * (4 * image.shape[1] + label.element_size())
        assert batch_bytes(device) <= common
        saved += common - batch_bytes(device)
    assert saved > 0  # some batch mixed extents
