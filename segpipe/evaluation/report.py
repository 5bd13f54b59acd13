"""Cross-validation report: which trained model to use, and the command that uses it.

The last stage. Reads only run folders (``WORK/<config>/fold_<k>/``: ``validation*/`` predictions and
``summary.json``, ``log.csv``), ``WORK/splits.json``, ``WORK/dataset.json`` (reference labels) and
``WORK/plans.json``; writes ``WORK/report/``: ``report.json``, ``report.md``, ``report.html`` and the
PNG plots they show. Every candidate (a configuration's final, SWA or snapshot-ensemble weights, or
an ensemble of configurations averaging their saved probabilities) is scored on the same
out-of-fold cases, each case predicted by the fold that did not train on it. Dice is recomputed
here from the saved predictions, one case at a time (never more than one case in memory).

The recommendation (:func:`recommend`): an ensemble, SWA or snapshot ensemble only where it beats its
single model (the same configuration's final weights; for an ensemble of configurations, the best
single model) case by case: a higher mean Dice and a two-sided Wilcoxon signed-rank p < 0.05 over
the paired cases; else the single model with the highest mean Dice, with what each alternative gained
or lost. When the runs are plainly under-trained (:func:`training_warnings`) the report says so at
the top and recommends nothing.
"""

from __future__ import annotations

import html
import itertools
import math
import shlex
import warnings
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from segpipe.core.atomic import atomic_write, read_json, write_json
from segpipe.core.paths import LAST_SNAPSHOTS, WorkDir
from segpipe.core.paths import VALIDATION_FOLDERS as CANDIDATE_FOLDERS
from segpipe.data.dataset import Dataset
from segpipe.data.nifti import InputError
from segpipe.evaluation.metrics import (
    AFFINE_TOLERANCE,
    dice,
    load_label_map,
    mask_ignored,
    nanmean,
    target_key,
)
from segpipe.inference.decode import label_map
from segpipe.inference.postprocessing import load_decision
from segpipe.planning.plans import Plans, load_plans
from segpipe.runs.runlog import cell_float, read_rows

LAST_KIND = f"snapshots_last{LAST_SNAPSHOTS}"
# simpler first: wins ties (fewer forward passes)
KIND_ORDER = {"final": 0, "swa": 1, LAST_KIND: 2, "snapshots": 3, "ensemble": 4}
MIN_PAIRED_CASES = 5  # fewer paired cases: no Wilcoxon p-value (null)
TIE_TOLERANCE = 1e-9
SIGNIFICANCE = 0.05  # an alternative to the single model needs p below this (and a higher mean)
# under-training: the last tenth of the epochs (at least 3) against every earlier stretch as long
TAIL_FRACTION, MIN_TAIL_EPOCHS = 0.1, 3
RISE_MARGIN = 0.01  # Dice by which the last tenth's mean pseudo-Dice must top every earlier stretch
FAR_BELOW = 0.5  # every candidate's out-of-fold Dice below this fraction of the fold's best pseudo-Dice


@dataclass
class Candidate:
    """A model whose out-of-fold predictions lie in ``folder`` of each fold of each of ``configs``."""

    name: str
    kind: str  # final | swa | snapshots | ensemble
    configs: list[str]
    folder: str = CANDIDATE_FOLDERS["final"]

    def members(self, wd: WorkDir, folds: Sequence[int]) -> list[str]:
        return [str(wd.run(c, k) / self.folder) for c in self.configs for k in folds]

    def label_map(self, wd: WorkDir, fold: int, case: str, plans: Plans, grid: tuple) -> np.ndarray:
        """The case's label map ``(X, Y, Z)``; ``grid`` is the reference's ``(shape, affine)``."""
        if self.kind != "ensemble":
            path = wd.run(self.configs[0], fold) / self.folder / f"{case}.nii.gz"
            seg, affine = load_label_map(path)
            _check_grid(path, seg.shape, affine, grid)
            return seg
        total = None
        for config in self.configs:  # streaming sum: one member's probabilities beside the total
            path = wd.run(config, fold) / self.folder / f"{case}.npz"
            with np.load(path) as f:
                p = f["probabilities"].astype(np.float32)
            if total is not None and p.shape != total.shape:
                raise InputError(path, f"probability shape {p.shape} differs from the other members' {total.shape}")
            total = p if total is None else total + p
        assert total is not None
        _check_grid(path, total.shape[1:], None, grid)
        return label_map(total, plans.foreground_labels, plans.regions_class_order)


