"""segpipe.augmentation.batched against the per-sample reference segpipe.augmentation.draw.apply on the same parameters.

Reference inputs are crops of each sample's own :func:`source_extent`; batched inputs are those crops
zero-padded to the batch extent, so both see the same data and must agree up to float rounding.
"""

from __future__ import annotations

import math
from dataclasses import replace

import numpy as np
import pytest
import torch

from segpipe.augmentation.batched import apply_batch, batch_extent, center_pad_or_crop, monai_affine_matrix
from segpipe.augmentation.draw import (
    AUGMENTATIONS,
    AugmentationConfig,
    Augmenter,
    AugmentParams,
    Geometry,
    apply,
    choose_geometry,
    source_extent,
)
from segpipe.training.sampling import crop_padded

PATCH = [16, 20, 12]
CHANNELS = 2
# float32 rounding only: the grids differ in the last bits (theta vs MONAI's matrix product), conv sums
# may be ordered differently; 1e-4 of the data range is two orders above what we see (~2e-6)
RTOL = 1e-4
LABEL_AGREEMENT = 0.995  # nearest-neighbour ties may round either way when coordinates differ by 1 ulp


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """Tiny tensors: with a busy CPU, intra-op threads cost far more than they save (~30x here)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def volume() -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(0)
    image = rng.normal(size=(CHANNELS, 64, 64, 52)).astype(np.float32)
    label = rng.integers(0, 3, size=(1, 64, 64, 52)).astype(np.int8)
    return image, label


def _centres(n: int, seed: int) -> list[np.ndarray]:
    rng = np.random.default_rng(seed)
    return [rng.integers(20, 32, size=3) for _ in range(n)]


def _run_both(volume, params: list[AugmentParams], centres: list[np.ndarray], patch=PATCH):
    """Reference outputs per sample, and the batched outputs on the same crops padded to the batch extent."""
    image, label = volume
    extent = batch_extent(patch, params)
    ref, imgs, labs = [], [], []
    for p, c in zip(params, centres):
        own = source_extent(patch, p)
        img, lab = torch.from_numpy(crop_padded(image, c, own)), torch.from_numpy(crop_padded(label, c, own))
        ref.append(apply(img.clone(), lab.clone(), p, patch))  # apply may write into a crop it only views
        imgs.append(center_pad_or_crop(img, extent))
        labs.append(center_pad_or_crop(lab, extent))
    out = apply_batch(torch.stack(imgs), torch.stack(labs), params, patch)
    return ref, out


def _assert_equivalent(ref, out) -> None:
    images, labels = out
    assert images.dtype == torch.float32 and labels.dtype == torch.int8
    assert images.is_contiguous() and labels.is_contiguous()
    for k, (ref_img, ref_lab) in enumerate(ref):
        scale = max(float(ref_img.max() - ref_img.min()), 1.0)
        diff = float((images[k] - ref_img).abs().max())
        assert diff <= RTOL * scale, f"sample {k}: max abs diff {diff:.3g} over range {scale:.3g}"
        agree = float((labels[k] == ref_lab).float().mean())
        assert agree >= LABEL_AGREEMENT, f"sample {k}: labels agree in {agree:.4f}"


ROT = [0.4, -0.3, 0.5]
SINGLE = {
    "rotation": [AugmentParams(rotation=ROT), AugmentParams(rotation=[-0.5, 0.2, 0.1]), AugmentParams()],
    "scale": [AugmentParams(scale=0.73), AugmentParams(scale=1.37), AugmentParams()],
    "rotation_scale": [AugmentParams(rotation=ROT, scale=1.21), AugmentParams(rotation=[0.1, 0.5, -0.2], scale=0.8)],
    "blur": [AugmentParams(blur_sigma=[0.55, None]), AugmentParams(blur_sigma=[0.9, 0.7]), AugmentParams()],
    "brightness": [AugmentParams(brightness=0.8), AugmentParams(brightness=1.2), AugmentParams()],
    "contrast": [AugmentParams(contrast=0.77), AugmentParams(contrast=1.23), AugmentParams()],
    "lowres": [AugmentParams(lowres_zoom=[0.5, None]), AugmentParams(lowres_zoom=[0.63, 0.91]), AugmentParams()],
    "gamma": [AugmentParams(gamma=0.75), AugmentParams(gamma=1.4), AugmentParams()],
    "gamma_inverted": [AugmentParams(inverted_gamma=0.8), AugmentParams(inverted_gamma=1.3, gamma=0.8)],
    "mirror": [AugmentParams(mirror=[0]), AugmentParams(mirror=[1, 2]), AugmentParams(mirror=[0, 1, 2])],
}


@pytest.mark.parametrize("name", sorted(SINGLE))
def test_single_transform_matches_reference(volume, name: str) -> None:
    params = SINGLE[name]
    _assert_equivalent(*_run_both(volume, params, _centres(len(params), seed=1)))


def test_drawn_batches_match_reference(volume) -> None:
    augmenter = Augmenter(AugmentationConfig(), CHANNELS)
    seen = set()
    for seed in range(24):
        rng = np.random.default_rng(seed)
        params = [augmenter.draw(rng) for _ in range(4)]
        for p in params:
            seen |= {k for k, v in vars(p).items() if v not in (None, False, []) and v != [None] * CHANNELS}
        _assert_equivalent(*_run_both(volume, params, _centres(4, seed)))
    assert seen >= {
        "rotation",
        "scale",
        "blur_sigma",
        "brightness",
        "contrast",
        "lowres_zoom",
        "gamma",
        "inverted_gamma",
        "mirror",
        "noise_std",
    }


def test_brightness_contrast_gamma_drawn_as_bgcontrast() -> None:
    """batchgeneratorsv2's BGContrast: half the draws in U(lo, 1), half in U(1, hi); the two gamma
    transforms are independent (both can apply: p = 0.1 x 0.3)."""
    config = AugmentationConfig(p_brightness=1.0, p_contrast=1.0, p_gamma_inverted=0.5, p_gamma=0.5)
    aug = Augmenter(config, 1)
    rng = np.random.default_rng(4)
    drawn = [aug.draw(rng) for _ in range(4000)]
    bright = np.array([p.brightness for p in drawn])
    assert 0.47 < np.mean(bright < 1) < 0.53  # half below 1, although (0.75, 1.25) is symmetric around 1 anyway
    assert bright.min() >= 0.75 and bright.max() <= 1.25
    gammas = np.array([p.gamma for p in drawn if p.gamma is not None])
    # U(0.7, 1.5) would put 3/8 below 1; BGContrast puts half there
    assert 0.46 < np.mean(gammas < 1) < 0.54
    both = np.mean([p.gamma is not None and p.inverted_gamma is not None for p in drawn])
    assert 0.22 < both < 0.28  # 0.5 x 0.5: independent, not exclusive


def test_blur_kernels_are_monais() -> None:
    """An impulse shows each kernel: MONAI's truncation (4 sigma) per sigma, not the batch's longest one."""
    images = torch.zeros(2, CHANNELS, *PATCH)
    images[:, :, 8, 10, 6] = 1.0
    images[:, :, 0, 0, 0] = 1.0  # and its zero-padded border
    labels = torch.zeros(2, 1, *PATCH, dtype=torch.int8)
    params = [AugmentParams(blur_sigma=[0.5, 0.55]), AugmentParams(blur_sigma=[1.0, 0.62])]
    out, _ = apply_batch(images, labels, params, PATCH)
    for k, p in enumerate(params):
        ref, _ = apply(images[k].clone(), labels[k].clone(), p, PATCH)
        assert float((out[k] - ref).abs().max()) <= 1e-7


def test_noise_has_the_drawn_std_and_replays_from_its_seed() -> None:
    images = torch.zeros(3, CHANNELS, *PATCH)
    labels = torch.zeros(3, 1, *PATCH, dtype=torch.int8)
    params = [AugmentParams(noise_std=0.3, noise_seed=1), AugmentParams(noise_std=0.1, noise_seed=2), AugmentParams()]
    out, _ = apply_batch(images, labels, params, PATCH)
    ref, _ = apply(images[0].clone(), labels[0].clone(), params[0], PATCH)
    # 7680 voxels per sample: the std estimate is within ~1 % of the truth
    assert float(out[0].std()) == pytest.approx(0.3, rel=0.04)
    assert float(out[1].std()) == pytest.approx(0.1, rel=0.04)
    assert torch.equal(out[0], ref)  # the same seed: the reference's noise, exactly
    assert torch.equal(out[2], torch.zeros_like(out[2]))
    again, _ = apply_batch(images, labels, params, PATCH)
    assert torch.equal(out, again)
    other, _ = apply_batch(images[:1], labels[:1], [AugmentParams(noise_std=0.3, noise_seed=7)], PATCH)
    assert not torch.equal(other[0], out[0])


def test_sample_without_params_is_the_exact_centre_crop(volume) -> None:
    image, label = volume
    # the rotated sample makes the batch extent larger than the patch, with odd and even differences
    params = [AugmentParams(rotation=ROT, scale=1.3), AugmentParams()]
    extent = batch_extent(PATCH, params)
    assert any((e - p) % 2 for e, p in zip(extent, PATCH)) and any((e - p) % 2 == 0 for e, p in zip(extent, PATCH))
    centres = _centres(2, seed=3)
    imgs = torch.stack([torch.from_numpy(crop_padded(image, c, extent)) for c in centres])
    labs = torch.stack([torch.from_numpy(crop_padded(label, c, extent)) for c in centres])
    before = imgs.clone()
    out, lab = apply_batch(imgs, labs, params, PATCH)
    assert torch.equal(out[1], torch.from_numpy(crop_padded(image, centres[1], PATCH)))
    assert torch.equal(lab[1], torch.from_numpy(crop_padded(label, centres[1], PATCH)))
    assert torch.equal(imgs, before), "inputs must not be modified"


def test_extra_channels_get_spatial_and_mirror_only(volume) -> None:
    image, label = volume
    rng = np.random.default_rng(5)
    one_hot = np.eye(3, dtype=np.float32)[rng.integers(0, 3, size=image.shape[1:])].transpose(3, 0, 1, 2)
    stacked = np.concatenate([image, one_hot])
    full = AugmentParams(
        rotation=ROT, scale=1.1, noise_std=0.2, blur_sigma=[0.7, 0.6], brightness=1.2, contrast=0.8,
        lowres_zoom=[0.6, 0.7], gamma=1.3, mirror=[1],
    )  # fmt: skip
    spatial_only = AugmentParams(rotation=ROT, scale=1.1, mirror=[1])
    extent = batch_extent(PATCH, [full])
    centre = np.array([30, 30, 26])
    imgs = torch.from_numpy(crop_padded(stacked, centre, extent))[None]
    labs = torch.from_numpy(crop_padded(label, centre, extent))[None]
    out, _ = apply_batch(imgs, labs, [full], PATCH, num_image_channels=CHANNELS)
    plain, _ = apply_batch(imgs, labs, [spatial_only], PATCH, num_image_channels=CHANNELS)
    extra = out[0, CHANNELS:]
    assert torch.equal(extra, plain[0, CHANNELS:])
    assert set(extra.unique().tolist()) <= {0.0, 1.0}
    # nearest neighbour: each voxel still carries exactly one class (the source crop covers the patch here)
    assert torch.equal(extra.sum(0), torch.ones_like(extra[0]))
    # and it is what the reference does to a label channel
    for k in range(3):
        ref_lab = apply(imgs[0, :CHANNELS].clone(), imgs[0, CHANNELS + k : CHANNELS + k + 1], spatial_only, PATCH)[1]
        assert float((extra[k] == ref_lab[0]).float().mean()) >= LABEL_AGREEMENT
    # image channels do not depend on the extra ones
    alone, _ = apply_batch(imgs[:, :CHANNELS], labs, [full], PATCH)
    with_extra, _ = apply_batch(imgs, labs, [full], PATCH, CHANNELS)
    assert torch.equal(alone, with_extra[:, :CHANNELS])


@pytest.mark.parametrize("size", [7, 8])
@pytest.mark.parametrize("target", [11, 12, 13])
def test_center_pad_or_crop_keeps_crop_padded_centre(volume, size: int, target: int) -> None:
    image = volume[0]
    centre = np.array([1, 30, 62])  # near both borders: crop_padded pads there too
    small = crop_padded(image, centre, [size] * 3)
    large = crop_padded(image, centre, [target] * 3)
    assert torch.equal(center_pad_or_crop(torch.from_numpy(large), [size] * 3), torch.from_numpy(small))
    padded = center_pad_or_crop(torch.from_numpy(small), [target] * 3)
    assert torch.equal(center_pad_or_crop(padded, [size] * 3), torch.from_numpy(small))
    assert float(padded.abs().sum()) == pytest.approx(float(np.abs(small).sum()), rel=1e-6)  # only zeros added


def test_batch_extent_is_the_largest_source_extent() -> None:
    params = [AugmentParams(), AugmentParams(rotation=ROT), AugmentParams(scale=1.4), AugmentParams(scale=0.7)]
    extents = np.array([source_extent(PATCH, p) for p in params])
    assert batch_extent(PATCH, params) == extents.max(0).tolist()
    assert batch_extent(PATCH, [AugmentParams(scale=0.5)]) == PATCH
    assert batch_extent(PATCH, []) == PATCH


@pytest.mark.parametrize("pad", [(0, 0, 0), (1, 2, 3), (4, 5, 1)])
def test_padding_to_a_larger_extent_keeps_alignment(volume, pad: tuple[int, int, int]) -> None:
    image, label = volume
    params = [AugmentParams(rotation=[0.2, -0.4, 0.3], scale=0.9, blur_sigma=[0.8, None], mirror=[2])]
    centre = np.array([30, 31, 25])
    own = source_extent(PATCH, params[0])
    img, lab = (
        torch.from_numpy(crop_padded(image, centre, own))[None],
        torch.from_numpy(crop_padded(label, centre, own))[None],
    )
    alone = apply_batch(img, lab, params, PATCH)
    larger = [e + d for e, d in zip(own, pad)]
    padded = apply_batch(center_pad_or_crop(img, larger), center_pad_or_crop(lab, larger), params, PATCH)
    assert float((alone[0] - padded[0]).abs().max()) <= 1e-4
    assert torch.equal(alone[1], padded[1])


def test_real_data_crop_of_the_batch_extent_equals_the_reference(volume) -> None:
    """With a crop of the batch extent taken from the case (what the sampler does), every voxel equals the
    reference: ``source_extent`` covers everything MONAI samples (it once used the rotations in the wrong
    order, ``Rz @ Ry @ Rx``, and was too small at angles like these), so no voxel reads the crop's padding."""
    image, label = volume
    patch = [24, 32, 24]
    params = [AugmentParams(rotation=[0.5, 0.5, 0.5], scale=1.2), AugmentParams(rotation=[-0.5, 0.1, 0.5])]
    extent = batch_extent(patch, params)
    centres = [np.array([31, 32, 26]), np.array([32, 31, 25])]
    out, _ = apply_batch(
        torch.stack([torch.from_numpy(crop_padded(image, c, extent)) for c in centres]),
        torch.stack([torch.from_numpy(crop_padded(label, c, extent)) for c in centres]),
        params,
        patch,
    )
    grid = np.stack(np.meshgrid(*[np.arange(p) - (p - 1) / 2 for p in patch], indexing="ij")).reshape(3, -1)
    outside_total = 0
    for k, (p, c) in enumerate(zip(params, centres)):
        own = np.array(source_extent(patch, p))
        ref, _ = apply(
            torch.from_numpy(crop_padded(image, c, own)), torch.from_numpy(crop_padded(label, c, own)), p, patch
        )
        src = monai_affine_matrix(p.rotation, p.scale) @ grid + ((own - 1) / 2)[:, None]
        outside = ((np.floor(src) < 0) | (np.floor(src) + 1 > (own - 1)[:, None])).any(0).reshape(patch)
        diff = (out[k] - ref).abs().amax(0).numpy()
        assert diff[~outside].max() <= RTOL * float(ref.max() - ref.min())
        outside_total += outside.sum()
    assert outside_total == 0, "source_extent must contain every voxel MONAI samples"


