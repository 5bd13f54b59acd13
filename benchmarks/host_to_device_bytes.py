"""Bytes copied to the training device per batch when augmentation runs there (``augment_on=device``,
the GPU default): every sample cropped to the batch's largest source extent (before) or to its own (now).

    python benchmarks/host_to_device_bytes.py WORK [WORK ...] [--config 3d_fullres] [--batches 200]

Only the plans are read: the extents follow from the drawn augmentation parameters, not from the data.
"""

from __future__ import annotations

import argparse
import math
from pathlib import Path

import numpy as np

from segpipe.augmentation.batched import batch_extent
from segpipe.augmentation.draw import source_extent
from segpipe.core.paths import WorkDir
from segpipe.planning.plans import load_plans
from segpipe.training.loop import build_augmenter


def bytes_per_batch(work: Path, config_name: str, batches: int, seed: int = 0) -> tuple[float, float, str]:
    """Mean bytes per batch, common extent vs own extents, and a description of the plan."""
    plans = load_plans(WorkDir(work).plans)
    config = plans.configuration(config_name)
    augmenter = build_augmenter(plans, config, plans.training)
    per_voxel = 4 * len(plans.channel_names) + np.dtype(plans.class_dtype).itemsize  # float32 image + label
    rng = np.random.default_rng(seed)
    common, own = [], []
    for _ in range(batches):
        drawn = [augmenter.draw(rng) for _ in range(config.batch_size)]
        common.append(config.batch_size * math.prod(batch_extent(config.patch_size, drawn)) * per_voxel)
        own.append(sum(math.prod(source_extent(config.patch_size, p)) for p in drawn) * per_voxel)
    label = f"{plans.dataset_name} {config_name}: patch {config.patch_size}, batch {config.batch_size}"
    return float(np.mean(common)), float(np.mean(own)), label


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("work", nargs="+", type=Path)
    parser.add_argument("--config", default="3d_fullres")
    parser.add_argument("--batches", type=int, default=200)
    args = parser.parse_args()
    print("| plan | before (largest extent) MB | now (own extents) MB | ratio |")
    print("|---|---:|---:|---:|")
    for work in args.work:
        before, now, label = bytes_per_batch(work, args.config, args.batches)
        print(f"| {label} | {before / 1e6:.2f} | {now / 1e6:.2f} | {before / now:.2f}x |")


if __name__ == "__main__":
    main()
