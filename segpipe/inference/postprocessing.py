"""Applying a postprocessing decision: keep the largest connected component(s) of a label map.

Sits at the end of inference: ``segpipe predict`` reads ``WORK/<config>/postprocessing.json`` (written
by :mod:`segpipe.evaluation.postprocessing_decision` from the folds' out-of-fold predictions) and
applies it to every label map it writes (probabilities are left as they are) unless
``--no-postprocessing``.

Label maps are ``(X, Y, Z)`` integer arrays of label values. Connected components use full
connectivity (26 neighbours in 3D), as nnU-Net does: nnunetv2/postprocessing/remove_connected_components.py
``remove_all_but_largest_component_from_segmentation`` calls acvl_utils' ``remove_all_but_largest_component``,
whose ``skimage.measure.label`` defaults to ``connectivity = ndim``; components tied for the largest
are all kept.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
from scipy import ndimage

from segpipe.core.atomic import read_json


def largest_component_mask(mask: np.ndarray) -> np.ndarray:
    """The largest fully connected component(s) of a boolean mask: every component of the largest size."""
    structure = ndimage.generate_binary_structure(mask.ndim, mask.ndim)  # faces, edges and corners
    components, count = ndimage.label(mask, structure=structure)
    if count <= 1:
        return mask.copy()
    sizes = np.bincount(components.ravel())
    sizes[0] = 0
    largest = np.flatnonzero(sizes == sizes.max())
    return np.isin(components, largest)


def keep_largest_component(seg: np.ndarray, labels: Sequence[int | list[int]] | None = None) -> np.ndarray:
    """A copy of ``seg`` with all but the largest connected component set to background (0).

    ``labels=None``: the components of all foreground together (any non-zero value); the voxels of
    every smaller component are set to 0, whatever their label. With a list: for each label, the
    components of that label alone. Connectivity: full (26 neighbours in 3D).
    """
    out = np.array(seg, copy=True)
    if labels is None:
        fg = out != 0
        out[fg & ~largest_component_mask(fg)] = 0
        return out
    for label in labels:  # a label value, or a region: a list of them (nnU-Net's region_or_label_to_mask)
        mask = np.isin(out, label) if isinstance(label, list | tuple) else out == label
        out[mask & ~largest_component_mask(mask)] = 0
    return out


def apply_postprocessing(seg: np.ndarray, decision: dict[str, Any] | None) -> np.ndarray:
    """Apply a decision of ``decide_postprocessing`` to a label map (``None``: unchanged copy)."""
    out = np.array(seg, copy=True)
    if not decision:
        return out
    if decision.get("foreground_largest_component"):
        out = keep_largest_component(out, None)
    per_label = [
        [int(x) for x in v] if isinstance(v, list) else int(v) for v in decision.get("per_label_largest_component", [])
    ]
    if per_label:
        out = keep_largest_component(out, per_label)
    return out


def load_decision(path: str | Path) -> dict[str, Any] | None:
    """The decision stored at ``path``, or ``None`` when there is no such file."""
    path = Path(path)
    return read_json(path) if path.is_file() else None
