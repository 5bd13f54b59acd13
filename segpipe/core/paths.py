"""The layout of a work folder, in one place.

WORK/dataset.json            the raw dataset's description (absolute paths), written by plan
WORK/fingerprint.json        dataset fingerprint
WORK/plans.json              plans
WORK/splits.json             cross-validation folds
WORK/preprocessed/<data_identifier>/CASE.npy, CASE_seg.npy, CASE_fg.npz, CASE.json
WORK/<config>/fold_<k>/      a training run: checkpoints, log.csv, progress.png, validation/
WORK/<config>/postprocessing.json   largest-component decision, applied by predict
WORK/<cascade config>/previous_stage/CASE.npy   stage 1's out-of-fold segmentation on the full-res grid
WORK/report/                 report.json, report.md, report.html and their PNG plots
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

# the snapshot ensemble of the last cycles only (beside the one of all cycles), as the study compares them
LAST_SNAPSHOTS = 2
# out-of-fold prediction folders inside a run folder, one per candidate model of the fold
VALIDATION_FOLDERS = {
    "final": "validation",
    "swa": "validation_swa",
    "snapshots": "validation_snapshots",
    f"snapshots_last{LAST_SNAPSHOTS}": f"validation_snapshots_last{LAST_SNAPSHOTS}",
}


@dataclass(frozen=True)
class WorkDir:
    root: Path

    def __init__(self, root: str | Path):
        object.__setattr__(self, "root", Path(root))

    @property
    def dataset(self) -> Path:
        return self.root / "dataset.json"

    @property
    def fingerprint(self) -> Path:
        return self.root / "fingerprint.json"

    @property
    def plans(self) -> Path:
        return self.root / "plans.json"

    @property
    def splits(self) -> Path:
        return self.root / "splits.json"

    def preprocessed(self, data_identifier: str) -> Path:
        return self.root / "preprocessed" / data_identifier

    def run(self, config: str, fold: int | str) -> Path:
        return self.root / config / f"fold_{fold}"

    def previous_stage(self, config: str) -> Path:
        return self.root / config / "previous_stage"

    def postprocessing(self, config: str) -> Path:
        return self.root / config / "postprocessing.json"

    @property
    def report(self) -> Path:
        return self.root / "report"


@dataclass(frozen=True)
class CaseFilesOnDisk:
    """The files of one preprocessed case."""

    folder: Path
    case_id: str

    @property
    def image(self) -> Path:
        return self.folder / f"{self.case_id}.npy"

    @property
    def label(self) -> Path:
        return self.folder / f"{self.case_id}_seg.npy"

    @property
    def foreground(self) -> Path:
        return self.folder / f"{self.case_id}_fg.npz"

    @property
    def properties(self) -> Path:
        # written last: its presence marks a complete case
        return self.folder / f"{self.case_id}.json"
