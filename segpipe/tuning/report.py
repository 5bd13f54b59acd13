"""What a search leaves for a person: ``WORK/tune/best.json`` and ``WORK/tune/report.html`` with its PNGs.

``best.json`` is the best complete trial's overrides, usable as ``segpipe train WORK --overrides
WORK/tune/best.json``. The report shows the optimisation history, parameter importances (Optuna's
fANOVA when scikit-learn is installed, else its PED-ANOVA, which needs nothing more), the rung values of
every trial, the trials table and, when run, the confirmation on a second fold. Reads only the study.
"""

from __future__ import annotations

import math
import warnings
from pathlib import Path
from typing import Any

from segpipe.core.atomic import atomic_write, read_json, write_json
from segpipe.evaluation.report import to_html
from segpipe.evaluation.report_plots import pyplot, save_png

BEST_FILE = "best.json"
REPORT_FILE = "report.html"


def write_best(out_dir: Path, study: Any) -> Path | None:
    """``best.json``: the overrides of the best complete trial (None while no trial completed)."""
    from optuna.trial import TrialState

    if not study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,)):
        return None
    path = out_dir / BEST_FILE
    write_json(path, study.best_trial.user_attrs["overrides"])
    return path


def importances(study: Any) -> tuple[str, dict[str, float]]:
    """The evaluator's name and its parameter importances ({} when fewer than two trials completed or
    no parameter was drawn in all of them)."""
    import optuna

    try:
        import sklearn  # noqa: F401 - fANOVA's random forest

        name, evaluator = "fANOVA", optuna.importance.FanovaImportanceEvaluator(seed=0)
    except ImportError:
        name, evaluator = "PED-ANOVA", optuna.importance.PedAnovaImportanceEvaluator()
    try:
        with warnings.catch_warnings():  # few trials per value: the report says how many trials there are
            warnings.simplefilter("ignore", UserWarning)
            return name, optuna.importance.get_param_importances(study, evaluator=evaluator)
    except (ValueError, RuntimeError):
        return name, {}


def plot_history(trials: list[Any], path: Path) -> str:
    """Validation Dice of the complete trials by number, the best so far, and the pruned trials' last
    pseudo-Dice."""
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(8, 4))
    done = [t for t in trials if t.state.name == "COMPLETE"]
    pruned = [t for t in trials if t.state.name == "PRUNED" and t.value is not None]
    ax.scatter([t.number for t in done], [t.value for t in done], color="tab:blue", label="validation Dice")
    ax.scatter(
        [t.number for t in pruned],
        [t.value for t in pruned],
        color="tab:gray",
        marker="x",
        label="pruned: last pseudo-Dice",
    )
    best, xs, ys = -math.inf, [], []
    for t in sorted(done, key=lambda t: t.number):
        best = max(best, t.value)
        xs.append(t.number)
        ys.append(best)
    ax.step(xs, ys, where="post", color="tab:red", label="best so far")
    ax.set_xlabel("trial")
    ax.set_ylabel("Dice")
    ax.set_title("optimisation history")
    ax.legend(fontsize=8)
    fig.tight_layout()
    return save_png(fig, path).name


def plot_rungs(trials: list[Any], path: Path) -> str:
    """Every trial's reported pseudo-Dice against training seconds: where the pruner cut."""
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(8, 4))
    for t in trials:
        steps = sorted(t.intermediate_values)
        style = "-" if t.state.name == "COMPLETE" else ":"
        ax.plot(steps, [t.intermediate_values[s] for s in steps], style, label=f"{t.number}")
    ax.set_xlabel("training seconds")
    ax.set_ylabel("pseudo-Dice")
    ax.set_title("rungs (solid: complete, dotted: pruned or failed)")
    if len(trials) <= 20:
        ax.legend(fontsize=7, ncol=2, title="trial")
    fig.tight_layout()
    return save_png(fig, path).name


