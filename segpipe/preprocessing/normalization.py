"""Intensity normalizers, one registry entry per scheme named in the plans.

Used by preprocessing (training cases) and inference (new cases) alike, so both see identical
intensities. A new scheme is one function plus ``@NORMALIZERS.register("name")``.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np

from segpipe.core.registry import Registry
from segpipe.planning.plans import Normalization

Normalizer = Callable[[np.ndarray, np.ndarray | None, Normalization], np.ndarray]
NORMALIZERS: Registry[Normalizer] = Registry("normalization scheme")


@NORMALIZERS.register("zscore")
def zscore(channel: np.ndarray, mask: np.ndarray | None, params: Normalization) -> np.ndarray:
    """Per-image z-score; with a mask, statistics from inside it and zeros outside."""
    values = channel[mask] if mask is not None else channel
    mean = float(values.mean()) if values.size else 0.0
    std = float(values.std()) if values.size else 1.0
    out = channel - mean
    out /= max(std, 1e-8)  # in place: one volume less at the peak
    if mask is not None:
        out[~mask] = 0
    return out.astype(np.float32, copy=False)


@NORMALIZERS.register("ct")
def ct(channel: np.ndarray, mask: np.ndarray | None, params: Normalization) -> np.ndarray:
    """Clip to the dataset's foreground 0.5/99.5 percentiles, z-score with its foreground mean/std."""
    assert params.lower is not None and params.upper is not None and params.mean is not None
    out = np.clip(channel, params.lower, params.upper)
    return ((out - params.mean) / max(params.std or 1.0, 1e-8)).astype(np.float32, copy=False)


def normalize(image: np.ndarray, schemes: list[Normalization]) -> np.ndarray:
    """Normalize a ``(C, X, Y, Z)`` image channel by channel."""
    if image.shape[0] != len(schemes):
        raise ValueError(f"image has {image.shape[0]} channels, plans expect {len(schemes)}")
    nonzero = np.any(image != 0, axis=0)
    out = np.empty(image.shape, dtype=np.float32)
    for c, params in enumerate(schemes):
        mask = nonzero if params.use_nonzero_mask else None
        out[c] = NORMALIZERS.get(params.scheme)(image[c].astype(np.float32, copy=False), mask, params)
    return out
