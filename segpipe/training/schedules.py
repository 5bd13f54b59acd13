"""Learning-rate schedules: plain functions of training progress in [0, 1].

Progress is ``max(iterations done / total, seconds spent / budget)``, so one schedule works with an
iteration count and with a wall-clock budget alike. A schedule is a function ``(progress, settings)
-> lr`` registered with ``@SCHEDULES.register("name")``; a cyclic one also registers where its
cycles end (``@CYCLE_ENDS.register("name")``), which is where snapshots are taken.
"""

from __future__ import annotations

import math
from collections.abc import Callable

from segpipe.core.registry import Registry
from segpipe.planning.plans import TrainingSettings

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
        return hi + (settings.initial_lr - hi) * (1 - progress / start) ** settings.poly_exponent
    t = ((progress - start) / length) % 1.0
    if progress >= 1.0:
        t = 0.5
    return (1 - 2 * t) * hi + 2 * t * lo if t <= 0.5 else (2 - 2 * t) * lo + (2 * t - 1) * hi


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
