"""Training augmentation: what is drawn, and the per-sample reference that defines what it does.

Each random transform first draws its parameters (:meth:`Augmenter.draw`, from a seeded numpy
generator, in the data-loader workers); deterministic functions apply them. Parameters are plain
dataclasses (noise included: it has its own seed), so any augmentation can be logged and replayed
exactly. Probabilities follow nnU-Net's defaults. Training applies them to whole batches with
:mod:`segpipe.augmentation.batched`; :func:`apply` here does one sample with MONAI's deterministic ``Affine``
and ``GaussianSmooth`` and is the reference the batched path is tested against. The spatial part
samples the rotated/scaled patch from a larger crop (:func:`source_extent` says how large).

Three geometries (:class:`Geometry`), as nnU-Net's ``configure_rotation_dummyDA_mirroring_and_inital_patch_size``
(nnunetv2/training/nnUNetTrainer/nnUNetTrainer.py) chooses them: ``3d`` rotates about all three axes;
``dummy_2d`` (a 3d patch more than ``anisotropy_threshold`` times longer in-plane than along the coarse
axis: thick slices) rotates (+-180 deg) and scales in-plane only and never resamples along the coarse
axis, so the slices are not sheared into each other; ``2d`` (the 2d configuration: one-slice patches)
does the same and also blurs and mirrors in-plane only.
"""

from __future__ import annotations

import itertools
import math
from dataclasses import dataclass, field, replace

import numpy as np
import torch
import torch.nn.functional as F
from monai.transforms import Affine, GaussianSmooth

from segpipe.augmentation.masks import MaskAugmentationConfig, MaskAugmentParams, draw_mask_params
from segpipe.core.registry import Registry


@dataclass(frozen=True)
class Geometry:
    """How spatial augmentation treats the axes: ``kind`` is ``3d``, ``dummy_2d`` or ``2d``; ``axis`` is
    the out-of-plane axis (the coarse or sliced one) for the two 2D kinds."""

    kind: str = "3d"
    axis: int | None = None

    @property
    def in_plane(self) -> bool:
        return self.kind in ("dummy_2d", "2d")


def choose_geometry(patch: list[int], coarse_axis: int, slice_axis: int | None, threshold: float) -> Geometry:
    """nnU-Net's rule: a 2d configuration is ``2d``; a 3d patch is ``dummy_2d`` when its longest axis is
    more than ``threshold`` times its extent along the coarse axis (``max(patch) / patch[0] > 3`` in
    nnU-Net's transposed axes, where axis 0 is the coarse one), else ``3d``."""
    if slice_axis is not None:
        return Geometry("2d", slice_axis)
    if max(patch) / patch[coarse_axis] > threshold:
        return Geometry("dummy_2d", coarse_axis)
    return Geometry("3d")


@dataclass
class AugmentationConfig:
    """Probabilities and ranges (nnU-Net's defaults)."""

    p_rotation: float = 0.2
    rotation_deg: float = 30.0  # 3d: about each axis
    rotation_deg_in_plane: float = 180.0  # dummy_2d and 2d
    rotation_deg_elongated_2d: float = 15.0  # 2d patches more than 1.5 times longer one way than the other
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


# The per-sample probabilities of the intensity and spatial transforms (mirroring and the cascade's
# mask transforms keep theirs): what the strength presets below scale.
STRENGTH_PROBABILITIES = (
    "p_rotation",
    "p_scale",
    "p_noise",
    "p_blur",
    "p_brightness",
    "p_contrast",
    "p_lowres",
    "p_gamma_inverted",
    "p_gamma",
)


def with_strength(config: AugmentationConfig, factor: float) -> AugmentationConfig:
    """``config`` with every transform probability of :data:`STRENGTH_PROBABILITIES` times ``factor``
    (capped at 1): one knob for the augmentation strength, for presets and searches."""
    return replace(config, **{k: min(1.0, getattr(config, k) * factor) for k in STRENGTH_PROBABILITIES})


