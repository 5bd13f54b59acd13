"""The demo: the whole pipeline on a small synthetic dataset within a few minutes on a CPU.

synth -> plan (cpu preset) -> preprocess -> train fold 0 within a time budget -> predict the held-out
cases -> Dice. Every stage is the same code the CLI runs; only the data and budget are small.
"""

from __future__ import annotations

import time
from pathlib import Path

import click

from segpipe.data.synth import make_synthetic_dataset
from segpipe.planning.planner import describe_plans, run_plan
from segpipe.preprocessing.preprocess import run_preprocessing
from segpipe.training.loop import fit, setup
from segpipe.training.validation import validate_fold

DEMO_CASES = 20
DEMO_SHAPE = (48, 48, 36)
# Seconds of the budget kept for data generation, planning, preprocessing and the final prediction.
NON_TRAINING_SECONDS = 45


def run_demo(out: Path, minutes: float, device: str = "auto", workers: int = 1) -> dict:
    """Run the demo in ``out``; returns the validation summary (Dice per label of held-out cases)."""
    start = time.perf_counter()
    data, work = out / "data", out / "work"
    click.echo(f"[1/5] synthetic dataset: {DEMO_CASES} cases of {DEMO_SHAPE} -> {data}")
    make_synthetic_dataset(data, cases=DEMO_CASES, shape=DEMO_SHAPE, labels=2, seed=0)
    click.echo("[2/5] plan (preset cpu)")
    click.echo(describe_plans(run_plan(data, work, "cpu", workers)))
    click.echo("[3/5] preprocess")
    run_preprocessing(work, None, workers)
    budget = max(30.0, minutes * 60 - NON_TRAINING_SECONDS - (time.perf_counter() - start))
    click.echo(f"[4/5] train fold 0 for {budget:.0f} s")
    run = setup(work, "3d_fullres", 0, {"iters_per_epoch": 50, "val_iters": 2}, time_budget=budget, device=device)
    state = fit(run)
    click.echo(f"      {state.iteration} iterations, {state.seconds / max(state.iteration, 1):.2f} s/iteration")
    click.echo("[5/5] predict the held-out cases and evaluate")
    summary = validate_fold(work, "3d_fullres", 0, device)
    click.echo(f"done in {time.perf_counter() - start:.0f} s; results in {work / '3d_fullres' / 'fold_0'}")
    return summary
