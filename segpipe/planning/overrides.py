"""Run overrides: the settings one training run changes relative to the plans.

A flat JSON object (``segpipe train --overrides FILE``, ``WORK/tune/best.json``) whose keys are
:class:`~segpipe.planning.plans.TrainingSettings` fields or :class:`RunOverrides` fields: changes of
the configuration a run trains (batch, patch and network width, Dice variant) and of how much of the
fold's training data it sees. Unknown keys are an error naming the key and the file. The plans file
itself is never changed: the run folder records the configuration it trained with.
"""

from __future__ import annotations

from dataclasses import dataclass, fields, replace
from typing import Any

from segpipe.core.atomic import read_json
from segpipe.core.serialization import from_dict, to_dict
from segpipe.planning.plans import Configuration, Topology, TrainingSettings

MIN_FEATURES = 4  # a scaled-down network keeps at least this many channels per stage


@dataclass
class RunOverrides:
    """Overrides that are not training settings; None leaves the planned value."""

    batch_size: int | None = None
    patch_scale: float | None = None  # every patch axis times this, rounded to the network's divisor
    width_scale: float | None = None  # every stage's feature count times this
    batch_dice: bool | None = None  # the Dice variant: summed over the batch (True) or per sample
    train_fraction: float | None = None  # low fidelity: train on this fraction of the fold's training cases


TRAINING_KEYS = frozenset(f.name for f in fields(TrainingSettings))
RUN_KEYS = frozenset(f.name for f in fields(RunOverrides))
OVERRIDE_KEYS = TRAINING_KEYS | RUN_KEYS


@dataclass
class Overrides:
    """A flat override dict split into its two kinds, both checked."""

    training: dict[str, Any]
    run: RunOverrides

    def as_dict(self) -> dict[str, Any]:
        """The flat form again (None values of ``run`` left out)."""
        return {**self.training, **{k: v for k, v in to_dict(self.run).items() if v is not None}}


def check_keys(keys: Any, where: str) -> None:
    """Refuse keys that name no override, listing them and ``where`` they came from."""
    unknown = sorted(set(keys) - OVERRIDE_KEYS)
    if unknown:
        raise ValueError(f"{where}: unknown override key(s) {unknown}; known: {', '.join(sorted(OVERRIDE_KEYS))}")


def split_overrides(data: dict[str, Any], where: str = "overrides") -> Overrides:
    """Check a flat override dict (keys and value types) and split it; None values are dropped."""
    if not isinstance(data, dict):
        raise ValueError(f"{where}: expected a JSON object of settings")
    data = {k: v for k, v in data.items() if v is not None}
    check_keys(data, where)
    training = {k: v for k, v in data.items() if k in TRAINING_KEYS}
    # type-check the training values against the dataclass (ints, floats, bools, strings)
    checked = from_dict(TrainingSettings, {**to_dict(TrainingSettings()), **training}, where=where)
    training = {k: getattr(checked, k) for k in training}
    run = from_dict(RunOverrides, {k: v for k, v in data.items() if k in RUN_KEYS}, where=where)
    _check_run(run, where)
    return Overrides(training, run)


def _check_run(run: RunOverrides, where: str) -> None:
    positive = {"batch_size": run.batch_size, "patch_scale": run.patch_scale, "width_scale": run.width_scale}
    for key, value in positive.items():
        if value is not None and value <= 0:
            raise ValueError(f"{where}: {key} must be positive, got {value}")
    if run.train_fraction is not None and not 0 < run.train_fraction <= 1:
        raise ValueError(f"{where}: train_fraction must be in (0, 1], got {run.train_fraction}")


def load_overrides(path: Any) -> Overrides:
    """Read and check an override file (``segpipe train --overrides``)."""
    return split_overrides(read_json(path), where=str(path))


def scaled_patch(patch: list[int], divisor: list[int], scale: float, slice_axis: int | None) -> list[int]:
    """Each patch axis times ``scale``, rounded to a multiple of the network's ``divisor`` (at least one);
    a 2d configuration's sliced axis keeps its 1."""
    out = []
    for axis, (p, d) in enumerate(zip(patch, divisor)):
        out.append(p if axis == slice_axis else max(d, round(p * scale / d) * d))
    return out


def apply_run_overrides(config: Configuration, run: RunOverrides) -> Configuration:
    """The configuration a run trains: the planned one with ``run``'s changes."""
    out = config
    if run.batch_size is not None:
        out = replace(out, batch_size=run.batch_size)
    if run.batch_dice is not None:
        out = replace(out, batch_dice=run.batch_dice)
    if run.patch_scale is not None and run.patch_scale != 1:
        patch = scaled_patch(out.patch_size, out.topology.divisor(), run.patch_scale, out.slice_axis)
        out = replace(out, patch_size=patch)
    if run.width_scale is not None and run.width_scale != 1:
        features = [max(MIN_FEATURES, round(f * run.width_scale)) for f in out.topology.features]
        out = replace(out, topology=Topology(out.topology.kernel_sizes, out.topology.strides, features))
    return out


def train_subset(ids: list[str], fraction: float | None) -> list[str]:
    """The first ``fraction`` of a fold's training cases (at least one), in split order: the same subset
    for every trial, so low-fidelity trials compare like with like."""
    if fraction is None or fraction >= 1:
        return ids
    return ids[: max(1, round(len(ids) * fraction))]
