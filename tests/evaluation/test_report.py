"""The cross-validation report on a hand-built work folder: numbers recomputed here by hand, the
recommendation, the predict command, and the written files."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pytest
from conftest import run_cli
from oof_work import dice_by_hand, write_predictions, write_work
from scipy.stats import wilcoxon

from segpipe.core.atomic import read_json
from segpipe.evaluation.metrics import evaluate_folder
from segpipe.evaluation.report import best_by_mean, build_report, paired_comparison, still_rising
from segpipe.runs.runlog import append_row

CASES = [f"c{i}" for i in range(6)]
SPLITS = [{"train": CASES[3:], "val": CASES[:3]}, {"train": CASES[:3], "val": CASES[3:]}]
SHAPE = (10, 10, 10)
FULL, LOW = "3d_fullres", "3d_lowres"
ENSEMBLE = f"ensemble({FULL}+{LOW})"
VALUES = np.array([0, 1, 2], dtype=np.uint8)


def _fold_of(case: str) -> int:
    return 0 if case in SPLITS[0]["val"] else 1


def _corrupt(gt: np.ndarray, wrong: np.ndarray) -> np.ndarray:
    seg = gt.copy().ravel()
    seg[wrong] = (seg[wrong] + 1) % 3
    return seg.reshape(gt.shape)


def _probs(gt: np.ndarray, wrong: np.ndarray) -> np.ndarray:
    """0.9 on the true class, 0.05 on the others; on ``wrong`` voxels 0.55 on the next class, 0.45 true."""
    p = np.full((3, gt.size), 0.05, dtype=np.float32)
    p[gt.ravel(), np.arange(gt.size)] = 0.9
    true = gt.ravel()[wrong]
    p[:, wrong] = 0.0
    p[true, wrong] = 0.45
    p[(true + 1) % 3, wrong] = 0.55
    return p.reshape(3, *gt.shape).astype(np.float16)


@pytest.fixture(scope="module")
def hand_work(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict[str, np.ndarray], dict[str, dict]]:
    """Two folds of three cases; 3d_fullres (final + SWA weights) and 3d_lowres (final); the two
    configurations err on disjoint voxels with low confidence, so their ensemble is perfect."""
    root = tmp_path_factory.mktemp("report")
    rng = np.random.default_rng(7)
    gt, segs, probs = {}, {FULL: {}, f"{FULL}:swa": {}, LOW: {}}, {FULL: {}, LOW: {}}
    for case in CASES:
        seg = np.zeros(SHAPE, dtype=np.uint8)
        x, y, z = rng.integers(0, 3, 3)
        seg[x : x + 4, y : y + 4, z : z + 4] = 1
        x, y, z = rng.integers(0, 2, 3)
        seg[6 + x : 9 + x, 5 + y : 8 + y, 5 + z : 8 + z] = 2
        gt[case] = seg
        order = rng.permutation(seg.size)
        wrong = {FULL: order[:40], LOW: order[40:80], f"{FULL}:swa": rng.permutation(seg.size)[:15]}
        for key in (FULL, LOW):
            probs[key][case] = _probs(seg, wrong[key])
            segs[key][case] = VALUES[probs[key][case].astype(np.float32).argmax(0)]
            np.testing.assert_array_equal(segs[key][case], _corrupt(seg, wrong[key]))
        segs[f"{FULL}:swa"][case] = _corrupt(seg, wrong[f"{FULL}:swa"])
    work = write_work(root, gt, SPLITS, [FULL, LOW])
    for fold, split in enumerate(SPLITS):
        val = split["val"]
        runs = [
            (FULL, FULL, "validation", True),
            (f"{FULL}:swa", FULL, "validation_swa", False),
            (LOW, LOW, "validation", True),
        ]
        for key, config, folder, with_probs in runs:
            out = write_predictions(
                work / config / f"fold_{fold}" / folder,
                {c: segs[key][c] for c in val},
                {c: probs[key][c] for c in val} if with_probs else None,
            )
            evaluate_folder(out, root / "gt", [1, 2], output=out / "summary.json")
        for config in (FULL, LOW):
            for epoch in range(3):
                append_row(
                    work / config / f"fold_{fold}" / "log.csv",
                    {
                        "epoch": epoch,
                        "iteration": 10 * (epoch + 1),
                        "train_loss": 1.0 - 0.2 * epoch,
                        "val_loss": 1.1 - 0.2 * epoch,
                        "dice_1": 0.3 * epoch,
                        "dice_2": 0.25 * epoch,
                        "mean_dice": 0.275 * epoch,
                        "lr": 0.01,
                        "epoch_seconds": 2.0,
                        "elapsed_seconds": 2.0 * (epoch + 1),
                    },
                )
    ensemble = {}
    for case in CASES:
        mean = (probs[FULL][case].astype(np.float32) + probs[LOW][case].astype(np.float32)) / 2
        ensemble[case] = VALUES[mean.argmax(0)]
    expected = {
        f"{FULL}:final": segs[FULL],
        f"{FULL}:swa": segs[f"{FULL}:swa"],
        f"{LOW}:final": segs[LOW],
        ENSEMBLE: ensemble,
    }
    return work, gt, expected


def _by_hand(segs: dict[str, np.ndarray], gt: dict[str, np.ndarray], cases: list[str]) -> tuple[dict, float, list]:
    per_label = {str(v): float(np.mean([dice_by_hand(segs[c], gt[c], v) for c in cases])) for v in (1, 2)}
    case_means = [float(np.mean([dice_by_hand(segs[c], gt[c], v) for v in (1, 2)])) for c in cases]
    return per_label, float(np.mean(list(per_label.values()))), case_means


def test_report_matches_recomputation_and_recommends_best(hand_work: tuple) -> None:
    work, gt, expected = hand_work
    result = run_cli("report", work)
    assert result.exit_code == 0, result.output
    report = read_json(work / "report" / "report.json")
    rows = {r["name"]: r for r in report["candidates"]}
    assert set(rows) == set(expected)

    by_hand = {name: _by_hand(segs, gt, CASES) for name, segs in expected.items()}
    best = max(by_hand, key=lambda n: by_hand[n][1])
    assert best == ENSEMBLE and by_hand[ENSEMBLE][1] > by_hand[f"{FULL}:swa"][1] > by_hand[f"{FULL}:final"][1]
    assert report["recommended"] == ENSEMBLE and f"recommended: {ENSEMBLE}" in result.output
    for name, (per_label, mean, case_means) in by_hand.items():
        row = rows[name]
        assert row["num_cases"] == len(CASES)
        assert row["dice"] == pytest.approx(per_label, abs=1e-12)
        assert row["mean_dice"] == pytest.approx(mean, abs=1e-12)
        diffs = np.array(case_means) - np.array(by_hand[best][2])
        assert row["mean_difference_vs_best"] == pytest.approx(diffs.mean(), abs=1e-12)
        p_expected = 1.0 if name == best else wilcoxon(diffs).pvalue
        assert row["wilcoxon_p_vs_best"] == pytest.approx(p_expected)
    assert rows[f"{FULL}:final"]["wilcoxon_p_vs_best"] < 0.05  # 6 of 6 cases worse

    folds = {(f["config"], f["fold"]): f for f in report["folds"]}
    assert set(folds) == {(c, k) for c in (FULL, LOW) for k in (0, 1)}
    per_label, mean, _ = _by_hand(expected[f"{LOW}:final"], gt, SPLITS[1]["val"])
    assert folds[(LOW, 1)]["dice"] == pytest.approx(per_label) and folds[(LOW, 1)]["mean_dice"] == pytest.approx(mean)
    assert set(folds[(LOW, 1)]["hd95"]) == {"1", "2"} and folds[(LOW, 1)]["epochs"] == 3

    w = str(work)
    assert report["predict_command"].splitlines() == [
        f"segpipe predict -i INPUT -m {w} --folds 0,1 -o OUTPUT/{FULL} --config {FULL} --save-probabilities",
        f"segpipe predict -i INPUT -m {w} --folds 0,1 -o OUTPUT/{LOW} --config {LOW} --save-probabilities",
        f"segpipe ensemble OUTPUT/{FULL} OUTPUT/{LOW} -o OUTPUT/ensemble -m {w}",
    ]
    out = work / "report"
    md, page = (out / "report.md").read_text(), (out / "report.html").read_text()
    for text in (md, page):
        assert f"Recommended: {ENSEMBLE}" in text and "segpipe ensemble" in text and "fold ensemble" in text
    assert '<img src="dice_per_candidate.png"' in page and "](dice_per_candidate.png)" in md
    for png in ("dice_per_candidate.png", f"curves_{FULL}.png", f"curves_{LOW}.png"):
        assert (out / png).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
        assert png in page


def test_report_single_config_recommends_swa(hand_work: tuple) -> None:
    work, _, _ = hand_work
    report = build_report(work, [FULL])
    assert [r["name"] for r in report["candidates"]] == [f"{FULL}:final", f"{FULL}:swa"]
    assert report["recommended"] == f"{FULL}:swa"
    command = f"segpipe predict -i INPUT -m {work} --folds 0,1 -o OUTPUT --config {FULL} --weights swa"
    assert report["predict_command"] == command


def test_report_uses_only_complete_folds(hand_work: tuple, tmp_path: Path) -> None:
    work = Path(shutil.copytree(hand_work[0], tmp_path / "work"))
    shutil.rmtree(work / LOW / "fold_1" / "validation")
    (work / FULL / "fold_0" / "validation_swa" / "c1.nii.gz").unlink()
    report = build_report(work)
    assert report["folds_used"] == [0] and report["num_cases"] == 3
    assert {r["name"] for r in report["candidates"]} == {f"{FULL}:final", f"{LOW}:final", ENSEMBLE}
    assert [s["name"] for s in report["skipped_candidates"]] == [f"{FULL}:swa"]
    assert any("Only folds 0 of 2" in n for n in report["notes"])
    assert "--folds 0 " in report["predict_command"]
    with pytest.raises(KeyError):
        build_report(work, ["3d_cascade_fullres"])


def test_paired_comparison_edge_cases() -> None:
    assert paired_comparison([0.5, 0.6], [0.5, 0.6]) == (0.0, 1.0)
    assert paired_comparison([0.5, 0.7], [0.4, 0.6])[1] is None  # too few cases for a p-value
    assert paired_comparison([float("nan")], [0.3]) == (None, None)
    a, b = [0.9, 0.8, 0.7, 0.95, 0.85, float("nan")], [0.8, 0.75, 0.72, 0.9, 0.8, 0.5]
    diff, p = paired_comparison(a, b)
    d = np.array(a[:5]) - np.array(b[:5])
    assert diff == pytest.approx(d.mean()) and p == pytest.approx(wilcoxon(d).pvalue)


def test_recommend_breaks_ties_towards_the_simpler_model() -> None:
    rows = [
        {"name": "x:snapshots", "kind": "snapshots", "members": ["a"], "mean_dice": 0.8},
        {"name": "x:swa", "kind": "swa", "members": ["a"], "mean_dice": 0.8},
        {"name": "ensemble(x+y)", "kind": "ensemble", "members": ["a", "b"], "mean_dice": 0.8},
        {"name": "y:final", "kind": "final", "members": ["b"], "mean_dice": 0.7},
    ]
    assert best_by_mean(rows) == "x:swa"
    rows[3]["mean_dice"] = 0.8 + 1e-12
    assert best_by_mean(rows) == "y:final"
    rows[0]["mean_dice"] = 0.81
    assert best_by_mean(rows) == "x:snapshots"


# ------------------------------------------------------------------ the recommendation rule

CASES10 = [f"d{i}" for i in range(10)]
SPLITS10 = [{"train": CASES10[5:], "val": CASES10[:5]}, {"train": CASES10[:5], "val": CASES10[5:]}]
CONVERGED = [min(0.9, 0.1 * (e + 1)) + 0.002 * (-1) ** e for e in range(20)]  # flat over its second half
RISING = list(np.linspace(0.05, 0.6, 20))
SNAPSHOTS, SWA, SINGLE = f"{FULL}:snapshots", f"{FULL}:swa", f"{FULL}:final"


def _snapshot_work(
    root: Path, snapshot_wrong: list[int], pseudo_dice: list[float], final_wrong: int = 40, swa_wrong: int = 60
) -> tuple[Path, dict[str, dict[str, np.ndarray]], dict[str, np.ndarray]]:
    """One configuration, two folds of five cases. The final weights err on ``final_wrong`` voxels of
    each case, the snapshot ensemble on the first ``snapshot_wrong[i]`` voxels of the same order and the
    SWA weights on the first ``swa_wrong``: fewer voxels are a subset, so better on every label of
    that case; more are a superset, so worse. Every fold's log has ``pseudo_dice`` as its curve."""
    rng = np.random.default_rng(3)
    gt, segs = {}, {SINGLE: {}, SNAPSHOTS: {}, SWA: {}}
    for i, case in enumerate(CASES10):
        seg = np.zeros(SHAPE, dtype=np.uint8)
        seg[1:5, 1:5, 1:5] = 1
        seg[6:9, 5:8, 5:8] = 2
        gt[case] = seg
        order = rng.permutation(seg.size)
        segs[SINGLE][case] = _corrupt(seg, order[:final_wrong])
        segs[SNAPSHOTS][case] = _corrupt(seg, order[: snapshot_wrong[i]])
        segs[SWA][case] = _corrupt(seg, order[:swa_wrong])
    work = write_work(root, gt, SPLITS10, [FULL])
    folders = {SINGLE: "validation", SNAPSHOTS: "validation_snapshots", SWA: "validation_swa"}
    for fold, split in enumerate(SPLITS10):
        run = work / FULL / f"fold_{fold}"
        for name, folder in folders.items():
            write_predictions(run / folder, {c: segs[name][c] for c in split["val"]})
        for epoch, d in enumerate(pseudo_dice):
            append_row(
                run / "log.csv",
                {"epoch": epoch, "train_loss": 1 - d, "val_loss": 1 - d, "mean_dice": d, "elapsed_seconds": epoch},
            )
    return work, segs, gt


