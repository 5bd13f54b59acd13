"""Training loss: Dice + cross-entropy (MONAI's DiceCELoss) over the deep-supervision heads."""

from __future__ import annotations

import torch
from monai.losses import DiceCELoss
from torch import nn

from segpipe.networks.build import deep_supervision_weights


class DeepSupervisionDiceCE(nn.Module):
    """Soft Dice (foreground classes, batch Dice) + cross-entropy, weighted over heads.

    ``logits``: ``(B, H, C, X, Y, Z)`` with heads, or ``(B, C, X, Y, Z)``; ``target``: ``(B, 1, X, Y, Z)``
    integer labels.
    """

    def __init__(self) -> None:
        super().__init__()
        self.dice_ce = DiceCELoss(
            include_background=False, to_onehot_y=True, softmax=True, batch=True, smooth_nr=1e-5, smooth_dr=1e-5
        )

    def forward(self, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        if logits.dim() == target.dim():
            return self.dice_ce(logits.float(), target)
        weights = deep_supervision_weights(logits.shape[1]).to(logits.device)
        return sum(w * self.dice_ce(logits[:, i].float(), target) for i, w in enumerate(weights))
