"""Tests for sliding-window inference (segpipe.inference.sliding_window) and the per-case predict path.

The network is replaced by fixed, hand-written modules whose output is known, so every assertion
is about the pipeline's geometry and averaging, not about a trained model.
"""

from __future__ import annotations

import math
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch
from scipy import ndimage
from torch import nn

import segpipe.inference.models as models_module
import segpipe.inference.predict as predict_module
from segpipe.data.dataset import CaseFiles, read_case
from segpipe.data.nifti import save_nifti
from segpipe.inference.ensemble import Members
from segpipe.inference.predict import PredictOptions, predict_case_probabilities, predict_folder, write_prediction
from segpipe.inference.sliding_window import (
    gaussian_importance,
    mirror_combinations,
    pad_to_patch,
    predict_probabilities,
    window_slices,
    window_starts,
)
from segpipe.planning.plans import FULLRES, Configuration, Normalization, Plans, Topology, TrainingSettings, save_plans
from segpipe.preprocessing.preprocess import preprocess_case

# ---------------------------------------------------------------------------------- window_starts


@pytest.mark.parametrize(
    ("size", "patch", "step", "expected"),
    [
        (100, 40, 0.5, [0, 20, 40, 60]),  # n = ceil(60 / 20) + 1 = 4, stride 60 / 3 = 20
        (100, 40, 1.0, [0, 30, 60]),  # n = ceil(60 / 40) + 1 = 3, stride 30
        (50, 16, 0.5, [0, 7, 14, 20, 27, 34]),  # n = ceil(34 / 8) + 1 = 6, stride 6.8 -> rounded
        (41, 40, 0.5, [0, 1]),  # one voxel too large for one window: two windows
        (40, 40, 0.5, [0]),
        (7, 40, 0.5, [0]),  # smaller than the patch: one (padded) window
    ],
)
def test_window_starts_hand_computed(size: int, patch: int, step: float, expected: list[int]) -> None:
    assert window_starts(size, patch, step) == expected


@pytest.mark.parametrize("step", [0.25, 0.5, 1.0])
@pytest.mark.parametrize("patch", [8, 16, 20])
def test_window_starts_properties(patch: int, step: float) -> None:
    for size in range(1, 120):
        starts = window_starts(size, patch, step)
        if size <= patch:
            assert starts == [0]
            continue
        assert starts[0] == 0
        assert starts[-1] == size - patch  # the last window touches the far border
        assert starts == sorted(set(starts))  # strictly increasing
        steps = np.diff(starts)
        assert steps.max() <= patch * step, (size, starts)  # overlap at least (1 - step) x patch
        # and no more windows than needed for that overlap
        assert len(starts) == math.ceil((size - patch) / (patch * step)) + 1


def test_window_slices_cover_every_voxel() -> None:
    shape, patch = (50, 37, 29), (16, 24, 16)
    cover = np.zeros(shape, dtype=int)
    windows = window_slices(shape, patch, 0.5)
    for w in windows:
        assert tuple(s.stop - s.start for s in w) == patch
        cover[w] += 1
    assert cover.min() >= 1
    assert len(windows) == len(window_starts(50, 16, 0.5)) * len(window_starts(37, 24, 0.5)) * len(
        window_starts(29, 16, 0.5)
    )


# ---------------------------------------------------------------------------------- Gaussian, mirrors