def _case_means(segs: dict[str, np.ndarray], gt: dict[str, np.ndarray]) -> np.ndarray:
    return np.array([np.mean([dice_by_hand(segs[c], gt[c], v) for v in (1, 2)]) for c in CASES10])


def _texts(work: Path) -> tuple[str, str, str]:
    out = work / "report"
    return (out / "report.md").read_text(), (out / "report.html").read_text(), run_cli("report", work).output


def test_an_ensemble_that_beats_the_single_model_significantly_is_recommended(tmp_path: Path) -> None:
    work, segs, gt = _snapshot_work(tmp_path, [10] * 10, CONVERGED)
    d = _case_means(segs[SNAPSHOTS], gt) - _case_means(segs[SINGLE], gt)
    p = wilcoxon(d).pvalue
    assert (d > 0).all() and p < 0.05  # the crafted evidence: better on all 10 cases
    report = build_report(work)
    assert not report["under_trained"] and report["warnings"] == []
    assert report["recommended"] == SNAPSHOTS
    assert report["predict_command"].endswith(f"--config {FULL} --snapshots all")
    words = f"{SNAPSHOTS} beats {SINGLE} by {d.mean():+.3f} Dice, p = {p:.2g} over 10 cases."
    assert report["recommendation"]["text"].startswith(f"Recommended: {SNAPSHOTS}. {words}")
    for text in _texts(work):
        assert words in text
    assert (work / "report" / "report.md").read_text().count(f"Recommended: {SNAPSHOTS}") >= 1


