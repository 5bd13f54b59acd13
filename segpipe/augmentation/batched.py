"""Training augmentation for a whole batch at once, in torch, on whatever device the batch is on.

nnU-Net's training is often bound by CPU augmentation: every sample is rotated, scaled, blurred and
so on by itself in a data-loader worker (:func:`segpipe.augmentation.draw.apply`). This module applies the same
drawn :class:`~segpipe.augmentation.draw.AugmentParams` to a stacked batch: one ``affine_grid`` and one
``grid_sample`` per interpolation mode resample every rotated/scaled sample, and the intensity
transforms are batched tensor operations, so in the training process the per-sample CPU work becomes
a few GPU kernels (on CPU tensors, in workers, it is the same work, vectorised). On the same parameters
the result equals :func:`segpipe.augmentation.draw.apply` up to float rounding (noise included: each sample's
noise comes from its own drawn seed). The caller crops every sample around its patch centre to one common extent
(:func:`batch_extent`); :func:`center_pad_or_crop` keeps :func:`segpipe.training.sampling.crop_padded`'s centring.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from segpipe.augmentation.draw import (
    Augmenter,
    AugmentParams,
    adjust_contrast,
    adjust_gamma,
    noise_like,
    simulate_lowres,
    source_extent,
)
from segpipe.augmentation.masks import apply_mask_augmentation_batch

# MONAI GaussianSmooth's defaults: GaussianFilter(truncated=4.0, approx="erf")
_BLUR_TRUNCATED = 4.0


def batch_extent(patch: Sequence[int], params: Sequence[AugmentParams]) -> list[int]:
    """The common source extent of a batch: per axis, the largest :func:`source_extent` (at least ``patch``)."""
    extents = [source_extent(list(patch), p) for p in params]
    return [max(axis) for axis in zip(patch, *extents)]


def center_pad_or_crop(x: Tensor, extent: Sequence[int]) -> Tensor:
    """Zero-pad or crop the last ``len(extent)`` axes of ``x`` (``(C, X, Y, Z)`` or ``(B, C, X, Y, Z)``).

    Voxel ``size // 2`` lands on voxel ``extent // 2``: the convention of
    :func:`segpipe.training.sampling.crop_padded` (start = centre - size // 2), so ``crop_padded(a, c, e)`` padded to
    ``m`` equals ``crop_padded(a, c, m)`` wherever the latter lies inside ``a``, for odd and even sizes alike.
    """
    spatial = x.shape[x.dim() - len(extent) :]
    pads: list[int] = []
    for size, target in zip(reversed(spatial), reversed(list(extent))):  # F.pad lists the last axis first
        before = target // 2 - size // 2
        pads += [before, target - size - before]  # negative amounts crop
    return F.pad(x, pads)


def monai_affine_matrix(rotation: Sequence[float] | None, scale: float | Sequence[float] | None) -> np.ndarray:
    """The ``(3, 3)`` matrix of MONAI ``Affine(rotate_params=rotation, scale_params=scale)`` (one factor
    for all axes, or one per axis).

    It maps an output voxel's offset from the output centre ``(size - 1) / 2`` to the input offset from
    the input centre (in voxels): ``Rx(a) @ Ry(b) @ Rz(c) @ diag(s)`` (intrinsic x-y-z rotations), so a
    scale above 1 samples a larger region, i.e. shrinks the content. Note the order differs from
    :func:`segpipe.augmentation.draw._rotation_matrix` (``Rz @ Ry @ Rx``), which only sizes the source crop.
    """
    a, b, c = rotation if rotation is not None else (0.0, 0.0, 0.0)
    rx = np.array([[1, 0, 0], [0, math.cos(a), -math.sin(a)], [0, math.sin(a), math.cos(a)]])
    ry = np.array([[math.cos(b), 0, math.sin(b)], [0, 1, 0], [-math.sin(b), 0, math.cos(b)]])
    rz = np.array([[math.cos(c), -math.sin(c), 0], [math.sin(c), math.cos(c), 0], [0, 0, 1]])
    factors = np.ones(3) if scale is None else np.broadcast_to(np.asarray(scale, dtype=float), (3,))
    return rx @ ry @ rz @ np.diag(factors)


def affine_theta(params: Sequence[AugmentParams], patch: Sequence[int], src: Sequence[int]) -> Tensor:
    """``(N, 3, 4)`` float64 ``theta`` for ``F.affine_grid(align_corners=False)`` reproducing MONAI's ``Affine``.

    Sample ``n``'s own crop (extent ``e = source_extent(patch, params[n])``) sits inside the common ``src``
    crop at offset ``src // 2 - e // 2``, and MONAI rotates about that crop's centre ``(e - 1) / 2``; the
    output centre is ``(patch - 1) / 2``. ``affine_grid`` works in normalised coordinates
    (``(2 i + 1) / size - 1``) with the axes reversed (x = last axis), hence the rescaling and flips.
    """
    p, m = np.asarray(patch, dtype=float), np.asarray(src, dtype=float)
    thetas = []
    for prm in params:
        e = np.asarray(source_extent(list(patch), prm), dtype=float)
        centre = m // 2 - e // 2 + (e - 1) / 2  # rotation centre, in voxels of the common crop
        linear = monai_affine_matrix(prm.rotation, prm.scale) * p[None, :] / m[:, None]
        shift = (2 * centre + 1 - m) / m
        thetas.append(np.concatenate([linear[::-1, ::-1], shift[::-1, None]], axis=1))
    return torch.from_numpy(np.stack(thetas))


def apply_batch(
    images: Tensor,
    labels: Tensor,
    params: list[AugmentParams],
    patch: list[int],
    num_image_channels: int | None = None,
) -> tuple[Tensor, Tensor]:
    """Augment a batch as :func:`segpipe.augmentation.draw.apply` does each sample, on the tensors' device.

    ``images`` ``(B, C, *src)`` float and ``labels`` ``(B, 1, *src)`` (int8 or float) are crops centred
    on each sample's patch centre, all of one extent ``src`` (at least :func:`batch_extent`), made with
    :func:`segpipe.training.sampling.crop_padded` or :func:`center_pad_or_crop`. Channels from
    ``num_image_channels`` on (default: none) are segmentation-like inputs (the cascade's one-hot
    masks): they are rotated/scaled with nearest interpolation and mirrored, never intensity-augmented.
    Each sample's noise comes from its own ``noise_seed``. Returns ``images`` ``(B, C, *patch)`` float32
    and ``labels`` ``(B, 1, *patch)`` int8, both contiguous.
    """
    b, c = images.shape[:2]
    n_img = c if num_image_channels is None else num_image_channels
    if len(params) != b or labels.shape[:2] != (b, 1):
        raise ValueError(f"{b} images, {labels.shape[0]} labels of {labels.shape[1]} channel(s), {len(params)} params")
    if images.shape[2:] != labels.shape[2:] or any(s < p for s, p in zip(images.shape[2:], patch)):
        raise ValueError(f"source extents {list(images.shape[2:])} / {list(labels.shape[2:])} vs patch {patch}")
    # extra channels and label share the nearest-neighbour resampling
    seg = torch.cat([images[:, n_img:].float(), labels.float()], dim=1)
    image, seg = _spatial(images[:, :n_img].float(), seg, params, patch)
    image = _intensity(image.contiguous(), params)
    out = torch.cat([image, seg[:, :-1]], dim=1)
    label = seg[:, -1:]
    for axes in {tuple(p.mirror) for p in params if p.mirror}:
        idx = torch.tensor([i for i, p in enumerate(params) if tuple(p.mirror) == axes], device=out.device)
        dims = [a + 2 for a in axes]
        out[idx] = out[idx].flip(dims)
        label[idx] = label[idx].flip(dims)
    out, label = mask_outside(out, label, n_img)
    return out.contiguous(), label.round().to(_label_dtype(labels)).contiguous()


def mask_outside(images: Tensor, labels: Tensor, num_image_channels: int) -> tuple[Tensor, Tensor]:
    """Image channels set to 0 where the label marks "outside the non-zero mask" (< 0), that marker then
    made background: nnU-Net's MaskImageTransform + RemoveLabelTransform(-1, 0), after every other
    transform (it, too, masks every image channel). Works on one sample or a batch."""
    # no "if any": reading that back would wait for the device on every training step
    outside = labels < 0
    images = images.clone()
    images[..., :num_image_channels, :, :, :] = images[..., :num_image_channels, :, :, :].masked_fill(outside, 0)
    return images, labels.clamp_min(0)


def _label_dtype(labels: Tensor) -> torch.dtype:
    """Class maps keep their integer dtype (int8, or int16 beyond 127 classes); float input gives int8."""
    return torch.int8 if labels.is_floating_point() else labels.dtype


def _spatial(image: Tensor, seg: Tensor, params: list[AugmentParams], patch: list[int]) -> tuple[Tensor, Tensor]:
    """Rotate/scale the samples that have spatial params with one grid; centre-crop the others.

    Cropping (rather than an identity grid) keeps those samples bit-exact: with ``src - patch`` odd an
    identity grid would fall between voxels, and normalised coordinates are never exact anyway.
    """
    out_image, out_seg = center_pad_or_crop(image, patch), center_pad_or_crop(seg, patch)
    moved = [i for i, p in enumerate(params) if p.spatial]
    if not moved:
        return out_image, out_seg
    idx = torch.tensor(moved, device=image.device)
    theta = affine_theta([params[i] for i in moved], patch, image.shape[2:]).to(image.device, torch.float32)
    grid = F.affine_grid(theta, [len(moved), 1, *patch], align_corners=False)
    # zeros outside the crop and align_corners=False, as MONAI's Affine(padding_mode="zeros")
    warped = F.grid_sample(image[idx], grid, mode="bilinear", padding_mode="zeros", align_corners=False)
    warped_seg = F.grid_sample(seg[idx], grid, mode="nearest", padding_mode="zeros", align_corners=False)
    return out_image.index_copy(0, idx, warped), out_seg.index_copy(0, idx, warped_seg)


def _intensity(image: Tensor, params: list[AugmentParams]) -> Tensor:
    """Noise, blur, brightness, contrast, low resolution, gamma, in :func:`segpipe.augmentation.draw.apply`'s order.

    Works on the ``(B * C, *patch)`` rows (one per sample and channel), which is the layout augment.py's
    per-channel helpers already reduce over, so they are reused with per-row factors.
    """
    b, n_img, *patch = image.shape
    rows = image.view(b * n_img, *patch)
    dev = image.device

    def sample_rows(which: list[int]) -> Tensor:
        return torch.tensor([i * n_img + ch for i in which for ch in range(n_img)], device=dev, dtype=torch.long)

    def per_row(values: list[float]) -> Tensor:  # one value per sample -> (rows, 1, 1, 1)
        return torch.tensor(values, device=dev, dtype=torch.float32).repeat_interleave(n_img).view(-1, 1, 1, 1)

    noisy = [i for i, p in enumerate(params) if p.noise_std is not None]
    if noisy:  # each sample's noise from its own seed: equal to the reference's, replayable
        noise = torch.cat([noise_like(image[i], params[i].noise_seed) for i in noisy])
        idx = sample_rows(noisy)
        rows[idx] = rows[idx] + noise * per_row([params[i].noise_std for i in noisy])

    for keep in {p.blur_keep_axis for p in params}:  # one geometry per run: in practice a single group
        blurred = [
            (i * n_img + ch, s)
            for i, p in enumerate(params)
            if p.blur_keep_axis == keep
            for ch, s in enumerate(p.blur_sigma[:n_img])
            if s is not None
        ]
        if blurred:
            idx = torch.tensor([r for r, _ in blurred], device=dev)
            rows[idx] = _gaussian_smooth(rows[idx], [s for _, s in blurred], keep)

    bright = [i for i, p in enumerate(params) if p.brightness is not None]
    if bright:
        idx = sample_rows(bright)
        rows[idx] = rows[idx] * per_row([params[i].brightness for i in bright])

    contrast = [i for i, p in enumerate(params) if p.contrast is not None]
    if contrast:
        idx = sample_rows(contrast)
        rows[idx] = adjust_contrast(rows[idx], per_row([params[i].contrast for i in contrast]))  # type: ignore[arg-type]

    # each channel's own zoom gives its own low-res grid: one small interpolate pair per channel
    for i, p in enumerate(params):
        for ch, zoom in enumerate(p.lowres_zoom[:n_img]):
            if zoom is not None:
                rows[i * n_img + ch] = simulate_lowres(rows[i * n_img + ch], zoom, p.lowres_keep_axis)

    for field, inverted in (("inverted_gamma", True), ("gamma", False)):  # the reference's order
        which = [i for i, p in enumerate(params) if getattr(p, field) is not None]
        if which:
            idx = sample_rows(which)
            rows[idx] = adjust_gamma(rows[idx], per_row([getattr(params[i], field) for i in which]), inverted)
    return rows.view(b, n_img, *patch)


def _gaussian_smooth(rows: Tensor, sigmas: list[float], keep_axis: int | None = None) -> Tensor:
    """MONAI ``GaussianSmooth(sigma)`` on each row ``(N, X, Y, Z)`` with its own sigma, as one grouped conv per axis
    (none along ``keep_axis``: MONAI's sigma 0 there).

    MONAI's kernel (``gaussian_1d(approx="erf", truncated=4)``) holds the Gaussian's integral over each
    voxel, ``tail = int(max(4 sigma, 0.5) + 0.5)`` voxels each side, not renormalised; borders are zero-padded,
    axes filtered 0, 1, 2. Shorter kernels are zero-extended to the longest, which changes no sum.
    """
    n, dev = rows.shape[0], rows.device
    sigma = torch.tensor(sigmas, dtype=torch.float32, device=dev)  # float32 like MONAI, so same tails and kernels
    tails = torch.tensor([int(max(float(s) * _BLUR_TRUNCATED, 0.5) + 0.5) for s in sigma.tolist()], device=dev)
    tail = int(tails.max())
    x = torch.arange(-tail, tail + 1, dtype=torch.float32, device=dev)
    t = 0.70710678 / sigma[:, None]
    kernel = (0.5 * ((t * (x + 0.5)).erf() - (t * (x - 0.5)).erf())).clamp(min=0)
    kernel = torch.where(x.abs() <= tails[:, None], kernel, torch.zeros_like(kernel))
    out = rows[None]  # (1, N, X, Y, Z): one group per row
    for axis in range(3):
        if axis == keep_axis:
            continue
        shape = [n, 1, 1, 1, 1]
        shape[axis + 2] = 2 * tail + 1
        padding = [0, 0, 0]
        padding[axis] = tail
        out = F.conv3d(out, kernel.view(shape), padding=padding, groups=n)
    return out[0]


def augment_batch(
    augmenter: Augmenter,
    images: Tensor,
    labels: Tensor,
    params: list[AugmentParams],
    patch: list[int],
) -> tuple[Tensor, Tensor]:
    """The whole training augmentation of a batch: :func:`apply_batch`, then, for a cascade, the
    morphology and component removal of the one-hot channels on the whole (spatially transformed) patch."""
    images, labels = apply_batch(images, labels, params, patch, augmenter.num_channels)
    masks = [p.mask for p in params]
    if augmenter.num_mask_channels and any(m is not None and not m.is_identity for m in masks):
        c = augmenter.num_channels
        images[:, c:] = apply_mask_augmentation_batch(images[:, c:], masks)
    return images, labels
