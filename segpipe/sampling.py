"""Patch sampling from preprocessed cases: batches for training and validation.

Reads ``WORK/preprocessed/<data_identifier>/`` (memory-mapped ``.npy``) and yields batches of
``image (B, C, *patch)`` float32 and ``label (B, 1, *patch)`` int8. A third of each batch (the last
samples, as nnU-Net) is centred on a stored foreground voxel of a random present class; the rest
anywhere. Cases smaller than the patch are zero-padded. Runs inside ``DataLoader`` workers: every
worker draws from its own generator seeded by (seed, epoch, rank, worker), so a run is
reproducible and an epoch can be replayed after a resume.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from segpipe.augment import Augmenter, source_extent
from segpipe.augment import apply as apply_augmentation
from segpipe.paths import CaseFilesOnDisk


@dataclass
class SamplerSpec:
    folder: Path
    case_ids: list[str]
    patch_size: list[int]
    batch_size: int
    oversample_foreground: float
    foreground_classes: list[int]  # class indices 1..K


class _CaseCache:
    """Memory-mapped arrays and foreground coordinates, opened once per worker."""

    def __init__(self, folder: Path):
        self.folder = folder
        self._cache: dict[str, tuple[np.ndarray, np.ndarray, dict[int, np.ndarray]]] = {}

    def get(self, case_id: str) -> tuple[np.ndarray, np.ndarray, dict[int, np.ndarray]]:
        if case_id not in self._cache:
            files = CaseFilesOnDisk(self.folder, case_id)
            image = np.load(files.image, mmap_mode="r")
            label = np.load(files.label, mmap_mode="r")
            with np.load(files.foreground) as fg:
                coords = {int(k.split("_")[1]): fg[k] for k in fg.files}
            self._cache[case_id] = (image, label, coords)
        return self._cache[case_id]


def crop_padded(array: np.ndarray, center: np.ndarray, size: list[int]) -> np.ndarray:
    """Crop ``size`` voxels around ``center`` from ``(C, X, Y, Z)``, zero-padding outside the array."""
    starts = [int(c) - s // 2 for c, s in zip(center, size)]
    out = np.zeros((array.shape[0], *size), dtype=array.dtype)
    src, dst = [], []
    for st, s, dim in zip(starts, size, array.shape[1:]):
        lo, hi = max(st, 0), min(st + s, dim)
        if hi <= lo:
            return out
        src.append(slice(lo, hi))
        dst.append(slice(lo - st, hi - st))
    out[(slice(None), *dst)] = array[(slice(None), *src)]
    return out


def choose_center(
    shape: tuple[int, ...], patch: list[int], coords: dict[int, np.ndarray], force_fg: bool, rng: np.random.Generator
) -> np.ndarray:
    """A patch centre: on a random foreground voxel of a random present class, or uniform so the patch
    stays inside the case where it fits (centred where the case is smaller than the patch)."""
    present = [c for c, xyz in coords.items() if len(xyz)]
    if force_fg and present:
        xyz = coords[present[rng.integers(len(present))]]
        return xyz[rng.integers(len(xyz))].astype(int)
    center = []
    for dim, p in zip(shape, patch):
        lo, hi = p // 2, dim - (p - p // 2)
        center.append(rng.integers(lo, hi + 1) if hi >= lo else dim // 2)
    return np.array(center)


class PatchBatches(IterableDataset):
    """An iterable of ``num_batches`` batches (split over workers) for one epoch."""

    def __init__(
        self,
        spec: SamplerSpec,
        num_batches: int,
        seed: int,
        epoch: int,
        augmenter: Augmenter | None,
        rank: int = 0,
    ):
        self.spec = spec
        self.num_batches = num_batches
        self.seed = seed
        self.epoch = epoch
        self.augmenter = augmenter
        self.rank = rank
        self._cases: _CaseCache | None = None

    def __iter__(self):
        info = get_worker_info()
        worker, workers = (info.id, info.num_workers) if info else (0, 1)
        rng = np.random.default_rng([self.seed, self.epoch, self.rank, worker])
        torch.manual_seed(int(rng.integers(2**31)))
        if self._cases is None:
            self._cases = _CaseCache(self.spec.folder)
        for _ in range(worker, self.num_batches, workers):
            yield self.make_batch(rng)

    def make_batch(self, rng: np.random.Generator) -> dict[str, torch.Tensor]:
        spec = self.spec
        cases = self._cases or _CaseCache(spec.folder)
        self._cases = cases
        n_random = round(spec.batch_size * (1 - spec.oversample_foreground))
        images, labels = [], []
        for i in range(spec.batch_size):
            image, label, coords = cases.get(spec.case_ids[rng.integers(len(spec.case_ids))])
            center = choose_center(image.shape[1:], spec.patch_size, coords, i >= n_random, rng)
            if self.augmenter is None:
                images.append(torch.from_numpy(crop_padded(image, center, spec.patch_size)))
                labels.append(torch.from_numpy(crop_padded(label[None], center, spec.patch_size)))
                continue
            params = self.augmenter.draw(rng)
            extent = source_extent(spec.patch_size, params)
            img = torch.from_numpy(crop_padded(image, center, extent))
            lab = torch.from_numpy(crop_padded(label[None], center, extent))
            img, lab = apply_augmentation(img, lab, params, spec.patch_size)
            images.append(img)
            labels.append(lab)
        return {"image": torch.stack(images).float(), "label": torch.stack(labels).to(torch.int8)}


def make_loader(dataset: PatchBatches, num_workers: int, pin_memory: bool) -> DataLoader:
    """A DataLoader over ready batches (``batch_size=None``), workers limited to one thread each."""
    return DataLoader(
        dataset,
        batch_size=None,
        num_workers=num_workers,
        pin_memory=pin_memory,
        worker_init_fn=_one_thread if num_workers else None,
        prefetch_factor=4 if num_workers else None,
        persistent_workers=False,
    )


def _one_thread(_: int) -> None:
    torch.set_num_threads(1)