def build_report(work: Path, configs: list[str] | None = None) -> dict[str, Any]:
    """Score every candidate on the out-of-fold cases, pick one, write ``WORK/report/``; return report.json's dict."""
    from segpipe.evaluation.report_plots import plot_candidates, plot_curves

    wd = WorkDir(work)
    plans = load_plans(wd.plans)
    labels = plans.evaluation_targets
    splits = read_json(wd.splits)
    dataset = Dataset.from_dict(read_json(wd.dataset))
    gt = {c.case_id: Path(c.label) for c in dataset.training if c.label}
    configs = configs or [c for c in plans.configurations if (wd.root / c).is_dir()]
    for config in configs:
        plans.configuration(config)  # unknown names: KeyError listing the planned ones
    folds = [
        k
        for k in range(len(splits))
        if all(_complete(wd.run(c, k) / "validation", splits[k]["val"], ".nii.gz") for c in configs)
    ]
    if not configs or not folds:
        raise FileNotFoundError(
            f"{wd.root}: no fold has validation/ predictions of every case for configurations "
            f"{', '.join(configs) or '(none trained)'}; train with validation first"
        )
    cases = list({case: k for k in folds for case in splits[k]["val"]}.items())
    missing = [case for case, _ in cases if case not in gt]
    if missing:
        raise InputError(wd.dataset, f"no reference label for validation cases {missing[:5]}")

    candidates, skipped = _candidates(wd, configs, folds, splits)
    per_case = _score(wd, candidates, cases, gt, plans)
    rows = [_summarize(c, per_case[c.name], labels, wd, folds) for c in candidates]
    recommendation = recommend(rows, per_case)
    best = recommendation["name"]  # the rule's choice; withheld below when the runs are under-trained
    best_case_means = [r["mean_dice"] for r in per_case[best]]
    for row in rows:
        diff, p = paired_comparison([r["mean_dice"] for r in per_case[row["name"]]], best_case_means)
        row["mean_difference_vs_best"], row["wilcoxon_p_vs_best"] = diff, p
    chosen = next(c for c in candidates if c.name == best)

    out = wd.report
    fold_rows, curves = _gather_folds(wd, configs, len(splits))
    used = {c: {k: log for k, log in logs.items() if k in folds} for c, logs in curves.items()}
    warnings_, unjudged = training_warnings(used, rows, per_case)
    report: dict[str, Any] = {
        "work": str(wd.root),
        "configs": configs,
        "labels": _target_names(plans),
        "num_folds": len(splits),
        "folds_used": folds,
        "num_cases": len(cases),
        "folds": fold_rows,
        "candidates": rows,
        "skipped_candidates": skipped,
        "under_trained": bool(warnings_),
        "warnings": warnings_,
        "recommended": None if warnings_ else best,
        "recommendation": recommendation,
        "predict_command": None if warnings_ else predict_command(wd.root, chosen, folds),
        "postprocessing": {c: load_decision(wd.postprocessing(c)) for c in configs},
        "notes": _notes(folds, len(splits), len(cases), unjudged),
        "per_case": per_case,
        "plots": {  # file names inside WORK/report/
            "candidates": Path(
                plot_candidates(rows, [target_key(t) for t in labels], out / "dice_per_candidate.png")
            ).name,
            **{
                f"curves_{c}": Path(plot_curves(c, logs, out / f"curves_{c}.png")).name
                for c, logs in curves.items()
                if logs
            },
        },
    }
    write_json(out / "report.json", report)
    sections = _sections(report)
    text_md, text_html = to_markdown(sections), to_html(sections)
    atomic_write(out / "report.md", lambda tmp: tmp.write_text(text_md))
    atomic_write(out / "report.html", lambda tmp: tmp.write_text(text_html))
    return report


