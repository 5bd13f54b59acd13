"""The search loop of ``segpipe tune``: an Optuna study in an RDB storage, trials pruned on their budget.

Reads the work folder (plans, preprocessed cases, splits) and a search space; writes the study to
``WORK/tune/<study>.db`` (or any ``--storage`` URL) and every trial's run to
``WORK/tune/<study>/trial_<n>/`` (the confirmation, :mod:`segpipe.tuning.confirm`, runs beside them).
Each trial trains with the top budget as its time budget and reports its pseudo-Dice at every epoch
(step = training seconds); the pruner (Hyperband or successive halving between the min and max budget)
stops the weak ones at its rungs. A trial that reaches the top
budget is scored by the fold's validation Dice from the inference path: that is the objective.

Resuming and parallel workers are Optuna's own: the storage holds the study, so a re-run continues it
and several processes (or nodes, given one database URL) draw trials from it together. A killed trial
stops sending heartbeats; after the grace period the next trial start of any worker marks it failed
and Optuna's retry callback queues its parameters again, and the retry resumes the killed run's folder.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import math
import os
import socket
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from tqdm.auto import tqdm

from segpipe.core.atomic import read_json
from segpipe.core.paths import WorkDir
from segpipe.core.registry import Registry
from segpipe.planning.plans import load_plans
from segpipe.tuning.space import SearchSpace, load_space, resolve_space, suggest
from segpipe.tuning.trials import RungReporter, ensure_splits, train_and_validate, trial_work

# a trial failing this way (e.g. out of memory for a large patch) fails alone; the search goes on
TRIAL_ERRORS = (RuntimeError, ValueError, MemoryError)
# study settings that must not change when a study is resumed or joined
STUDY_KEYS = ("config", "fold", "min_budget", "max_budget", "space")
# epochs per lowest rung: the pruner compares a trial's first pseudo-Dice at or past each rung, so an
# epoch ending well past it would be judged on more training than its rivals (an epoch of 250
# iterations can take longer than the whole lowest rung on a CPU)
EPOCHS_PER_MIN_BUDGET = 4


@dataclass
class SearchOptions:
    """``segpipe tune``'s options."""

    config: str = "3d_fullres"
    fold: int = 0
    trials: int = 20
    min_budget: float = 100.0  # seconds
    max_budget: float = 900.0  # seconds: every trial's time budget, the top rung
    space: str = "default"  # a name in plans/search/ or a path
    storage: str | None = None  # an RDB URL; default sqlite:///WORK/tune/<study>.db
    study: str | None = None  # default <config>_fold<fold>
    device: str = "auto"
    pruner: str = "hyperband"
    reduction_factor: int = 3
    seed: int | None = None  # the sampler's; give parallel workers different seeds
    heartbeat: int = 60  # seconds; a trial silent for twice this is failed and retried
    tta: bool = False  # mirroring in the trials' validation inference
    confirm_fold: int | None = 1  # re-train the best and the default settings on this fold

    @property
    def study_name(self) -> str:
        return self.study or f"{self.config}_fold{self.fold}"


def tune_dir(work: Path) -> Path:
    return Path(work) / "tune"


def storage_url(work: Path, options: SearchOptions) -> str:
    if options.storage:
        return options.storage
    path = (tune_dir(work) / f"{options.study_name}.db").resolve()
    path.parent.mkdir(parents=True, exist_ok=True)
    return f"sqlite:///{path}"


PRUNERS: Registry[Callable[[SearchOptions], Any]] = Registry("pruner")


@PRUNERS.register("hyperband")
def _hyperband(o: SearchOptions) -> Any:
    import optuna

    return optuna.pruners.HyperbandPruner(
        min_resource=max(1, int(o.min_budget)), max_resource=int(o.max_budget), reduction_factor=o.reduction_factor
    )


