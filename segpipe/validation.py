"""After training: predict the fold's held-out cases with the full inference path and score them.

Reads the run folder's final checkpoint and ``WORK/dataset.json`` (raw images and labels); writes
``fold_<k>/validation/<case>.nii.gz``, ``<case>.npz`` probabilities and ``summary.json``.
"""

from __future__ import annotations

from pathlib import Path

from segpipe.atomic import read_json
from segpipe.dataset import Dataset
from segpipe.evaluation import evaluate_folder
from segpipe.paths import WorkDir
from segpipe.plans import load_plans
from segpipe.predict import PredictOptions, predict_folder


def validate_fold(work: Path, config_name: str, fold: int, device: str = "auto", tta: bool = True) -> dict:
    """Predict and evaluate the validation cases of one fold; returns the evaluation summary."""
    wd = WorkDir(work)
    plans = load_plans(wd.plans)
    dataset = Dataset.from_dict(read_json(wd.dataset))
    val_ids = set(read_json(wd.splits)[fold]["val"])
    cases = [c for c in dataset.training if c.case_id in val_ids]
    out = wd.run(config_name, fold) / "validation"
    options = PredictOptions(tta=tta, save_probabilities=True, overwrite=True)
    predict_folder(out, out, work, config_name, [fold], options, device, cases=cases)
    gt_dir = Path(cases[0].label).parent if cases and cases[0].label else None
    if gt_dir is None:
        raise FileNotFoundError("validation cases have no label files")
    return evaluate_folder(out, gt_dir, labels=plans.foreground_labels, output=out / "summary.json")