def paired_comparison(a: Sequence[float], b: Sequence[float]) -> tuple[float | None, float | None]:
    """Mean of the per-case differences ``a - b`` and the two-sided Wilcoxon signed-rank p-value.

    Cases where either value is NaN are left out. No pairs: ``(None, None)``; all differences zero:
    p = 1.0; fewer than ``MIN_PAIRED_CASES`` pairs otherwise: p = ``None``.
    """
    from scipy.stats import wilcoxon

    d = np.array([x - y for x, y in zip(a, b, strict=True) if not (_isnan(x) or _isnan(y))], dtype=np.float64)
    if d.size == 0:
        return None, None
    if not np.any(d != 0):
        return 0.0, 1.0
    if d.size < MIN_PAIRED_CASES:
        return float(d.mean()), None
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # scipy warns about ties and small samples; the p-value stands
        p = float(wilcoxon(d).pvalue)
    return float(d.mean()), (None if math.isnan(p) else p)


def best_by_mean(rows: list[dict[str, Any]]) -> str:
    """The row with the highest mean Dice; a tie (within 1e-9) goes to the simpler kind."""
    scored = [r for r in rows if not _isnan(r["mean_dice"])]
    if not scored:
        raise ValueError("no candidate has a finite mean Dice")
    top = max(r["mean_dice"] for r in scored)
    tied = [r for r in scored if r["mean_dice"] >= top - TIE_TOLERANCE]
    return min(tied, key=lambda r: (KIND_ORDER[r["kind"]], len(r["members"]), r["name"]))["name"]


def recommend(rows: list[dict[str, Any]], per_case: dict[str, list[dict[str, Any]]]) -> dict[str, Any]:
    """The candidate to use, with the evidence in words (see the module docstring).

    Among the single models (final weights) the highest mean Dice; an alternative (SWA, snapshot
    ensemble, configuration ensemble) replaces it only when it beats its own single model (same
    configuration's final weights; the best single model for an ensemble of configurations) with a
    positive mean difference and p < ``SIGNIFICANCE`` over the paired cases, and has a higher mean
    Dice than the best single model. Returns ``{"name", "text", "comparisons"}``: one comparison per
    alternative (baseline, mean difference, p, paired cases, whether it beats the baseline)."""
    singles = [r for r in rows if r["kind"] == "final"]
    single = best_by_mean(singles or rows)
    means = {r["name"]: r["mean_dice"] for r in rows}
    comparisons = []
    for row in rows:
        if row["name"] == single or row["kind"] == "final":
            continue
        own = f"{row['name'].split(':')[0]}:final"
        baseline = own if row["kind"] != "ensemble" and own in means else single
        diff, p, n = _paired(per_case[row["name"]], per_case[baseline])
        beats = diff is not None and diff > 0 and p is not None and p < SIGNIFICANCE
        comparisons.append(
            {"name": row["name"], "baseline": baseline, "difference": diff, "p": p, "cases": n, "beats": beats}
        )
    winners = [r for r in rows if any(c["name"] == r["name"] and c["beats"] for c in comparisons)]
    winners = [r for r in winners if r["mean_dice"] > means[single]]
    name = best_by_mean(winners) if winners else single
    lines = [_comparison_text(c) for c in comparisons]
    if name == single:
        head = f"Recommended: the single model {single}"
        head += (
            f": no ensemble or SWA beats its single model with p < {SIGNIFICANCE:g} and a higher mean Dice."
            if comparisons
            else "."
        )
        if len(singles) > 1:
            head += f" It has the highest mean out-of-fold Dice of the single models ({means[single]:.4f})."
    else:
        chosen = next(c for c in comparisons if c["name"] == name)
        head = f"Recommended: {name}. {_comparison_text(chosen)}"
        lines = [line for c, line in zip(comparisons, lines) if c is not chosen]
    return {"name": name, "single": single, "text": " ".join([head, *lines]), "comparisons": comparisons}


def _paired(a: list[dict[str, Any]], b: list[dict[str, Any]]) -> tuple[float | None, float | None, int]:
    """Mean difference, Wilcoxon p and number of the paired cases (both finite) of two candidates."""
    x, y = [r["mean_dice"] for r in a], [r["mean_dice"] for r in b]
    diff, p = paired_comparison(x, y)
    return diff, p, sum(not (_isnan(u) or _isnan(v)) for u, v in zip(x, y))


