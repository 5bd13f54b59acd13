"""The confirmation of a search: the best trial's settings and the defaults re-trained on another fold.

The search fold's validation cases chose the settings, so their Dice is optimistic; re-training the best
settings and the defaults on ``--confirm-fold`` at the top budget, and pairing the two over that fold's
cases, shows whether the gain was the validation set's noise. Writes ``WORK/tune/confirm.json`` and the
runs to ``WORK/tune/<study>/confirm_*/``.
"""

from __future__ import annotations

import contextlib
import fcntl
from pathlib import Path
from typing import Any

from segpipe.core.atomic import write_json
from segpipe.evaluation.report import paired_comparison
from segpipe.tuning.space import load_space
from segpipe.tuning.study import SearchOptions, trial_fixed, tune_dir
from segpipe.tuning.trials import train_and_validate, trial_work


def confirm(work: Path, study: Any, options: SearchOptions) -> dict[str, Any] | None:
    """Re-train the best trial's settings and the defaults (the trials' fixed settings only) on the
    confirmation fold at the top budget; both validation Dice values, beside the search fold's, and
    their difference paired over the fold's cases. One worker does it: the others find the lock taken
    and skip."""
    if options.confirm_fold is None or not _completed(study):
        return None
    if options.confirm_fold == options.fold:
        raise ValueError(f"--confirm-fold {options.confirm_fold} is the searched fold; choose another")
    space = load_space(options.space)
    best = study.best_trial
    folder = tune_dir(work) / options.study_name
    folder.mkdir(parents=True, exist_ok=True)
    with _exclusive(folder / "confirm.lock") as mine:
        if not mine:
            return None
        runs = {"best": (f"confirm_trial_{best.number:04d}", best.user_attrs["overrides"])}
        runs["defaults"] = ("confirm_defaults", trial_fixed(options, space))
        results = {}
        for name, (sub, overrides) in runs.items():
            results[name] = train_and_validate(
                trial_work(work, folder / sub),
                options.config,
                options.confirm_fold,
                overrides,
                options.max_budget,
                options.device,
                options.tta,
            )
    best_cases, default_cases = results["best"].case_dice, results["defaults"].case_dice
    cases = sorted(set(best_cases) & set(default_cases))
    difference, p = paired_comparison([best_cases[c] for c in cases], [default_cases[c] for c in cases])
    out = {
        "study": options.study_name,
        "best_trial": best.number,
        "search_fold": options.fold,
        "search_fold_dice": best.value,
        "confirm_fold": options.confirm_fold,
        "confirm_fold_dice": results["best"].dice,
        "defaults_confirm_fold_dice": results["defaults"].dice,
        # paired over the confirmation fold's cases: best minus defaults, two-sided Wilcoxon
        "confirm_fold_difference": difference,
        "confirm_fold_wilcoxon_p": p,
        "confirm_fold_cases": len(cases),
        "budget_seconds": options.max_budget,
    }
    write_json(tune_dir(work) / "confirm.json", out)
    return out


def _completed(study: Any) -> bool:
    from optuna.trial import TrialState

    return bool(study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,)))


@contextlib.contextmanager
def _exclusive(path: Path):
    """Yield True while holding a non-blocking lock on ``path`` (False: another process holds it)."""
    with open(path, "a") as fh:
        try:
            fcntl.flock(fh, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            yield False
            return
        try:
            yield True
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)
