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
    TWO_D,
    Configuration,
    NetworkSpec,
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
    """Median spacing; on anisotropic data the coarse axis takes its 10th percentile instead.

    nnU-Net's rule (nnunetv2/experiment_planning/experiment_planners/default_experiment_planner.py,
    ``ExperimentPlanner.determine_fullres_target_spacing``): the data count as anisotropic when the
    coarsest median spacing is more than ``anisotropy_threshold`` times the largest other one *and* the
    median number of voxels along that axis (after cropping), times the threshold, is below the
    smallest other median. The 10th percentile is then bounded below by the largest other spacing
    (plus 1e-5): the coarse axis never becomes finer than the in-plane axes.
    """
    spacings = np.array([c.spacing for c in fp.cases], dtype=float)
    sizes = np.array([c.cropped_shape for c in fp.cases], dtype=float)
    target = np.median(spacings, axis=0)
    median_size = np.median(sizes, axis=0)
    worst = int(np.argmax(target))
    others = [a for a in range(3) if a != worst]
    aniso_spacing = target[worst] > anisotropy_threshold * target[others].max()
    aniso_voxels = median_size[worst] * anisotropy_threshold < median_size[others].min()
    if aniso_spacing and aniso_voxels:
        p10 = float(np.percentile(spacings[:, worst], 10))
        if p10 < target[others].max():
            p10 = float(target[others].max()) + 1e-5
        target[worst] = p10
    return [float(s) for s in target]


def slice_axis(spacing: list[float]) -> int:
    """The axis a 2d configuration slices along: the coarsest; on a tie the last one (Z in the files'
    (X, Y, Z) order), which is the axis nnU-Net's transpose puts first (its arrays are (Z, Y, X))."""
    coarsest = max(spacing)
    return max(a for a, s in enumerate(spacing) if s == coarsest)


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


def plan_topology(
    spacing: list[float],
    patch: list[int],
    preset: PlannerPreset,
    max_features: int | None = None,
    max_stages: int | None = None,
) -> Topology:
    """Pooling and kernels per stage, for 2 or 3 axes, by nnU-Net's rule
    (nnunetv2/experiment_planning/experiment_planners/network_topology.py, ``get_pool_and_conv_props``).

    An axis pools while its feature map is at least ``2 x min_feature_map`` and its spacing is less than
    twice the finest spacing of the axes that can still pool (a single such axis also needs
    ``3 x min_feature_map``). A stage's kernel is 3 along an axis once its spacing there is less than
    twice the finest (1 before: thick slices get in-plane kernels); the last stage's kernel is 3
    everywhere. Unlike nnU-Net the stages are capped (``max_stages``, a preset knob).
    """
    dims = len(spacing)
    max_stages = max_stages or preset.max_stages
    current = np.array(spacing, dtype=float)
    size = np.array(patch, dtype=float)
    kernel = [1] * dims
    kernels: list[list[int]] = []
    strides = [[1] * dims]
    while len(strides) < max_stages:
        valid = [a for a in range(dims) if size[a] >= 2 * preset.min_feature_map]
        if not valid:
            break
        finest = min(current[a] for a in valid)
        pool = [a for a in valid if current[a] / finest < 2]
        if not pool or (len(pool) == 1 and size[pool[0]] < 3 * preset.min_feature_map):
            break
        kernel = [3 if k == 3 or current[a] / current.min() < 2 else 1 for a, k in enumerate(kernel)]
        kernels.append(list(kernel))
        stride = [2 if a in pool else 1 for a in range(dims)]
        strides.append(stride)
        current = current * np.array(stride)
        size = np.ceil(size / np.array(stride))
    kernels.append([3] * dims)  # the bottleneck
    top = preset.max_features if max_features is None else max_features
    features = [min(preset.base_features * 2**i, top) for i in range(len(strides))]
    return Topology(kernel_sizes=kernels, strides=strides, features=features)


# What the loss keeps per class and voxel of every deep-supervision head: the logits in float32, their
# softmax and the one-hot target (segpipe.training.losses computes in float32), and the two gradients.
BYTES_PER_HEAD_CLASS_VOXEL = 24


