"""Snapshot ensembles, SWA and FGE against poly at one training budget: held-out Dice, paired tests, cost.

From a clean WORK, in one command (resumable: a finished run is skipped, an interrupted one resumed):

    python benchmarks/ensemble_study.py --data ../shared/data/Task04_Hippocampus --work STUDY \\
        --preset cpu --folds 0,1 --budget 900 --seed 12345 --device cpu

``STUDY/base/`` is planned and preprocessed once and holds ``splits.json``; each recipe (a schedule
preset of ``plans/schedules/``) trains in its own work folder ``STUDY/<recipe>/`` with copies of the
base's plans, dataset, fingerprint and splits, and its ``preprocessed/`` a symlink to the base's, so
every recipe trains on the same cases and folds with the same seed and budget, and ``segpipe report
STUDY/<recipe>`` works on each. Every fold is trained with ``segpipe train --schedule RECIPE
--time-budget BUDGET``, whose end predicts the held-out cases with the full inference path (TTA on)
for every candidate of the run in one pass (final weights, SWA, snapshot ensembles).

Writes ``STUDY/study.md`` (the table, printed too), ``STUDY/study.json`` and ``STUDY/study_curves.png``
(pseudo-Dice and learning rate against training seconds, every recipe, one column per fold).
Per candidate: Dice per label (mean over the folds' held-out cases), the paired difference of the
per-case mean Dice to poly's final weights with its Wilcoxon p, and inference seconds per case.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

import numpy as np  # noqa: E402

from segpipe.core.atomic import atomic_write, read_json, write_json  # noqa: E402
from segpipe.core.paths import VALIDATION_FOLDERS, WorkDir  # noqa: E402
from segpipe.core.serialization import from_dict  # noqa: E402
from segpipe.evaluation.metrics import nanmean  # noqa: E402
from segpipe.evaluation.report import build_report, paired_comparison  # noqa: E402
from segpipe.planning.plans import TrainingSettings, load_plans  # noqa: E402
from segpipe.planning.splits import load_or_create_splits  # noqa: E402
from segpipe.preprocessing.preprocess import list_preprocessed  # noqa: E402
from segpipe.runs.checkpoint import FINAL, LATEST, load_checkpoint  # noqa: E402
from segpipe.runs.runlog import read_rows  # noqa: E402
from segpipe.training.schedules import SCHEDULE_PRESETS, cycle_ends, learning_rate  # noqa: E402
from segpipe.training.validation import TIMING_FILE  # noqa: E402

RECIPES = ["poly", "sgdr3", "sgdr-grow", "fge", "swa"]
BASELINE = ("poly", "final")
CONFIG = "3d_fullres"
SHARED_FILES = ("plans.json", "dataset.json", "fingerprint.json", "splits.json")
SIGNIFICANCE = 0.05


def cli(*args: object) -> None:
    """Run ``cli.py ARGS`` in a child process; its output goes to this one's."""
    command = [sys.executable, str(REPO / "cli.py"), *map(str, args)]
    print("+", " ".join(command), file=sys.stderr, flush=True)
    subprocess.run(command, check=True)


def prepare_base(data: Path, base: Path, preset: str, seed: int, num_folds: int, workers: int) -> None:
    """Plan and preprocess once (skipped when done), then write the splits every recipe shares."""
    wd = WorkDir(base)
    if not wd.plans.exists() or not _preprocessed(base):
        cli("preprocess", data, "-o", base, "--preset", preset, "--workers", workers)
    config = load_plans(wd.plans).configuration(CONFIG)
    load_or_create_splits(wd.splits, list_preprocessed(wd.preprocessed(config.data_identifier)), num_folds, seed)


def _preprocessed(base: Path) -> bool:
    plans = load_plans(WorkDir(base).plans)
    return bool(list_preprocessed(WorkDir(base).preprocessed(plans.configuration(CONFIG).data_identifier)))


def recipe_work(base: Path, work: Path) -> None:
    """A recipe's work folder: the base's plans, dataset, fingerprint and splits, its preprocessed cases."""
    work.mkdir(parents=True, exist_ok=True)
    for name in SHARED_FILES:
        if not (work / name).exists():
            shutil.copy2(base / name, work / name)
    link = work / "preprocessed"
    if not link.exists():
        os.symlink((base / "preprocessed").resolve(), link)


def finished(run_dir: Path) -> bool:
    return (run_dir / TIMING_FILE).is_file() and (run_dir / VALIDATION_FOLDERS["final"] / "summary.json").is_file()


