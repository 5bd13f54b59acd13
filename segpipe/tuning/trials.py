"""One trial of a search: a real training run with a time budget in its own work folder, then validation.

A trial's work folder ``WORK/tune/<study>/trial_<n>/`` holds copies of ``plans.json``, ``dataset.json``
and ``splits.json`` and a link to ``WORK/preprocessed``, so training and the validation inference run
exactly as ``segpipe train`` does, without touching ``WORK/<config>/``. A trial whose process was killed
is resumed from its folder's latest checkpoint when Optuna retries it.
"""

from __future__ import annotations

import math
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from segpipe.core.atomic import atomic_path, read_json
from segpipe.core.paths import WorkDir
from segpipe.evaluation.metrics import case_mean_dice
from segpipe.planning.plans import load_plans
from segpipe.planning.splits import load_or_create_splits
from segpipe.preprocessing.preprocess import list_preprocessed
from segpipe.runs.checkpoint import FINAL, LATEST
from segpipe.runs.runlog import cell_float, read_rows
from segpipe.training.loop import EpochEnd, TrainingRun, fit, setup
from segpipe.training.validation import validate_fold

SHARED_FILES = ("plans.json", "dataset.json", "splits.json", "fingerprint.json")


@dataclass
class TrialResult:
    """What a trial's run ended with."""

    dice: float | None  # mean validation Dice by the inference path; None when stopped early
    pseudo_dice: float | None  # the last epoch's mean pseudo-Dice
    seconds: float  # training seconds spent (the budget used)
    stopped: bool  # stopped early (pruned)
    case_dice: dict[str, float] = field(default_factory=dict)  # validation case -> mean Dice over labels


def ensure_splits(work: Path, config_name: str) -> None:
    """Create ``WORK/splits.json`` before any trial copies it, so every trial and confirmation run sees
    the same folds."""
    wd = WorkDir(work)
    if wd.splits.exists():
        return
    plans = load_plans(wd.plans)
    cases = list_preprocessed(wd.preprocessed(plans.configuration(config_name).data_identifier))
    if not cases:
        raise FileNotFoundError(f"{work}: no preprocessed cases for {config_name}; run `segpipe preprocess` first")
    load_or_create_splits(wd.splits, cases, plans.training.num_folds, plans.training.seed)


def trial_work(work: Path, folder: Path) -> Path:
    """Make (or reuse) a trial's work folder beside the main one; returns it."""
    folder.mkdir(parents=True, exist_ok=True)
    for name in SHARED_FILES:
        source, target = work / name, folder / name
        if source.exists() and not target.exists():
            with atomic_path(target) as tmp:
                shutil.copyfile(source, tmp)
    link = folder / "preprocessed"
    if not link.exists():
        link.symlink_to((work / "preprocessed").resolve(), target_is_directory=True)
    return folder


def train_and_validate(
    work: Path,
    config_name: str,
    fold: int,
    overrides: dict[str, Any],
    budget: float,
    device: str = "auto",
    tta: bool = False,
    on_epoch_end: EpochEnd | None = None,
) -> TrialResult:
    """Train ``fold`` in the (trial) work folder ``work`` for ``budget`` seconds, resuming a killed run,
    then score the validation cases with the inference path; a finished, scored run is read back."""
    run_dir = WorkDir(work).run(config_name, fold)
    summary_path = run_dir / "validation" / "summary.json"
    if (run_dir / FINAL).exists() and summary_path.exists():
        return _finished(run_dir, read_json(summary_path))
    if not (run_dir / FINAL).exists():
        run = setup(work, config_name, fold, overrides, budget, device, resume=(run_dir / LATEST).exists())
        state = fit(run, on_epoch_end=on_epoch_end)
        if not state.done:
            return TrialResult(None, _last_pseudo_dice(run), state.seconds, stopped=True)
    summary = validate_fold(work, config_name, fold, device, tta=tta)
    return _finished(run_dir, summary or {})


def _finished(run_dir: Path, summary: dict[str, Any]) -> TrialResult:
    rows = read_rows(run_dir / "log.csv")
    seconds = float(rows[-1]["elapsed_seconds"]) if rows else math.nan
    pseudo = cell_float(rows[-1].get("mean_dice")) if rows else None
    dice = summary.get("mean_dice")
    cases = {c["case"]: case_mean_dice(c) for c in summary.get("per_case", [])}
    return TrialResult(float(dice) if dice is not None else math.nan, pseudo, seconds, False, cases)


def _last_pseudo_dice(run: TrainingRun) -> float | None:
    rows = read_rows(run.run_dir / "log.csv")
    return cell_float(rows[-1].get("mean_dice")) if rows else None


class RungReporter:
    """The ``on_epoch_end`` hook of a trial: reports the epoch's pseudo-Dice to the Optuna trial at the
    step "training seconds so far" and says stop when the pruner prunes. Steps are whole seconds, so the
    pruner's rungs are budgets in seconds; an epoch ending in an already reported second is not reported."""

    def __init__(self, trial: Any):
        self.trial = trial
        self.last_step = -1

    def __call__(self, run: TrainingRun, metrics: dict[str, float]) -> bool:
        value = metrics.get("mean_dice", math.nan)
        step = int(run.state.seconds)
        if step <= self.last_step or not math.isfinite(value):
            return False  # NaN: no foreground in the sampled validation patches; nothing to compare
        self.last_step = step
        self.trial.report(value, step)
        return bool(self.trial.should_prune())