def _comparison_text(c: dict[str, Any]) -> str:
    """One alternative against its single model, in words."""
    evidence = f"{_fmt(c['difference'], '+.3f')} Dice, p = {_fmt(c['p'], '.2g')} over {c['cases']} cases"
    if c["beats"]:
        return f"{c['name']} beats {c['baseline']} by {evidence}."
    return f"{c['name']} does not beat {c['baseline']}: {evidence}."


def still_rising(pseudo_dice: Sequence[float]) -> tuple[float, int] | None:
    """Whether a run's validation pseudo-Dice (one value per epoch) still rises at its end: the mean of
    its last tenth of epochs (at least ``MIN_TAIL_EPOCHS``) exceeds the mean of every earlier stretch of
    as many consecutive epochs by more than ``RISE_MARGIN``. Returns ``(rise, epochs in the tenth)``
    when it does, None when it does not or when there are fewer than two tenths' worth of epochs."""
    values = [float(v) for v in pseudo_dice if not _isnan(v)]
    m = max(MIN_TAIL_EPOCHS, math.ceil(TAIL_FRACTION * len(values)))
    if len(values) < 2 * m:
        return None
    tail = float(np.mean(values[-m:]))
    earlier = max(float(np.mean(values[i : i + m])) for i in range(len(values) - 2 * m + 1))
    return (tail - earlier, m) if tail - earlier > RISE_MARGIN else None


def training_warnings(
    curves: dict[str, dict[int, list[dict[str, str]]]],
    rows: list[dict[str, Any]],
    per_case: dict[str, list[dict[str, Any]]],
) -> tuple[list[str], list[str]]:
    """Why the runs look under-trained, one sentence per run (config and fold); and the runs whose
    logs were too short to tell. A run is under-trained when its pseudo-Dice (``log.csv``
    ``mean_dice``) still rises (:func:`still_rising`), or when every candidate of its configuration
    scores below ``FAR_BELOW`` x its best epoch's pseudo-Dice on the fold's out-of-fold cases."""
    warnings_: list[str] = []
    unjudged: list[str] = []
    for config, logs in curves.items():
        own = [r["name"] for r in rows if r["kind"] != "ensemble" and r["name"].split(":")[0] == config]
        for fold, log in sorted(logs.items()):
            dice = [cell_float(r.get("mean_dice")) for r in log]
            dice = [float("nan") if v is None else v for v in dice]
            rising = still_rising(dice)
            if rising is not None:
                rise, m = rising
                warnings_.append(
                    f"{config} fold {fold}: the validation pseudo-Dice still rises at the end of training: the "
                    f"mean of its last {m} epochs is {rise:.3f} above every earlier stretch of {m} epochs."
                )
            elif len([v for v in dice if not _isnan(v)]) < 2 * MIN_TAIL_EPOCHS:
                unjudged.append(f"{config} fold {fold}")
            best_epoch = max((v for v in dice if not _isnan(v)), default=None)
            fold_dice = {n: nanmean(r["mean_dice"] for r in per_case[n] if r["fold"] == fold) for n in own}
            fold_dice = {n: v for n, v in fold_dice.items() if not _isnan(v)}
            if best_epoch and fold_dice and max(fold_dice.values()) < FAR_BELOW * best_epoch:
                top = max(fold_dice, key=lambda n: fold_dice[n])
                warnings_.append(
                    f"{config} fold {fold}: every candidate's out-of-fold Dice is below {FAR_BELOW:g} x the "
                    f"fold's best epoch pseudo-Dice ({best_epoch:.3f}); the best candidate, {top}, has "
                    f"{fold_dice[top]:.3f}."
                )
    return warnings_, unjudged


def predict_command(work: Path, candidate: Candidate, folds: Sequence[int]) -> str:
    """The ``segpipe predict`` command(s) that apply ``candidate`` to new images (INPUT -> OUTPUT)."""
    base = f"segpipe predict -i INPUT -m {shlex.quote(str(work))} --folds {','.join(map(str, folds))}"
    if candidate.kind == "final":
        return f"{base} -o OUTPUT --config {candidate.configs[0]}"
    if candidate.kind == "swa":
        return f"{base} -o OUTPUT --config {candidate.configs[0]} --weights swa"
    if candidate.kind == "snapshots":
        return f"{base} -o OUTPUT --config {candidate.configs[0]} --snapshots all"
    if candidate.kind == LAST_KIND:
        return f"{base} -o OUTPUT --config {candidate.configs[0]} --snapshots last:{LAST_SNAPSHOTS}"
    lines = [f"{base} -o OUTPUT/{c} --config {c} --save-probabilities" for c in candidate.configs]
    members = " ".join(f"OUTPUT/{c}" for c in candidate.configs)
    lines.append(f"segpipe ensemble {members} -o OUTPUT/ensemble -m {shlex.quote(str(work))}")
    return "\n".join(lines)