def test_monai_affine_matrix_is_a_scaled_rotation() -> None:
    m = monai_affine_matrix([0.3, -0.2, 0.1], 1.25)
    assert np.allclose(m @ m.T, 1.25**2 * np.eye(3))
    assert np.allclose(monai_affine_matrix(None, None), np.eye(3))
    half = math.pi / 2  # rotating about axis 2 by 90 degrees sends axis 1 into -axis 0
    assert np.allclose(monai_affine_matrix([0, 0, half], None) @ [0, 1, 0], [-1, 0, 0])


# ------------------------------------------------------------------ thick slices: dummy 2D and 2d


def test_geometry_follows_nnunet_rule() -> None:
    # nnU-Net: dummy 2D when max(patch) / patch[coarse] > 3 (strict); a 2d configuration is 2d
    assert choose_geometry([80, 80, 24], 2, None, 3.0) == Geometry("dummy_2d", 2)  # 80 / 24 = 3.33
    assert choose_geometry([72, 72, 24], 2, None, 3.0) == Geometry("3d")  # 72 / 24 = 3.0 is not > 3
    assert choose_geometry([40, 56, 40], 2, None, 3.0) == Geometry("3d")  # Hippocampus
    assert choose_geometry([24, 96, 96], 0, None, 3.0) == Geometry("dummy_2d", 0)
    assert choose_geometry([192, 160, 1], 2, 2, 3.0) == Geometry("2d", 2)


