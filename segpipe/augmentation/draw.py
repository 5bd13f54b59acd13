"""Training augmentation: what is drawn, and the per-sample reference that defines what it does.

Each random transform first draws its parameters (:meth:`Augmenter.draw`, from a seeded numpy
generator, in the data-loader workers); deterministic functions apply them. Parameters are plain
dataclasses (noise included: it has its own seed), so any augmentation can be logged and replayed
exactly. Probabilities follow nnU-Net's defaults. Training applies them to whole batches with
:mod:`segpipe.augmentation.batched`; :func:`apply` here does one sample with MONAI's deterministic ``Affine``
and ``GaussianSmooth`` and is the reference the batched path is tested against. The spatial part
samples the rotated/scaled patch from a larger crop (:func:`source_extent` says how large).
"""

from __future__ import annotations

import itertools
import math
from dataclasses import dataclass, field

import numpy as np
import torch
import torch.nn.functional as F
from monai.transforms import Affine, GaussianSmooth

from segpipe.augmentation.masks import MaskAugmentationConfig, MaskAugmentParams, draw_mask_params
from segpipe.core.registry import Registry


@dataclass
class AugmentationConfig:
    """Probabilities and ranges (nnU-Net's defaults)."""

    p_rotation: float = 0.2
    rotation_deg: float = 30.0
    p_scale: float = 0.2
    scale_range: tuple[float, float] = (0.7, 1.4)
    p_noise: float = 0.1
    noise_variance: tuple[float, float] = (0.0, 0.1)
    p_blur: float = 0.2
    blur_sigma: tuple[float, float] = (0.5, 1.0)
    p_brightness: float = 0.15
    brightness_range: tuple[float, float] = (0.75, 1.25)
    p_contrast: float = 0.15
    contrast_range: tuple[float, float] = (0.75, 1.25)
    p_lowres: float = 0.25
    lowres_zoom: tuple[float, float] = (0.5, 1.0)
    p_gamma_inverted: float = 0.1
    p_gamma: float = 0.3
    gamma_range: tuple[float, float] = (0.7, 1.5)
    p_mirror: float = 0.5
    mirror_axes: tuple[int, ...] = (0, 1, 2)
    mask: MaskAugmentationConfig = field(default_factory=MaskAugmentationConfig)  # cascade stage-1 channels


AUGMENTATIONS: Registry[AugmentationConfig] = Registry("augmentation preset")
AUGMENTATIONS.register("default")(AugmentationConfig())
AUGMENTATIONS.register("none")(
    AugmentationConfig(
        p_rotation=0,
        p_scale=0,
        p_noise=0,
        p_blur=0,
        p_brightness=0,
        p_contrast=0,
        p_lowres=0,
        p_gamma_inverted=0,
        p_gamma=0,
        p_mirror=0,
        mask=MaskAugmentationConfig(p_morphology=0, p_component_removal=0),
    )
)


@dataclass
class AugmentParams:
    """One sample's drawn parameters; ``None`` means the transform is not applied."""

    rotation: list[float] | None = None  # radians about axes 0, 1, 2
    scale: float | None = None
    noise_std: float | None = None
    noise_seed: int = 0  # the noise's own generator seed, so the noise too replays exactly
    blur_sigma: list[float | None] = field(default_factory=list)  # per channel
    brightness: float | None = None
    contrast: float | None = None
    lowres_zoom: list[float | None] = field(default_factory=list)  # per channel
    gamma: float | None = None
    gamma_inverted: bool = False
    mirror: list[int] = field(default_factory=list)
    mask: MaskAugmentParams | None = None  # cascade: morphology / component removal of the one-hot channels

    @property
    def spatial(self) -> bool:
        return self.rotation is not None or self.scale is not None


def _rotation_matrix(angles: list[float]) -> np.ndarray:
    a, b, c = angles
    rx = np.array([[1, 0, 0], [0, math.cos(a), -math.sin(a)], [0, math.sin(a), math.cos(a)]])
    ry = np.array([[math.cos(b), 0, math.sin(b)], [0, 1, 0], [-math.sin(b), 0, math.cos(b)]])
    rz = np.array([[math.cos(c), -math.sin(c), 0], [math.sin(c), math.cos(c), 0], [0, 0, 1]])
    return rx @ ry @ rz  # MONAI Affine's order (create_rotate), so source_extent covers what it samples


def source_extent(patch: list[int], params: AugmentParams) -> list[int]:
    """Size of the crop that contains every voxel the rotated/scaled patch samples (+ margin)."""
    if not params.spatial:
        return list(patch)
    m = _rotation_matrix(params.rotation or [0.0, 0.0, 0.0]) * (params.scale or 1.0)
    corners = np.array(list(itertools.product(*[(-p / 2, p / 2) for p in patch]))).T
    extent = np.abs(m @ corners).max(axis=1) * 2
    return [int(math.ceil(e)) + 2 for e in extent]