# --------------------------------------------------------------------------------------------------


def _complete(folder: Path, cases: list[str], ending: str) -> bool:
    return folder.is_dir() and all((folder / f"{c}{ending}").is_file() for c in cases)


def _candidates(
    wd: WorkDir, configs: list[str], folds: list[int], splits: list[dict]
) -> tuple[list[Candidate], list[dict[str, str]]]:
    """Every candidate complete on ``folds``, and the skipped ones with the reason."""
    out: list[Candidate] = []
    skipped: list[dict[str, str]] = []
    for config in configs:
        for kind, folder in CANDIDATE_FOLDERS.items():
            name = f"{config}:{kind}"
            if all(_complete(wd.run(config, k) / folder, splits[k]["val"], ".nii.gz") for k in folds):
                out.append(Candidate(name, kind, [config], folder))
            elif kind == "final" or any((wd.run(config, k) / folder).is_dir() for k in folds):
                skipped.append({"name": name, "reason": f"{folder}/ is incomplete in some of folds {folds}"})
    with_probs = [
        c for c in configs if all(_complete(wd.run(c, k) / "validation", splits[k]["val"], ".npz") for k in folds)
    ]
    groups = list(itertools.combinations(with_probs, 2))
    if len(with_probs) > 2:
        groups.append(tuple(with_probs))
    for group in groups:
        out.append(Candidate(f"ensemble({'+'.join(group)})", "ensemble", list(group)))
    for config in sorted(set(configs) - set(with_probs)):
        if len(configs) > 1:
            skipped.append({"name": f"ensembles with {config}", "reason": "validation/ lacks some CASE.npz"})
    return out, skipped


def _score(
    wd: WorkDir, candidates: list[Candidate], cases: list[tuple[str, int]], gt: dict[str, Path], plans: Plans
) -> dict[str, list[dict[str, Any]]]:
    """Per candidate, per case: Dice of each label (or region) and their mean (NaN labels left out; the
    reference's ``ignore`` voxels count for none)."""
    targets = plans.evaluation_targets
    out: dict[str, list[dict[str, Any]]] = {c.name: [] for c in candidates}
    for case, fold in cases:
        ref, affine = load_label_map(gt[case])
        for cand in candidates:
            seg = cand.label_map(wd, fold, case, plans, (ref.shape, affine))
            seg, masked_ref = mask_ignored(seg, ref, plans.ignore_label)
            scores = {target_key(t): dice(seg, masked_ref, t) for t in targets}
            out[cand.name].append({"case": case, "fold": fold, "dice": scores, "mean_dice": nanmean(scores.values())})
    return out


def _target_names(plans: Plans) -> dict[str, int | str]:
    """Display name -> key of every evaluation target: label values, or regions (``"1+2"``)."""
    if plans.regions and plans.region_names:
        return {name: target_key(r) for name, r in zip(plans.region_names, plans.regions)}
    return {name: v for name, v in plans.labels.items() if v != 0}


def _summarize(cand: Candidate, cases: list[dict[str, Any]], labels: list, wd: WorkDir, folds: list[int]) -> dict:
    per_label = {target_key(v): nanmean([c["dice"][target_key(v)] for c in cases]) for v in labels}
    return {
        "name": cand.name,
        "kind": cand.kind,
        "members": cand.members(wd, folds),
        "dice": per_label,
        "mean_dice": nanmean(per_label.values()),
        "num_cases": len(cases),
    }