def test_an_ensemble_without_significant_evidence_loses_to_the_single_model(tmp_path: Path) -> None:
    # much better on five cases, a little worse on the other five: a higher mean but no evidence
    work, segs, gt = _snapshot_work(tmp_path, [5] * 5 + [44] * 5, CONVERGED)
    single = _case_means(segs[SINGLE], gt)
    d = _case_means(segs[SNAPSHOTS], gt) - single
    p = wilcoxon(d).pvalue
    assert d.mean() > 0 and p > 0.05 and (d < 0).sum() == 5
    d_swa = _case_means(segs[SWA], gt) - single
    p_swa = wilcoxon(d_swa).pvalue
    assert (d_swa < 0).all()
    report = build_report(work)
    rows = {r["name"]: r for r in report["candidates"]}
    assert best_by_mean(list(rows.values())) == SNAPSHOTS  # the highest mean Dice alone would take it
    assert report["recommended"] == SINGLE
    assert report["predict_command"].endswith(f"-o OUTPUT --config {FULL}")
    text = report["recommendation"]["text"]
    assert text.startswith(f"Recommended: the single model {SINGLE}: no ensemble or SWA beats it")
    lost = f"{SNAPSHOTS} does not beat {SINGLE}: {d.mean():+.3f} Dice, p = {p:.2g} over 10 cases."
    lost_swa = f"{SWA} does not beat {SINGLE}: {d_swa.mean():+.3f} Dice, p = {p_swa:.2g} over 10 cases."
    assert lost in text and lost_swa in text and f"{d_swa.mean():+.3f}".startswith("-")
    for t in _texts(work):
        assert lost in t and lost_swa in t and f"Recommended: {SINGLE}" in t.replace("recommended", "Recommended")
    comparisons = {c["name"]: c for c in report["recommendation"]["comparisons"]}
    assert comparisons[SNAPSHOTS]["p"] == pytest.approx(p) and not comparisons[SNAPSHOTS]["beats"]


