"""Preprocessing: crop to the non-zero box, normalize, resample, store for fast patch access.

Fourth stage: reads ``WORK/dataset.json`` and ``WORK/plans.json`` and the raw images, writes one
folder per configuration spacing under ``WORK/preprocessed/`` with, per case, an uncompressed
``(C, X, Y, Z)`` float32 ``.npy`` image (memory-mappable), an ``(X, Y, Z)`` int8 ``_seg.npy`` of class
indices (label values mapped to 0..K in ascending order), ``_fg.npz`` with sampled foreground voxel
coordinates per class, and a ``.json`` of properties (written last: it marks the case complete).
Inference calls :func:`preprocess_case` on new images so they see exactly the training-time
pipeline.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import partial
from pathlib import Path

import numpy as np

from segpipe.core.atomic import read_json, remove_stale_temporaries, save_npy, save_npz, write_json
from segpipe.core.errors import StageFailed
from segpipe.core.parallel import map_cases
from segpipe.core.paths import CaseFilesOnDisk, WorkDir
from segpipe.core.serialization import from_dict, to_dict
from segpipe.data.dataset import CaseData, CaseFiles, Dataset, read_case
from segpipe.planning.fingerprint import nonzero_bbox
from segpipe.planning.plans import Configuration, Plans, load_plans
from segpipe.preprocessing.normalization import normalize
from segpipe.preprocessing.resampling import OUTSIDE_MASK, resample_image, resample_label

FOREGROUND_SAMPLES_PER_CLASS = 10_000


@dataclass
class CaseProperties:
    """What is needed to map a preprocessed case back to its original geometry."""

    case_id: str
    original_shape: list[int]  # (X, Y, Z)
    original_spacing: list[float]
    affine: list[list[float]]
    crop_box: list[list[int]]  # [[lo, hi), ...] per axis in original voxels
    target_spacing: list[float]
    shape: list[int]  # after crop and resampling
    image_files: list[str]
    label_file: str | None = None


@dataclass
class PreprocessedCase:
    image: np.ndarray  # (C, X, Y, Z) float32
    label: np.ndarray | None  # (X, Y, Z) class indices, int8 (int16 beyond 127 classes)
    properties: CaseProperties


def preprocess_case(
    data: CaseData, plans: Plans, config: Configuration, files: CaseFiles | None = None
) -> PreprocessedCase:
    """Crop, normalize and resample one case in memory."""
    box = nonzero_bbox(data.image)
    sl = tuple(slice(lo, hi) for lo, hi in box)
    image = normalize(data.image[(slice(None), *sl)], plans.normalization)
    spacing = [float(s) for s in data.spacing]
    image = resample_image(image, spacing, config.spacing, threshold=plans.anisotropy_threshold)
    label = None
    if data.label is not None:
        classes = plans.label_to_class(data.label[sl])
        if any(n.use_nonzero_mask for n in plans.normalization):
            # nnU-Net's crop_to_nonzero: background outside the non-zero mask becomes -1, so training sets
            # the image there back to 0 after augmentation (as normalization left it)
            classes[(classes == 0) & ~np.any(data.image[(slice(None), *sl)] != 0, axis=0)] = OUTSIDE_MASK
        label = resample_label(
            classes, spacing, config.spacing, plans.num_stored_classes, plans.anisotropy_threshold
        ).astype(plans.class_dtype)
    props = CaseProperties(
        case_id=data.case_id,
        original_shape=list(data.image.shape[1:]),
        original_spacing=spacing,
        affine=np.asarray(data.reference.affine).tolist(),
        crop_box=box,
        target_spacing=list(config.spacing),
        shape=list(image.shape[1:]),
        image_files=list(files.images) if files else [str(data.reference.path)],
        label_file=files.label if files else None,
    )
    return PreprocessedCase(image, label, props)


def sample_foreground(label: np.ndarray, labels: list[int], n: int, seed: int) -> dict[str, np.ndarray]:
    """Up to ``n`` random voxel coordinates ``(N, 3)`` per foreground class, for oversampling."""
    rng = np.random.default_rng(seed)
    out = {}
    for value in labels:
        coords = np.argwhere(label == value)
        if len(coords) > n:
            coords = coords[rng.choice(len(coords), n, replace=False)]
        out[f"class_{value}"] = coords.astype(np.int32)
    return out


def save_case(folder: Path, case: PreprocessedCase, labels: list[int], seed: int) -> None:
    """Write one case's files; the properties JSON goes last so its presence means complete."""
    files = CaseFilesOnDisk(folder, case.properties.case_id)
    save_npy(files.image, case.image)
    if case.label is not None:
        save_npy(files.label, case.label)
        save_npz(files.foreground, **sample_foreground(case.label, labels, FOREGROUND_SAMPLES_PER_CLASS, seed))
    write_json(files.properties, to_dict(case.properties))


def load_properties(path: Path) -> CaseProperties:
    return from_dict(CaseProperties, read_json(path), where=str(path))


def _preprocess_one(item: tuple[CaseFiles, int], work: Path, configs: list[str], overwrite: bool) -> str:
    case, seed = item
    wd = WorkDir(work)
    plans = load_plans(wd.plans)
    targets = []
    for name in configs:
        config = plans.configuration(name)
        folder = wd.preprocessed(config.data_identifier)
        if overwrite or not CaseFilesOnDisk(folder, case.case_id).properties.exists():
            targets.append((config, folder))
    if not targets:
        return "skipped"
    data = read_case(case, len(plans.channel_names), plans.allowed_label_values)
    for config, folder in targets:
        classes = list(range(1, plans.num_label_classes))
        save_case(folder, preprocess_case(data, plans, config, case), classes, seed)
    return "done"


def run_preprocessing(work: str | Path, configs: list[str] | None, workers: int, overwrite: bool = False) -> dict:
    """Preprocess every training case for the given configurations (default: all planned).

    Cases already complete are skipped unless ``overwrite``. Every failing case is reported at the
    end (:class:`StageFailed`) after all good ones are written.
    """
    wd = WorkDir(work)
    plans = load_plans(wd.plans)
    dataset = Dataset.from_dict(read_json(wd.dataset))
    names = configs or list(plans.configurations)
    # The cascade's stage 2 reads the full-res data; there is nothing of its own to preprocess.
    unique: dict[str, str] = {}
    for name in names:
        unique.setdefault(plans.configuration(name).data_identifier, name)
    for identifier in unique:  # what a killed run left half-written
        remove_stale_temporaries(wd.preprocessed(identifier))
    items = [(c, plans.training.seed + i) for i, c in enumerate(dataset.training)]
    fn = partial(_preprocess_one, work=wd.root, configs=list(unique.values()), overwrite=overwrite)
    results, failures = map_cases(fn, items, workers, "preprocess", keys=[c.case_id for c in dataset.training])
    summary = {
        "configurations": list(unique.values()),
        "done": sum(r == "done" for r in results.values()),
        "skipped": sum(r == "skipped" for r in results.values()),
        "failed": len(failures),
    }
    if failures:
        raise StageFailed("preprocess", {k: str(v) for k, v in failures.items()})
    return summary


def list_preprocessed(folder: Path) -> list[str]:
    """Case ids with a complete set of files in a preprocessed folder."""
    return sorted(p.stem for p in folder.glob("*.json"))