def _gather_folds(wd: WorkDir, configs: list[str], num_folds: int) -> tuple[list[dict], dict[str, dict]]:
    """Per config and fold: the validation summary's means and the log's last row; the log rows."""
    rows: list[dict] = []
    curves: dict[str, dict[int, list[dict[str, str]]]] = {c: {} for c in configs}
    for config in configs:
        for k in range(num_folds):
            run = wd.run(config, k)
            log = read_rows(run / "log.csv")
            summary_path = run / "validation" / "summary.json"
            if not log and not summary_path.is_file():
                continue
            summary = read_json(summary_path) if summary_path.is_file() else {"mean": {}}
            if log:
                curves[config][k] = log
            rows.append(
                {
                    "config": config,
                    "fold": k,
                    "dice": summary["mean"].get("dice", {}),
                    "hd95": summary["mean"].get("hd95", {}),
                    "mean_dice": summary.get("mean_dice"),
                    "num_cases": summary.get("num_cases"),
                    "epochs": len(log),
                    "final_pseudo_dice": cell_float(log[-1].get("mean_dice")) if log else None,
                    "train_seconds": cell_float(log[-1].get("elapsed_seconds")) if log else None,
                }
            )
    return rows, curves


def _notes(folds: list[int], num_folds: int, num_cases: int, unjudged: list[str]) -> list[str]:
    notes = [
        f"Every candidate is scored on the same {num_cases} out-of-fold cases, each predicted by the fold "
        "that did not train on it, without postprocessing.",
        "At test time the command below averages the models of all listed folds (a fold ensemble); the numbers "
        "here are the cross-validation of single-fold models, so the fold ensemble usually does slightly better.",
        "Δ and p: mean difference of the per-case mean Dice to the single model each alternative is compared "
        f"with, and its two-sided Wilcoxon signed-rank test (n/a with fewer than {MIN_PAIRED_CASES} cases).",
    ]
    if unjudged:
        notes.append(
            f"Too few epochs (fewer than {2 * MIN_TAIL_EPOCHS}) to tell whether the pseudo-Dice still rises: "
            + ", ".join(unjudged)
            + "."
        )
    if len(folds) < num_folds:
        notes.append(
            f"Only folds {', '.join(map(str, folds))} of {num_folds} have validation predictions "
            "for every configuration; the estimates cover those folds' cases only."
        )
    return notes


def _sections(report: dict[str, Any]) -> list[tuple]:
    """The report as a list of blocks, rendered by :func:`to_markdown` and :func:`to_html`."""
    keys = [str(v) for v in report["labels"].values()]
    names = [f"{n} ({v})" for n, v in report["labels"].items()]
    best = report["recommended"]
    rec = report["recommendation"]
    versus = {c["name"]: c for c in rec["comparisons"]}
    blocks: list[tuple] = [
        ("h1", "segpipe cross-validation report"),
        (
            "p",
            f"Work folder: {report['work']}. Configurations: {', '.join(report['configs'])}. "
            f"Folds used: {', '.join(map(str, report['folds_used']))} of {report['num_folds']}.",
        ),
    ]
    if report["under_trained"]:
        blocks += [
            ("h2", "No recommendation: the models are under-trained"),
            *[("p", w) for w in report["warnings"]],
            (
                "p",
                "Train longer (a larger --time-budget or more --epochs) and validate again; the comparison "
                f"below is for information only (the rule would have chosen {rec['name']}).",
            ),
        ]
    else:
        blocks += [("h2", f"Recommended: {best}"), ("p", rec["text"]), ("code", report["predict_command"])]
    blocks += [
        *[("p", n) for n in report["notes"]],
        ("h2", "Candidates (out-of-fold Dice)"),
        (
            "table",
            ["candidate", *[f"Dice {n}" for n in names], "mean Dice", "cases", "compared with", "Δ", "p"],
            [
                [
                    ("**" + r["name"] + "**") if r["name"] == best else r["name"],
                    *[_fmt(r["dice"].get(k)) for k in keys],
                    _fmt(r["mean_dice"]),
                    str(r["num_cases"]),
                    versus[r["name"]]["baseline"] if r["name"] in versus else "",
                    _fmt(versus[r["name"]]["difference"], "+.4f") if r["name"] in versus else "",
                    _fmt(versus[r["name"]]["p"], ".3g") if r["name"] in versus else "",
                ]
                for r in report["candidates"]
            ],
        ),
        ("img", report["plots"]["candidates"], "mean Dice per candidate and label"),
    ]
    for s in report["skipped_candidates"]:
        blocks.append(("p", f"Not compared: {s['name']} ({s['reason']})."))
    for config, decision in report["postprocessing"].items():
        if decision:
            blocks.append(
                (
                    "p",
                    f"{config}: postprocessing.json keeps the largest foreground component: "
                    f"{'yes' if decision['foreground_largest_component'] else 'no'}, per label: "
                    f"{decision['per_label_largest_component'] or 'none'}; segpipe predict applies it "
                    "(--no-postprocessing to skip), segpipe ensemble does not.",
                )
            )
    blocks += [
        ("h2", "Folds (validation/summary.json)"),
        (
            "table",
            [
                "config",
                "fold",
                *[f"Dice {n}" for n in names],
                *[f"HD95 {n} (mm)" for n in names],
                "mean Dice",
                "epochs",
                "train s",
            ],
            [
                [
                    f["config"],
                    str(f["fold"]),
                    *[_fmt(f["dice"].get(k)) for k in keys],
                    *[_fmt(f["hd95"].get(k), ".2f") for k in keys],
                    _fmt(f["mean_dice"]),
                    str(f["epochs"]),
                    _fmt(f["train_seconds"], ".0f"),
                ]
                for f in report["folds"]
            ],
        ),
        ("h2", "Training curves"),
    ]
    blocks += [("img", name, key) for key, name in report["plots"].items() if key.startswith("curves_")]
    return blocks


