"""Dataset fingerprint: per-case spacing and shapes, foreground intensities, label volumes.

Second stage: reads the raw dataset (``segpipe.data.dataset``) and writes ``WORK/fingerprint.json``,
which is all the planner looks at.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from segpipe.core.parallel import map_cases
from segpipe.core.serialization import from_dict, to_dict
from segpipe.data.dataset import CaseFiles, Dataset, read_case
from segpipe.data.nifti import InputError

SAMPLES_PER_CASE = 10_000


@dataclass
class CaseFingerprint:
    case_id: str
    spacing: list[float]
    shape: list[int]  # (X, Y, Z) as stored
    cropped_shape: list[int]  # after cropping to the non-zero bounding box
    label_voxels: dict[str, int]  # per label value
    label_volume_mm3: dict[str, float]


@dataclass
class ChannelStats:
    mean: float
    std: float
    percentile_00_5: float
    percentile_99_5: float
    min: float
    max: float


@dataclass
class Fingerprint:
    dataset_name: str
    channel_names: list[str]
    cases: list[CaseFingerprint]
    intensity: list[ChannelStats]
    failures: dict[str, str] = field(default_factory=dict)

    def to_dict(self) -> dict:
        return to_dict(self)

    @classmethod
    def from_dict(cls, data: dict) -> Fingerprint:
        return from_dict(cls, data)


def nonzero_bbox(image: np.ndarray) -> list[list[int]]:
    """Bounding box ``[[lo, hi), ...]`` per spatial axis of voxels non-zero in any channel.

    ``image`` is ``(C, X, Y, Z)``. An all-zero image keeps its full extent.
    """
    mask = np.any(image != 0, axis=0)
    box = []
    for axis in range(mask.ndim):
        other = tuple(a for a in range(mask.ndim) if a != axis)
        nz = np.flatnonzero(mask.any(axis=other))
        box.append([int(nz[0]), int(nz[-1]) + 1] if nz.size else [0, mask.shape[axis]])
    return box


def _case_fingerprint(
    args: tuple[CaseFiles, int, list[int], set[int], int],
) -> tuple[CaseFingerprint, list[np.ndarray]]:
    case, num_channels, labels, allowed, seed = args
    data = read_case(case, num_channels, allowed)
    assert data.label is not None
    box = nonzero_bbox(data.image)
    spacing = [float(s) for s in data.spacing]
    voxel_mm3 = float(np.prod(spacing))
    counts = np.bincount(data.label.ravel(), minlength=max(labels, default=0) + 1)
    fg = np.isin(data.label, labels)  # foreground: the labels, not background nor "ignore"
    rng = np.random.default_rng(seed)
    samples = []
    for c in range(num_channels):
        values = data.image[c][fg]
        if values.size > SAMPLES_PER_CASE:
            values = rng.choice(values, SAMPLES_PER_CASE, replace=False)
        samples.append(values.astype(np.float32))
    fp = CaseFingerprint(
        case_id=case.case_id,
        spacing=spacing,
        shape=list(data.image.shape[1:]),
        cropped_shape=[hi - lo for lo, hi in box],
        label_voxels={str(v): int(counts[v]) for v in labels},
        label_volume_mm3={str(v): float(counts[v]) * voxel_mm3 for v in labels},
    )
    return fp, samples


def compute_fingerprint(dataset: Dataset, workers: int, seed: int = 0) -> Fingerprint:
    """Fingerprint every training case; failing cases are listed in ``failures``, not fatal."""
    labels = dataset.foreground_labels
    allowed = dataset.allowed_label_values
    jobs = [(c, dataset.num_channels, labels, allowed, seed + i) for i, c in enumerate(dataset.training)]
    results, failures = map_cases(
        _case_fingerprint, jobs, workers, "fingerprint", keys=[c.case_id for c in dataset.training]
    )
    if not results:
        raise InputError(dataset.root, "no readable training case: " + "; ".join(str(e) for e in failures.values()))
    cases = [fp for fp, _ in results.values()]
    stats = []
    for c in range(dataset.num_channels):
        values = np.concatenate([s[c] for _, s in results.values()])
        if values.size == 0:  # no foreground anywhere: fall back to zeros, "ct" cannot be used then
            values = np.zeros(1, np.float32)
        stats.append(
            ChannelStats(
                mean=float(values.mean()),
                std=float(values.std()),
                percentile_00_5=float(np.percentile(values, 0.5)),
                percentile_99_5=float(np.percentile(values, 99.5)),
                min=float(values.min()),
                max=float(values.max()),
            )
        )
    return Fingerprint(
        dataset_name=dataset.name,
        channel_names=dataset.channel_names,
        cases=cases,
        intensity=stats,
        failures={k: str(v) for k, v in failures.items()},
    )
