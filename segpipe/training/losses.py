"""Training loss: soft Dice + cross-entropy over the deep-supervision heads, as nnU-Net v2 computes it.

nnU-Net's rules (nnunetv2/training/loss/compound_losses.py ``DC_and_CE_loss``, dice.py
``MemoryEfficientSoftDiceLoss``, nnunetv2/training/nnUNetTrainer/nnUNetTrainer.py ``_build_loss``):
Dice over the foreground classes of the softmax, smooth 1e-5 above and below, summed over the batch
("batch Dice") or per sample as the plans say, plus cross-entropy, weights 1 and 1. Voxels of the
``ignore`` label count in neither term. Deep supervision: every decoder head at its own resolution,
the targets downsampled to it with nearest-exact, weights halving per level, normalized (the lowest
level, whose weight nnU-Net sets to 0, is not built at all: see :mod:`segpipe.networks.build`).

Written here rather than taken from MONAI's ``DiceCELoss`` because the ignore label needs one voxel
mask in both terms, which MONAI's Dice losses do not accept.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from segpipe.core.registry import Registry
from segpipe.networks.build import deep_supervision_weights

SMOOTH = 1e-5


def soft_dice_loss(
    probs: Tensor, onehot: Tensor, mask: Tensor | None, batch_dice: bool, smooth: float = SMOOTH
) -> Tensor:
    """``-mean(dc)`` with ``dc = (2 I + smooth) / max(P + G + smooth, 1e-8)`` per class (``batch_dice``:
    sums over the batch too, else per sample and class). ``probs``, ``onehot``: ``(B, K, ...)``; ``mask``
    ``(B, 1, ...)`` of voxels that count, or None."""
    if mask is not None:
        probs, onehot = probs * mask, onehot * mask
    axes = tuple(range(2, probs.dim()))
    intersect, pred, ref = (probs * onehot).sum(axes), probs.sum(axes), onehot.sum(axes)
    if batch_dice:
        intersect, pred, ref = intersect.sum(0), pred.sum(0), ref.sum(0)
    return -((2 * intersect + smooth) / (pred + ref + smooth).clamp_min(1e-8)).mean()


class DiceCE(nn.Module):
    """Soft Dice of the foreground classes + cross-entropy, on ``logits (B, C, ...)`` and class-index
    ``target (B, 1, ...)``; target value ``ignore_class`` (if set) is masked out of both. ``top_k``
    (a fraction): the cross-entropy of only the hardest voxels (nnU-Net's ``DC_and_topk_loss``, 10%)."""

    def __init__(
        self,
        batch_dice: bool,
        ignore_class: int | None = None,
        weight_ce: float = 1.0,
        weight_dice: float = 1.0,
        top_k: float | None = None,
    ):
        super().__init__()
        self.batch_dice = batch_dice
        self.ignore_class = ignore_class
        self.weight_ce, self.weight_dice = weight_ce, weight_dice  # nnU-Net's DC_and_CE_loss weights
        self.top_k = top_k

    def forward(self, logits: Tensor, target: Tensor) -> Tensor:
        logits, target = logits.float(), target.long()
        mask = None
        if self.ignore_class is not None:
            mask = target != self.ignore_class
            target = torch.where(mask, target, torch.zeros_like(target))
        num_classes = logits.shape[1]
        onehot = torch.zeros_like(logits).scatter_(1, target, 1.0)
        probs = torch.softmax(logits, dim=1)
        m = mask.to(logits.dtype) if mask is not None else None
        dice = soft_dice_loss(probs[:, 1:], onehot[:, 1:], m, self.batch_dice) if num_classes > 1 else logits.sum() * 0
        ce_target = target[:, 0] if mask is None else torch.where(mask[:, 0], target[:, 0], -100)
        if self.top_k is None:
            # mean over the counted voxels; 0 when the whole batch is ignored (nnU-Net: no CE then),
            # without reading the count back from the device
            counted = mask.sum() if mask is not None else torch.tensor(float(ce_target.numel()), device=logits.device)
            ce = F.cross_entropy(logits, ce_target, ignore_index=-100, reduction="sum") / counted.clamp_min(1)
        else:  # nnunetv2/training/loss/robust_ce_loss.py TopKLoss: mean CE of the k% largest voxel losses
            per_voxel = F.cross_entropy(logits, ce_target, ignore_index=-100, reduction="none").flatten()
            if mask is not None:
                per_voxel = per_voxel[mask[:, 0].flatten()]
            k = int(per_voxel.numel() * self.top_k)
            ce = per_voxel.topk(max(1, k), sorted=False).values.mean() if per_voxel.numel() else logits.sum() * 0
        return self.weight_ce * ce + self.weight_dice * dice


class RegionDiceBCE(nn.Module):
    """Region-based training (nnU-Net's ``DC_and_BCE_loss``): one sigmoid output per region; target
    channel ``r`` is "the class map holds one of ``region_classes[r]``"; soft Dice over every region
    (no background channel) + binary cross-entropy, both without the ``ignore_class`` voxels (BCE as the
    mean over the counted voxels and regions; nnU-Net's masked BCE is that times the number of regions)."""

    def __init__(self, batch_dice: bool, region_classes: Sequence[Sequence[int]], ignore_class: int | None = None):
        super().__init__()
        self.batch_dice = batch_dice
        self.region_classes = [list(r) for r in region_classes]
        self.ignore_class = ignore_class

    def regions_of(self, target: Tensor) -> Tensor:
        """``(B, R, ...)`` float region masks of a class-index ``target (B, 1, ...)``."""
        return torch.cat(
            [torch.isin(target, torch.tensor(r, device=target.device)) for r in self.region_classes], dim=1
        ).float()

    def forward(self, logits: Tensor, target: Tensor) -> Tensor:
        logits, target = logits.float(), target.long()
        regions = self.regions_of(target)
        mask = (target != self.ignore_class).float() if self.ignore_class is not None else None
        dice = soft_dice_loss(torch.sigmoid(logits), regions, mask, self.batch_dice)
        bce = F.binary_cross_entropy_with_logits(logits, regions, reduction="none")
        if mask is None:
            return bce.mean() + dice
        counted = mask.sum() * logits.shape[1]
        return (bce * mask).sum() / counted.clamp_min(1.0) + dice


def downsample_target(target: Tensor, shape: Sequence[int]) -> Tensor:
    """Class-index ``target (B, 1, ...)`` at a deep-supervision head's ``shape``: nearest-exact, as
    nnU-Net's ``DownsampleSegForDSTransform`` (batchgeneratorsv2)."""
    if tuple(target.shape[2:]) == tuple(shape):
        return target
    return F.interpolate(target.float(), size=tuple(shape), mode="nearest-exact").to(target.dtype)


class DeepSupervisionLoss(nn.Module):
    """``loss`` over the heads: a tuple of logits, full resolution first (training with deep
    supervision), or one logits tensor (validation, no deep supervision)."""

    def __init__(self, loss: nn.Module):
        super().__init__()
        self.loss = loss

    def forward(self, logits: Tensor | Sequence[Tensor], target: Tensor) -> Tensor:
        if isinstance(logits, Tensor):
            return self.loss(logits, target)
        weights = deep_supervision_weights(len(logits))
        return sum(
            float(w) * self.loss(head, downsample_target(target, head.shape[2:])) for w, head in zip(weights, logits)
        )


LOSSES: Registry[Callable[..., nn.Module]] = Registry("loss", entry_point_group="segpipe.losses")


@LOSSES.register("dice_ce")
def dice_ce(batch_dice: bool, ignore_class: int | None, region_classes: Sequence[Sequence[int]] | None) -> nn.Module:
    """nnU-Net's default: Dice + cross-entropy, or Dice + BCE for regions."""
    if region_classes:
        return RegionDiceBCE(batch_dice, region_classes, ignore_class)
    return DiceCE(batch_dice, ignore_class)


@LOSSES.register("dice_topk")
def dice_topk(batch_dice: bool, ignore_class: int | None, region_classes: Sequence[Sequence[int]] | None) -> nn.Module:
    """nnU-Net's ``nnUNetTrainerDiceTopK10Loss``: Dice + the cross-entropy of the hardest 10% of voxels."""
    if region_classes:
        raise ValueError("loss 'dice_topk' is for label training; regions train with 'dice_ce' (Dice + BCE)")
    return DiceCE(batch_dice, ignore_class, top_k=0.10)


def build_loss(
    name: str,
    batch_dice: bool,
    ignore_class: int | None = None,
    region_classes: Sequence[Sequence[int]] | None = None,
) -> nn.Module:
    """The training loss ``name`` (see :data:`LOSSES`) over the deep-supervision heads."""
    return DeepSupervisionLoss(LOSSES.get(name)(batch_dice, ignore_class, region_classes))