def to_markdown(blocks: list[tuple]) -> str:
    lines: list[str] = []
    for kind, *args in blocks:
        if kind in ("h1", "h2"):
            lines += [("# " if kind == "h1" else "## ") + args[0], ""]
        elif kind == "p":
            lines += [args[0], ""]
        elif kind == "code":
            lines += ["```bash", args[0], "```", ""]
        elif kind == "img":
            lines += [f"![{args[1]}]({args[0]})", ""]
        elif kind == "table":
            header, rows = args
            lines += ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
            lines += ["| " + " | ".join(r) + " |" for r in rows] + [""]
    return "\n".join(lines)


def to_html(blocks: list[tuple]) -> str:
    e = html.escape
    parts = [
        "<!DOCTYPE html>",
        '<html><head><meta charset="utf-8"><title>segpipe report</title>',
        "<style>body{font-family:sans-serif;max-width:1100px;margin:2em auto}table{border-collapse:collapse}"
        "td,th{border:1px solid #ccc;padding:3px 8px;text-align:right}td:first-child{text-align:left}"
        "pre{background:#f4f4f4;padding:8px}</style></head><body>",
    ]
    for kind, *args in blocks:
        if kind in ("h1", "h2", "p"):
            parts.append(f"<{kind}>{e(args[0])}</{kind}>")
        elif kind == "code":
            parts.append(f"<pre>{e(args[0])}</pre>")
        elif kind == "img":
            parts.append(f'<p><img src="{e(args[0])}" alt="{e(args[1])}"></p>')
        elif kind == "table":
            header, rows = args
            parts.append("<table><tr>" + "".join(f"<th>{e(h)}</th>" for h in header) + "</tr>")
            for r in rows:
                cells = [f"<b>{e(c[2:-2])}</b>" if c.startswith("**") else e(c) for c in r]
                parts.append("<tr>" + "".join(f"<td>{c}</td>" for c in cells) + "</tr>")
            parts.append("</table>")
    parts.append("</body></html>")
    return "\n".join(parts) + "\n"


def _check_grid(path: Path, shape: tuple, affine: np.ndarray | None, grid: tuple) -> None:
    ref_shape, ref_affine = grid
    if tuple(shape) != tuple(ref_shape):
        raise InputError(path, f"shape {tuple(shape)} differs from the reference label's {tuple(ref_shape)}")
    if affine is not None and not float(np.max(np.abs(affine - ref_affine))) <= AFFINE_TOLERANCE:
        raise InputError(path, "affine differs from the reference label's")


def _isnan(value: float | None) -> bool:
    return value is None or math.isnan(value)


def _fmt(value: float | None, spec: str = ".4f") -> str:
    return "n/a" if _isnan(value) else format(value, spec)
