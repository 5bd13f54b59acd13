"""The cascade's one-hot segmentation augmentation: exactness against scipy, one-hot, removal, draw rates."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from scipy import ndimage
from skimage.morphology import ball

from segpipe.augmentation.masks import (
    OPERATIONS,
    MaskAugmentationConfig,
    MaskAugmentParams,
    apply_mask_augmentation,
    apply_mask_augmentation_batch,
    draw_mask_params,
    morphology,
)

FULL = ndimage.generate_binary_structure(3, 3)


def reference_morphology(mask: np.ndarray, operation: str, radius: int) -> np.ndarray:
    """scipy's binary operators with ``ball(radius)``; outside the patch is background for dilation and
    foreground for erosion (``border_value=1``: skimage's default mode, which nnU-Net uses)."""
    footprint = ball(radius).astype(bool)

    def dilate(m: np.ndarray) -> np.ndarray:
        return ndimage.binary_dilation(m, structure=footprint)

    def erode(m: np.ndarray) -> np.ndarray:
        return ndimage.binary_erosion(m, structure=footprint, border_value=1)

    steps = {"dilation": [dilate], "erosion": [erode], "opening": [erode, dilate], "closing": [dilate, erode]}
    for step in steps[operation]:
        mask = step(mask)
    return mask


def blobs(shape: tuple[int, ...], seed: int, level: float) -> np.ndarray:
    """Random smooth blobs (threshold ``level`` in standard deviations of the smoothed noise)."""
    smooth = ndimage.gaussian_filter(np.random.default_rng(seed).standard_normal(shape), 2.0)
    return smooth / smooth.std() > level


def blobs_and_ellipsoid(shape: tuple[int, ...], seed: int) -> np.ndarray:
    """Blobs over about 40% of the patch, cut by every face, plus a central ellipsoid so r = 8 erodes."""
    idx = np.indices(shape)
    ellipsoid = sum(((idx[a] - (shape[a] - 1) / 2) / (0.4 * shape[a])) ** 2 for a in range(3)) <= 1
    return blobs(shape, seed, 0.3) | ellipsoid


def label_map(shape: tuple[int, ...], labels: int, seed: int) -> np.ndarray:
    """One-hot ``(labels, ...)`` bool of a random smooth label map with about 40% background."""
    noise = ndimage.gaussian_filter(np.random.default_rng(seed).standard_normal((labels + 1, *shape)), (0, 2, 2, 2))
    noise /= noise.std(axis=(1, 2, 3), keepdims=True)
    noise[0] += 0.3
    winner = noise.argmax(axis=0)
    onehot = np.stack([winner == c + 1 for c in range(labels)])
    assert 0.3 < (winner == 0).mean() < 0.55 and onehot.mean(axis=(1, 2, 3)).min() > 0.1
    return onehot


def reference_apply(onehot: np.ndarray, params: MaskAugmentParams) -> np.ndarray:
    """The augmentation written plainly with scipy, to compare the production path against."""
    masks = onehot.astype(bool)
    for channel, operation, radius in params.morphology:
        result = reference_morphology(masks[channel], operation, radius)
        gained = result & ~masks[channel]
        masks[:, gained] = False
        masks[channel] = result
    for channel, u in params.component_removal:
        labels, n = ndimage.label(masks[channel], structure=FULL)
        sizes = np.bincount(labels.ravel(), minlength=n + 1)[1:]
        eligible = [i + 1 for i in range(n) if sizes[i] < params.max_component_fraction * masks[channel].size]
        if eligible:
            masks[channel][labels == eligible[int(u * len(eligible))]] = False
    return masks


def assert_onehot(x: np.ndarray) -> None:
    assert set(np.unique(x).tolist()) <= {0, 1}
    assert x.astype(np.int64).sum(axis=0).max() <= 1


# --- exactness of the production operators -------------------------------------------------------------


@pytest.mark.parametrize("operation", OPERATIONS)
def test_operators_equal_scipy_with_skimage_ball(operation: str) -> None:
    for seed, (shape, radii) in enumerate([((26, 30, 22), (1, 2, 3, 5)), ((30, 34, 28), (1, 8))]):
        dense, sparse = blobs_and_ellipsoid(shape, seed), blobs(shape, seed + 10, 1.2)
        # the dense mask touches every face, so the border handling is exercised
        for axis in range(3):
            assert dense.take(0, axis=axis).any() and dense.take(-1, axis=axis).any()
        for radius in radii:
            nontrivial = 0
            for mask in (dense, sparse):
                expected = reference_morphology(mask, operation, radius)
                got = morphology(torch.from_numpy(mask), operation, radius).numpy()
                assert not np.array_equal(expected, mask)
                nontrivial += 0 < expected.sum() < expected.size
                assert np.array_equal(got, expected), (operation, radius, int((got != expected).sum()))
            assert nontrivial >= 1, (operation, radius)


def test_operators_on_empty_and_full_masks() -> None:
    for fill in (False, True):
        mask = np.full((12, 10, 9), fill)
        for operation in OPERATIONS:
            got = morphology(torch.from_numpy(mask), operation, 3).numpy()
            assert np.array_equal(got, reference_morphology(mask, operation, 3)), (fill, operation)
    # a patch face is not a boundary (outside the patch counts as foreground): a full patch stays full,
    # and a slab touching one face erodes only from its inner side
    assert morphology(torch.ones(12, 10, 9, dtype=torch.bool), "erosion", 3).sum() == 12 * 10 * 9
    slab = torch.zeros(12, 10, 9, dtype=torch.bool)
    slab[:8] = True
    assert morphology(slab, "erosion", 3).sum() == 5 * 10 * 9


def test_sphere_grows_and_shrinks_by_the_radius() -> None:
    def digital_ball(radius: int, shape: int = 49) -> np.ndarray:
        c = np.arange(shape) - shape // 2
        x, y, z = np.meshgrid(c, c, c, indexing="ij")
        return x * x + y * y + z * z <= radius * radius

    sphere = digital_ball(12)
    assert sphere.sum() == 7153
    for r in (1, 3, 8):
        grown = morphology(torch.from_numpy(sphere), "dilation", r).numpy()
        shrunk = morphology(torch.from_numpy(sphere), "erosion", r).numpy()
        assert np.array_equal(grown, reference_morphology(sphere, "dilation", r))
        assert np.array_equal(shrunk, reference_morphology(sphere, "erosion", r))
        # triangle inequality: B(R) + B(r) lies in B(R + r), B(R) - B(r) contains B(R - r); the digital
        # sets differ from those balls only by a thin shell
        outer, inner = digital_ball(12 + r), digital_ball(12 - r)
        assert not (grown & ~outer).any() and not (inner & ~shrunk).any()
        # ... and the counts lie between the digital balls of radius R + r - 1 and R + r (R - r and R - r + 1)
        assert digital_ball(11 + r).sum() < grown.sum() <= outer.sum()
        assert inner.sum() <= shrunk.sum() < digital_ball(13 - r).sum()
        # volume-equivalent radii within 0.3 voxel of the digital balls' own
        for result, ball_r in ((grown, 12 + r), (shrunk, 12 - r)):
            radius = (3 * result.sum() / (4 * np.pi)) ** (1 / 3)
            assert abs(radius - (3 * digital_ball(ball_r).sum() / (4 * np.pi)) ** (1 / 3)) < 0.3, (r, ball_r)


# --- the one-hot write-back ----------------------------------------------------------------------------


def test_dilation_takes_voxels_from_the_other_label_and_erosion_gives_them_to_background() -> None:
    onehot = np.zeros((2, 20, 20, 20), dtype=np.float32)
    onehot[0, 4:10, 4:16, 4:16] = 1
    onehot[1, 10:16, 4:16, 4:16] = 1  # touches label 1 along x = 9 | 10

    grown = apply_mask_augmentation(onehot, MaskAugmentParams(morphology=[(0, "dilation", 2)]))
    expected = reference_morphology(onehot[0] > 0, "dilation", 2)
    taken = expected & (onehot[1] > 0)
    assert taken.sum() == 2 * 12 * 12  # the two slices x = 10, 11 under the face
    assert np.array_equal(grown[0] > 0, expected)
    assert np.array_equal(grown[1] > 0, (onehot[1] > 0) & ~taken)
    assert grown.dtype == np.float32 and grown.max() == 1
    assert_onehot(grown)
    assert onehot[1].sum() == 6 * 12 * 12  # the input is left alone

    shrunk = apply_mask_augmentation(onehot, MaskAugmentParams(morphology=[(0, "erosion", 1)]))
    assert np.array_equal(shrunk[1], onehot[1])  # what label 1 lost became background
    assert shrunk[0].sum() == 4 * 10 * 10


@pytest.mark.parametrize("operation", OPERATIONS)
def test_every_operation_keeps_one_hot(operation: str) -> None:
    onehot = label_map((30, 28, 26), labels=3, seed=4)
    assert_onehot(onehot)
    for channel in range(3):
        for radius in (1, 4):
            out = apply_mask_augmentation(onehot, MaskAugmentParams(morphology=[(channel, operation, radius)]))
            assert_onehot(out)
            assert np.array_equal(out[channel], reference_morphology(onehot[channel], operation, radius))


def test_random_draws_match_the_reference_keep_one_hot_and_all_input_types() -> None:
    onehot = label_map((28, 26, 24), labels=3, seed=5)
    config = MaskAugmentationConfig(p_morphology=1.0, p_component_removal=0.7)
    rng = np.random.default_rng(11)
    changed = 0
    for _ in range(10):
        params = draw_mask_params(config, rng, num_labels=3)
        expected = reference_apply(onehot, params)
        got = apply_mask_augmentation(onehot, params)
        assert got.dtype == np.bool_ and isinstance(got, np.ndarray)
        assert np.array_equal(got, expected), params
        assert_onehot(got)
        changed += not np.array_equal(got, onehot)
        as_float = apply_mask_augmentation(onehot.astype(np.float32), params)
        assert as_float.dtype == np.float32 and np.array_equal(as_float, expected.astype(np.float32))
        as_tensor = apply_mask_augmentation(torch.from_numpy(onehot).to(torch.uint8), params)
        assert as_tensor.dtype == torch.uint8 and np.array_equal(as_tensor.numpy(), expected)
    assert changed >= 8


def test_batch_applies_per_sample_and_leaves_identity_samples_alone() -> None:
    batch = torch.from_numpy(np.stack([label_map((24, 22, 20), labels=2, seed=s) for s in range(3)])).float()
    params = [
        MaskAugmentParams(morphology=[(1, "closing", 3), (0, "dilation", 2)], component_removal=[(0, 0.5)]),
        MaskAugmentParams(),
        MaskAugmentParams(morphology=[(0, "erosion", 1)]),
    ]
    out = apply_mask_augmentation_batch(batch, params)
    assert out.dtype == torch.float32 and out.shape == batch.shape
    for b, p in enumerate(params):
        assert torch.equal(out[b], apply_mask_augmentation(batch[b], p))
        assert np.array_equal(out[b].numpy() > 0, reference_apply(batch[b].numpy() > 0, p))
    assert torch.equal(out[1], batch[1]) and not torch.equal(out[0], batch[0])
    with pytest.raises(ValueError):
        apply_mask_augmentation_batch(batch, params[:2])


# --- component removal ---------------------------------------------------------------------------------


def components(mask: np.ndarray) -> list[int]:
    labels, n = ndimage.label(mask, structure=FULL)
    return sorted(np.bincount(labels.ravel(), minlength=n + 1)[1:].tolist())


def test_removal_deletes_exactly_one_small_component() -> None:
    onehot = np.zeros((1, 32, 32, 32), dtype=bool)
    onehot[0, 1:19, 1:19, 1:19] = True  # 5832 voxels >= 15% of 32768 = 4915.2: never removed
    onehot[0, 24:26, 24:26, 24:26] = True  # 8
    onehot[0, 22:25, 2:5, 2:5] = True  # 27
    onehot[0, 2:6, 24:28, 24:28] = True  # 64
    onehot[0, 28, 28, 2] = onehot[0, 29, 29, 3] = True  # 2 voxels touching by a corner: one component
    assert components(onehot[0]) == [2, 8, 27, 64, 5832]
    removed = set()
    for u in np.linspace(0, 0.999, 25):
        out = apply_mask_augmentation(onehot, MaskAugmentParams(component_removal=[(0, float(u))]))
        after = components(out[0])
        assert len(after) == 4 and 5832 in after
        assert not (out & ~onehot).any()
        (gone,) = set([2, 8, 27, 64, 5832]) - set(after)
        removed.add(gone)
    assert removed == {2, 8, 27, 64}


def test_removal_never_touches_a_component_at_or_above_the_threshold() -> None:
    onehot = np.zeros((2, 10, 10, 10), dtype=bool)
    onehot[0, :5, :5, :6] = True  # 150 voxels = 15% of 1000: not eligible
    onehot[1, :5, 5:, :6] = True
    onehot[1, 0, 5, 0] = False  # 149 voxels: eligible
    for u in (0.0, 0.5, 0.99):
        out = apply_mask_augmentation(onehot, MaskAugmentParams(component_removal=[(0, u), (1, u)]))
        assert np.array_equal(out[0], onehot[0])
        assert not out[1].any()
    large_only = np.zeros((1, 20, 20, 20), dtype=bool)
    large_only[0, 2:15, 2:15, 2:15] = True
    out = apply_mask_augmentation(large_only, MaskAugmentParams(component_removal=[(0, 0.3)]))
    assert np.array_equal(out, large_only)


# --- drawing -------------------------------------------------------------------------------------------


def within(count: int, n: int, p: float, sigmas: float = 4.5) -> bool:
    return abs(count / n - p) <= sigmas * np.sqrt(p * (1 - p) / n)


def test_draw_rates_radii_operations_and_order() -> None:
    config = MaskAugmentationConfig()
    rng = np.random.default_rng(2024)
    n, k = 20_000, 2
    draws = [draw_mask_params(config, rng, num_labels=k) for _ in range(n)]

    # nnU-Net: per sample 0.4 / 0.2, then every label (p_per_label 1): both labels or none
    for attr, p in (("morphology", 0.4), ("component_removal", 0.2)):
        sizes = np.array([len(getattr(d, attr)) for d in draws])
        assert within(int((sizes == 2).sum()), n, p), attr
        assert set(sizes.tolist()) == {0, 2}, attr

    steps = [step for d in draws for step in d.morphology]
    radii = np.array([r for _, _, r in steps])
    assert set(radii.tolist()) == set(range(1, 9))
    for r in range(1, 9):
        assert within(int((radii == r).sum()), len(steps), 1 / 8), r
    ops = [op for _, op, _ in steps]
    for op in OPERATIONS:
        assert within(ops.count(op), len(steps), 1 / 4), op
    # labels are visited in random order, in both operations
    for attr in ("morphology", "component_removal"):
        both = [getattr(d, attr) for d in draws if len(getattr(d, attr)) == 2]
        assert within(sum(m[0][0] == 0 for m in both), len(both), 0.5), attr
    us = np.array([u for d in draws for _, u in d.component_removal])
    assert us.min() >= 0 and us.max() < 1 and abs(us.mean() - 0.5) < 4.5 * np.sqrt(1 / 12 / len(us))

    assert all(d.max_component_fraction == 0.15 for d in draws)
    replay = np.random.default_rng(2024)
    assert [draw_mask_params(config, replay, num_labels=k) for _ in range(50)] == draws[:50]


def test_forced_rates_and_config_checks() -> None:
    config = MaskAugmentationConfig(p_morphology_label=0.5, p_component_removal_label=0.5)
    rng = np.random.default_rng(7)
    draws = [draw_mask_params(config, rng, num_labels=3) for _ in range(20_000)]
    # per label 0.5 (not nnU-Net's default): P(all three) = p / 8
    assert within(sum(len(d.morphology) == 3 for d in draws), 20_000, 0.4 / 8)
    assert within(sum(len(d.component_removal) == 3 for d in draws), 20_000, 0.2 / 8)
    with pytest.raises(ValueError):
        MaskAugmentationConfig(operations=("dilation", "thinning"))
    with pytest.raises(ValueError):
        MaskAugmentationConfig(radius_range=(5, 2))
