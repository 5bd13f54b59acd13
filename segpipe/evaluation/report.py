"""Cross-validation report: which trained model to use, and the command that uses it.

The last stage. Reads only run folders (``WORK/<config>/fold_<k>/``: ``validation*/`` predictions and
``summary.json``, ``log.csv``), ``WORK/splits.json``, ``WORK/dataset.json`` (reference labels) and
``WORK/plans.json``; writes ``WORK/report/``: ``report.json``, ``report.md``, ``report.html`` and the
PNG plots they show. Every candidate (a configuration's final, SWA or snapshot-ensemble weights, or
an ensemble of configurations averaging their saved probabilities) is scored on the same
out-of-fold cases, each case predicted by the fold that did not train on it. Dice is recomputed
here from the saved predictions, one case at a time (never more than one case in memory), and
candidates are compared case by case with a Wilcoxon signed-rank test against the best one.
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
from segpipe.core.paths import VALIDATION_FOLDERS as CANDIDATE_FOLDERS
from segpipe.core.paths import WorkDir
from segpipe.data.dataset import Dataset
from segpipe.data.nifti import InputError
from segpipe.evaluation.metrics import AFFINE_TOLERANCE, dice, load_label_map, mask_ignored, target_key
from segpipe.inference.decode import label_map
from segpipe.inference.postprocessing import load_decision
from segpipe.planning.plans import Plans, load_plans
from segpipe.runs.runlog import read_rows

KIND_ORDER = {"final": 0, "swa": 1, "snapshots": 2, "ensemble": 3}  # simpler first: wins ties
MIN_PAIRED_CASES = 5  # fewer paired cases: no Wilcoxon p-value (null)
TIE_TOLERANCE = 1e-9


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
    best = recommend(rows)
    best_case_means = [r["mean_dice"] for r in per_case[best]]
    for row in rows:
        diff, p = paired_comparison([r["mean_dice"] for r in per_case[row["name"]]], best_case_means)
        row["mean_difference_vs_best"], row["wilcoxon_p_vs_best"] = diff, p
    chosen = next(c for c in candidates if c.name == best)

    out = wd.report
    fold_rows, curves = _gather_folds(wd, configs, len(splits))
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
        "recommended": best,
        "predict_command": predict_command(wd.root, chosen, folds),
        "postprocessing": {c: load_decision(wd.postprocessing(c)) for c in configs},
        "notes": _notes(folds, len(splits), len(cases)),
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


def recommend(rows: list[dict[str, Any]]) -> str:
    """The candidate with the highest mean Dice; a tie (within 1e-9) goes to the simpler kind."""
    scored = [r for r in rows if not _isnan(r["mean_dice"])]
    if not scored:
        raise ValueError("no candidate has a finite mean Dice")
    top = max(r["mean_dice"] for r in scored)
    tied = [r for r in scored if r["mean_dice"] >= top - TIE_TOLERANCE]
    return min(tied, key=lambda r: (KIND_ORDER[r["kind"]], len(r["members"]), r["name"]))["name"]


def predict_command(work: Path, candidate: Candidate, folds: Sequence[int]) -> str:
    """The ``segpipe predict`` command(s) that apply ``candidate`` to new images (INPUT -> OUTPUT)."""
    base = f"segpipe predict -i INPUT -m {shlex.quote(str(work))} --folds {','.join(map(str, folds))}"
    if candidate.kind == "final":
        return f"{base} -o OUTPUT --config {candidate.configs[0]}"
    if candidate.kind == "swa":
        return f"{base} -o OUTPUT --config {candidate.configs[0]} --weights swa"
    if candidate.kind == "snapshots":
        return f"{base} -o OUTPUT --config {candidate.configs[0]} --snapshots all"
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
            out[cand.name].append({"case": case, "fold": fold, "dice": scores, "mean_dice": _nanmean(scores.values())})
    return out


def _target_names(plans: Plans) -> dict[str, int | str]:
    """Display name -> key of every evaluation target: label values, or regions (``"1+2"``)."""
    if plans.regions and plans.region_names:
        return {name: target_key(r) for name, r in zip(plans.region_names, plans.regions)}
    return {name: v for name, v in plans.labels.items() if v != 0}


def _summarize(cand: Candidate, cases: list[dict[str, Any]], labels: list, wd: WorkDir, folds: list[int]) -> dict:
    per_label = {target_key(v): _nanmean([c["dice"][target_key(v)] for c in cases]) for v in labels}
    return {
        "name": cand.name,
        "kind": cand.kind,
        "members": cand.members(wd, folds),
        "dice": per_label,
        "mean_dice": _nanmean(per_label.values()),
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
                    "final_pseudo_dice": _float(log[-1].get("mean_dice")) if log else None,
                    "train_seconds": _float(log[-1].get("elapsed_seconds")) if log else None,
                }
            )
    return rows, curves


def _notes(folds: list[int], num_folds: int, num_cases: int) -> list[str]:
    notes = [
        f"Every candidate is scored on the same {num_cases} out-of-fold cases, each predicted by the fold "
        "that did not train on it, without postprocessing.",
        "At test time the command below averages the models of all listed folds (a fold ensemble); the numbers "
        "here are the cross-validation of single-fold models, so the fold ensemble usually does slightly better.",
        "p: two-sided Wilcoxon signed-rank test of the per-case mean Dice against the recommended candidate "
        f"(null with fewer than {MIN_PAIRED_CASES} cases).",
    ]
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
    blocks: list[tuple] = [
        ("h1", "segpipe cross-validation report"),
        (
            "p",
            f"Work folder: {report['work']}. Configurations: {', '.join(report['configs'])}. "
            f"Folds used: {', '.join(map(str, report['folds_used']))} of {report['num_folds']}.",
        ),
        ("h2", f"Recommended: {best}"),
        ("code", report["predict_command"]),
        *[("p", n) for n in report["notes"]],
        ("h2", "Candidates (out-of-fold Dice)"),
        (
            "table",
            ["candidate", *[f"Dice {n}" for n in names], "mean Dice", "cases", "Δ vs best", "p"],
            [
                [
                    ("**" + r["name"] + "**") if r["name"] == best else r["name"],
                    *[_fmt(r["dice"].get(k)) for k in keys],
                    _fmt(r["mean_dice"]),
                    str(r["num_cases"]),
                    _fmt(r["mean_difference_vs_best"], "+.4f"),
                    _fmt(r["wilcoxon_p_vs_best"], ".3g"),
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


def _nanmean(values: Any) -> float:
    finite = [float(v) for v in values if v is not None and not math.isnan(v)]
    return float(np.mean(finite)) if finite else float("nan")


def _isnan(value: float | None) -> bool:
    return value is None or math.isnan(value)


def _float(value: str | None) -> float | None:
    try:
        return float(value) if value not in (None, "") else None
    except ValueError:
        return None


def _fmt(value: float | None, spec: str = ".4f") -> str:
    return "n/a" if _isnan(value) else format(value, spec)
