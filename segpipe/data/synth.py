"""Synthetic raw datasets in the Medical Segmentation Decathlon (MSD) layout.

This module sits *before* the whole pipeline: it produces a raw dataset (``dataset.json``,
``imagesTr/``, ``labelsTr/``, ``imagesTs/``) exactly like the ones the pipeline ingests, for the
demo, the unit tests and the scale tests.

Each case is a "body" (a large, slightly irregular ellipsoid of moderate intensity, zero outside)
holding ``labels`` structures: randomly placed, sized and rotated ellipsoids whose radius is
modulated by low-frequency noise. Structures may touch and overlap; label ``k`` is painted after
label ``k - 1``. Every label has its own mean intensity (distributions overlap), and the image gets
a smooth multiplicative bias field and Gaussian noise inside the body. Geometry varies per case:
shape and spacing are jittered by up to 10% per axis, and the affine has a small random rotation
and a random origin. Everything is deterministic given ``seed``; case ``k`` draws from
``numpy.random.default_rng([seed, k])``, so a case does not depend on how many others are made.
"""

from __future__ import annotations

import argparse
import math
from dataclasses import dataclass
from pathlib import Path

import nibabel as nib
import numpy as np
from scipy import ndimage

from segpipe.core.atomic import write_json
from segpipe.data.nifti import save_nifti

BODY_MEAN = 100.0  # mean intensity of the body (non-structure tissue)
NOISE_SIGMA = 0.12 * BODY_MEAN  # Gaussian noise inside the body
BIAS_STRENGTH = 0.15  # bias field is exp(BIAS_STRENGTH * unit-std smooth field)
JITTER = 0.10  # relative per-axis jitter of shape and spacing
MAX_TILT_DEG = 10.0  # largest rotation of the affine
MIN_SIZE = 8  # smallest allowed extent of a case along any axis


@dataclass
class SyntheticCase:
    """One generated case: ``image`` float32 and ``label`` uint8 in ``(X, Y, Z)``, affine 4x4 in mm."""

    image: np.ndarray
    label: np.ndarray
    affine: np.ndarray

    @property
    def spacing(self) -> tuple[float, float, float]:
        return tuple(float(v) for v in np.linalg.norm(self.affine[:3, :3], axis=0))  # type: ignore[return-value]