class Augmenter:
    """Draws :class:`AugmentParams` for patches of ``num_channels`` image channels followed by
    ``num_mask_channels`` one-hot mask channels (the cascade's stage-1 segmentation)."""

    def __init__(self, config: AugmentationConfig, num_channels: int, num_mask_channels: int = 0):
        self.config = config
        self.num_channels = num_channels
        self.num_mask_channels = num_mask_channels

    def draw(self, rng: np.random.Generator) -> AugmentParams:
        c = self.config
        u = rng.uniform
        p = AugmentParams()
        if rng.random() < c.p_rotation:
            r = math.radians(c.rotation_deg)
            p.rotation = [float(u(-r, r)) for _ in range(3)]
        if rng.random() < c.p_scale:
            p.scale = float(u(*c.scale_range))
        if rng.random() < c.p_noise:
            p.noise_std = float(math.sqrt(u(*c.noise_variance)))
            p.noise_seed = int(rng.integers(2**31))
        blur = rng.random() < c.p_blur
        p.blur_sigma = [
            float(u(*c.blur_sigma)) if blur and rng.random() < 0.5 else None for _ in range(self.num_channels)
        ]
        if rng.random() < c.p_brightness:
            p.brightness = float(u(*c.brightness_range))
        if rng.random() < c.p_contrast:
            p.contrast = float(u(*c.contrast_range))
        lowres = rng.random() < c.p_lowres
        p.lowres_zoom = [
            float(u(*c.lowres_zoom)) if lowres and rng.random() < 0.5 else None for _ in range(self.num_channels)
        ]
        if rng.random() < c.p_gamma_inverted:
            p.gamma, p.gamma_inverted = self._gamma(rng), True
        elif rng.random() < c.p_gamma:
            p.gamma = self._gamma(rng)
        p.mirror = [a for a in c.mirror_axes if rng.random() < c.p_mirror]
        if self.num_mask_channels:
            p.mask = draw_mask_params(c.mask, rng, self.num_mask_channels)
        return p

    def _gamma(self, rng: np.random.Generator) -> float:
        lo, hi = self.config.gamma_range
        # half the draws below 1, half above, as nnU-Net
        return float(rng.uniform(lo, 1.0) if rng.random() < 0.5 and lo < 1 else rng.uniform(max(lo, 1.0), hi))


def apply(
    image: torch.Tensor, label: torch.Tensor, params: AugmentParams, patch: list[int]
) -> tuple[torch.Tensor, torch.Tensor]:
    """Apply drawn parameters. ``image`` ``(C, ...)`` float and ``label`` ``(1, ...)`` are the crops of
    size :func:`source_extent` centred on the patch centre; returns patch-sized tensors."""
    if params.spatial:
        affine_kw = dict(
            rotate_params=params.rotation or [0.0, 0.0, 0.0],
            scale_params=[params.scale or 1.0] * 3,
            spatial_size=patch,
            padding_mode="zeros",
            image_only=True,
        )
        image = Affine(mode="bilinear", **affine_kw)(image)
        label = Affine(mode="nearest", **affine_kw)(label.float())
        image, label = torch.as_tensor(image), torch.as_tensor(label)
    else:
        image, label = _center_crop(image, patch), _center_crop(label, patch)
    image = image.float()
    if params.noise_std is not None:
        image = image + noise_like(image, params.noise_seed) * params.noise_std
    for ch, sigma in enumerate(params.blur_sigma):
        if sigma is not None:
            image[ch] = torch.as_tensor(GaussianSmooth(sigma=sigma)(image[ch : ch + 1]))[0]
    if params.brightness is not None:
        image = image * params.brightness
    if params.contrast is not None:
        image = adjust_contrast(image, params.contrast)
    for ch, zoom in enumerate(params.lowres_zoom):
        if zoom is not None:
            image[ch] = simulate_lowres(image[ch], zoom)
    if params.gamma is not None:
        image = adjust_gamma(image, params.gamma, params.gamma_inverted)
    if params.mirror:
        dims = [a + 1 for a in params.mirror]
        image, label = image.flip(dims), label.flip(dims)
    return image.contiguous(), label.round().to(torch.int8).contiguous()


def noise_like(x: torch.Tensor, seed: int) -> torch.Tensor:
    """Standard normal noise shaped like ``x``, on its device, from its own generator seeded by ``seed``
    (the same numbers wherever it is drawn on that kind of device: workers or training process)."""
    generator = torch.Generator(device=x.device).manual_seed(seed)
    return torch.randn(x.shape, generator=generator, device=x.device, dtype=x.dtype)


def _center_crop(x: torch.Tensor, patch: list[int]) -> torch.Tensor:
    starts = [(s - p) // 2 for s, p in zip(x.shape[1:], patch)]
    return x[(slice(None), *[slice(st, st + p) for st, p in zip(starts, patch)])]


def adjust_contrast(image: torch.Tensor, factor: float) -> torch.Tensor:
    # scale around each channel's mean, keeping its value range (nnU-Net's ContrastAugmentation)
    dims = tuple(range(1, image.dim()))
    mean = image.mean(dim=dims, keepdim=True)
    lo, hi = image.amin(dim=dims, keepdim=True), image.amax(dim=dims, keepdim=True)
    return torch.maximum(torch.minimum((image - mean) * factor + mean, hi), lo)


def simulate_lowres(channel: torch.Tensor, zoom: float) -> torch.Tensor:
    shape = channel.shape
    small = [max(1, round(s * zoom)) for s in shape]
    down = F.interpolate(channel[None, None], size=small, mode="nearest")
    return F.interpolate(down, size=tuple(shape), mode="trilinear", align_corners=False)[0, 0]


def adjust_gamma(image: torch.Tensor, gamma: float, inverted: bool) -> torch.Tensor:
    # gamma on the [0, 1]-rescaled image, restoring mean and std afterwards (retain_stats)
    sign = -1.0 if inverted else 1.0
    x = image * sign
    dims = tuple(range(1, image.dim()))
    mean, std = x.mean(dim=dims, keepdim=True), x.std(dim=dims, keepdim=True)
    lo, hi = x.amin(dim=dims, keepdim=True), x.amax(dim=dims, keepdim=True)
    rng = (hi - lo).clamp_min(1e-7)
    y = ((x - lo) / rng).clamp(0, 1) ** gamma * rng + lo
    y = (y - y.mean(dim=dims, keepdim=True)) / y.std(dim=dims, keepdim=True).clamp_min(1e-7) * std + mean
    return y * sign
