"""Sliding-window inference: window positions, Gaussian weights, mirroring, accumulation.

Small pure pieces, each testable on its own; :mod:`segpipe.inference.predict` strings them together with
preprocessing and resampling back. Arrays are ``(C, X, Y, Z)``.

Why our own and not ``monai.inferers.sliding_window_inference``: we need nnU-Net's window placement
(steps spread evenly so the edge windows touch the borders), all mirrorings of a window batched
into one forward pass, and softmax averaging over windows, mirrors and models in one accumulator
that can live on the CPU when the device is too small.
"""

from __future__ import annotations

import itertools
import logging
import math
from collections.abc import Callable, Sequence
from functools import lru_cache

import numpy as np
import torch
import torch.nn.functional as F
from scipy.ndimage import gaussian_filter
from torch import nn

log = logging.getLogger("segpipe")

# Use at most this fraction of the device's free memory for one case's accumulators; the rest is
# for the network's activations and the allocator's slack.
DEVICE_MEMORY_FRACTION = 0.6


def window_starts(size: int, patch: int, step: float) -> list[int]:
    """Start indices along one axis: windows overlap by ``1 - step`` of the patch at least, are spread
    evenly, and the first and last touch the borders."""
    if size <= patch:
        return [0]
    # at least one voxel per step: a one-slice patch (the 2d configuration) visits every slice once
    n = math.ceil((size - patch) / max(patch * step, 1)) + 1
    stride = (size - patch) / (n - 1)
    return [int(round(i * stride)) for i in range(n)]


def window_slices(shape: Sequence[int], patch: Sequence[int], step: float) -> list[tuple[slice, ...]]:
    """All windows covering ``shape`` (spatial), as slice tuples."""
    axes = [window_starts(s, p, step) for s, p in zip(shape, patch)]
    return [tuple(slice(st, st + p) for st, p in zip(starts, patch)) for starts in itertools.product(*axes)]