def label_means(labels: int) -> np.ndarray:
    """Mean intensity of background (0), body and each label: ``[0, body, m_1, ..., m_labels]``.

    Labels alternate above and below the body's intensity (odd labels brighter, even darker), so
    every class is distinct but neighbouring classes' distributions overlap through noise and bias.
    """
    n_up, n_down = (labels + 1) // 2, labels // 2
    up = [BODY_MEAN + 80.0 * i / n_up for i in range(1, n_up + 1)]
    down = [BODY_MEAN - 45.0 * i / n_down for i in range(1, n_down + 1)] if n_down else []
    means = [0.0, BODY_MEAN]
    for k in range(labels):
        means.append(up[k // 2] if k % 2 == 0 else down[k // 2])
    return np.asarray(means, dtype=np.float32)


def generate_case(
    index: int,
    shape: tuple[int, int, int] = (64, 64, 48),
    spacing: tuple[float, float, float] = (1.0, 1.0, 1.0),
    labels: int = 2,
    seed: int = 0,
    body_fill: float | None = None,
) -> SyntheticCase:
    """Generate case ``index`` in memory (no files); deterministic given ``(seed, index)``.

    ``body_fill``: the body's half-axes as a fraction of the field of view (±0.03 per axis); default
    0.78–0.9, a head in an MR field of view. A CT torso fills more (e.g. 0.93), which matters to the
    planner: cropping to the body then removes little, as in real CT.
    """
    _check_args(shape, spacing, labels)
    rng = np.random.default_rng([seed, index])
    case_shape = tuple(max(MIN_SIZE, round(s * rng.uniform(1 - JITTER, 1 + JITTER))) for s in shape)
    case_spacing = np.asarray([s * rng.uniform(1 - JITTER, 1 + JITTER) for s in spacing])
    affine = _random_affine(rng, case_spacing, case_shape)

    # Physical coordinates (mm) of voxel centres relative to the volume centre, per axis.
    axes = [(np.arange(n, dtype=np.float32) - (n - 1) / 2) * np.float32(sp) for n, sp in zip(case_shape, case_spacing)]
    extent = np.asarray(case_shape) * case_spacing
    lo, hi = (0.78, 0.9) if body_fill is None else (body_fill - 0.03, min(body_fill + 0.03, 0.97))
    body_radii = extent / 2 * rng.uniform(lo, hi, size=3)
    body = _body_mask(rng, axes, body_radii)
    label = _paint_structures(rng, axes, case_spacing, extent, body, body_radii, labels)

    tissue = np.where(body, label.astype(np.uint8) + np.uint8(1), np.uint8(0))
    mean = label_means(labels)[tissue]
    mean = ndimage.gaussian_filter(mean, sigma=0.5, mode="nearest")  # a little partial-volume blur
    bias = np.exp(BIAS_STRENGTH * _smooth_field(rng, case_shape, nodes=4))
    scale = np.float32(rng.uniform(0.85, 1.15))  # scanner-to-scanner intensity scale
    image = mean * bias * scale
    image += rng.standard_normal(case_shape, dtype=np.float32) * np.float32(NOISE_SIGMA * scale)
    floor = np.float32(0.02 * BODY_MEAN)
    image = np.where(body, np.maximum(image, floor), np.float32(0)).astype(np.float32, copy=False)
    return SyntheticCase(image=image, label=label, affine=affine)


def make_synthetic_dataset(
    out: Path,
    cases: int,
    shape: tuple[int, int, int] = (64, 64, 48),
    spacing: tuple[float, float, float] = (1.0, 1.0, 1.0),
    labels: int = 2,
    test_cases: int = 0,
    seed: int = 0,
    name: str = "Synthetic",
    body_fill: float | None = None,
) -> Path:
    """Write ``cases`` labelled and ``test_cases`` unlabelled synthetic cases to ``out`` (MSD layout).

    Training cases are ``synth_000 ..``, test cases continue the numbering. ``dataset.json`` is
    written last, so a folder with a ``dataset.json`` is complete. Returns ``out``.
    """
    if cases < 0 or test_cases < 0:
        raise ValueError(f"cases and test_cases must be >= 0, got {cases} and {test_cases}")
    _check_args(shape, spacing, labels)
    out = Path(out)
    total = cases + test_cases
    width = max(3, len(str(max(total - 1, 0))))
    header = nib.Nifti1Header()
    header.set_xyzt_units("mm", "sec")
    training, test = [], []
    for k in range(total):
        case = generate_case(k, shape, spacing, labels, seed, body_fill)
        fname = f"synth_{k:0{width}d}.nii.gz"
        if k < cases:
            save_nifti(out / "imagesTr" / fname, case.image, case.affine, header, dtype=np.float32)
            save_nifti(out / "labelsTr" / fname, case.label, case.affine, header, dtype=np.uint8)
            training.append({"image": f"./imagesTr/{fname}", "label": f"./labelsTr/{fname}"})
        else:
            save_nifti(out / "imagesTs" / fname, case.image, case.affine, header, dtype=np.float32)
            test.append(f"./imagesTs/{fname}")
    write_json(
        out / "dataset.json",
        {
            "name": name,
            "description": (
                f"Synthetic ellipsoid/blob volumes from segpipe.data.synth (seed={seed}, shape~{list(shape)}, "
                f"spacing~{list(spacing)}, labels={labels})"
            ),
            "reference": "segpipe.data.synth",
            "licence": "CC0",
            "release": "1.0",
            "tensorImageSize": "3D",
            "modality": {"0": "MRI"},
            "labels": {"0": "background", **{str(k): f"structure_{k}" for k in range(1, labels + 1)}},
            "numTraining": cases,
            "numTest": test_cases,
            "training": training,
            "test": test,
        },
    )
    return out


# --------------------------------------------------------------------------------------- helpers


def _check_args(shape: tuple[int, int, int], spacing: tuple[float, float, float], labels: int) -> None:
    if len(shape) != 3 or min(shape) < MIN_SIZE:
        raise ValueError(f"shape must be 3 sizes >= {MIN_SIZE}, got {shape}")
    if len(spacing) != 3 or min(spacing) <= 0:
        raise ValueError(f"spacing must be 3 positive values, got {spacing}")
    if not 1 <= labels <= 254:
        raise ValueError(f"labels must be in 1..254, got {labels}")


def _rotation(axis: np.ndarray, angle: float) -> np.ndarray:
    """Rotation matrix about unit ``axis`` by ``angle`` radians (Rodrigues)."""
    x, y, z = axis / np.linalg.norm(axis)
    k = np.array([[0, -z, y], [z, 0, -x], [-y, x, 0]])
    return np.eye(3) + math.sin(angle) * k + (1 - math.cos(angle)) * (k @ k)


def _random_rotation(rng: np.random.Generator) -> np.ndarray:
    """Uniformly random 3D rotation (QR of a Gaussian matrix, signs fixed, det +1)."""
    q, r = np.linalg.qr(rng.standard_normal((3, 3)))
    q = q * np.sign(np.diag(r))
    if np.linalg.det(q) < 0:
        q[:, 0] = -q[:, 0]
    return q


def _random_affine(rng: np.random.Generator, spacing: np.ndarray, shape: tuple[int, ...]) -> np.ndarray:
    """Affine with the given spacing, a small random rotation and a random origin near the centre."""
    rot = _rotation(rng.standard_normal(3), math.radians(rng.uniform(0, MAX_TILT_DEG)))
    affine = np.eye(4)
    affine[:3, :3] = rot @ np.diag(spacing)
    centre = affine[:3, :3] @ ((np.asarray(shape) - 1) / 2)
    affine[:3, 3] = rng.uniform(-50, 50, size=3) - centre
    return affine


def _smooth_field(rng: np.random.Generator, shape: tuple[int, ...], nodes: int = 4) -> np.ndarray:
    """Low-frequency random field of roughly unit std, float32.

    A ``nodes``^3 grid of Gaussian values is interpolated with separable Gaussian kernels
    (three tensor contractions), which is smooth and costs ~``nodes`` multiply-adds per voxel.
    """
    coarse = rng.standard_normal((nodes, nodes, nodes)).astype(np.float32)
    grid = np.linspace(0.0, 1.0, nodes)
    width = 1.0 / (nodes - 1)
    mats = []
    for n in shape:
        t = np.linspace(0.0, 1.0, n)[:, None]
        w = np.exp(-((t - grid[None, :]) ** 2) / (2 * width**2))
        mats.append((w / w.sum(axis=1, keepdims=True)).astype(np.float32))
    field = np.tensordot(mats[0], coarse, axes=(1, 0))  # (X, n, n)
    field = np.tensordot(field, mats[1], axes=(1, 1))  # (X, n, Y)
    field = np.tensordot(field, mats[2], axes=(1, 1))  # (X, Y, Z)
    sample = field[::3, ::3, ::3]  # statistics from a subsample: same result, a fraction of the cost
    field -= np.float32(sample.mean())
    field /= np.float32(sample.std() or 1.0)
    return field


def _body_mask(rng: np.random.Generator, axes: list[np.ndarray], radii: np.ndarray) -> np.ndarray:
    """Axis-aligned ellipsoid with a slightly wobbly (noise-modulated) surface."""
    x, y, z = (a / np.float32(r) for a, r in zip(axes, radii))
    d2 = x[:, None, None] ** 2 + y[None, :, None] ** 2 + z[None, None, :] ** 2
    wobble = 1 + 0.05 * _smooth_field(rng, d2.shape, nodes=4)
    return d2 < wobble**2


def _paint_structures(
    rng: np.random.Generator,
    axes: list[np.ndarray],
    spacing: np.ndarray,
    extent: np.ndarray,
    body: np.ndarray,
    body_radii: np.ndarray,
    labels: int,
    tries: int = 20,
) -> np.ndarray:
    """Paint ``labels`` blobs into a uint8 map (label k after k-1), retrying until every label survives."""
    volume = float(np.prod(extent))
    crowd = min(1.0, 6.0 / labels)  # many labels: smaller structures so they still fit in the body
    label = np.zeros(body.shape, dtype=np.uint8)
    best: tuple[float, np.ndarray] | None = None  # (score, label map) of the best failed attempt
    for _ in range(tries):
        label[:] = 0
        painted: list[int] = []
        centres: list[np.ndarray] = []
        sizes: list[float] = []
        for k in range(1, labels + 1):
            fraction = rng.uniform(0.015, 0.04) * crowd
            r_eq = (3 * fraction * volume / (4 * math.pi)) ** (1 / 3)  # mm, equal-volume sphere
            ratios = np.exp(rng.uniform(-0.35, 0.35, size=3))
            radii = r_eq * ratios / np.prod(ratios) ** (1 / 3)
            inner = np.maximum(body_radii - 0.9 * r_eq, 0.25 * body_radii)
            if centres and rng.uniform() < 0.5:  # next to an earlier structure, so labels touch
                j = int(rng.integers(len(centres)))
                direction = rng.standard_normal(3)
                centre = centres[j] + direction / np.linalg.norm(direction) * 0.8 * (sizes[j] + r_eq)
                norm = math.sqrt(float(np.sum((centre / inner) ** 2)))
                if norm > 1:
                    centre = centre / norm
            else:
                direction = rng.standard_normal(3)
                centre = direction / np.linalg.norm(direction) * rng.uniform() ** (1 / 3) * inner
            blob, box = _blob(rng, axes, spacing, centre, radii, _random_rotation(rng))
            blob &= body[box]
            label[box][blob] = k
            painted.append(int(blob.sum()))
            centres.append(centre)
            sizes.append(r_eq)
        counts = np.bincount(label.ravel(), minlength=labels + 1)[1:]
        # Each label must keep a fair share of its blob (later labels may paint over it).
        score = min(c / max(p, 1) for c, p in zip(counts, painted))
        if score >= 0.3 and counts.min() >= min(10, min(painted)):
            return label
        if best is None or score > best[0]:
            best = (score, label.copy())
    if best is None or best[0] == 0:
        raise RuntimeError(f"could not place {labels} visible structures in shape {body.shape}")
    return best[1]


def _blob(
    rng: np.random.Generator,
    axes: list[np.ndarray],
    spacing: np.ndarray,
    centre: np.ndarray,
    radii: np.ndarray,
    rot: np.ndarray,
    wobble: float = 0.2,
) -> tuple[np.ndarray, tuple[slice, slice, slice]]:
    """Rotated ellipsoid with noise-modulated radius, evaluated only inside its bounding box."""
    reach = float(radii.max()) * (1 + 2.5 * wobble)
    box = []
    for a, c, sp in zip(axes, centre, spacing):
        lo = int(np.searchsorted(a, c - reach - sp))
        hi = int(np.searchsorted(a, c + reach + sp))
        box.append(slice(max(lo, 0), max(min(hi, len(a)), max(lo, 0) + 1)))
    box_t = (box[0], box[1], box[2])
    px, py, pz = (a[s] - np.float32(c) for a, s, c in zip(axes, box_t, centre))
    # Coordinates in the blob's own frame: q = rot^T p, scaled by the radii.
    m = (rot.T / radii[:, None]).astype(np.float32)
    d2 = np.zeros((len(px), len(py), len(pz)), dtype=np.float32)
    for i in range(3):
        q = m[i, 0] * px[:, None, None] + m[i, 1] * py[None, :, None] + m[i, 2] * pz[None, None, :]
        d2 += q * q
    limit = 1 + wobble * np.clip(_smooth_field(rng, d2.shape, nodes=4), -2.5, 2.5)
    return d2 < limit**2, box_t


def main(argv: list[str] | None = None) -> None:
    """``python -m segpipe.data.synth OUT --cases N ...``: write a synthetic MSD dataset."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("out", type=Path)
    parser.add_argument("--cases", type=int, default=8)
    parser.add_argument("--test-cases", type=int, default=0)
    parser.add_argument("--shape", type=int, nargs=3, default=(64, 64, 48))
    parser.add_argument("--spacing", type=float, nargs=3, default=(1.0, 1.0, 1.0))
    parser.add_argument("--labels", type=int, default=2)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--name", default="Synthetic")
    args = parser.parse_args(argv)
    out = make_synthetic_dataset(
        args.out,
        args.cases,
        shape=tuple(args.shape),
        spacing=tuple(args.spacing),
        labels=args.labels,
        test_cases=args.test_cases,
        seed=args.seed,
        name=args.name,
    )
    print(out / "dataset.json")


if __name__ == "__main__":
    main()