def test_dummy_2d_draws_in_plane_rotation_and_scale_only() -> None:
    config = AugmentationConfig(p_rotation=1.0, p_scale=1.0, p_lowres=1.0)
    aug = Augmenter(config, 1, geometry=Geometry("dummy_2d", 2), patch=[80, 80, 24])
    rng = np.random.default_rng(0)
    drawn = [aug.draw(rng) for _ in range(400)]
    angles = np.array([p.rotation for p in drawn])
    assert np.all(angles[:, :2] == 0) and np.abs(angles[:, 2]).max() <= math.pi
    assert np.abs(angles[:, 2]).max() > math.radians(150)  # +-180 deg, not 3D's +-30 deg
    assert all(p.scale[2] == 1.0 and p.scale[0] == p.scale[1] for p in drawn)
    assert all(p.lowres_keep_axis == 2 and p.blur_keep_axis is None for p in drawn)
    assert aug.mirror_axes == (0, 1, 2)  # nnU-Net mirrors all axes in dummy 2D too
    plain = Augmenter(config, 1, patch=[40, 56, 40])
    angles3 = np.array([plain.draw(rng).rotation for _ in range(200)])
    assert np.abs(angles3).max() <= math.radians(30) and np.all(np.abs(angles3).max(axis=0) > 0.3)


