"""The loss against nnU-Net's formulas worked by hand: Dice + CE, batch vs per-sample Dice, the ignore
label, deep supervision with downsampled targets and nnU-Net's weights."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from segpipe.inference.decode import decode_regions
from segpipe.networks.build import build_network, deep_supervision_weights
from segpipe.planning.plans import Configuration, Topology
from segpipe.training.losses import DiceCE, RegionDiceBCE, build_loss, downsample_target

SMOOTH = 1e-5


def _by_hand(probs: np.ndarray, target: np.ndarray, batch_dice: bool, mask: np.ndarray | None = None) -> float:
    """nnU-Net's MemoryEfficientSoftDiceLoss (foreground classes) + mean CE, in plain numpy loops."""
    b, c = probs.shape[:2]
    m = np.ones(target.shape, dtype=float) if mask is None else mask.astype(float)
    onehot = np.stack([(target == k) for k in range(c)], axis=1).astype(float)
    dcs = []
    if batch_dice:
        for k in range(1, c):
            i = (probs[:, k] * onehot[:, k] * m).sum()
            p, g = (probs[:, k] * m).sum(), (onehot[:, k] * m).sum()
            dcs.append((2 * i + SMOOTH) / (p + g + SMOOTH))
    else:
        for n in range(b):
            for k in range(1, c):
                i = (probs[n, k] * onehot[n, k] * m[n]).sum()
                p, g = (probs[n, k] * m[n]).sum(), (onehot[n, k] * m[n]).sum()
                dcs.append((2 * i + SMOOTH) / (p + g + SMOOTH))
    picked = np.take_along_axis(probs, target[:, None], axis=1)[:, 0]
    ce = -(np.log(picked) * m).sum() / m.sum()
    return ce - float(np.mean(dcs))


@pytest.mark.parametrize("batch_dice", [True, False])
def test_dice_ce_matches_nnunet_formula(batch_dice: bool) -> None:
    rng = np.random.default_rng(0)
    logits = rng.normal(size=(2, 3, 4, 5, 3)).astype(np.float32)
    target = rng.integers(0, 3, size=(2, 4, 5, 3))
    probs = np.exp(logits) / np.exp(logits).sum(axis=1, keepdims=True)
    loss = DiceCE(batch_dice)(torch.from_numpy(logits), torch.from_numpy(target[:, None]))
    assert float(loss) == pytest.approx(_by_hand(probs, target, batch_dice), rel=1e-5)


def test_ignore_label_is_in_no_term() -> None:
    """Class 3 (one past the 3 network classes) is ignore: the loss equals the by-hand value on the
    other voxels, and what the network outputs at ignored voxels changes nothing."""
    rng = np.random.default_rng(1)
    logits = rng.normal(size=(2, 3, 6, 4, 2)).astype(np.float32)
    target = rng.integers(0, 3, size=(2, 6, 4, 2))
    target[:, :2] = 3  # a slab without annotation
    probs = np.exp(logits) / np.exp(logits).sum(axis=1, keepdims=True)
    loss_fn = DiceCE(batch_dice=True, ignore_class=3)
    t = torch.from_numpy(target[:, None])
    loss = float(loss_fn(torch.from_numpy(logits), t))
    mask = target != 3
    assert loss == pytest.approx(_by_hand(probs, np.where(mask, target, 0), True, mask), rel=1e-5)
    changed = logits.copy()
    changed[:, :, :2] = rng.normal(size=changed[:, :, :2].shape) * 10
    assert float(loss_fn(torch.from_numpy(changed), t)) == pytest.approx(loss, rel=1e-6)
    # a batch that is all ignore: no cross-entropy (nnU-Net), the Dice term is the smoothing's -1
    assert float(loss_fn(torch.from_numpy(logits), torch.full_like(t, 3))) == pytest.approx(-1.0)


def test_nearest_exact_target_downsampling() -> None:
    # nearest-exact by 2 takes source index floor((j + 0.5) * 2) = 2j + 1
    target = torch.arange(8).view(1, 1, 8, 1, 1).expand(1, 1, 8, 2, 2).contiguous()
    down = downsample_target(target, (4, 1, 1))
    assert down[0, 0, :, 0, 0].tolist() == [1, 3, 5, 7]
    assert down.dtype == target.dtype


def test_deep_supervision_weights_are_nnunets() -> None:
    # nnU-Net, 5 stages: 4 outputs, weights 1, 1/2, 1/4, 0 normalized; segpipe builds the first three
    assert deep_supervision_weights(3).tolist() == pytest.approx([4 / 7, 2 / 7, 1 / 7])


def test_heads_at_their_own_resolution_and_the_weighted_sum() -> None:
    topo = Topology([[3, 3, 3]] * 5, [[1, 1, 1]] + [[2, 2, 2]] * 4, [8, 16, 16, 16, 16])
    config = Configuration("3d_fullres", [1, 1, 1], [32] * 3, [32, 32, 32], 2, topo, "3d_fullres")
    net = build_network(config, 1, 3, deep_supervision=True).train()
    heads = net(torch.randn(2, 1, 32, 32, 32))
    assert isinstance(heads, tuple) and [h.shape[2:] for h in heads] == [(32,) * 3, (16,) * 3, (8,) * 3]
    target = torch.randint(0, 3, (2, 1, 32, 32, 32))
    loss = build_loss("dice_ce", batch_dice=False)(heads, target)
    parts = [DiceCE(False)(h, downsample_target(target, h.shape[2:])) for h in heads]
    loss, parts = loss.detach(), [p.detach() for p in parts]
    assert float(loss) == pytest.approx(sum(w * float(p) for w, p in zip([4 / 7, 2 / 7, 1 / 7], parts)), rel=1e-5)
    assert not any("deep_supervision_heads" in k for k in build_network(config, 1, 3, False).state_dict())
    assert math.isfinite(float(loss))


def test_region_dice_bce_matches_nnunet_formula() -> None:
    """Regions {1, 2} and {2} of a class map; sigmoid Dice over both regions (no background) + BCE."""
    rng = np.random.default_rng(3)
    logits = rng.normal(size=(2, 2, 4, 3, 3)).astype(np.float32)
    target = rng.integers(0, 3, size=(2, 1, 4, 3, 3))
    regions = np.concatenate([np.isin(target, [1, 2]), target == 2], axis=1).astype(float)
    probs = 1 / (1 + np.exp(-logits))
    dcs = []
    for r in range(2):
        i, p, g = (probs[:, r] * regions[:, r]).sum(), probs[:, r].sum(), regions[:, r].sum()
        dcs.append((2 * i + SMOOTH) / (p + g + SMOOTH))
    bce = -(regions * np.log(probs) + (1 - regions) * np.log(1 - probs)).mean()
    loss = RegionDiceBCE(True, [[1, 2], [2]])(torch.from_numpy(logits), torch.from_numpy(target))
    assert float(loss) == pytest.approx(bce - np.mean(dcs), rel=1e-5)


def test_decode_regions_later_regions_win() -> None:
    probs = np.zeros((2, 3, 1, 1), dtype=np.float32)
    probs[0] = np.array([0.9, 0.9, 0.2]).reshape(3, 1, 1)  # "whole": voxels 0, 1
    probs[1] = np.array([0.1, 0.8, 0.7]).reshape(3, 1, 1)  # "core": voxels 1, 2 (2 outside "whole" too)
    assert decode_regions(probs, [1, 2]).ravel().tolist() == [1, 2, 2]
