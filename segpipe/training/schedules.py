"""Learning-rate schedules: plain functions of training progress in [0, 1].

Progress is ``max(iterations done / total, seconds spent / budget)``, so one schedule works with an
iteration count and with a wall-clock budget alike. A schedule is a function ``(progress, settings)
-> lr`` registered with ``@SCHEDULES.register("name")``; a cyclic one also registers where its
cycles end (``@CYCLE_ENDS.register("name")``), which is where snapshots are taken.

A schedule *preset* is a recipe: a JSON file ``plans/schedules/NAME.json`` of training-setting
overrides (schedule, cycles, SWA, ...) registered in ``SCHEDULE_PRESETS``, so that ``segpipe train
--schedule NAME`` gets the whole recipe; :func:`schedule_overrides` resolves a name to either.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from pathlib import Path
from typing import Any

from segpipe.core.atomic import read_json
from segpipe.core.registry import Registry
from segpipe.core.serialization import from_dict, to_dict
from segpipe.planning.plans import PRESET_DIR, TrainingSettings

Schedule = Callable[[float, TrainingSettings], float]
SCHEDULES: Registry[Schedule] = Registry("schedule")
CYCLE_ENDS: Registry[Callable[[TrainingSettings], list[float]]] = Registry("cyclic schedule")


@SCHEDULES.register("poly")
def poly(progress: float, settings: TrainingSettings) -> float:
    """nnU-Net's polynomial decay: ``lr0 * (1 - progress) ** exponent``; zero at the end."""
    return settings.initial_lr * max(0.0, 1.0 - progress) ** settings.poly_exponent


@SCHEDULES.register("constant")
def constant(progress: float, settings: TrainingSettings) -> float:
    return settings.initial_lr


@CYCLE_ENDS.register("cosine")
def sgdr_cycle_ends(settings: TrainingSettings) -> list[float]:
    """Progress at the end of each SGDR cycle; cycle ``i`` is ``cycle_mult ** i`` times the first."""
    lengths = [settings.cycle_mult**i for i in range(settings.cycles)]
    total = sum(lengths)
    ends, acc = [], 0.0
    for length in lengths:
        acc += length
        ends.append(acc / total)
    ends[-1] = 1.0
    return ends


@SCHEDULES.register("cosine")
def cosine(progress: float, settings: TrainingSettings) -> float:
    """Cosine annealing with warm restarts (Loshchilov & Hutter): each cycle falls from ``initial_lr``
    to ``min_lr`` along a half cosine, then restarts."""
    start = 0.0
    for end in sgdr_cycle_ends(settings):
        if progress < end or end == 1.0:
            t = min(max((progress - start) / (end - start), 0.0), 1.0)
            return settings.min_lr + (settings.initial_lr - settings.min_lr) * 0.5 * (1 + math.cos(math.pi * t))
        start = end
    return settings.min_lr


def _cyclic_geometry(settings: TrainingSettings) -> tuple[float, float]:
    """Start of the cyclic part and the length of one cycle, in progress units. The cyclic part holds
    ``cycles - 0.5`` cycles so that training ends at a low point."""
    start = 1.0 - settings.cyclic_fraction
    return start, settings.cyclic_fraction / (settings.cycles - 0.5)


@CYCLE_ENDS.register("cyclic")
def fge_cycle_ends(settings: TrainingSettings) -> list[float]:
    """Progress at the low point of each FGE cycle."""
    start, length = _cyclic_geometry(settings)
    ends = [start + (k + 0.5) * length for k in range(settings.cycles)]
    ends[-1] = 1.0
    return ends


@SCHEDULES.register("cyclic")
def cyclic(progress: float, settings: TrainingSettings) -> float:
    """Fast Geometric Ensembling (Garipov et al.): poly decay from ``initial_lr`` to ``cyclic_lr_high``
    over the first part, then short piecewise-linear cycles high -> low -> high."""
    hi, lo = settings.cyclic_lr_high, settings.cyclic_lr_low
    start, length = _cyclic_geometry(settings)
    if progress < start:
        return _poly_towards(hi, progress / start, settings)
    t = ((progress - start) / length) % 1.0
    if progress >= 1.0:
        t = 0.5
    return (1 - 2 * t) * hi + 2 * t * lo if t <= 0.5 else (2 - 2 * t) * lo + (2 * t - 1) * hi


def _poly_towards(target: float, t: float, settings: TrainingSettings) -> float:
    """Poly decay from ``initial_lr`` at ``t = 0`` to ``target`` at ``t = 1``."""
    return target + (settings.initial_lr - target) * (1 - t) ** settings.poly_exponent


@SCHEDULES.register("poly_constant")
def poly_constant(progress: float, settings: TrainingSettings) -> float:
    """SWA as Izmailov et al. run it: poly decay from ``initial_lr`` to ``swa_lr`` over the first
    ``1 - cyclic_fraction``, then the constant ``swa_lr`` while SWA averages every epoch end (no
    cycles, so no snapshots: ``loop.fit`` averages the epoch ends of the final ``cyclic_fraction``)."""
    start = 1.0 - settings.cyclic_fraction
    if progress < start:
        return _poly_towards(settings.swa_lr, progress / start, settings)
    return settings.swa_lr


def cycle_ends(settings: TrainingSettings) -> list[float]:
    """Where snapshots are taken: the cycle ends of a cyclic schedule, none for the others."""
    return CYCLE_ENDS.get(settings.schedule)(settings) if settings.schedule in CYCLE_ENDS else []


def learning_rate(progress: float, settings: TrainingSettings) -> float:
    """The schedule named in ``settings`` with an optional linear warm-up over its first fraction."""
    progress = min(max(progress, 0.0), 1.0)
    lr = SCHEDULES.get(settings.schedule)(progress, settings)
    if settings.warmup_fraction > 0 and progress < settings.warmup_fraction:
        lr *= progress / settings.warmup_fraction
    return lr


def training_progress(iteration: int, total_iterations: int, seconds: float, budget: float | None) -> float:
    """How far training is, in [0, 1]: the further of the iteration count and the time budget."""
    p = iteration / max(total_iterations, 1)
    if budget:
        p = max(p, seconds / budget)
    return min(p, 1.0)


SCHEDULE_PRESET_DIR = PRESET_DIR / "schedules"
SCHEDULE_PRESETS: Registry[Path] = Registry("schedule preset")
# one line per recipe; its settings live in plans/schedules/<name>.json
for _name in ("poly", "sgdr3", "sgdr-grow", "fge", "swa"):
    SCHEDULE_PRESETS.register(_name)(SCHEDULE_PRESET_DIR / f"{_name}.json")


def load_schedule_preset(name: str) -> dict[str, Any]:
    """A preset's training-setting overrides; unknown setting names are an error naming the file."""
    path = SCHEDULE_PRESETS.get(name)
    overrides = dict(read_json(path)["training"])
    from_dict(TrainingSettings, {**to_dict(TrainingSettings()), **overrides}, where=f"{path}:training")
    return overrides


def schedule_overrides(name: str) -> dict[str, Any]:
    """What ``--schedule NAME`` sets: a preset's whole recipe, else ``schedule = NAME`` for a registered
    schedule; neither: a KeyError listing both."""
    if name in SCHEDULE_PRESETS:
        return load_schedule_preset(name)
    if name in SCHEDULES:
        return {"schedule": name}
    raise KeyError(
        f"unknown schedule {name!r}; presets: {', '.join(SCHEDULE_PRESETS.names())}; "
        f"schedules: {', '.join(SCHEDULES.names())}"
    )
