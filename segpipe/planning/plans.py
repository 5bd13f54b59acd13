"""Plans: the typed, versioned description of how to preprocess and train a dataset.

``planner.py`` writes a :class:`Plans` to ``WORK/plans.json``; every later stage reads it and
nothing else decides a spacing, patch, topology or hyper-parameter. Planner presets (the knobs the
planner starts from: memory budget, feature widths, training settings) are JSON files in the
top-level ``plans/`` folder, loaded as :class:`PlannerPreset`.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np

from segpipe.core.atomic import read_json, write_json
from segpipe.core.serialization import from_dict, to_dict

SCHEMA_VERSION = 1
PRESET_DIR = Path(__file__).resolve().parents[2] / "plans"

TWO_D = "2d"
FULLRES = "3d_fullres"
LOWRES = "3d_lowres"
CASCADE = "3d_cascade_fullres"


@dataclass
class Normalization:
    """How one image channel is normalized (``scheme`` names an entry of the normalizer registry)."""

    scheme: str
    use_nonzero_mask: bool = False
    mean: float | None = None  # dataset foreground statistics, used by "ct"
    std: float | None = None
    lower: float | None = None  # 0.5 percentile
    upper: float | None = None  # 99.5 percentile


@dataclass
class Topology:
    """U-Net layout: per-stage kernel sizes and strides (first stride is 1) and feature widths."""

    kernel_sizes: list[list[int]]
    strides: list[list[int]]
    features: list[int]

    @property
    def num_stages(self) -> int:
        return len(self.strides)

    def divisor(self) -> list[int]:
        """What every patch axis must be divisible by (product of strides)."""
        out = [1] * len(self.strides[0])
        for s in self.strides:
            out = [a * b for a, b in zip(out, s)]
        return out


@dataclass
class NetworkSpec:
    """Which registered network a configuration trains, with its extra arguments (the topology comes
    from :class:`Topology`)."""

    name: str = "dynunet"
    kwargs: dict[str, Any] = field(default_factory=dict)


@dataclass
class Configuration:
    """One trainable configuration (``2d``, ``3d_fullres``, ``3d_lowres`` or ``3d_cascade_fullres``).

    ``patch_size`` and ``topology`` always have three axes; a 2d configuration has ``slice_axis`` set,
    patch 1 and kernel/stride 1 along it: the network sees the other two axes of one slice.
    """

    name: str
    spacing: list[float]  # mm, array-axis order (X, Y, Z)
    median_shape: list[int]  # median cropped case shape at this spacing
    patch_size: list[int]
    batch_size: int
    topology: Topology
    data_identifier: str  # folder under WORK/preprocessed holding this configuration's cases
    previous_stage: str | None = None  # the cascade's stage-1 configuration
    slice_axis: int | None = None  # 2d: the axis the volume is sliced along; None for 3d
    batch_dice: bool = False  # Dice summed over the batch (True) or per sample, as nnU-Net's planner chooses
    network: NetworkSpec = field(default_factory=NetworkSpec)

    @property
    def is_2d(self) -> bool:
        return self.slice_axis is not None


@dataclass
class TrainingSettings:
    """Training hyper-parameters; defaults are nnU-Net's. Overridable by presets and the CLI."""

    epochs: int = 1000
    iters_per_epoch: int = 250
    # an epoch also ends after this many seconds (None: never): `segpipe tune` sets it so that a trial's
    # pseudo-Dice is measured close to each pruning rung, whatever the trial's speed per iteration
    epoch_seconds: float | None = None
    val_iters: int = 50
    optimizer: str = "sgd"  # a name in segpipe.training.optimizers.OPTIMIZERS
    loss: str = "dice_ce"  # a name in segpipe.training.losses.LOSSES
    initial_lr: float = 0.01
    momentum: float = 0.99
    weight_decay: float = 3e-5
    nesterov: bool = True
    schedule: str = "poly"
    poly_exponent: float = 0.9
    warmup_fraction: float = 0.0
    cycles: int = 1  # cosine / cyclic: number of cycles (a snapshot at the end of each)
    cycle_mult: float = 1.0  # cosine: each cycle this many times longer than the previous (SGDR)
    min_lr: float = 0.0  # cosine: the LR at the end of each cycle
    # cyclic: the final part of training spent in short cycles; poly_constant: at swa_lr; non-cyclic
    # schedules with swa: the part whose epoch ends are averaged
    cyclic_fraction: float = 0.25
    cyclic_lr_high: float = 0.005  # cyclic: LR at the top of each cycle (FGE's alpha 1)
    cyclic_lr_low: float = 0.0001  # cyclic: LR at the low point of each cycle, where snapshots are taken
    swa: bool = False  # keep a running average of the snapshot weights (swa.pt)
    swa_lr: float = 0.002  # poly_constant: the constant LR of the final cyclic_fraction, while SWA averages
    accumulate: int = 1  # gradient accumulation over this many batches
    grad_clip: float = 12.0
    oversample_foreground: float = 0.33
    deep_supervision: bool = True
    num_workers: int = 2
    augmentation: str = "default"
    augment_on: str = "auto"  # where the batch augmentation runs: device, workers, or auto (device on a GPU)
    compile: bool = False  # torch.compile the network for training
    channels_last: bool = False  # channels_last_3d memory format (GPU)
    num_folds: int = 5
    seed: int = 12345