def plot_importances(values: dict[str, float], evaluator: str, path: Path) -> str:
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(8, max(2.0, 0.4 * len(values) + 1)))
    names = list(values)[::-1]
    ax.barh(names, [values[n] for n in names], color="tab:green")
    ax.set_xlabel(f"importance ({evaluator})")
    ax.set_title("parameter importances")
    fig.tight_layout()
    return save_png(fig, path).name


def trials_table(trials: list[Any]) -> tuple[list[str], list[list[str]]]:
    keys = sorted({k for t in trials for k in t.params})
    header = ["trial", "state", "Dice", "seconds", *keys]
    rows = []
    for t in trials:
        value = f"{t.value:.4f}" if t.value is not None else ""
        seconds = t.user_attrs.get("seconds")
        cells = [str(t.number), t.state.name.lower(), value, f"{seconds:.0f}" if seconds is not None else ""]
        rows.append(cells + [_cell(t.params.get(k)) for k in keys])
    return header, rows


def _cell(value: Any) -> str:
    if value is None:
        return ""
    return f"{value:.4g}" if isinstance(value, float) else str(value)


def write_report(out_dir: Path, study: Any) -> Path:
    """``report.html`` and its PNGs in ``out_dir`` (``WORK/tune/``)."""
    trials = study.get_trials(deepcopy=False)
    evaluator, values = importances(study)
    stem = study.study_name
    blocks: list[tuple] = [("h1", f"segpipe tune: study {stem}")]
    settings = ", ".join(f"{k} {v}" for k, v in study.user_attrs.items())
    blocks.append(
        (
            "p",
            f"{len(trials)} trials; {settings}. Dice: the fold's validation Dice by the inference "
            "path for complete trials, the last pseudo-Dice (sampled patches) for pruned ones.",
        )
    )
    best_path = out_dir / BEST_FILE
    if best_path.exists():
        blocks.append(("p", f"best trial {study.best_trial.number}: validation Dice {study.best_trial.value:.4f}"))
        blocks.append(("code", f"segpipe train WORK --fold K --time-budget S --overrides {best_path}"))
    confirm_path = out_dir / "confirm.json"
    if confirm_path.exists():
        c = read_json(confirm_path)
        blocks.append(("h2", "confirmation on another fold"))
        blocks.append(
            (
                "table",
                ["settings", f"fold {c['search_fold']}", f"fold {c['confirm_fold']}"],
                [
                    [f"best (trial {c['best_trial']})", _num(c["search_fold_dice"]), _num(c["confirm_fold_dice"])],
                    ["defaults", "", _num(c["defaults_confirm_fold_dice"])],
                ],
            )
        )
        if c.get("confirm_fold_difference") is not None:
            p = c.get("confirm_fold_wilcoxon_p")
            blocks.append(
                (
                    "p",
                    f"fold {c['confirm_fold']}, paired over its {c['confirm_fold_cases']} cases: best minus "
                    f"defaults {c['confirm_fold_difference']:+.4f}, Wilcoxon p = "
                    + (f"{p:.2g}" if p is not None else "n/a (too few cases)"),
                )
            )
    blocks.append(("h2", "optimisation history"))
    blocks.append(("img", plot_history(trials, out_dir / f"{stem}_history.png"), "optimisation history"))
    blocks.append(("img", plot_rungs(trials, out_dir / f"{stem}_rungs.png"), "rungs"))
    blocks.append(("h2", f"parameter importances ({evaluator})"))
    if values:
        complete = sum(t.state.name == "COMPLETE" for t in trials)
        blocks.append(("p", f"from the {complete} complete trials (pruned ones have no objective value)"))
        blocks.append(("img", plot_importances(values, evaluator, out_dir / f"{stem}_importances.png"), "importances"))
    else:
        blocks.append(("p", "not enough complete trials (or no parameter common to them) to estimate importances"))
    blocks.append(("h2", "trials"))
    blocks.append(("table", *trials_table(trials)))
    path = out_dir / REPORT_FILE
    text = to_html(blocks)
    atomic_write(path, lambda tmp: tmp.write_text(text))
    return path


def _num(value: float | None) -> str:
    return f"{value:.4f}" if value is not None and math.isfinite(value) else "n/a"