def train(work: Path, recipe: str, fold: int, args: argparse.Namespace) -> None:
    """Train (or resume) one fold with the recipe; its end validates every candidate, TTA on."""
    run_dir = WorkDir(work).run(CONFIG, fold)
    extra = ["--resume"] if (run_dir / LATEST).exists() else []
    cli(
        "train", work, "--config", CONFIG, "--fold", fold, "--schedule", recipe, "--time-budget", args.budget,
        "--seed", args.seed, "--device", args.device, "--workers", args.workers, *extra,
    )  # fmt: skip


def case_dice(run_dir: Path, folder: str) -> dict[str, dict[str, float | None]]:
    """Per case of one fold's candidate folder: Dice per label (from its summary.json)."""
    summary = read_json(run_dir / folder / "summary.json")
    return {c["case"]: c["dice"] for c in summary["per_case"]}


def collect(study: Path, recipes: list[str], folds: list[int]) -> list[dict[str, Any]]:
    """One row per recipe and candidate present in every fold: per-case Dice, seconds per case, training."""
    rows = []
    for recipe in recipes:
        work = study / recipe
        runs = [WorkDir(work).run(CONFIG, k) for k in folds]
        timings = [read_json(r / TIMING_FILE)["candidates"] for r in runs]
        logs = [read_rows(r / "log.csv") for r in runs]
        for kind, folder in VALIDATION_FOLDERS.items():
            if not all((r / folder / "summary.json").is_file() for r in runs):
                continue
            cases: dict[str, dict[str, float | None]] = {}
            for r in runs:
                cases.update(case_dice(r, folder))
            rows.append(
                {
                    "recipe": recipe,
                    "candidate": kind,
                    "cases": cases,
                    "seconds_per_case": sum(t[kind]["seconds_per_case"] for t in timings) / len(timings),
                    "forward_passes": timings[0][kind]["forward_passes"],
                    "iterations": [int(log[-1]["iteration"]) for log in logs],
                    "epochs": [len(log) for log in logs],
                }
            )
    return rows


def summarize(rows: list[dict[str, Any]], labels: list[str]) -> list[dict[str, Any]]:
    """Add to each row its Dice per label, mean Dice, and the paired comparison with poly's final weights."""
    base = next((r for r in rows if (r["recipe"], r["candidate"]) == BASELINE), None)
    for row in rows:
        cases = sorted(row["cases"])
        row["dice"] = {k: nanmean([row["cases"][c].get(k) for c in cases]) for k in labels}
        row["mean_dice"] = nanmean(list(row["dice"].values()))
        per_case = [nanmean([row["cases"][c].get(k) for k in labels]) for c in cases]
        if row is base or base is None or sorted(base["cases"]) != cases:
            row["difference"], row["p"] = None, None
            continue
        ref = [nanmean([base["cases"][c].get(k) for k in labels]) for c in cases]
        row["difference"], row["p"] = paired_comparison(per_case, ref)
    return rows


def verdict(row: dict[str, Any]) -> str:
    if (row["recipe"], row["candidate"]) == BASELINE:
        return "baseline"
    d, p = row["difference"], row["p"]
    if d is None or p is None:
        return "too few cases"
    if p < SIGNIFICANCE:
        return "beats poly" if d > 0 else "worse than poly"
    return "no significant difference"


def markdown(rows: list[dict[str, Any]], labels: list[str], names: dict[str, str], meta: dict[str, Any]) -> str:
    head = ["recipe", "candidate", *[f"Dice {names[k]}" for k in labels], "mean Dice", "Δ vs poly", "p"]
    head += ["vs poly", "s/case", "forward passes", "iterations"]
    lines = [
        f"Budget {meta['budget']} s per run, seed {meta['seed']}, folds {meta['folds']}, {meta['cases']} held-out "
        f"cases, preset {meta['preset']}, device {meta['device']}, TTA on.",
        "",
        "| " + " | ".join(head) + " |",
        "|" + "---|" * len(head),
    ]
    for r in rows:
        cells = [r["recipe"], r["candidate"], *[f"{r['dice'][k]:.4f}" for k in labels], f"{r['mean_dice']:.4f}"]
        v = verdict(r)
        if v == "baseline":
            cells += ["—", "—"]
        else:
            cells += ["" if r["difference"] is None else f"{r['difference']:+.4f}"]
            cells += ["n/a" if r["p"] is None else f"{r['p']:.3g}"]
        cells += [v, f"{r['seconds_per_case']:.2f}"]
        cells += [str(r["forward_passes"]), "/".join(map(str, r["iterations"]))]
        lines.append("| " + " | ".join(cells) + " |")
    lines += ["", *[f"- `segpipe report` on {k}: {v}" for k, v in meta["reports"].items()]]
    return "\n".join(lines) + "\n"