AUGMENTATIONS: Registry[AugmentationConfig] = Registry("augmentation preset")
AUGMENTATIONS.register("default")(AugmentationConfig())
AUGMENTATIONS.register("light")(with_strength(AugmentationConfig(), 0.5))
AUGMENTATIONS.register("strong")(with_strength(AugmentationConfig(), 1.5))
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
    scale: float | list[float] | None = None  # one factor for all axes, or one per axis
    noise_std: float | None = None
    noise_seed: int = 0  # the noise's own generator seed, so the noise too replays exactly
    blur_sigma: list[float | None] = field(default_factory=list)  # per channel
    brightness: float | None = None
    contrast: float | None = None
    lowres_zoom: list[float | None] = field(default_factory=list)  # per channel
    inverted_gamma: float | None = None  # gamma on the negated image (nnU-Net's first GammaTransform)
    gamma: float | None = None  # then plain gamma, drawn independently (its second)
    mirror: list[int] = field(default_factory=list)
    mask: MaskAugmentParams | None = None  # cascade: morphology / component removal of the one-hot channels
    lowres_keep_axis: int | None = None  # low-resolution simulation leaves this axis alone (2d, dummy_2d)
    blur_keep_axis: int | None = None  # blur leaves this axis alone (2d: a one-slice patch)

    @property
    def spatial(self) -> bool:
        return self.rotation is not None or self.scale is not None

    @property
    def scale_vector(self) -> list[float]:
        if self.scale is None:
            return [1.0, 1.0, 1.0]
        return [float(v) for v in self.scale] if isinstance(self.scale, list) else [float(self.scale)] * 3


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
    m = _rotation_matrix(params.rotation or [0.0, 0.0, 0.0]) * np.array(params.scale_vector)[None, :]
    corners = np.array(list(itertools.product(*[(-p / 2, p / 2) for p in patch]))).T
    extent = np.abs(m @ corners).max(axis=1) * 2
    # an axis the transform leaves alone (dummy 2D's out-of-plane axis) is read as it is: no margin,
    # so its voxels are sampled exactly at their centres and slices never mix
    fixed = np.isclose(m, np.eye(3)).all(axis=1) & np.isclose(m, np.eye(3)).all(axis=0)
    return [int(p) if f else int(math.ceil(e)) + 2 for p, e, f in zip(patch, extent, fixed)]


class Augmenter:
    """Draws :class:`AugmentParams` for patches of ``num_channels`` image channels followed by
    ``num_mask_channels`` one-hot mask channels (the cascade's stage-1 segmentation)."""

    def __init__(
        self,
        config: AugmentationConfig,
        num_channels: int,
        num_mask_channels: int = 0,
        geometry: Geometry = Geometry(),
        patch: list[int] | None = None,
    ):
        self.config = config
        self.num_channels = num_channels
        self.num_mask_channels = num_mask_channels
        self.geometry = geometry
        self.patch = patch

    @property
    def mirror_axes(self) -> tuple[int, ...]:
        """The axes training mirrors, and so the axes prediction may mirror (nnU-Net's
        ``inference_allowed_mirroring_axes``): in-plane only for 2d, none when mirroring is off."""
        if self.config.p_mirror <= 0:
            return ()
        g = self.geometry
        return tuple(a for a in self.config.mirror_axes if not (g.kind == "2d" and a == g.axis))

    def _rotation(self, rng: np.random.Generator) -> list[float]:
        g, c = self.geometry, self.config
        if not g.in_plane:
            r = math.radians(c.rotation_deg)
            return [float(rng.uniform(-r, r)) for _ in range(3)]
        degrees = c.rotation_deg_in_plane
        if g.kind == "2d" and self.patch is not None:
            plane = [p for a, p in enumerate(self.patch) if a != g.axis]
            if max(plane) / min(plane) > 1.5:
                degrees = c.rotation_deg_elongated_2d
        angles = [0.0, 0.0, 0.0]
        angles[g.axis] = float(rng.uniform(-math.radians(degrees), math.radians(degrees)))  # type: ignore[index]
        return angles

    def _per_channel(
        self, rng: np.random.Generator, p_sample: float, value_range: tuple[float, float]
    ) -> list[float | None]:
        """With ``p_sample`` per sample, then 0.5 per channel (nnU-Net's p_per_channel): a value per channel."""
        chosen = rng.random() < p_sample
        return [
            float(rng.uniform(*value_range)) if chosen and rng.random() < 0.5 else None
            for _ in range(self.num_channels)
        ]

    def draw(self, rng: np.random.Generator) -> AugmentParams:
        c, g = self.config, self.geometry
        u = rng.uniform
        p = AugmentParams(
            lowres_keep_axis=g.axis if g.in_plane else None, blur_keep_axis=g.axis if g.kind == "2d" else None
        )
        if rng.random() < c.p_rotation:
            p.rotation = self._rotation(rng)
        if rng.random() < c.p_scale:
            factor = float(u(*c.scale_range))
            p.scale = [1.0 if a == g.axis else factor for a in range(3)] if g.in_plane else factor
        if rng.random() < c.p_noise:
            p.noise_std = float(math.sqrt(u(*c.noise_variance)))
            p.noise_seed = int(rng.integers(2**31))
        p.blur_sigma = self._per_channel(rng, c.p_blur, c.blur_sigma)
        if rng.random() < c.p_brightness:
            p.brightness = bg_contrast_factor(rng, c.brightness_range)
        if rng.random() < c.p_contrast:
            p.contrast = bg_contrast_factor(rng, c.contrast_range)
        p.lowres_zoom = self._per_channel(rng, c.p_lowres, c.lowres_zoom)
        # two independent transforms, as nnU-Net's get_training_transforms: inverted (p 0.1), then plain (p 0.3)
        if rng.random() < c.p_gamma_inverted:
            p.inverted_gamma = bg_contrast_factor(rng, c.gamma_range)
        if rng.random() < c.p_gamma:
            p.gamma = bg_contrast_factor(rng, c.gamma_range)
        p.mirror = [a for a in self.mirror_axes if rng.random() < c.p_mirror]
        if self.num_mask_channels:
            p.mask = draw_mask_params(c.mask, rng, self.num_mask_channels)
        return p