@dataclass
class PlannerPreset:
    """The planner's starting knobs, loaded from ``plans/<name>.json``."""

    name: str
    description: str = ""
    gpu_memory_gb: float = 10.0
    base_features: int = 32
    max_features: int = 320
    min_feature_map: int = 4
    max_stages: int = 6
    min_batch_size: int = 2
    max_batch_size: int = 64
    max_dataset_fraction_per_batch: float = 0.05
    max_patch_voxels: int = 256**3
    # compute per iteration, patch voxels x batch (CPU presets: what a few cores train in reasonable
    # time); None: only the memory budget decides
    max_batch_voxels: int | None = None
    max_features_2d: int = 512  # nnU-Net's UNet_max_features_2d
    max_stages_2d: int = 8
    max_patch_pixels_2d: int = 2048**2  # nnU-Net's initial 2d patch: 2048^2 pixels, isotropic in mm
    cascade_coverage_threshold: float = 0.25
    lowres_spacing_step: float = 1.03
    anisotropy_threshold: float = 3.0
    network: NetworkSpec = field(default_factory=NetworkSpec)  # for every configuration
    training: dict[str, Any] = field(default_factory=dict)  # overrides of TrainingSettings fields


@dataclass
class Plans:
    """Everything later stages need to know about a dataset, saved as ``WORK/plans.json``."""

    dataset_name: str
    preset: str
    channel_names: list[str]
    labels: dict[str, int]
    normalization: list[Normalization]
    configurations: dict[str, Configuration]
    training: TrainingSettings
    original_median_spacing: list[float]
    anisotropy_threshold: float = 3.0  # the planner's, also the resampling's separate-axis rule
    ignore_label: int | None = None  # nnU-Net v2's "ignore": unannotated voxels, in no loss term or metric
    # region-based training (nnU-Net v2): one sigmoid output per region (the label values it unites),
    # written back to label values in ``regions_class_order`` (later regions overwrite earlier ones)
    regions: list[list[int]] | None = None
    region_names: list[str] | None = None
    regions_class_order: list[int] | None = None
    schema_version: int = SCHEMA_VERSION

    @property
    def num_classes(self) -> int:
        """Output channels of the network: background plus every foreground label (never ``ignore``),
        or one per region."""
        return len(self.regions) if self.regions else len(self.labels)

    @property
    def num_label_classes(self) -> int:
        """Classes of preprocessed label maps: background plus every foreground label value."""
        return len(self.labels)

    @property
    def evaluation_targets(self) -> list[int | list[int]]:
        """What Dice is reported for: each foreground label, or each region (a list of label values)."""
        return [list(r) for r in self.regions] if self.regions else self.foreground_labels

    @property
    def region_classes(self) -> list[list[int]] | None:
        """Each region as class indices of the preprocessed label maps."""
        if not self.regions:
            return None
        index = {v: i for i, v in enumerate(sorted(self.labels.values()))}
        return [[index[v] for v in region] for region in self.regions]

    @property
    def foreground_labels(self) -> list[int]:
        return sorted(v for v in self.labels.values() if v != 0)

    @property
    def allowed_label_values(self) -> set[int]:
        """What a label file may contain: the labels and the ignore value."""
        return set(self.labels.values()) | ({self.ignore_label} if self.ignore_label is not None else set())

    @property
    def ignore_class(self) -> int | None:
        """The class index ``ignore`` voxels get in preprocessed label maps: one past the label classes."""
        return self.num_label_classes if self.ignore_label is not None else None

    @property
    def num_stored_classes(self) -> int:
        """Class indices a preprocessed label map may hold: the label classes and ``ignore``."""
        return self.num_label_classes + (self.ignore_label is not None)

    @property
    def class_dtype(self) -> type[np.signedinteger]:
        """Storage of class-index maps: int8 while the indices fit (nnU-Net does the same), else int16."""
        return np.int8 if self.num_stored_classes <= 127 else np.int16

    def label_to_class(self, label: np.ndarray) -> np.ndarray:
        """Map label values to contiguous class indices (background 0, then labels in ascending order;
        ``ignore`` to :attr:`ignore_class`)."""
        values = sorted(self.labels.values())
        top = max([*values, self.ignore_label if self.ignore_label is not None else 0])
        lut = np.zeros(top + 1, dtype=self.class_dtype)
        lut[values] = np.arange(len(values))
        if self.ignore_label is not None:
            lut[self.ignore_label] = self.ignore_class
        return lut[label]

    def configuration(self, name: str) -> Configuration:
        if name not in self.configurations:
            raise KeyError(f"configuration {name!r} is not planned; planned: {', '.join(self.configurations)}")
        return self.configurations[name]

    def with_training(self, **overrides: Any) -> Plans:
        """A copy with some training settings replaced (unknown names are an error)."""
        return replace(self, training=from_dict(TrainingSettings, {**to_dict(self.training), **overrides}))

    def fingerprint_hash(self) -> str:
        """A short hash of the plans' content, stored in checkpoints to catch mismatched resumes."""
        return hashlib.sha256(json.dumps(to_dict(self), sort_keys=True).encode()).hexdigest()[:16]


def save_plans(plans: Plans, path: str | Path) -> None:
    write_json(path, to_dict(plans))


def load_plans(path: str | Path) -> Plans:
    """Load ``plans.json``; errors name the file and the offending key."""
    data = read_json(path)
    version = data.get("schema_version")
    if version != SCHEMA_VERSION:
        raise ValueError(f"{path}: plans schema version {version}, this segpipe reads {SCHEMA_VERSION}; re-run plan")
    return from_dict(Plans, data, where=str(path))


def list_presets() -> list[str]:
    return sorted(p.stem for p in PRESET_DIR.glob("*.json"))


def load_preset(name_or_path: str) -> PlannerPreset:
    """Load a planner preset by name (``plans/<name>.json``) or by path to a JSON file."""
    path = Path(name_or_path)
    if not path.suffix == ".json":
        path = PRESET_DIR / f"{name_or_path}.json"
    if not path.is_file():
        raise FileNotFoundError(f"preset {name_or_path!r} not found; presets: {', '.join(list_presets())}")
    preset = from_dict(PlannerPreset, read_json(path), where=str(path))
    from_dict(TrainingSettings, {**to_dict(TrainingSettings()), **preset.training}, where=f"{path}:training")
    return preset
