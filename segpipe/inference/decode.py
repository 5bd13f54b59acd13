"""Probabilities to label maps: argmax over classes, or nnU-Net's region decoding.

Predictions (:mod:`segpipe.inference.predict`), ensembles of saved probabilities
(:mod:`segpipe.inference.ensemble`) and the report's ensembles all turn ``(C, X, Y, Z)`` probabilities
into label values here. Labels: the argmax class, mapped to its label value. Regions (nnU-Net v2's
``convert_probabilities_to_segmentation`` in nnunetv2/utilities/label_handling/label_handling.py): each
region's sigmoid probability above 0.5 writes its value of ``regions_class_order``, in that order, so
later (inner) regions overwrite earlier (outer) ones.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch

from segpipe.data.nifti import label_file_dtype


def argmax_classes(probs: torch.Tensor | np.ndarray, slab: int = 16) -> np.ndarray:
    """Argmax over the class axis of ``(C, X, Y, Z)`` as int16, a slab of X at a time (no int64 volume)."""
    probs = torch.as_tensor(probs)
    out = np.empty(probs.shape[1:], dtype=np.int16)
    for i in range(0, probs.shape[1], slab):
        out[i : i + slab] = probs[:, i : i + slab].argmax(dim=0).to(torch.int16).cpu().numpy()
    return out


def decode_regions(probs: torch.Tensor | np.ndarray, regions_class_order: Sequence[int]) -> np.ndarray:
    """``(R, X, Y, Z)`` region probabilities -> label values: region ``i`` above 0.5 writes
    ``regions_class_order[i]``, later regions over earlier ones."""
    probs = torch.as_tensor(probs)
    out = np.zeros(probs.shape[1:], dtype=label_file_dtype(list(regions_class_order)))
    for i, value in enumerate(regions_class_order):
        out[(probs[i] > 0.5).cpu().numpy()] = value
    return out


def label_map(
    probs: torch.Tensor | np.ndarray, labels: Sequence[int], regions_class_order: Sequence[int] | None = None
) -> np.ndarray:
    """``(C, X, Y, Z)`` probabilities -> ``(X, Y, Z)`` label values (``labels``: the foreground values,
    class ``k`` is ``labels[k - 1]``; with ``regions_class_order`` the channels are regions)."""
    if regions_class_order is not None:
        return decode_regions(probs, regions_class_order)
    values = np.array([0, *labels], dtype=label_file_dtype(list(labels)))
    return values[argmax_classes(probs)]
