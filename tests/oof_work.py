"""Hand-built work folders for the stages that read only run folders (postprocess, ensemble, report).

Writes ``plans.json``, ``dataset.json`` (reference labels under ``ROOT/gt/``), ``splits.json`` and
out-of-fold prediction folders with tiny NIfTI label maps and ``.npz`` probabilities, without
training anything.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from segpipe.core.atomic import save_npz, write_json
from segpipe.core.paths import WorkDir
from segpipe.data.dataset import CaseFiles, Dataset
from segpipe.data.nifti import save_nifti
from segpipe.planning.plans import Configuration, Normalization, Plans, Topology, TrainingSettings, save_plans

AFFINE = np.diag([1.5, 1.5, 2.0, 1.0])
LABELS = {"background": 0, "a": 1, "b": 2}


def make_plans(configs: list[str], labels: dict[str, int] | None = None) -> Plans:
    """Minimal valid plans with the given configuration names (topology irrelevant here)."""

    def config(name: str) -> Configuration:
        return Configuration(
            name=name,
            spacing=[1.5, 1.5, 2.0],
            median_shape=[16, 16, 16],
            patch_size=[16, 16, 16],
            batch_size=2,
            topology=Topology(kernel_sizes=[[3, 3, 3]], strides=[[1, 1, 1]], features=[8]),
            data_identifier=name,
        )

    return Plans(
        dataset_name="Hand",
        preset="test",
        channel_names=["MRI"],
        labels=dict(labels or LABELS),
        normalization=[Normalization("zscore")],
        configurations={c: config(c) for c in configs},
        training=TrainingSettings(),
        original_median_spacing=[1.5, 1.5, 2.0],
    )


def write_work(
    root: Path,
    gt: dict[str, np.ndarray],
    splits: list[dict[str, list[str]]],
    configs: list[str],
    labels: dict[str, int] | None = None,
) -> Path:
    """``root/work`` with plans, splits and a dataset whose labels are ``gt`` (written to ``root/gt``)."""
    work = root / "work"
    wd = WorkDir(work)
    save_plans(make_plans(configs, labels), wd.plans)
    write_json(wd.splits, splits)
    cases = []
    for case, seg in gt.items():
        label = root / "gt" / f"{case}.nii.gz"
        save_nifti(label, seg, AFFINE, dtype=np.uint8)
        cases.append(CaseFiles(case, [str(root / "images" / f"{case}.nii.gz")], str(label)))
    dataset = Dataset(str(root), "Hand", "msd", ["MRI"], dict(labels or LABELS), training=cases)
    write_json(wd.dataset, dataset.to_dict())
    return work


def write_predictions(folder: Path, segs: dict[str, np.ndarray], probs: dict[str, np.ndarray] | None = None) -> Path:
    """``CASE.nii.gz`` label maps and, when given, ``CASE.npz`` probabilities ``(C, X, Y, Z)`` float16."""
    for case, seg in segs.items():
        save_nifti(folder / f"{case}.nii.gz", seg, AFFINE, dtype=np.uint8)
    for case, p in (probs or {}).items():
        save_npz(folder / f"{case}.npz", probabilities=p.astype(np.float16))
    return folder


def box(shape: tuple[int, ...], lo: tuple[int, ...], hi: tuple[int, ...]) -> np.ndarray:
    """A boolean mask with the box ``[lo, hi)`` set."""
    mask = np.zeros(shape, dtype=bool)
    mask[tuple(slice(a, b) for a, b in zip(lo, hi))] = True
    return mask


def dice_by_hand(pred: np.ndarray, gt: np.ndarray, label: int) -> float:
    p, g = pred == label, gt == label
    total = p.sum() + g.sum()
    return float("nan") if total == 0 else 2.0 * float((p & g).sum()) / float(total)
