"""The planner: fingerprint + preset -> plans (spacing, normalization, topology, patch, batch).

Third stage: reads ``WORK/fingerprint.json`` and a preset from ``plans/``, writes
``WORK/plans.json``. The rules follow nnU-Net's experiment planner, written as small pure
functions so each rule can be tested on its own.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from segpipe.core.serialization import from_dict, to_dict
from segpipe.planning.fingerprint import Fingerprint
from segpipe.planning.plans import (
    CASCADE,
    FULLRES,
    LOWRES,
    Configuration,
    Normalization,
    PlannerPreset,
    Plans,
    Topology,
    TrainingSettings,
)

# Activation memory per (voxel x feature) of a stage, summed over encoder and decoder: about twelve
# stored tensors (conv, norm, activation, twice per block) at 2 bytes (mixed precision). With it a
# 10 GB budget gives nnU-Net's batch sizes for the same patch (e.g. 128^3 x 2 at 32..320 features).
BYTES_PER_FEATURE_VOXEL = 48
# nnU-Net uses nonzero-mask normalization when cropping removes at least a quarter of the image.
NONZERO_MASK_CROP_RATIO = 0.75


@dataclass
class _Grid:
    spacing: np.ndarray
    median_shape: np.ndarray


def target_spacing(fp: Fingerprint, anisotropy_threshold: float) -> list[float]:
    """Median spacing; for anisotropic data the coarse axis takes its 10th percentile instead."""
    spacings = np.array([c.spacing for c in fp.cases], dtype=float)
    target = np.median(spacings, axis=0)
    worst = int(np.argmax(target))
    others = [a for a in range(3) if a != worst]
    if target[worst] / target[others].min() > anisotropy_threshold:
        p10 = float(np.percentile(spacings[:, worst], 10))
        target[worst] = max(p10, float(target[others].max()) + 1e-5)
    return [float(s) for s in target]


def median_shape_at(fp: Fingerprint, spacing: list[float]) -> list[int]:
    """Median cropped case shape after resampling to ``spacing``."""
    shapes = np.array(
        [np.array(c.cropped_shape) * np.array(c.spacing) / np.array(spacing) for c in fp.cases], dtype=float
    )
    return [int(round(v)) for v in np.median(shapes, axis=0)]


def plan_normalization(fp: Fingerprint) -> list[Normalization]:
    """CT channels: clip to the foreground 0.5/99.5 percentiles and z-score with dataset stats;
    any other channel: per-image z-score (inside the non-zero mask when cropping removes a lot)."""
    ratios = [np.prod(c.cropped_shape) / np.prod(c.shape) for c in fp.cases]
    nonzero = float(np.median(ratios)) < NONZERO_MASK_CROP_RATIO
    out = []
    for name, stats in zip(fp.channel_names, fp.intensity):
        if name.strip().lower() == "ct":
            out.append(
                Normalization(
                    "ct",
                    mean=stats.mean,
                    std=stats.std,
                    lower=stats.percentile_00_5,
                    upper=stats.percentile_99_5,
                )
            )
        else:
            out.append(Normalization("zscore", use_nonzero_mask=nonzero))
    return out


def plan_topology(spacing: list[float], patch: list[int], preset: PlannerPreset) -> Topology:
    """Pool each axis while its feature map stays >= 2 x ``min_feature_map`` and its spacing is at most
    twice the finest of the axes that can still pool (as nnU-Net v2); kernel 1 on an axis while its
    spacing is more than twice the finest."""
    current = np.array(spacing, dtype=float)
    size = np.array(patch, dtype=float)
    kernels = [[3 if current[a] <= 2 * current.min() else 1 for a in range(3)]]
    strides = [[1, 1, 1]]
    while len(strides) < preset.max_stages:
        poolable = [a for a in range(3) if size[a] >= 2 * preset.min_feature_map]
        if not poolable:
            break
        finest = min(current[a] for a in poolable)  # an axis too small to pool must not block the others
        pool = [bool(a in poolable and current[a] <= 2 * finest) for a in range(3)]
        if not any(pool):
            break
        stride = [2 if p else 1 for p in pool]
        size = size / np.array(stride)
        current = current * np.array(stride)
        previous = kernels[-1]
        kernels.append([3 if previous[a] == 3 or current[a] <= 2 * current.min() else 1 for a in range(3)])
        strides.append(stride)
    features = [min(preset.base_features * 2**i, preset.max_features) for i in range(len(strides))]
    return Topology(kernel_sizes=kernels, strides=strides, features=features)


def estimate_memory_bytes(patch: list[int], topology: Topology, batch_size: int) -> float:
    """Estimated training activation memory for one batch (see BYTES_PER_FEATURE_VOXEL)."""
    voxels = float(np.prod(patch))
    total = 0.0
    scale = np.ones(3)
    for stride, feat in zip(topology.strides, topology.features):
        scale = scale * np.array(stride)
        total += voxels / float(np.prod(scale)) * feat
    return total * BYTES_PER_FEATURE_VOXEL * batch_size


def _round_up(patch: np.ndarray, divisor: list[int]) -> list[int]:
    return [int(math.ceil(p / d) * d) for p, d in zip(patch, divisor)]


def plan_configuration(
    name: str,
    spacing: list[float],
    median_shape: list[int],
    dataset_voxels: float,
    preset: PlannerPreset,
    data_identifier: str | None = None,
) -> Configuration:
    """Patch, topology and batch size for one spacing, within the preset's memory budget."""
    budget = preset.gpu_memory_gb * 1024**3
    inv = 1.0 / np.array(spacing)
    # Start from an isotropic-in-mm patch of max_patch_voxels, then no larger than the median case.
    patch = inv * (preset.max_patch_voxels / np.prod(inv)) ** (1 / 3)
    patch = np.minimum(np.round(patch), np.array(median_shape, dtype=float)).clip(min=1)
    topology = plan_topology(spacing, [int(p) for p in patch], preset)
    padded = _round_up(patch, topology.divisor())
    while estimate_memory_bytes(padded, topology, preset.min_batch_size) > budget:
        ratios = np.array(padded) / np.array(median_shape)
        axis = int(np.argmax(ratios))
        step = topology.divisor()[axis]
        if padded[axis] - step < step:
            shrinkable = [a for a in range(3) if padded[a] - topology.divisor()[a] >= topology.divisor()[a]]
            if not shrinkable:
                break
            axis = max(shrinkable, key=lambda a: ratios[a])
            step = topology.divisor()[axis]
        patch = np.array(padded, dtype=float)
        patch[axis] -= step
        topology = plan_topology(spacing, [int(p) for p in patch], preset)
        padded = _round_up(patch, topology.divisor())
    per_sample = estimate_memory_bytes(padded, topology, 1)
    batch = int(np.clip(budget // per_sample, preset.min_batch_size, preset.max_batch_size))
    cap = int(preset.max_dataset_fraction_per_batch * dataset_voxels // np.prod(padded))
    batch = max(preset.min_batch_size, min(batch, cap))
    return Configuration(
        name=name,
        spacing=[float(s) for s in spacing],
        median_shape=[int(s) for s in median_shape],
        patch_size=padded,
        batch_size=batch,
        topology=topology,
        data_identifier=data_identifier or name,
    )


def _dataset_voxels(fp: Fingerprint, spacing: list[float]) -> float:
    return float(sum(np.prod(np.array(c.cropped_shape) * np.array(c.spacing) / np.array(spacing)) for c in fp.cases))


def plan_lowres(fp: Fingerprint, fullres: Configuration, preset: PlannerPreset) -> Configuration | None:
    """Coarsen the spacing in steps of ``lowres_spacing_step`` until the patch covers enough of the
    median case; None when the full-res patch already covers it (no cascade needed)."""
    threshold = preset.cascade_coverage_threshold
    if np.prod(fullres.patch_size) / np.prod(fullres.median_shape) >= threshold:
        return None
    spacing = np.array(fullres.spacing, dtype=float)
    for _ in range(1000):
        coarse = spacing < spacing.max()
        spacing = spacing * np.where(coarse if coarse.any() else True, preset.lowres_spacing_step, 1.0)
        median = median_shape_at(fp, list(spacing))
        config = plan_configuration(LOWRES, list(spacing), median, _dataset_voxels(fp, list(spacing)), preset)
        if np.prod(config.patch_size) / np.prod(median) >= threshold:
            return config
    return None


def plan_dataset(fp: Fingerprint, preset: PlannerPreset, labels: dict[str, int]) -> Plans:
    """Plan every configuration of a dataset from its fingerprint."""
    spacing = target_spacing(fp, preset.anisotropy_threshold)
    median = median_shape_at(fp, spacing)
    fullres = plan_configuration(FULLRES, spacing, median, _dataset_voxels(fp, spacing), preset)
    configurations = {FULLRES: fullres}
    lowres = plan_lowres(fp, fullres, preset)
    if lowres is not None:
        cascade = from_dict(Configuration, {**to_dict(fullres), "name": CASCADE, "previous_stage": LOWRES})
        configurations[LOWRES] = lowres
        configurations[CASCADE] = cascade
    training = from_dict(TrainingSettings, {**to_dict(TrainingSettings()), **preset.training})
    return Plans(
        dataset_name=fp.dataset_name,
        preset=preset.name,
        channel_names=fp.channel_names,
        labels=labels,
        normalization=plan_normalization(fp),
        configurations=configurations,
        training=training,
        original_median_spacing=[float(s) for s in np.median([c.spacing for c in fp.cases], axis=0)],
    )


def run_plan(dataset_dir: str | Path, work: str | Path, preset_name: str, workers: int) -> Plans:
    """The ``plan`` stage: describe the dataset, fingerprint it, plan, and save all three files.

    Every unreadable or invalid training case is reported at once (:class:`StageFailed`), and no
    plans are written then: plans from a silently reduced dataset would mislead.
    """
    from segpipe.core.atomic import remove_stale_temporaries, write_json
    from segpipe.core.errors import StageFailed
    from segpipe.core.paths import WorkDir
    from segpipe.data.dataset import load_dataset
    from segpipe.planning.fingerprint import compute_fingerprint
    from segpipe.planning.plans import load_preset, save_plans

    wd = WorkDir(work)
    remove_stale_temporaries(wd.root)  # what a killed run left half-written
    preset = load_preset(preset_name)
    dataset = load_dataset(dataset_dir)
    fp = compute_fingerprint(dataset, workers)
    if fp.failures:
        raise StageFailed("plan", fp.failures)
    plans = plan_dataset(fp, preset, dataset.labels)
    write_json(wd.dataset, dataset.to_dict())
    write_json(wd.fingerprint, fp.to_dict())
    save_plans(plans, wd.plans)
    return plans


def describe_plans(plans: Plans) -> str:
    """A short human-readable summary of the planned configurations."""
    lines = [f"dataset {plans.dataset_name} (preset {plans.preset}), labels {plans.labels}"]
    lines.append(
        "normalization: "
        + ", ".join(n.scheme + (" (nonzero mask)" if n.use_nonzero_mask else "") for n in plans.normalization)
    )
    for c in plans.configurations.values():
        lines.append(
            f"{c.name}: spacing {[round(s, 3) for s in c.spacing]} mm, median shape {c.median_shape}, "
            f"patch {c.patch_size}, batch {c.batch_size}, features {c.topology.features}"
            + (f", previous stage {c.previous_stage}" if c.previous_stage else "")
        )
    return "\n".join(lines)
