"""Optimizers by name (``TrainingSettings.optimizer``): one function and one registry line each.

``sgd`` is nnU-Net's (nnunetv2/training/nnUNetTrainer/nnUNetTrainer.py ``configure_optimizers``: SGD,
Nesterov momentum 0.99, weight decay 3e-5, initial LR 0.01); ``adamw`` is PyTorch's AdamW with the
settings' LR and weight decay (give it a smaller ``--lr``, e.g. 1e-3). The LR schedule sets the LR
of every group each iteration, whatever the optimizer.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable

import torch

from segpipe.core.registry import Registry
from segpipe.planning.plans import TrainingSettings

OptimizerBuilder = Callable[[Iterable[torch.nn.Parameter], TrainingSettings], torch.optim.Optimizer]
OPTIMIZERS: Registry[OptimizerBuilder] = Registry("optimizer", entry_point_group="segpipe.optimizers")


@OPTIMIZERS.register("sgd")
def sgd(params: Iterable[torch.nn.Parameter], s: TrainingSettings) -> torch.optim.Optimizer:
    return torch.optim.SGD(
        params, lr=s.initial_lr, momentum=s.momentum, weight_decay=s.weight_decay, nesterov=s.nesterov
    )


@OPTIMIZERS.register("adamw")
def adamw(params: Iterable[torch.nn.Parameter], s: TrainingSettings) -> torch.optim.Optimizer:
    return torch.optim.AdamW(params, lr=s.initial_lr, weight_decay=s.weight_decay)
