"""NIfTI reading and writing (nibabel), with errors that name the file.

Arrays keep nibabel's voxel order: a 3D image is ``(X, Y, Z)`` in the file's own index order, and
the affine maps those indices to world millimetres. Keeping that order (no reorientation) is what
lets predictions be written back in exactly the input geometry.
"""

from __future__ import annotations

import gzip
import zlib
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import nibabel as nib
import numpy as np

from segpipe.core.atomic import atomic_path

NIFTI_ENDINGS = (".nii.gz", ".nii")


class InputError(ValueError):
    """A problem with one input file; the message starts with the file's path."""

    def __init__(self, path: str | Path, problem: str):
        self.path = str(path)
        self.problem = problem
        super().__init__(f"{path}: {problem}")

    def __reduce__(self) -> tuple:
        # Picklable with both arguments, so a worker process's error reaches the parent intact.
        return (self.__class__, (self.path, self.problem))


@dataclass
class Volume:
    """One NIfTI file: ``data`` is ``(X, Y, Z)`` or ``(X, Y, Z, C)``; ``affine`` is 4x4 in mm."""

    data: np.ndarray
    affine: np.ndarray
    header: nib.Nifti1Header
    path: Path

    @property
    def spacing(self) -> tuple[float, ...]:
        return spacing_from_affine(self.affine)


def is_nifti(path: str | Path) -> bool:
    return str(path).endswith(NIFTI_ENDINGS)


def strip_nifti_ending(name: str) -> str:
    for ending in NIFTI_ENDINGS:
        if name.endswith(ending):
            return name[: -len(ending)]
    return name


def spacing_from_affine(affine: np.ndarray) -> tuple[float, float, float]:
    """Voxel size in mm along each array axis (column norms of the affine's 3x3 block)."""
    return tuple(float(v) for v in np.linalg.norm(np.asarray(affine)[:3, :3], axis=0))  # type: ignore[return-value]


def load_nifti(path: str | Path, dtype: type = np.float32) -> Volume:
    """Read a NIfTI file fully into memory.

    Raises :class:`InputError` naming the file when it is missing, not NIfTI, truncated or corrupt.
    """
    path = Path(path)
    if not path.is_file():
        raise InputError(path, "file not found")
    if not is_nifti(path):
        raise InputError(path, "not a NIfTI file (expected .nii or .nii.gz)")
    try:
        img = nib.load(str(path))
        data = np.asarray(img.dataobj, dtype=dtype)
    except (EOFError, OSError, zlib.error, gzip.BadGzipFile, ValueError, nib.filebasedimages.ImageFileError) as exc:
        raise InputError(path, f"unreadable or truncated NIfTI ({type(exc).__name__}: {exc})") from exc
    return Volume(data=data, affine=np.asarray(img.affine, dtype=np.float64), header=img.header.copy(), path=path)


def save_nifti(
    path: str | Path,
    data: np.ndarray,
    affine: np.ndarray,
    header: nib.Nifti1Header | None = None,
    dtype: type | None = None,
) -> None:
    """Write ``data`` with the given geometry atomically (temp file + rename).

    When ``header`` is given (the input's), orientation codes (qform/sform) are preserved; the data
    type and scaling are reset so label maps are stored exactly.
    """
    path = Path(path)
    if dtype is not None:
        data = data.astype(dtype, copy=False)
    hdr = header.copy() if header is not None else None
    img = nib.Nifti1Image(data, affine, header=hdr)
    img.set_data_dtype(data.dtype)
    img.header.set_slope_inter(1.0, 0.0)
    if hdr is not None:
        img.set_qform(affine, code=int(hdr["qform_code"]) or 1)
        img.set_sform(affine, code=int(hdr["sform_code"]) or 1)
    ending = ".nii.gz" if str(path).endswith(".gz") else ".nii"
    with atomic_path(path, suffix=ending) as tmp:
        nib.save(img, str(tmp))


def label_file_dtype(labels: Sequence[int]) -> type[np.unsignedinteger]:
    """uint8 label maps while every value fits (as nnU-Net's export), else uint16 (e.g. MM-WHS's 205..850)."""
    return np.uint8 if max(labels, default=0) <= 255 else np.uint16
