"""Resampling between a case's own spacing and a configuration's spacing.

Forward (preprocessing, numpy/scipy): images with 3rd-order splines, labels as linear interpolation
of one-hot maps then argmax; for anisotropic data the coarse axis is resampled separately with
order 0, as nnU-Net does. Backward (inference, torch): probabilities with order 1 on the device.
Both use the pixel-edge grid convention (scipy ``grid_mode=True`` = torch ``align_corners=False``)
so that forward and backward map voxel centres identically.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
import torch.nn.functional as F
from scipy import ndimage

ANISOTROPY_THRESHOLD = 3.0  # nnunetv2/configuration.py ANISO_THRESHOLD; plans carry their own value
OUTSIDE_MASK = -1  # label-map marker of background outside the non-zero mask (nnU-Net's -1)


def resampled_shape(shape: Sequence[int], spacing: Sequence[float], target: Sequence[float]) -> list[int]:
    """Shape after resampling from ``spacing`` to ``target`` (mm), at least 1 voxel per axis."""
    return [max(1, int(round(s * sp / t))) for s, sp, t in zip(shape, spacing, target)]


def separate_axis(
    spacing: Sequence[float], target: Sequence[float], threshold: float = ANISOTROPY_THRESHOLD
) -> int | None:
    """The coarse axis to resample on its own (order 0), or None for isotropic-enough data.

    nnU-Net's rule (nnunetv2/preprocessing/resampling/default_resampling.py,
    ``determine_do_sep_z_and_axis``): the source spacing decides if it is anisotropic (max / min above
    ``threshold``), else the target spacing; the separate axis is the coarsest one, and when two or
    three axes share the coarsest spacing no axis is resampled separately.
    """
    for sp in (spacing, target):
        if max(sp) / min(sp) > threshold:
            coarsest = [a for a, v in enumerate(sp) if v == max(sp)]
            return coarsest[0] if len(coarsest) == 1 else None
    return None


def _zoom(volume: np.ndarray, shape: Sequence[int], order: int) -> np.ndarray:
    factors = [n / o for n, o in zip(shape, volume.shape)]
    out = ndimage.zoom(volume, factors, order=order, mode="nearest", grid_mode=True, prefilter=order > 1)
    assert out.shape == tuple(shape), (out.shape, shape)
    return out


def _resample_volume(volume: np.ndarray, shape: Sequence[int], order: int, axis: int | None) -> np.ndarray:
    if tuple(shape) == volume.shape:
        return volume
    if axis is None:
        return _zoom(volume, shape, order)
    in_plane = [s for a, s in enumerate(shape) if a != axis]
    moved = np.moveaxis(volume, axis, 0)
    slices = np.stack([_zoom(s, in_plane, order) for s in moved])
    slices = _zoom(slices, [shape[axis], *in_plane], 0) if slices.shape[0] != shape[axis] else slices
    return np.moveaxis(slices, 0, axis)


def resample_image(
    image: np.ndarray,
    spacing: Sequence[float],
    target: Sequence[float],
    order: int = 3,
    threshold: float = ANISOTROPY_THRESHOLD,
) -> np.ndarray:
    """Resample a ``(C, X, Y, Z)`` image from ``spacing`` to ``target`` mm (``threshold``: see
    :func:`separate_axis`)."""
    shape = resampled_shape(image.shape[1:], spacing, target)
    axis = separate_axis(spacing, target, threshold)
    return np.stack([_resample_volume(c, shape, order, axis) for c in image]).astype(np.float32, copy=False)


def resample_label(
    label: np.ndarray,
    spacing: Sequence[float],
    target: Sequence[float],
    num_classes: int,
    threshold: float = ANISOTROPY_THRESHOLD,
) -> np.ndarray:
    """Resample an ``(X, Y, Z)`` label map: linear interpolation of each class's mask, then argmax."""
    shape = resampled_shape(label.shape, spacing, target)
    if tuple(shape) == label.shape:
        return label
    axis = separate_axis(spacing, target, threshold)
    best = np.zeros(shape, dtype=np.float32)
    out = np.zeros(shape, dtype=label.dtype)
    values = [*range(num_classes), *([OUTSIDE_MASK] if (label == OUTSIDE_MASK).any() else [])]
    for c in values:
        prob = _resample_volume((label == c).astype(np.float32), shape, 1, axis)
        better = prob > best
        out[better] = c
        best[better] = prob[better]
    return out


def resample_probabilities(probs: torch.Tensor, shape: Sequence[int]) -> torch.Tensor:
    """Resample ``(C, X, Y, Z)`` class probabilities to ``shape`` with trilinear interpolation."""
    if tuple(probs.shape[1:]) == tuple(shape):
        return probs
    return F.interpolate(probs[None].float(), size=tuple(shape), mode="trilinear", align_corners=False)[0]
