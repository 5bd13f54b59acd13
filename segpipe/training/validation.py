"""After training: predict the fold's held-out cases with the full inference path and score them.

Reads the run folder's checkpoints and ``WORK/dataset.json`` (raw images and labels); writes one
folder per candidate model of the fold, each with ``<case>.nii.gz``, ``<case>.npz`` probabilities
and ``summary.json``:

    fold_k/validation/             the final weights
    fold_k/validation_swa/         the SWA weights (when trained with --swa)
    fold_k/validation_snapshots/   the ensemble of all cycle snapshots (cyclic schedules)

Ensembling, postprocessing and reports work from these out-of-fold files without retraining.
"""

from __future__ import annotations

from pathlib import Path

from segpipe.core.atomic import read_json
from segpipe.core.paths import VALIDATION_FOLDERS, WorkDir
from segpipe.data.dataset import Dataset
from segpipe.evaluation.metrics import evaluate_folder
from segpipe.inference.ensemble import Members
from segpipe.inference.predict import PredictOptions, predict_folder, resolve_device
from segpipe.planning.plans import load_plans
from segpipe.preprocessing.cascade import out_of_fold_predictions
from segpipe.runs.snapshots import SWA_FILE, list_snapshots
from segpipe.scale.distributed import SINGLE, DistInfo

CANDIDATE_FOLDERS = VALIDATION_FOLDERS


def fold_candidates(run_dir: Path, fold: int) -> dict[str, Members]:
    """The models of one fold worth comparing: final weights, SWA, snapshot ensemble."""
    out = {"final": Members([fold])}
    if (run_dir / SWA_FILE).exists():
        out["swa"] = Members([fold], weights="swa")
    if len(list_snapshots(run_dir)) > 1:
        out["snapshots"] = Members([fold], snapshots="all")
    return out


def validate_fold(
    work: Path, config_name: str, fold: int, device: str = "auto", tta: bool = True, dist: DistInfo = SINGLE
) -> dict | None:
    """Predict and evaluate the validation cases of one fold for every candidate; returns the final
    weights' evaluation summary. Under DDP (``dist``) the ranks share the cases and rank 0 evaluates
    (the other ranks return None)."""
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
    summaries = {}
    for name, members in fold_candidates(run_dir, fold).items():
        out = run_dir / CANDIDATE_FOLDERS[name]
        predict_folder(
            out, out, work, config_name, members, options, device, cases=cases, dist=dist, previous_stage=previous
        )
        if dist.is_main:
            summaries[name] = evaluate_folder(
                out,
                gt_dir,
                labels=plans.evaluation_targets,
                output=out / "summary.json",
                ignore_label=plans.ignore_label,
            )
    return summaries.get("final")
