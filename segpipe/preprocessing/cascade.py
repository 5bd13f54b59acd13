"""The cascade's link between its stages: the low-res segmentation as extra one-hot input channels.

Stage 2 (``3d_cascade_fullres``) sees the image plus one channel per foreground label holding stage 1's
(``3d_lowres``) segmentation, brought to the full-res grid by the same crop and resampling as the
image (linear interpolation of each class's mask, then argmax, as for labels).

Training reads stage 1's *out-of-fold* predictions, ``WORK/3d_lowres/fold_k/validation/CASE.nii.gz``,
each case predicted by the fold that held it out, so stage 2 never learns from a stage-1 map that saw
the case's own label. :func:`prepare_training_inputs` converts them once to
``WORK/3d_cascade_fullres/previous_stage/CASE.npy`` (int8 class indices on the preprocessed grid),
redoing a case when its prediction is newer. Prediction converts stage 1's output of each case the same
way (:func:`with_previous_stage`), so training and inference see the same pipeline.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from segpipe.core.atomic import read_json, remove_stale_temporaries, save_npy
from segpipe.core.paths import VALIDATION_FOLDERS, CaseFilesOnDisk, WorkDir
from segpipe.data.nifti import InputError, load_nifti
from segpipe.planning.plans import Configuration, Plans
from segpipe.preprocessing.preprocess import CaseProperties, PreprocessedCase, list_preprocessed, load_properties
from segpipe.preprocessing.resampling import resample_label


class MissingPreviousStage(FileNotFoundError):
    """Stage 1's outputs that stage 2 needs are not there; the message says what to run."""


def previous_stage_classes(
    seg: np.ndarray, props: CaseProperties, plans: Plans, config: Configuration, where: str | Path
) -> np.ndarray:
    """Stage 1's label map in the original image grid -> ``(X, Y, Z)`` int8 class indices on the
    configuration's preprocessed grid (the image's crop box and resampling)."""
    if tuple(seg.shape[:3]) != tuple(props.original_shape) or seg.ndim not in (3, 4):
        raise InputError(where, f"previous-stage segmentation has shape {seg.shape}, image {props.original_shape}")
    seg = seg.reshape(seg.shape[:3])
    unknown = sorted(set(np.unique(seg).tolist()) - set(plans.labels.values()))
    if unknown:
        raise InputError(where, f"previous-stage segmentation has label values {unknown} that the plans do not know")
    box = tuple(slice(lo, hi) for lo, hi in props.crop_box)
    classes = plans.label_to_class(seg[box].astype(np.int64))
    out = resample_label(
        classes, props.original_spacing, config.spacing, plans.num_label_classes, plans.anisotropy_threshold
    ).astype(np.int8)
    if list(out.shape) != list(props.shape):
        raise InputError(where, f"resampled to {list(out.shape)}, the preprocessed image is {props.shape}")
    return out


def one_hot(classes: np.ndarray, num_classes: int) -> np.ndarray:
    """``(X, Y, Z)`` class indices -> ``(num_classes - 1, X, Y, Z)`` float32, one channel per foreground class."""
    return np.stack([classes == c for c in range(1, num_classes)]).astype(np.float32)


def with_previous_stage(
    pre: PreprocessedCase, seg: np.ndarray, plans: Plans, config: Configuration, where: str | Path
) -> PreprocessedCase:
    """The case's image with stage 1's segmentation ``seg`` (original grid, label values) appended as
    one-hot channels: the input of stage 2."""
    classes = previous_stage_classes(seg, pre.properties, plans, config, where)
    image = np.concatenate([pre.image, one_hot(classes, plans.num_label_classes)])
    return PreprocessedCase(image, pre.label, pre.properties)


def read_previous_stage(path: Path) -> np.ndarray:
    """A stage-1 segmentation file (NIfTI of label values)."""
    return np.asarray(load_nifti(path, dtype=np.int16).data)


def out_of_fold_predictions(work: Path, config: Configuration, case_ids: list[str]) -> dict[str, Path]:
    """Each training case's stage-1 prediction by the fold that held it out; raises
    :class:`MissingPreviousStage` naming the command to run when any is missing."""
    wd = WorkDir(work)
    stage1 = config.previous_stage
    if stage1 is None:
        raise ValueError(f"{config.name} has no previous stage")
    if not wd.splits.exists():
        raise MissingPreviousStage(
            f"{config.name} needs the out-of-fold {stage1} predictions; no folds yet ({wd.splits} missing): "
            f"run `segpipe train {work} --config {stage1} --fold all` first"
        )
    found: dict[str, Path] = {}
    missing_folds: dict[int, int] = {}
    for fold, split in enumerate(read_json(wd.splits)):
        folder = wd.run(stage1, fold) / VALIDATION_FOLDERS["final"]
        for case in split["val"]:
            path = folder / f"{case}.nii.gz"
            if path.exists():
                found[case] = path
            elif case in case_ids:
                missing_folds[fold] = missing_folds.get(fold, 0) + 1
    if missing_folds:
        folds = ",".join(map(str, sorted(missing_folds)))
        raise MissingPreviousStage(
            f"{config.name} is trained on the out-of-fold {stage1} predictions of every training case; "
            f"{sum(missing_folds.values())} are missing (folds {folds}: {wd.run(stage1, 'K')}/validation/). "
            f"Run `segpipe train {work} --config {stage1} --fold {folds}` (without --no-validation) first"
        )
    return found


def prepare_training_inputs(work: Path, plans: Plans, config: Configuration) -> Path:
    """Write ``WORK/<config>/previous_stage/CASE.npy`` for every preprocessed case from stage 1's
    out-of-fold predictions (a case is redone when its prediction is newer); return the folder."""
    wd = WorkDir(work)
    data = wd.preprocessed(config.data_identifier)
    cases = list_preprocessed(data)
    sources = out_of_fold_predictions(work, config, cases)
    out = wd.previous_stage(config.name)
    out.mkdir(parents=True, exist_ok=True)
    remove_stale_temporaries(out)
    for case in cases:
        target = out / f"{case}.npy"
        source = sources[case]
        if target.exists() and target.stat().st_mtime >= source.stat().st_mtime:
            continue
        props = load_properties(CaseFilesOnDisk(data, case).properties)
        save_npy(target, previous_stage_classes(read_previous_stage(source), props, plans, config, source))
    return out