@pytest.mark.parametrize("patch", [(15, 21, 9), (16, 24, 16)])
def test_gaussian_importance_peak_positive_symmetric(patch: tuple[int, int, int]) -> None:
    g = gaussian_importance(patch).numpy()
    assert g.shape == patch
    assert g.dtype == np.float32
    centre = tuple(p // 2 for p in patch)
    assert g[centre] == 1.0
    assert g.max() == 1.0
    assert np.unravel_index(np.argmax(g), g.shape) == centre
    assert g.min() > 0  # every voxel of a window gets some weight
    assert g.min() < 0.05  # and the borders far less than the centre
    # mirror-symmetric about the centre voxel along every axis
    for axis, (p, c) in enumerate(zip(patch, centre)):
        for d in range(1, min(c, p - 1 - c) + 1):
            lo = np.take(g, c - d, axis=axis)
            hi = np.take(g, c + d, axis=axis)
            np.testing.assert_allclose(lo, hi, rtol=1e-5, atol=1e-7)
    if all(p % 2 for p in patch):  # odd patch: the centre voxel is the array centre, so flips are exact
        for axis in range(3):
            np.testing.assert_allclose(g, np.flip(g, axis), rtol=1e-5, atol=1e-7)


def test_mirror_combinations() -> None:
    combos = mirror_combinations((0, 1, 2))
    assert len(combos) == 8
    assert combos[0] == ()
    assert len(set(combos)) == 8
    assert set(combos) == {(), (0,), (1,), (2,), (0, 1), (0, 2), (1, 2), (0, 1, 2)}
    assert mirror_combinations(()) == [()]
    assert mirror_combinations((1,)) == [(), (1,)]


def test_pad_to_patch_centres_and_crops_back() -> None:
    image = torch.arange(1 * 5 * 30 * 3, dtype=torch.float32).reshape(1, 5, 30, 3) + 1
    padded, crop = pad_to_patch(image, (8, 16, 4))
    assert tuple(padded.shape) == (1, 8, 30, 4)
    assert crop == (slice(1, 6), slice(0, 30), slice(0, 3))
    assert torch.equal(padded[(slice(None), *crop)], image)
    assert float(padded.sum()) == float(image.sum())  # zeros elsewhere


# ---------------------------------------------------------------------------------- identity network


class OneHotIdentity(nn.Module):
    """Logits = 20 x input: on a one-hot input the softmax is (almost) the input itself."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return 20.0 * x


def _random_onehot(num_classes: int, shape: tuple[int, ...], seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    classes = torch.randint(0, num_classes, shape, generator=gen)
    onehot = torch.nn.functional.one_hot(classes, num_classes).permute(3, 0, 1, 2).float()
    return classes, onehot


def _expected_softmax(onehot: torch.Tensor) -> torch.Tensor:
    """softmax(20 x one-hot) in closed form: e^20 / (e^20 + C - 1) on the hot class, 1 / (...) elsewhere."""
    c = onehot.shape[0]
    hot = math.exp(20) / (math.exp(20) + c - 1)
    cold = 1 / (math.exp(20) + c - 1)
    return onehot * hot + (1 - onehot) * cold


@pytest.mark.parametrize("batch_windows", [1, 3])
def test_identity_network_reproduces_input_with_mirroring(batch_windows: int) -> None:
    classes, onehot = _random_onehot(3, (50, 37, 29), seed=0)
    probs = predict_probabilities(
        OneHotIdentity(), onehot, (16, 24, 16), 3, step=0.5, mirror_axes=(0, 1, 2), batch_windows=batch_windows
    )
    assert tuple(probs.shape) == (3, 50, 37, 29)
    assert torch.equal(probs.argmax(0), classes)
    # Gaussian weights and the 8 mirrorings normalize out: every voxel gets exactly softmax(20 x input)
    torch.testing.assert_close(probs, _expected_softmax(onehot), atol=1e-5, rtol=0)
    torch.testing.assert_close(probs.sum(0), torch.ones(50, 37, 29), atol=1e-5, rtol=0)


def test_identity_network_volume_smaller_than_patch() -> None:
    classes, onehot = _random_onehot(4, (10, 20, 7), seed=1)  # smaller than the patch on every axis
    probs = predict_probabilities(OneHotIdentity(), onehot, (16, 24, 16), 4, step=0.5, mirror_axes=(0, 1, 2))
    assert tuple(probs.shape) == (4, 10, 20, 7)  # padding cropped away again
    assert torch.equal(probs.argmax(0), classes)
    torch.testing.assert_close(probs, _expected_softmax(onehot), atol=1e-5, rtol=0)


class PositionDependent(nn.Module):
    """Not mirror-equivariant: logit of class 1 grows along axis 0 of the *window*, class 0 is flat."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        ramp = torch.linspace(-1, 1, x.shape[2]).view(1, x.shape[2], 1, 1).expand(x.shape[0], -1, *x.shape[3:])
        return torch.stack([torch.zeros_like(ramp), ramp], dim=1)


def test_mirroring_averages_flipped_predictions() -> None:
    # With mirroring along axis 0 the window-relative ramp and its flip average to 0: probability 1/2
    # everywhere. Without mirroring the ramp survives (class 1 wins on the upper half of each window).
    image = torch.zeros(1, 16, 8, 8)
    mirrored = predict_probabilities(PositionDependent(), image, (16, 8, 8), 2, mirror_axes=(0,))
    torch.testing.assert_close(mirrored, torch.full((2, 16, 8, 8), 0.5), atol=1e-6, rtol=0)
    plain = predict_probabilities(PositionDependent(), image, (16, 8, 8), 2, mirror_axes=())
    assert torch.equal(plain.argmax(0)[:, 0, 0], torch.tensor([0] * 8 + [1] * 8))


# ---------------------------------------------------------------------------------- predict path

LABELS = {"background": 0, "inner": 1, "outer": 2}


def _label_volume(shape: tuple[int, int, int]) -> np.ndarray:
    """An ellipsoid of label 1, its +x part relabelled 2, background around it."""
    x, y, z = np.meshgrid(*[np.arange(s, dtype=float) for s in shape], indexing="ij")
    c = np.array(shape) / 2
    r = sum(((a - ca) / (0.4 * s)) ** 2 for a, ca, s in zip((x, y, z), c, shape))
    label = np.zeros(shape, dtype=np.uint8)
    label[r < 1] = 1
    label[(r < 1) & (x > c[0] + 2)] = 2
    return label


def _affine(spacing: tuple[float, float, float]) -> np.ndarray:
    """A rotated (20 degrees about z), shifted affine with the given voxel spacing."""
    t = math.radians(20)
    rot = np.array([[math.cos(t), -math.sin(t), 0], [math.sin(t), math.cos(t), 0], [0, 0, 1]])
    affine = np.eye(4)
    affine[:3, :3] = rot @ np.diag(spacing)
    affine[:3, 3] = [12.5, -20.0, 3.0]
    return affine


def _plans(target_spacing: list[float], median_shape: list[int]) -> Plans:
    config = Configuration(
        name=FULLRES,
        spacing=target_spacing,
        median_shape=median_shape,
        patch_size=[16, 16, 16],
        batch_size=2,
        topology=Topology(kernel_sizes=[[3, 3, 3]], strides=[[1, 1, 1]], features=[8]),
        data_identifier=FULLRES,
    )
    return Plans(
        dataset_name="LabelAsImage",
        preset="test",
        channel_names=["MRI"],
        labels=dict(LABELS),
        normalization=[Normalization("zscore", use_nonzero_mask=False)],
        configurations={FULLRES: config},
        training=TrainingSettings(),
        original_median_spacing=list(target_spacing),
    )


def _normalized_class_values(label: np.ndarray) -> list[float]:
    """What z-score normalization makes of the intensities 0, 1, 2, computed independently:
    statistics over the non-zero bounding box (the crop), no mask."""
    nz = np.argwhere(label > 0)
    lo, hi = nz.min(axis=0), nz.max(axis=0) + 1
    crop = label[lo[0] : hi[0], lo[1] : hi[1], lo[2] : hi[2]].astype(np.float64)
    mean, std = crop.mean(), crop.std()
    return [(v - mean) / std for v in (0.0, 1.0, 2.0)]


class NearestValue(nn.Module):
    """Logit of class c = -20 (x - v_c)^2: the argmax is the class whose normalized value is nearest."""

    def __init__(self, values: list[float], scale: float = 20.0):
        super().__init__()
        self.values = torch.tensor(values, dtype=torch.float32).view(1, -1, 1, 1, 1)
        self.scale = scale

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return -self.scale * (x - self.values) ** 2


def _dice(a: np.ndarray, b: np.ndarray, k: int) -> float:
    return 2 * float(((a == k) & (b == k)).sum()) / float((a == k).sum() + (b == k).sum())


def _write_case(folder: Path, label: np.ndarray, spacing: tuple[float, float, float]) -> CaseFiles:
    path = folder / "case_001.nii.gz"
    save_nifti(path, label.astype(np.float32), _affine(spacing), dtype=np.float32)
    return CaseFiles("case_001", [str(path)])


@pytest.mark.parametrize(
    ("spacing", "target", "min_dice"),
    [
        # planned spacing = case spacing: no resampling anywhere, the label must come back exactly
        ((1.5, 1.2, 1.8), [1.5, 1.2, 1.8], 1.0),
        # coarser case than plan: spline upsampling forward, trilinear downsampling of probabilities
        # back. Only voxels on label borders can flip (asserted below); measured Dice 0.991 / 0.993.
        # A half-voxel grid mismatch (align_corners=True backwards) measures 0.982 / 0.972, a one-voxel
        # shift 0.92 / 0.88, so 0.985 separates a correct round trip from a misaligned one.
        ((1.5, 1.2, 1.8), [1.0, 1.0, 1.0], 0.985),
    ],
)
def test_predict_case_restores_label_in_original_geometry(
    tmp_path: Path, spacing: tuple[float, float, float], target: list[float], min_dice: float
) -> None:
    shape = (40, 36, 26)
    label = _label_volume(shape)
    case = _write_case(tmp_path, label, spacing)
    plans = _plans(target, list(shape))
    config = plans.configuration(FULLRES)
    data = read_case(case, 1)
    np.testing.assert_allclose(data.spacing, spacing, atol=1e-6)
    pre = preprocess_case(data, plans, config, case)
    model = NearestValue(_normalized_class_values(label))
    probs = predict_case_probabilities([model], pre, plans, config, PredictOptions(tta=True), torch.device("cpu"))

    assert probs.shape == (3, *shape)
    np.testing.assert_allclose(probs.sum(axis=0), 1.0, atol=1e-4)
    pred = probs.argmax(axis=0)
    for k in (1, 2):
        assert _dice(pred, label, k) >= min_dice, (k, _dice(pred, label, k))
    if min_dice == 1.0:
        assert np.array_equal(pred, label)
    # every wrong voxel lies on a border between labels of the original map
    border = ndimage.maximum_filter(label, size=3) != ndimage.minimum_filter(label, size=3)
    assert not np.any((pred != label) & ~border)


def test_predict_folder_writes_input_geometry(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The folder path (read, preprocess, windows, restore, write) with the fixed model in place of
    trained checkpoints: output NIfTI equals the label, with the input's shape and affine."""
    shape, spacing = (40, 36, 26), (1.5, 1.2, 1.8)
    label = _label_volume(shape)
    inputs = tmp_path / "in"
    _write_case(inputs, label, spacing)
    work = tmp_path / "work"
    plans = _plans(list(spacing), list(shape))
    save_plans(plans, work / "plans.json")
    model = NearestValue(_normalized_class_values(label))
    monkeypatch.setattr(models_module, "load_members", lambda *args, **kwargs: [model])
    monkeypatch.setattr(models_module, "inference_mirror_axes", lambda *args, **kwargs: (0, 1, 2))
    out = tmp_path / "out"
    summary = predict_folder(inputs, out, work, FULLRES, Members([0]), PredictOptions(), device="cpu")
    assert summary["predicted"] == 1 and summary["failed"] == 0
    written = nib.load(str(out / "case_001.nii.gz"))
    assert written.shape == shape
    assert written.get_data_dtype() == np.uint8
    np.testing.assert_allclose(written.affine, _affine(spacing), atol=1e-5)
    assert np.array_equal(np.asarray(written.dataobj), label)


def test_write_prediction_uint8_with_input_geometry(tmp_path: Path) -> None:
    shape, spacing = (9, 7, 5), (0.8, 1.1, 2.5)
    image_path = tmp_path / "img.nii.gz"
    save_nifti(image_path, np.ones(shape, dtype=np.float32), _affine(spacing), dtype=np.float32)
    data = read_case(CaseFiles("case_x", [str(image_path)]), 1)
    rng = np.random.default_rng(0)
    probs = rng.random((3, *shape)).astype(np.float32)
    out = tmp_path / "out"
    write_prediction(out, data, probs, [1, 2], save_probs=True)

    written = nib.load(str(out / "case_x.nii.gz"))
    assert written.shape == shape
    assert written.get_data_dtype() == np.uint8
    np.testing.assert_allclose(written.affine, _affine(spacing), atol=1e-5)
    seg = np.asarray(written.dataobj)
    assert seg.dtype == np.uint8
    assert np.array_equal(seg, probs.argmax(axis=0))
    assert set(np.unique(seg)) == {0, 1, 2}
    with np.load(out / "case_x.npz") as npz:
        np.testing.assert_allclose(npz["probabilities"], probs, atol=1e-3)


def test_write_prediction_maps_classes_to_label_values(tmp_path: Path) -> None:
    # class index i -> the i-th label value (background first), here 0, 3, 7
    image_path = tmp_path / "img.nii.gz"
    save_nifti(image_path, np.ones((2, 2, 1), dtype=np.float32), _affine((1.0, 1.0, 1.0)), dtype=np.float32)
    data = read_case(CaseFiles("c", [str(image_path)]), 1)
    probs = np.zeros((3, 2, 2, 1), dtype=np.float32)
    probs[0, 0, 0, 0] = probs[1, 0, 1, 0] = probs[2, 1, 0, 0] = probs[2, 1, 1, 0] = 1
    write_prediction(tmp_path, data, probs, [3, 7], save_probs=False)
    seg = np.asarray(nib.load(str(tmp_path / "c.nii.gz")).dataobj)
    assert seg[:, :, 0].tolist() == [[0, 3], [7, 7]]
    assert not (tmp_path / "c.npz").exists()


def test_ensemble_of_models_averages_their_probabilities(tmp_path: Path) -> None:
    """Several members (folds, snapshots) are summed in place and divided: the mean of each alone."""
    shape = (20, 18, 14)
    label = _label_volume(shape)
    case = _write_case(tmp_path, label, (1.0, 1.0, 1.0))
    plans = _plans([1.0, 1.0, 1.0], list(shape))
    config = plans.configuration(FULLRES)
    pre = preprocess_case(read_case(case, 1), plans, config, case)
    sharp = NearestValue(_normalized_class_values(label))
    soft = NearestValue(_normalized_class_values(label), scale=0.05)  # a much flatter softmax
    options, cpu = PredictOptions(tta=False), torch.device("cpu")
    p_sharp = predict_case_probabilities([sharp], pre, plans, config, options, cpu)
    p_soft = predict_case_probabilities([soft], pre, plans, config, options, cpu)
    both = predict_case_probabilities([sharp, soft], pre, plans, config, options, cpu)
    assert not np.allclose(p_sharp, p_soft, atol=1e-3)
    np.testing.assert_allclose(both, (p_sharp + p_soft) / 2, atol=1e-6)


# ------------------------------------------------------------------ out of device memory, failed devices


class OutOfMemoryAbove(nn.Module):
    """OneHotIdentity that raises CUDA's out-of-memory error for batches above ``max_batch`` (fault injection)."""

    def __init__(self, max_batch: int):
        super().__init__()
        self.max_batch = max_batch
        self.batches: list[int] = []

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.batches.append(x.shape[0])
        if x.shape[0] > self.max_batch:
            raise torch.OutOfMemoryError(f"CUDA out of memory. Tried to allocate {x.shape[0]} windows")
        return 20.0 * x


def test_window_batches_that_run_out_of_memory_are_halved(caplog: pytest.LogCaptureFixture) -> None:
    classes, onehot = _random_onehot(3, (50, 37, 29), seed=0)
    model = OutOfMemoryAbove(max_batch=8)  # one window in its 8 mirrorings fits, two do not
    with caplog.at_level("WARNING", logger="segpipe"):
        probs = predict_probabilities(model, onehot, (16, 24, 16), 3, mirror_axes=(0, 1, 2), batch_windows=4)
    torch.testing.assert_close(probs, _expected_softmax(onehot), atol=1e-5, rtol=0)  # the same result
    assert model.batches[:3] == [32, 16, 8] and set(model.batches[3:]) == {8}  # 4 -> 2 -> 1, then stays at 1
    said = [r.getMessage() for r in caplog.records]
    assert said == ["out of device memory with 4 windows a batch: retrying with 2",
                    "out of device memory with 2 windows a batch: retrying with 1"]  # fmt: skip
    with pytest.raises(torch.OutOfMemoryError):  # not even one window fits: the caller's turn
        predict_probabilities(OutOfMemoryAbove(max_batch=4), onehot, (16, 24, 16), 3, batch_windows=2)


def test_a_case_steps_down_to_cpu_accumulators_then_to_the_cpu(caplog: pytest.LogCaptureFixture) -> None:
    cuda, cpu = torch.device("cuda", 0), torch.device("cpu")
    attempts = predict_module.fallback_attempts(cuda, cuda)
    assert [(d, a) for d, a, _ in attempts] == [(cuda, cuda), (cuda, cpu), (cpu, cpu)]
    assert [(d, a) for d, a, _ in predict_module.fallback_attempts(cuda, cpu)] == [(cuda, cpu), (cpu, cpu)]
    assert len(predict_module.fallback_attempts(cpu, cpu)) == 1

    tried = []

    def run(device: torch.device, accumulate_on: torch.device) -> str:
        tried.append((device, accumulate_on))
        if device.type == "cuda":
            raise torch.OutOfMemoryError("CUDA out of memory")
        return "done on the CPU"

    with caplog.at_level("WARNING", logger="segpipe"):
        assert predict_module.with_fallbacks("case_7", attempts, run) == "done on the CPU"
    assert tried == [(cuda, cuda), (cuda, cpu), (cpu, cpu)]
    said = [r.getMessage() for r in caplog.records]
    assert len(said) == 2 and said[0].endswith("with its accumulators on the CPU") and said[1].endswith("on the CPU")
    assert all(m.startswith("case_7: out of device memory") for m in said)
    with pytest.raises(torch.OutOfMemoryError):
        predict_module.with_fallbacks("case_7", attempts[:2], run)


def test_the_memory_estimate_counts_the_forward_batch(tmp_path: Path) -> None:
    from segpipe.inference.sliding_window import forward_batch_bytes

    # patch 8^3 = 512 voxels, stages of 4 and 8 features (the second at stride 2: 64 voxels), 1 channel,
    # 3 classes: per window 512 x (1 + 2 x 3) + (4 x 512 + 8 x 64) + 2 x 4 x 512 = 3584 + 2560 + 4096 = 10240
    # values; 2 windows x 8 mirrorings x 4 bytes
    assert forward_batch_bytes([8, 8, 8], [4, 8], [[1, 1, 1], [2, 2, 2]], 1, 3, 16) == 16 * 4 * 10240
    shape, spacing = (40, 36, 26), (1.5, 1.2, 1.8)
    case = _write_case(tmp_path, _label_volume(shape), spacing)
    plans = _plans(list(spacing), list(shape))
    config = plans.configuration(FULLRES)
    pre = preprocess_case(read_case(case, 1), plans, config, case)
    without = predict_module.case_device_bytes(pre, config, 3, 1)
    options = PredictOptions(batch_windows=2, mirror_axes=(0, 1, 2))
    forward = forward_batch_bytes([16] * 3, [8], [[1, 1, 1]], 1, 3, 2 * 8)
    assert predict_module.case_device_bytes(pre, config, 3, 1, options) == without + forward
    no_tta = PredictOptions(batch_windows=2, tta=False)
    assert predict_module.case_device_bytes(pre, config, 3, 1, no_tta) == without + forward // 8


def _fixed_model_folder(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, model: nn.Module, cases: int) -> Path:
    """Input cases and a WORK whose 'trained' model is ``model`` (as in the predict-folder test above)."""
    shape, spacing = (40, 36, 26), (1.5, 1.2, 1.8)
    for i in range(cases):
        case = _write_case(tmp_path / "in", _label_volume(shape), spacing)
        case_path = Path(case.images[0])
        case_path.rename(case_path.with_name(f"case_{i:03d}.nii.gz"))
    save_plans(_plans(list(spacing), list(shape)), tmp_path / "work" / "plans.json")
    monkeypatch.setattr(models_module, "load_members", lambda *args, **kwargs: [model])
    monkeypatch.setattr(models_module, "inference_mirror_axes", lambda *args, **kwargs: (0, 1, 2))
    return tmp_path / "work"


class FailingDevice(nn.Module):
    """A network whose device hit a device-side assert: every call fails the same way."""

    def __init__(self):
        super().__init__()
        self.calls = 0

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.calls += 1
        raise RuntimeError("CUDA error: device-side assert triggered")


def test_a_failed_device_stops_the_run_instead_of_failing_every_case(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from segpipe.core.errors import DeviceFailed

    model = FailingDevice()
    work = _fixed_model_folder(tmp_path, monkeypatch, model, cases=3)
    with pytest.raises(DeviceFailed) as info:
        predict_folder(tmp_path / "in", tmp_path / "out", work, FULLRES, Members([0]), PredictOptions(), device="cpu")
    assert model.calls == 1  # the first case's first batch; no later case was tried
    message = str(info.value)
    assert message.startswith("case_000: the device failed") and "--device cpu" in message
    assert "CUDA_LAUNCH_BLOCKING=1" in message
    assert not list((tmp_path / "out").glob("*.nii.gz"))


def test_out_of_memory_on_every_step_names_what_to_try(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from conftest import run_cli

    work = _fixed_model_folder(tmp_path, monkeypatch, OutOfMemoryAbove(max_batch=0), cases=1)
    result = run_cli(
        "predict", "-i", tmp_path / "in", "-o", tmp_path / "out", "-m", work, "--folds", 0, "--device", "cpu"
    )
    assert result.exit_code == 1, result.output
    assert "case_000" in result.output and "OutOfMemoryError: CUDA out of memory" in result.output
    assert "try --batch-windows 1, a --device-memory-limit MB" in result.output and "--device cpu" in result.output
    assert result.output.count("try --batch-windows 1") == 1  # said once, with the case
