"""Patch sampling from preprocessed cases: batches for training and validation.

Reads ``WORK/preprocessed/<data_identifier>/`` (memory-mapped ``.npy``) and yields batches of
``image (B, C, *patch)`` float32 and ``label (B, 1, *patch)`` int8; a cascade stage 2's image has one more
channel per foreground class, stage 1's segmentation one-hot (see :mod:`segpipe.preprocessing.cascade`). A third of
each batch (the last samples, as nnU-Net) is centred on a stored foreground voxel of a random present class; the rest
anywhere. Cases smaller than the patch are zero-padded. Runs inside ``DataLoader`` workers: every
worker draws from its own generator seeded by (seed, epoch, rank, worker), so a run is
reproducible and an epoch can be replayed after a resume.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from segpipe.augmentation.batched import augment_batch, batch_extent, center_pad_or_crop
from segpipe.augmentation.draw import Augmenter, source_extent
from segpipe.core.paths import CaseFilesOnDisk
from segpipe.preprocessing.cascade import one_hot


@dataclass
class SamplerSpec:
    folder: Path
    case_ids: list[str]
    patch_size: list[int]
    batch_size: int
    oversample_foreground: float
    foreground_classes: list[int]  # class indices 1..K
    previous_stage: Path | None = None  # cascade: folder of stage 1's CASE.npy class maps on this grid


@dataclass
class _Case:
    image: np.ndarray  # (C, X, Y, Z), memory-mapped
    label: np.ndarray  # (X, Y, Z)
    coords: dict[int, np.ndarray]  # class -> foreground voxel coordinates (N, 3)
    previous: np.ndarray | None  # cascade: stage 1's class map (X, Y, Z)


class _CaseCache:
    """Memory-mapped arrays and foreground coordinates, opened once per worker."""

    def __init__(self, folder: Path, previous_stage: Path | None = None):
        self.folder = folder
        self.previous_stage = previous_stage
        self._cache: dict[str, _Case] = {}

    def get(self, case_id: str) -> _Case:
        if case_id not in self._cache:
            files = CaseFilesOnDisk(self.folder, case_id)
            with np.load(files.foreground) as fg:
                coords = {int(k.split("_")[1]): fg[k] for k in fg.files}
            previous = None
            if self.previous_stage is not None:
                previous = np.load(self.previous_stage / f"{case_id}.npy", mmap_mode="r")
            self._cache[case_id] = _Case(
                np.load(files.image, mmap_mode="r"), np.load(files.label, mmap_mode="r"), coords, previous
            )
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
        augment_in_workers: bool = True,
    ):
        self.spec = spec
        self.num_batches = num_batches
        self.seed = seed
        self.epoch = epoch
        self.augmenter = augmenter
        self.rank = rank
        self.augment_in_workers = augment_in_workers
        self._cases: _CaseCache | None = None

    @property
    def cases(self) -> _CaseCache:
        """The opened cases, created on first use in each worker process."""
        if self._cases is None:
            self._cases = _CaseCache(self.spec.folder, self.spec.previous_stage)
        return self._cases

    def __iter__(self):
        info = get_worker_info()
        worker, workers = (info.id, info.num_workers) if info else (0, 1)
        rng = np.random.default_rng([self.seed, self.epoch, self.rank, worker])
        torch.manual_seed(int(rng.integers(2**31)))
        for _ in range(worker, self.num_batches, workers):
            yield self.make_batch(rng)

    def make_batch(self, rng: np.random.Generator) -> dict[str, Any]:
        """One batch of crops, with the drawn augmentation parameters when there is an augmenter.

        Augmenting here (``augment_in_workers``), every crop has the batch's common source extent
        (:func:`batch_extent`) and the batch comes out augmented. Augmenting on the training device,
        each sample's crop has its own :func:`source_extent` and ``image``/``label`` are lists: less to
        copy to the device, where :func:`stack_crops` pads them to the common ``extent`` (sent along)."""
        spec = self.spec
        cases = self.cases
        n_random = round(spec.batch_size * (1 - spec.oversample_foreground))
        drawn = [self.augmenter.draw(rng) for _ in range(spec.batch_size)] if self.augmenter else None
        common = batch_extent(spec.patch_size, drawn) if drawn else spec.patch_size
        per_sample = drawn is not None and not self.augment_in_workers
        images, labels = [], []
        for i in range(spec.batch_size):
            case = cases.get(spec.case_ids[rng.integers(len(spec.case_ids))])
            center = choose_center(case.image.shape[1:], spec.patch_size, case.coords, i >= n_random, rng)
            extent = source_extent(spec.patch_size, drawn[i]) if per_sample else common
            image = crop_padded(case.image, center, extent)
            if case.previous is not None:
                previous = crop_padded(case.previous[None], center, extent)[0]
                image = np.concatenate([image, one_hot(previous, len(spec.foreground_classes) + 1)])
            images.append(image)
            labels.append(crop_padded(case.label[None], center, extent))
        if per_sample:  # the label keeps the stored class dtype: int8, or int16
            crops = [torch.from_numpy(i).float() for i in images], [torch.from_numpy(lb) for lb in labels]
            return {"image": crops[0], "label": crops[1], "params": drawn, "extent": common}
        batch: dict[str, Any] = {
            "image": torch.from_numpy(np.stack(images)).float(),
            "label": torch.from_numpy(np.stack(labels)),
        }
        if drawn is None:
            return batch
        assert self.augmenter is not None
        image, label = augment_batch(self.augmenter, batch["image"], batch["label"], drawn, spec.patch_size)
        batch["image"], batch["label"] = image, label
        return batch


def stack_crops(crops: list[torch.Tensor], extent: list[int], device: torch.device) -> torch.Tensor:
    """Per-sample crops of different extents, copied to ``device`` as they are and zero-padded there to
    the common ``extent`` (:func:`center_pad_or_crop` keeps :func:`crop_padded`'s centring, and a sample's
    transform reads nothing outside its own source extent, so the result equals cropping at ``extent``)."""
    return torch.stack([center_pad_or_crop(c.to(device, non_blocking=True), extent) for c in crops])


def batch_bytes(batch: dict[str, Any]) -> int:
    """Bytes of a batch's image and label tensors (what travels to the training device)."""
    parts = [batch["image"], batch["label"]]
    tensors = [t for part in parts for t in (part if isinstance(part, list) else [part])]
    return sum(t.numel() * t.element_size() for t in tensors)


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
