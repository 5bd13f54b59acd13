"""After training: predict the fold's held-out cases with the full inference path and score them.

Reads the run folder's checkpoints and ``WORK/dataset.json`` (raw images and labels); writes one
folder per candidate model of the fold, each with ``<case>.nii.gz``, ``<case>.npz`` probabilities
and ``summary.json``:

    fold_k/validation/                  the final weights
    fold_k/validation_swa/              the SWA weights (when trained with --swa)
    fold_k/validation_snapshots/        the ensemble of all cycle snapshots (cyclic schedules)
    fold_k/validation_snapshots_last2/  the ensemble of the last two snapshots (three or more)

and ``fold_k/validation_timing.json``: each candidate's seconds per case and forward passes. Every
case is read and preprocessed once and each distinct set of weights runs once over it
(:func:`segpipe.inference.candidates.predict_candidates`). Ensembling, postprocessing and reports
work from these out-of-fold files without retraining.
"""

from __future__ import annotations

from pathlib import Path

from segpipe.core.atomic import read_json, write_json
from segpipe.core.paths import LAST_SNAPSHOTS, VALIDATION_FOLDERS, WorkDir
from segpipe.data.dataset import Dataset
from segpipe.evaluation.metrics import evaluate_folder
from segpipe.inference.candidates import predict_candidates
from segpipe.inference.predict import PredictOptions, resolve_device
from segpipe.planning.plans import load_plans
from segpipe.preprocessing.cascade import out_of_fold_predictions
from segpipe.runs.checkpoint import FINAL
from segpipe.runs.snapshots import SWA_FILE, list_snapshots
from segpipe.scale.distributed import SINGLE, DistInfo

CANDIDATE_FOLDERS = VALIDATION_FOLDERS
TIMING_FILE = "validation_timing.json"


def fold_candidates(run_dir: Path) -> dict[str, list[Path]]:
    """The models of one fold worth comparing, each as its member checkpoints: final weights, SWA,
    the ensemble of all snapshots and of the last ``LAST_SNAPSHOTS``. The largest ensemble comes first,
    so that every candidate's members run in the order :func:`predict_candidates` sums them."""
    snaps = list_snapshots(run_dir)
    out: dict[str, list[Path]] = {}
    if len(snaps) > 1:
        out["snapshots"] = snaps
    if len(snaps) > LAST_SNAPSHOTS:
        out[f"snapshots_last{LAST_SNAPSHOTS}"] = snaps[-LAST_SNAPSHOTS:]
    out["final"] = [run_dir / FINAL]
    if (run_dir / SWA_FILE).exists():
        out["swa"] = [run_dir / SWA_FILE]
    return out


def validate_fold(
    work: Path, config_name: str, fold: int, device: str = "auto", tta: bool = True, dist: DistInfo = SINGLE
) -> dict | None:
    """Predict and evaluate the validation cases of one fold for every candidate in one pass; returns
    the final weights' evaluation summary. Under DDP (``dist``) the ranks share the cases and rank 0
    evaluates (the other ranks return None)."""
    wd = WorkDir(work)
    plans = load_plans(wd.plans)
    dataset = Dataset.from_dict(read_json(wd.dataset))
    val_ids = set(read_json(wd.splits)[fold]["val"])
    cases = [c for c in dataset.training if c.case_id in val_ids]
    if not cases or not cases[0].label:
        raise FileNotFoundError(f"fold {fold} has no labelled validation cases")
    gt_dir = Path(cases[0].label).parent
    run_dir = wd.run(config_name, fold)
    # out-of-fold scores stay fp32 on a CPU, so they compare across machines with and without native bf16
    precision = "auto" if resolve_device(device).type == "cuda" else "fp32"
    options = PredictOptions(tta=tta, save_probabilities=True, overwrite=True, postprocess=False, precision=precision)
    config = plans.configuration(config_name)
    # a cascade stage 2 builds on stage 1's out-of-fold predictions, exactly as in its training
    previous = out_of_fold_predictions(work, config, sorted(val_ids)) if config.previous_stage else None
    candidates = fold_candidates(run_dir)
    folders = {name: run_dir / CANDIDATE_FOLDERS[name] for name in candidates}
    predicted = predict_candidates(
        work,
        config_name,
        {folders[name]: members for name, members in candidates.items()},
        cases,
        options,
        device,
        dist=dist,
        previous_stage=previous,
    )
    if not dist.is_main:
        return None
    timing = {
        name: {k: predicted[folders[name]][k] for k in ("seconds_per_case", "forward_passes")} for name in candidates
    }
    write_json(run_dir / TIMING_FILE, {"tta": tta, "device": device, "cases": len(cases), "candidates": timing})
    summaries = {
        name: evaluate_folder(
            out, gt_dir, labels=plans.evaluation_targets, output=out / "summary.json", ignore_label=plans.ignore_label
        )
        for name, out in folders.items()
    }
    return summaries["final"]