def bg_contrast_factor(rng: np.random.Generator, value_range: tuple[float, float]) -> float:
    """A factor drawn as batchgeneratorsv2's ``BGContrast`` draws brightness, contrast and gamma
    (transforms/intensity/contrast.py): half the time U(lo, 1), else U(max(lo, 1), hi)."""
    lo, hi = value_range
    if rng.random() < 0.5 and lo < 1:
        return float(rng.uniform(lo, 1.0))
    return float(rng.uniform(max(lo, 1.0), hi))


def apply(
    image: torch.Tensor, label: torch.Tensor, params: AugmentParams, patch: list[int]
) -> tuple[torch.Tensor, torch.Tensor]:
    """Apply drawn parameters. ``image`` ``(C, ...)`` float and ``label`` ``(1, ...)`` are the crops of
    size :func:`source_extent` centred on the patch centre; returns patch-sized tensors."""
    dtype = torch.int8 if label.is_floating_point() else label.dtype  # the class map's own (int8 / int16)
    if params.spatial:
        affine_kw = dict(
            rotate_params=params.rotation or [0.0, 0.0, 0.0],
            scale_params=params.scale_vector,
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
            sigmas = [0.0 if a == params.blur_keep_axis else sigma for a in range(3)]
            image[ch] = torch.as_tensor(GaussianSmooth(sigma=sigmas)(image[ch : ch + 1]))[0]
    if params.brightness is not None:
        image = image * params.brightness
    if params.contrast is not None:
        image = adjust_contrast(image, params.contrast)
    for ch, zoom in enumerate(params.lowres_zoom):
        if zoom is not None:
            image[ch] = simulate_lowres(image[ch], zoom, params.lowres_keep_axis)
    if params.inverted_gamma is not None:
        image = adjust_gamma(image, params.inverted_gamma, True)
    if params.gamma is not None:
        image = adjust_gamma(image, params.gamma, False)
    if params.mirror:
        dims = [a + 1 for a in params.mirror]
        image, label = image.flip(dims), label.flip(dims)
    outside = label < 0  # nnU-Net's MaskImageTransform: image 0 outside the non-zero mask, then label 0
    if bool(outside.any()):
        image = image.masked_fill(outside, 0)
        label = label.clamp_min(0)
    return image.contiguous(), label.round().to(dtype).contiguous()


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


def simulate_lowres(channel: torch.Tensor, zoom: float, keep_axis: int | None = None) -> torch.Tensor:
    # nearest down, trilinear up; never along ``keep_axis`` (nnU-Net's ignore_axes for dummy 2D)
    shape = channel.shape
    small = [s if a == keep_axis else max(1, round(s * zoom)) for a, s in enumerate(shape)]
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