@lru_cache(maxsize=8)
def _gaussian(patch: tuple[int, ...], sigma_scale: float) -> np.ndarray:
    impulse = np.zeros(patch, dtype=np.float64)
    impulse[tuple(p // 2 for p in patch)] = 1
    g = gaussian_filter(impulse, [p * sigma_scale for p in patch], mode="constant", cval=0)
    g = g / g.max()
    g[g == 0] = g[g > 0].min()  # no zero weights: every voxel must receive some prediction
    return g.astype(np.float32)


def gaussian_importance(patch: Sequence[int], sigma_scale: float = 1 / 8) -> torch.Tensor:
    """Gaussian importance map of a window (max 1, sigma = ``sigma_scale`` x patch size)."""
    return torch.from_numpy(_gaussian(tuple(int(p) for p in patch), sigma_scale))


def mirror_combinations(axes: Sequence[int]) -> list[tuple[int, ...]]:
    """Every subset of the mirror axes, the identity first (8 for three axes)."""
    return [c for r in range(len(axes) + 1) for c in itertools.combinations(axes, r)]


def pad_to_patch(image: torch.Tensor, patch: Sequence[int]) -> tuple[torch.Tensor, tuple[slice, ...]]:
    """Zero-pad ``(C, X, Y, Z)`` symmetrically to at least ``patch``; returns the crop back."""
    pads, crop = [], []
    for size, p in zip(image.shape[1:], patch):
        total = max(p - size, 0)
        pads.append((total // 2, total - total // 2))
        crop.append(slice(total // 2, total // 2 + size))
    flat = [v for lo_hi in reversed(pads) for v in lo_hi]
    return (F.pad(image, flat) if any(flat) else image), tuple(crop)


def accumulator_bytes(shape: Sequence[int], num_classes: int, num_channels: int) -> int:
    """Bytes that one case's sliding-window state takes on the accumulating device: the summed
    probabilities (``num_classes`` float32 volumes), the summed weights (one) and the image
    (``num_channels``), for a padded spatial ``shape``."""
    return 4 * math.prod(int(s) for s in shape) * (num_classes + 1 + num_channels)


def forward_batch_bytes(
    patch: Sequence[int],
    features: Sequence[int],
    strides: Sequence[Sequence[int]],
    num_channels: int,
    num_classes: int,
    batch: int,
) -> int:
    """Bytes one forward pass of ``batch`` windows (every mirroring counts) takes on the device in
    inference (float32, nothing kept for backward): the input, the logits and their softmax, and the
    activations: every encoder stage's output is kept for its skip connection while two full-resolution
    feature maps are alive at the top of the decoder."""
    voxels = math.prod(int(p) for p in patch)
    skips, scale = 0.0, [1] * len(patch)
    for stride, feat in zip(strides, features):
        scale = [a * b for a, b in zip(scale, stride)]
        skips += feat * voxels / math.prod(scale)
    per_window = voxels * (num_channels + 2 * num_classes) + skips + 2 * features[0] * voxels
    return int(4 * batch * per_window)


def choose_accumulation_device(
    need_bytes: int, device: torch.device | str, memory_limit_bytes: int | None = None
) -> torch.device:
    """Where to keep a case's accumulators: ``device`` when ``need_bytes`` fit, else the CPU (logged).

    They fit when ``need_bytes`` (see :func:`accumulator_bytes`) is at most ``memory_limit_bytes`` (a
    forced limit, checked whatever the device) or, without a limit, at most
    ``DEVICE_MEMORY_FRACTION`` of a CUDA device's free memory; on the CPU nothing is checked.
    With the CPU accumulating, only window batches and the network live on the device.
    """
    device = torch.device(device)
    if memory_limit_bytes is not None:
        available = float(memory_limit_bytes)
    elif device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        cached = torch.cuda.memory_reserved(device) - torch.cuda.memory_allocated(device)  # reusable by torch
        available = (free + cached) * DEVICE_MEMORY_FRACTION
    else:
        return device
    if need_bytes <= available:
        return device
    log.warning(
        "accumulating on the CPU: need %.2f GB, device %s has %.2f GB for this case",
        need_bytes / 1e9,
        device,
        available / 1e9,
    )
    return torch.device("cpu")


def _mirrored_probabilities(
    model: nn.Module,
    padded: torch.Tensor,
    chunk: list[tuple[slice, ...]],
    mirrors: list[tuple[int, ...]],
    device: torch.device,
    amp_dtype: torch.dtype | None,
    sigmoid: bool,
) -> torch.Tensor:
    """The windows of ``chunk``, each in every mirroring, through the network in one forward pass;
    returns ``(len(chunk), C, *patch)`` probabilities summed over the un-mirrored mirrorings."""
    x = torch.stack([padded[(slice(None), *w)] for w in chunk]).to(device)
    xin = torch.cat([x.flip([a + 2 for a in axes]) if axes else x for axes in mirrors])
    with torch.autocast(device.type, dtype=amp_dtype, enabled=amp_dtype is not None):
        logits = model(xin)
    # softmax over classes, or one sigmoid per region (region-based training)
    p = (torch.sigmoid(logits.float()) if sigmoid else torch.softmax(logits.float(), dim=1)).split(len(chunk))
    return sum(pm.flip([a + 2 for a in axes]) if axes else pm for axes, pm in zip(mirrors, p))


def release_cached_memory(device: torch.device) -> None:
    """Give the failed batch's cached blocks back before the retry (CUDA keeps them otherwise)."""
    if device.type == "cuda":
        torch.cuda.empty_cache()


@torch.inference_mode()
def predict_probabilities(
    model: nn.Module | Callable[[torch.Tensor], torch.Tensor],
    image: torch.Tensor,
    patch: Sequence[int],
    num_classes: int,
    step: float = 0.5,
    mirror_axes: Sequence[int] = (0, 1, 2),
    device: torch.device | str = "cpu",
    batch_windows: int = 1,
    accumulate_on: torch.device | str | None = None,
    amp_dtype: torch.dtype | None = None,
    sigmoid: bool = False,
) -> torch.Tensor:
    """Softmax probabilities ``(num_classes, X, Y, Z)`` of ``image`` ``(C, X, Y, Z)`` (``sigmoid``: one
    independent probability per output channel, for regions).

    ``model``: a module, or any backend's runner (:mod:`segpipe.inference.backends`).
    ``batch_windows`` windows, each in every mirroring, go through the network in one batch; the
    softmax of each mirroring is un-mirrored, averaged and added with Gaussian weight, and the sum is
    divided by the summed weights. A batch that runs out of device memory is retried with half the
    windows (down to one, for the rest of the case); the result is the same. ``accumulate_on`` places
    the accumulators and the image (default: ``device``), e.g. the CPU for volumes too large for the GPU (see
    :func:`choose_accumulation_device`); each window batch then travels to ``device`` and back.
    """
    device = torch.device(device)
    acc_device = torch.device(accumulate_on) if accumulate_on is not None else device
    padded, crop = pad_to_patch(image, patch)
    shape = padded.shape[1:]
    weight = gaussian_importance(patch).to(device)
    acc_weight = weight.to(acc_device)
    mirrors = mirror_combinations(mirror_axes)
    window_weight = weight / len(mirrors)  # Gaussian weight and the mean over mirrorings, in one factor
    probs = torch.zeros((num_classes, *shape), dtype=torch.float32, device=acc_device)
    weights = torch.zeros(shape, dtype=torch.float32, device=acc_device)
    windows = window_slices(shape, patch, step)
    padded = padded.to(acc_device)
    first, size = 0, max(1, batch_windows)
    while first < len(windows):
        chunk = windows[first : first + size]
        try:
            summed = _mirrored_probabilities(model, padded, chunk, mirrors, device, amp_dtype, sigmoid) * window_weight
        except torch.OutOfMemoryError:
            if size == 1:
                raise  # one window does not fit: the caller moves the accumulators, then the case, to the CPU
            size = max(1, len(chunk) // 2)
            release_cached_memory(device)
            log.warning("out of device memory with %d windows a batch: retrying with %d", len(chunk), size)
            continue
        for w, s in zip(chunk, summed):
            probs[(slice(None), *w)] += s.to(acc_device)
            weights[w] += acc_weight
        first += len(chunk)
    probs /= weights
    return probs[(slice(None), *crop)]
