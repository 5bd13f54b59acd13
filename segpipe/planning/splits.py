"""Cross-validation splits: K folds with a fixed seed, stored in ``WORK/splits.json`` once.

Training reads the splits file and never re-draws it, so every fold of every configuration uses
the same held-out cases. A user may replace the file with their own (same format).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from segpipe.core.atomic import read_json, write_json


def make_splits(case_ids: list[str], num_folds: int, seed: int) -> list[dict[str, list[str]]]:
    """Shuffle the cases once and deal them into ``num_folds`` validation sets."""
    if num_folds < 2:
        raise ValueError("need at least 2 folds")
    if len(case_ids) < num_folds:
        raise ValueError(f"{len(case_ids)} cases cannot be split into {num_folds} folds")
    ids = sorted(case_ids)
    order = np.random.default_rng(seed).permutation(len(ids))
    folds = np.array_split(order, num_folds)
    out = []
    for k in range(num_folds):
        val = sorted(ids[i] for i in folds[k])
        out.append({"train": sorted(set(ids) - set(val)), "val": val})
    return out


def load_or_create_splits(
    path: str | Path, case_ids: list[str], num_folds: int, seed: int
) -> list[dict[str, list[str]]]:
    """Read the splits file, or create it the first time. Errors name the file."""
    path = Path(path)
    if path.exists():
        splits = read_json(path)
        if not isinstance(splits, list) or not all("train" in s and "val" in s for s in splits):
            raise ValueError(f"{path}: expected a list of {{'train': [...], 'val': [...]}} folds")
        unknown = {c for s in splits for c in s["train"] + s["val"]} - set(case_ids)
        if unknown:
            raise ValueError(f"{path}: names cases that are not preprocessed: {sorted(unknown)[:5]}")
        return splits
    splits = make_splits(case_ids, num_folds, seed)
    write_json(path, splits)
    return splits