def test_2d_rotation_range_mirror_axes_and_blur_axis() -> None:
    config = AugmentationConfig(p_rotation=1.0, p_blur=1.0)
    square = Augmenter(config, 1, geometry=Geometry("2d", 1), patch=[64, 1, 64])
    elongated = Augmenter(config, 1, geometry=Geometry("2d", 1), patch=[160, 1, 64])  # 2.5 > 1.5
    rng = np.random.default_rng(1)
    wide = np.array([square.draw(rng).rotation for _ in range(300)])
    narrow = np.array([elongated.draw(rng).rotation for _ in range(300)])
    assert np.all(wide[:, [0, 2]] == 0) and np.abs(wide[:, 1]).max() > math.radians(150)
    assert np.abs(narrow[:, 1]).max() <= math.radians(15) + 1e-12
    assert square.mirror_axes == (0, 2)
    assert square.draw(rng).blur_keep_axis == 1
    assert Augmenter(AugmentationConfig(p_mirror=0.0), 1).mirror_axes == ()


def _slice_volume(axis: int) -> np.ndarray:
    """One channel whose every slice along ``axis`` is a constant 1..n: any mixing of slices shows."""
    shape = [160, 160, 160]
    values = np.arange(1, shape[axis] + 1, dtype=np.float32)
    view = [1, 1, 1]
    view[axis] = shape[axis]
    return np.broadcast_to(values.reshape(view), shape)[None].copy()