def test_a_still_rising_pseudo_dice_withholds_the_recommendation(tmp_path: Path) -> None:
    work, _, _ = _snapshot_work(tmp_path, [10] * 10, RISING)  # the ensemble would win, but training is not done
    report = build_report(work)
    assert report["under_trained"] and report["recommended"] is None and report["predict_command"] is None
    assert report["recommendation"]["name"] == SNAPSHOTS  # what the rule would have chosen, shown as such
    assert len(report["warnings"]) == 2 and all("still rises" in w for w in report["warnings"])
    assert report["warnings"][0].startswith(f"{FULL} fold 0: ")
    md, page, cli = _texts(work)
    assert md.index("No recommendation: the models are under-trained") < md.index("Candidates")
    assert "Recommended:" not in md and "Recommended:" not in page
    assert "no recommendation: the models are under-trained" in cli and "recommended:" not in cli


def test_candidates_far_below_the_best_epoch_withhold_the_recommendation(tmp_path: Path) -> None:
    work, segs, gt = _snapshot_work(tmp_path, [380] * 10, [0.98] * 20, final_wrong=400, swa_wrong=420)
    assert _case_means(segs[SNAPSHOTS], gt).max() < 0.5 * 0.98
    report = build_report(work)
    assert report["under_trained"] and report["recommended"] is None
    assert [w.split(":")[0] for w in report["warnings"]] == [f"{FULL} fold 0", f"{FULL} fold 1"]
    assert all("below 0.5 x the fold's best epoch pseudo-Dice (0.980)" in w for w in report["warnings"])


def test_still_rising_rule() -> None:
    assert still_rising(CONVERGED) is None
    rise, m = still_rising(RISING)
    assert m == 3 and rise == pytest.approx(np.mean(RISING[-3:]) - np.mean(RISING[-6:-3]))
    assert still_rising(RISING[:5]) is None  # fewer than two tenths of 3 epochs: not judged
    assert still_rising([0.5] * 27 + [0.52, 0.52, 0.52]) is not None  # 30 epochs: the last 3 are the tenth
    assert still_rising([0.5] * 27 + [0.505] * 3) is None  # within the margin