@PRUNERS.register("successive_halving")
def _successive_halving(o: SearchOptions) -> Any:
    import optuna

    return optuna.pruners.SuccessiveHalvingPruner(
        min_resource=max(1, int(o.min_budget)), reduction_factor=o.reduction_factor
    )


@PRUNERS.register("none")
def _no_pruning(o: SearchOptions) -> Any:
    import optuna

    return optuna.pruners.NopPruner()


def open_study(work: Path, options: SearchOptions) -> Any:
    """Create or load the study in its storage, with heartbeats and retries of stale trials."""
    import optuna

    url = storage_url(work, options)
    sqlite = url.startswith("sqlite:///")
    # SQLite: several processes wait for the database's lock instead of failing at once
    engine_kwargs = {"connect_args": {"timeout": 120}} if sqlite else {}
    # and they create the tables and the study one at a time: two creating them at once collide
    with _blocking_lock(Path(url[len("sqlite:///") :] + ".lock") if sqlite else None):
        storage = optuna.storages.RDBStorage(
            url,
            engine_kwargs=engine_kwargs,
            heartbeat_interval=options.heartbeat,
            grace_period=2 * options.heartbeat,
            heartbeat_stale_trial_callback=optuna.storages.RetryHeartbeatStaleTrialCallback(max_retry=3),
        )
        study = optuna.create_study(
            storage=storage,
            study_name=options.study_name,
            direction="maximize",
            sampler=optuna.samplers.TPESampler(seed=options.seed),
            pruner=PRUNERS.get(options.pruner)(options),
            load_if_exists=True,
        )
        _check_study_settings(study, options)
        if options.seed is not None and study.trials:
            # a seeded sampler starts its random stream afresh in every process: resumed with the same
            # --seed it would draw the first trials' parameters again
            study.sampler = optuna.samplers.TPESampler(seed=options.seed + len(study.trials))
    return study


def trial_fixed(options: SearchOptions, space: SearchSpace) -> dict[str, Any]:
    """What every trial and confirmation run gets: time-sliced epochs (see EPOCHS_PER_MIN_BUDGET), then
    the space's fixed settings, which may change that."""
    return {"epoch_seconds": options.min_budget / EPOCHS_PER_MIN_BUDGET, **space.fixed}


@contextlib.contextmanager
def _blocking_lock(path: Path | None):
    """Hold an exclusive lock on ``path`` (nothing when None)."""
    if path is None:
        yield
        return
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a") as fh:
        fcntl.flock(fh, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)


def _study_settings(options: SearchOptions) -> dict[str, Any]:
    space_file = resolve_space(options.space).resolve()
    # the space by its content, not its path: workers on other nodes have the file elsewhere
    canonical = json.dumps(read_json(space_file), sort_keys=True).encode()
    return {
        "config": options.config,
        "fold": options.fold,
        "min_budget": float(options.min_budget),
        "max_budget": float(options.max_budget),
        "space": "sha256:" + hashlib.sha256(canonical).hexdigest()[:16],
        "space_file": str(space_file),  # for people reading the study; not checked
    }


def _check_study_settings(study: Any, options: SearchOptions) -> None:
    """The first worker records what the study searches; a resume or another worker must match it."""
    mine = _study_settings(options)
    recorded = study.user_attrs
    if not recorded:
        for key, value in mine.items():
            study.set_user_attr(key, value)
        return
    differ = [f"{k} {recorded.get(k)!r} (here {mine[k]!r})" for k in STUDY_KEYS if recorded.get(k) != mine[k]]
    if differ:
        raise ValueError(f"study {options.study_name!r} was started with other settings: {', '.join(differ)}")


def counted_states() -> tuple[Any, ...]:
    from optuna.trial import TrialState

    return (TrialState.COMPLETE, TrialState.PRUNED)