def plot_curves(study: Path, recipes: list[str], folds: list[int], path: Path) -> None:
    """Pseudo-Dice per epoch (top) and the learning rate the schedule gave (bottom, with dotted lines at
    the snapshots) against training seconds; one column per fold."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(2, len(folds), figsize=(7 * len(folds), 7), sharex="col", squeeze=False)
    for j, fold in enumerate(folds):
        for i, recipe in enumerate(recipes):
            run_dir = WorkDir(study / recipe).run(CONFIG, fold)
            log = read_rows(run_dir / "log.csv")
            t = [float(r["elapsed_seconds"]) for r in log]
            dice = [float(r["mean_dice"] or "nan") for r in log]
            axes[0][j].plot(t, dice, color=f"C{i}", marker="o", markersize=3, label=recipe)
            ckpt = load_checkpoint(run_dir / FINAL)
            settings = from_dict(TrainingSettings, ckpt["settings"])
            budget = ckpt.get("time_budget") or (t[-1] if t else 1.0)
            progress = np.linspace(0, 1, 500)
            lr = [learning_rate(q, settings) for q in progress]
            axes[1][j].plot(progress * budget, lr, color=f"C{i}", label=recipe)
            for end in cycle_ends(settings):
                axes[1][j].axvline(end * budget, color=f"C{i}", linestyle=":", linewidth=0.8)
        axes[0][j].set_title(f"fold {fold}")
        axes[0][j].set_ylabel("validation pseudo-Dice (per epoch)")
        axes[0][j].set_ylim(0, 1)
        axes[0][j].legend(fontsize=8)
        axes[1][j].set_ylabel("learning rate (dotted: snapshots)")
        axes[1][j].set_xlabel("training seconds")
    fig.tight_layout()
    atomic_write(path, lambda tmp: fig.savefig(tmp, format="png", dpi=80))
    plt.close(fig)


def report_verdicts(study: Path, recipes: list[str]) -> dict[str, str]:
    """What ``segpipe report`` recommends for each recipe's work folder, in its own words."""
    out = {}
    for recipe in recipes:
        try:
            report = build_report(study / recipe, [CONFIG])
        except (OSError, ValueError, KeyError) as exc:
            out[recipe] = f"failed ({exc})"
            continue
        if report["under_trained"]:
            out[recipe] = "no recommendation, under-trained: " + " ".join(report["warnings"])
        else:
            out[recipe] = report["recommendation"]["text"]
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data", type=Path, required=True, help="MSD or nnU-Net v2 dataset")
    parser.add_argument("--work", type=Path, required=True, help="study folder (created; resumable)")
    parser.add_argument("--preset", default="cpu")
    parser.add_argument("--folds", default="0,1")
    parser.add_argument("--num-folds", type=int, default=5)
    parser.add_argument("--budget", type=float, default=900.0, help="training seconds per run")
    parser.add_argument("--seed", type=int, default=12345)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--workers", type=int, default=1, help="data-loader workers and preprocessing processes")
    parser.add_argument("--recipes", default=",".join(RECIPES), help="schedule presets; poly is the baseline")
    args = parser.parse_args()
    folds = [int(v) for v in args.folds.split(",")]
    recipes = args.recipes.split(",")
    for recipe in recipes:
        SCHEDULE_PRESETS.get(recipe)  # unknown names: the list of presets, before any work
    base = args.work / "base"
    prepare_base(args.data, base, args.preset, args.seed, args.num_folds, args.workers)
    for recipe in recipes:
        work = args.work / recipe
        recipe_work(base, work)
        for fold in folds:
            if finished(WorkDir(work).run(CONFIG, fold)):
                print(f"{recipe} fold {fold}: done, skipped", file=sys.stderr)
                continue
            train(work, recipe, fold, args)
    plans = load_plans(WorkDir(base).plans)
    names = {str(v): n for n, v in plans.labels.items() if v != 0}
    labels = list(names)
    rows = summarize(collect(args.work, recipes, folds), labels)
    meta = {
        "budget": args.budget,
        "seed": args.seed,
        "folds": args.folds,
        "preset": args.preset,
        "device": args.device,
        "cases": len(rows[0]["cases"]) if rows else 0,
        "reports": report_verdicts(args.work, recipes),
    }
    table = markdown(rows, labels, names, meta)
    atomic_write(args.work / "study.md", lambda tmp: tmp.write_text(table))
    write_json(args.work / "study.json", {**meta, "rows": [{k: v for k, v in r.items() if k != "cases"} for r in rows]})
    plot_curves(args.work, recipes, folds, args.work / "study_curves.png")
    print(table)
    print(json.dumps({"table": str(args.work / "study.md"), "curves": str(args.work / "study_curves.png")}))


if __name__ == "__main__":
    main()