@pytest.mark.parametrize("axis", [0, 2])
def test_dummy_2d_augmentation_keeps_the_out_of_plane_axis_untouched(axis: int) -> None:
    """Rotation, scaling and low-resolution simulation in dummy 2D: output slice k along the coarse axis
    holds exactly the input slice it came from; the same draw in 3D mixes slices."""
    patch = [24, 80, 80] if axis == 0 else [80, 80, 24]
    config = replace(AUGMENTATIONS.get("none"), p_rotation=1.0, p_scale=1.0, p_lowres=1.0)
    aug = Augmenter(config, 1, geometry=Geometry("dummy_2d", axis), patch=patch)
    image = _slice_volume(axis)
    label = np.zeros((1, *image.shape[1:]), dtype=np.int8)
    rng = np.random.default_rng(2)
    params = [aug.draw(rng) for _ in range(3)]
    centre = np.array([80, 80, 80])
    extent = batch_extent(patch, params)
    assert extent[axis] == patch[axis]  # read as it is: no margin along the out-of-plane axis
    crops = torch.from_numpy(crop_padded(image, centre, extent))[None].repeat(3, 1, 1, 1, 1)
    labels = torch.from_numpy(crop_padded(label, centre, extent))[None].repeat(3, 1, 1, 1, 1)
    out, _ = apply_batch(crops, labels, params, patch)
    expected = crop_padded(image, centre, patch)[0]  # slice k's constant, before augmentation
    for k in range(3):
        np.testing.assert_allclose(out[k, 0].numpy(), expected, atol=1e-3)
        ref, _ = apply(
            torch.from_numpy(crop_padded(image, centre, source_extent(patch, params[k]))),
            torch.from_numpy(crop_padded(label, centre, source_extent(patch, params[k]))),
            params[k],
            patch,
        )
        assert float((ref[0] - out[k, 0]).abs().max()) <= RTOL * float(expected.max())
    mixed = AugmentParams(rotation=[0.3, 0.3, 0.3])  # what 3D augmentation draws
    src = source_extent(patch, mixed)
    out3, _ = apply_batch(
        torch.from_numpy(crop_padded(image, centre, src))[None],
        torch.from_numpy(crop_padded(label, centre, src))[None],
        [mixed],
        patch,
    )
    assert np.abs(out3[0, 0].numpy() - expected).max() > 1.0