def estimate_memory_bytes(patch: list[int], topology: Topology, batch_size: int, num_classes: int = 0) -> float:
    """Estimated training memory for one batch: the activations (see BYTES_PER_FEATURE_VOXEL) plus, with
    ``num_classes`` outputs, what the loss stores for the heads actually built (full resolution and
    every decoder level but the lowest, each at its own resolution; see BYTES_PER_HEAD_CLASS_VOXEL)."""
    voxels = float(np.prod(patch))
    total = 0.0
    scale = np.ones(len(patch))
    level_voxels = []
    for stride, feat in zip(topology.strides, topology.features):
        scale = scale * np.array(stride)
        level_voxels.append(voxels / float(np.prod(scale)))
        total += level_voxels[-1] * feat
    heads = level_voxels[: max(topology.num_stages - 2, 1)]
    return (total * BYTES_PER_FEATURE_VOXEL + sum(heads) * num_classes * BYTES_PER_HEAD_CLASS_VOXEL) * batch_size


def _round_up(patch: np.ndarray, divisor: list[int]) -> list[int]:
    return [int(math.ceil(p / d) * d) for p, d in zip(patch, divisor)]


@dataclass
class _Planned:
    patch: list[int]
    topology: Topology
    batch: int


def _plan_patch(
    spacing: list[float],
    median_shape: list[int],
    dataset_voxels: float,
    preset: PlannerPreset,
    max_patch: float,
    max_features: int,
    max_stages: int,
    num_classes: int = 0,
) -> _Planned:
    """Patch, topology and batch on 2 or 3 axes (nnU-Net's ``get_plans_for_configuration`` with
    segpipe's memory model): an isotropic-in-mm patch of ``max_patch`` voxels, no larger than the
    median case, shrunk along the axis largest relative to the median until the memory estimate of
    the smallest batch fits; then the batch that fits, at most 5% of the dataset's voxels."""
    dims = len(spacing)
    budget = preset.gpu_memory_gb * 1024**3
    if preset.max_batch_voxels:  # CPU presets: bound the compute of one iteration as well
        max_patch = min(max_patch, preset.max_batch_voxels / preset.min_batch_size)
    inv = 1.0 / np.array(spacing, dtype=float)
    patch = inv * (max_patch / np.prod(inv)) ** (1 / dims)
    patch = np.minimum(np.round(patch), np.array(median_shape, dtype=float)).clip(min=1)

    def topology_for(p: np.ndarray) -> Topology:
        return plan_topology(spacing, [int(v) for v in p], preset, max_features, max_stages)

    topology = topology_for(patch)
    padded = _round_up(patch, topology.divisor())

    def too_big(p: list[int]) -> bool:
        over_memory = estimate_memory_bytes(p, topology, preset.min_batch_size, num_classes) > budget
        over_compute = bool(preset.max_batch_voxels) and np.prod(p) * preset.min_batch_size > preset.max_batch_voxels
        return over_memory or over_compute

    while too_big(padded):
        divisor = topology.divisor()
        ratios = np.array(padded) / np.array(median_shape)
        shrinkable = [a for a in range(dims) if padded[a] - divisor[a] >= divisor[a]]
        if not shrinkable:
            break
        axis = max(shrinkable, key=lambda a: ratios[a])
        patch = np.array(padded, dtype=float)
        patch[axis] -= divisor[axis]
        topology = topology_for(patch)
        padded = _round_up(patch, topology.divisor())
    per_sample = estimate_memory_bytes(padded, topology, 1, num_classes)
    batch = int(np.clip(budget // per_sample, preset.min_batch_size, preset.max_batch_size))
    if preset.max_batch_voxels:
        batch = min(batch, int(preset.max_batch_voxels // np.prod(padded)))
    # nnU-Net's cap: round(5% of the dataset's voxels / patch voxels) (``get_plans_for_configuration``)
    cap = int(round(preset.max_dataset_fraction_per_batch * dataset_voxels / np.prod(padded)))
    batch = max(preset.min_batch_size, min(batch, cap))
    return _Planned(padded, topology, batch)


def plan_configuration(
    name: str,
    spacing: list[float],
    median_shape: list[int],
    dataset_voxels: float,
    preset: PlannerPreset,
    data_identifier: str | None = None,
    num_classes: int = 0,
) -> Configuration:
    """A 3d configuration: patch, topology and batch size for one spacing, within the preset's budgets
    (``num_classes``: network outputs, for the memory the loss takes)."""
    planned = _plan_patch(
        spacing,
        median_shape,
        dataset_voxels,
        preset,
        preset.max_patch_voxels,
        preset.max_features,
        preset.max_stages,
        num_classes,
    )
    return Configuration(
        name=name,
        spacing=[float(s) for s in spacing],
        median_shape=[int(s) for s in median_shape],
        patch_size=planned.patch,
        batch_size=planned.batch,
        topology=planned.topology,
        data_identifier=data_identifier or name,
    )


def plan_2d(
    fullres: Configuration, dataset_voxels: float, preset: PlannerPreset, num_classes: int = 0
) -> Configuration:
    """The 2d configuration: slices of the 3d_fullres data along its coarsest axis.

    As nnU-Net's ``plan_experiment`` plans 2d: the in-plane spacing and median shape of 3d_fullres, an
    initial patch of ``max_patch_pixels_2d`` (2048^2) pixels isotropic in mm, features up to
    ``max_features_2d`` (512). Stored with three axes: patch, kernel and stride 1 along ``slice_axis``.
    """
    axis = slice_axis(fullres.spacing)
    plane = [a for a in range(3) if a != axis]
    planned = _plan_patch(
        [fullres.spacing[a] for a in plane],
        [fullres.median_shape[a] for a in plane],
        dataset_voxels,
        preset,
        preset.max_patch_pixels_2d,
        preset.max_features_2d,
        preset.max_stages_2d,
        num_classes,
    )

    def embed(values: list[int]) -> list[int]:
        out = list(values)
        out.insert(axis, 1)
        return out

    topology = Topology(
        kernel_sizes=[embed(k) for k in planned.topology.kernel_sizes],
        strides=[embed(s) for s in planned.topology.strides],
        features=planned.topology.features,
    )
    return Configuration(
        name=TWO_D,
        spacing=list(fullres.spacing),
        median_shape=list(fullres.median_shape),
        patch_size=embed(planned.patch),
        batch_size=planned.batch,
        topology=topology,
        data_identifier=fullres.data_identifier,  # trained on slices of the preprocessed 3d_fullres cases
        slice_axis=axis,
    )


def _dataset_voxels(fp: Fingerprint, spacing: list[float]) -> float:
    # nnU-Net's n_vox_dataset: the median case's voxels at this spacing times the number of cases
    return float(np.prod(median_shape_at(fp, spacing))) * len(fp.cases)


def plan_lowres(
    fp: Fingerprint, fullres: Configuration, preset: PlannerPreset, num_classes: int = 0
) -> Configuration | None:
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
        voxels = _dataset_voxels(fp, list(spacing))
        config = plan_configuration(LOWRES, list(spacing), median, voxels, preset, num_classes=num_classes)
        if np.prod(config.patch_size) / np.prod(median) >= threshold:
            return config
    return None


def plan_dataset(
    fp: Fingerprint,
    preset: PlannerPreset,
    labels: dict[str, int],
    ignore_label: int | None = None,
    regions: dict[str, list[int]] | None = None,
    regions_class_order: list[int] | None = None,
) -> Plans:
    """Plan every configuration of a dataset from its fingerprint."""
    spacing = target_spacing(fp, preset.anisotropy_threshold)
    median = median_shape_at(fp, spacing)
    voxels = _dataset_voxels(fp, spacing)
    outputs = len(regions) if regions else len(labels)  # the network's output channels
    fullres = plan_configuration(FULLRES, spacing, median, voxels, preset, num_classes=outputs)
    lowres = plan_lowres(fp, fullres, preset, outputs)
    # nnU-Net's batch_dice (``plan_experiment``): 2d yes, 3d_lowres no, 3d_fullres (and so the cascade)
    # only when a 3d_lowres exists
    fullres.batch_dice = lowres is not None
    two_d = plan_2d(fullres, voxels, preset, outputs)
    two_d.batch_dice = True
    configurations = {TWO_D: two_d, FULLRES: fullres}
    if lowres is not None:
        lowres.batch_dice = False
        cascade = from_dict(Configuration, {**to_dict(fullres), "name": CASCADE, "previous_stage": LOWRES})
        configurations[LOWRES] = lowres
        configurations[CASCADE] = cascade
    for config in configurations.values():
        config.network = from_dict(NetworkSpec, to_dict(preset.network))
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
        anisotropy_threshold=preset.anisotropy_threshold,
        ignore_label=ignore_label,
        regions=[list(r) for r in regions.values()] if regions else None,
        region_names=list(regions) if regions else None,
        regions_class_order=regions_class_order if regions else None,
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
    plans = plan_dataset(fp, preset, dataset.labels, dataset.ignore_label, dataset.regions, dataset.regions_class_order)
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
            + (f", slices along axis {c.slice_axis}" if c.is_2d else "")
        )
    return "\n".join(lines)