def make_objective(work: Path, options: SearchOptions, space: SearchSpace) -> Callable[[Any], float]:
    """The objective: train one drawn setting in its trial folder, pruned on the rungs; the validation
    Dice (inference path) when it reaches the top budget."""
    import optuna

    def objective(trial: optuna.Trial) -> float:
        overrides = {**trial_fixed(options, space), **suggest(trial, space)}
        # a retried trial keeps its user attributes, so it resumes the killed trial's folder
        folder = trial.user_attrs.get("folder") or f"trial_{trial.number:04d}"
        trial.set_user_attr("folder", folder)
        trial.set_user_attr("overrides", overrides)
        trial.set_user_attr("worker", f"{socket.gethostname()}:{os.getpid()}")
        run_work = trial_work(work, tune_dir(work) / options.study_name / folder)
        result = train_and_validate(
            run_work,
            options.config,
            options.fold,
            overrides,
            options.max_budget,
            options.device,
            options.tta,
            RungReporter(trial),
        )
        trial.set_user_attr("seconds", round(result.seconds, 1))
        trial.set_user_attr("pseudo_dice", result.pseudo_dice)
        if result.stopped:
            raise optuna.TrialPruned()
        if result.dice is None or not math.isfinite(result.dice):
            raise RuntimeError(f"trial {trial.number}: validation Dice is not a number")
        return result.dice

    return objective


def describe_trial(trial: Any) -> str:
    """One line per finished trial: number, state, score, budget, parameters."""
    seconds = trial.user_attrs.get("seconds")
    budget = f"{seconds:.0f} s" if seconds is not None else "? s"
    if trial.state.name == "COMPLETE":
        score = f"validation Dice {trial.value:.4f}"
    elif trial.state.name == "PRUNED":
        pseudo = trial.user_attrs.get("pseudo_dice")
        score = "pruned, pseudo-Dice " + (f"{pseudo:.4f}" if pseudo is not None else "n/a")
    else:
        score = trial.state.name.lower()
    params = ", ".join(f"{k}={_short(v)}" for k, v in trial.params.items())
    return f"trial {trial.number}: {score} after {budget}; {params}"


def _short(value: Any) -> str:
    return f"{value:.3g}" if isinstance(value, float) else str(value)


def run_search(work: Path, options: SearchOptions, echo: Callable[[str], None] = tqdm.write) -> Any:
    """Run trials until the study holds ``options.trials`` finished (complete or pruned) ones; returns
    the study. Safe to re-run after a kill and to run in several processes on one storage."""
    import optuna

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    warnings.filterwarnings("ignore", category=optuna.exceptions.ExperimentalWarning)
    work = Path(work)
    space = load_space(options.space)
    config = load_plans(WorkDir(work).plans).configuration(options.config)
    if config.previous_stage:
        raise ValueError(f"{options.config}: tuning a cascade stage is not supported; tune its stage 1 instead")
    if not 0 < options.min_budget <= options.max_budget:
        raise ValueError(f"need 0 < --min-budget <= --max-budget, got {options.min_budget} and {options.max_budget}")
    ensure_splits(work, options.config)
    study = open_study(work, options)
    done = len(study.get_trials(deepcopy=False, states=counted_states()))
    remaining = options.trials - done
    if remaining <= 0:
        echo(f"study {options.study_name}: {done} finished trials, nothing to do")
        return study
    echo(f"study {options.study_name} in {storage_url(work, options)}: {done} finished, {remaining} to run")
    bar = tqdm(total=options.trials, initial=done, desc="search", unit="trial", dynamic_ncols=True)

    def progress(study: Any, trial: Any) -> None:
        echo(describe_trial(trial))
        bar.n = len(study.get_trials(deepcopy=False, states=counted_states()))  # other workers' trials too
        bar.refresh()

    try:
        study.optimize(
            make_objective(work, options, space),
            n_trials=remaining,
            callbacks=[optuna.study.MaxTrialsCallback(options.trials, states=counted_states()), progress],
            catch=TRIAL_ERRORS,
            gc_after_trial=True,
        )
    finally:
        bar.close()
    return study