def test_2d_blur_is_in_plane_and_batched_equals_reference(volume) -> None:
    """A one-slice patch blurred in-plane keeps its intensity level (a blur across a 1-voxel axis with
    zero padding would darken it), and the batched path equals MONAI's GaussianSmooth with sigma 0 there."""
    patch = [16, 1, 20]
    params = [
        AugmentParams(blur_sigma=[0.9, 0.6], blur_keep_axis=1, rotation=[0.0, 1.1, 0.0], scale=[1.2, 1.0, 1.2]),
        AugmentParams(blur_sigma=[None, 1.0], blur_keep_axis=1, lowres_zoom=[0.6, None], lowres_keep_axis=1),
    ]
    _assert_equivalent(*_run_both(volume, params, _centres(2, seed=9), patch=patch))
    flat = torch.ones(1, 1, 16, 1, 20)
    out, _ = apply_batch(
        flat, torch.zeros(1, 1, 16, 1, 20, dtype=torch.int8), [AugmentParams(blur_sigma=[1.0], blur_keep_axis=1)], patch
    )
    assert float(out[0, 0, 8, 0, 10]) == pytest.approx(1.0, abs=1e-3)  # interior: unchanged level


def test_outside_the_nonzero_mask_is_zero_after_augmentation(volume) -> None:
    """nnU-Net's MaskImageTransform + RemoveLabelTransform(-1 -> 0): wherever the (rotated) label says
    "outside the non-zero mask" (-1) the image is 0 in every channel, and the label is background."""
    image, label = volume
    label = label.copy()
    label[:, :, :30] = -1  # a third of the volume is outside the mask
    params = [AugmentParams(rotation=ROT, scale=1.1, brightness=1.2, noise_std=0.3, noise_seed=3), AugmentParams()]
    centres = [np.array([32, 30, 26]), np.array([32, 28, 26])]
    extent = batch_extent(PATCH, params)
    imgs = torch.stack([torch.from_numpy(crop_padded(image, c, extent)) for c in centres])
    labs = torch.stack([torch.from_numpy(crop_padded(label, c, extent)) for c in centres])
    spatial_only = [AugmentParams(rotation=ROT, scale=1.1), AugmentParams()]
    marked = torch.where(labs < 0, torch.full_like(labs, 9), labs)  # the -1 region as a label of its own
    _, where = apply_batch(imgs.clone(), marked, spatial_only, PATCH)
    outside = where == 9  # where the -1 region lands under the same rotation
    assert outside.any() and (~outside).any()
    out, lab = apply_batch(imgs, labs, params, PATCH)
    assert lab.min() >= 0 and lab.dtype == torch.int8
    mask = outside.expand_as(out)
    assert torch.all(out[mask] == 0) and torch.count_nonzero(out[~mask]) > 0.99 * (~mask).sum()
    ref, ref_lab = apply(
        torch.from_numpy(crop_padded(image, centres[0], source_extent(PATCH, params[0]))),
        torch.from_numpy(crop_padded(label, centres[0], source_extent(PATCH, params[0]))),
        params[0],
        PATCH,
    )
    assert torch.all(ref[outside[0].expand_as(ref)] == 0) and ref_lab.min() >= 0
