"""Learning-rate schedules: plain functions of training progress in [0, 1].

Progress is ``max(iterations done / total, seconds spent / budget)``, so one schedule works with an
iteration count and with a wall-clock budget alike. A new schedule is one function plus
``@SCHEDULES.register("name")``.
"""

from __future__ import annotations

from collections.abc import Callable

from segpipe.plans import TrainingSettings
from segpipe.registry import Registry

Schedule = Callable[[float, TrainingSettings], float]
SCHEDULES: Registry[Schedule] = Registry("schedule")


@SCHEDULES.register("poly")
def poly(progress: float, settings: TrainingSettings) -> float:
    """nnU-Net's polynomial decay: ``lr0 * (1 - progress) ** exponent``; zero at the end."""
    return settings.initial_lr * max(0.0, 1.0 - progress) ** settings.poly_exponent


@SCHEDULES.register("constant")
def constant(progress: float, settings: TrainingSettings) -> float:
    return settings.initial_lr


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
