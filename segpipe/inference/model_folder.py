"""Model folders: what ``segpipe export`` writes and ``segpipe predict -m MODEL_DIR`` reads.

A self-contained folder: the network(s) in one format (ONNX, OpenVINO IR or TorchScript) and
``segpipe_model.json``, a :class:`ModelManifest` with everything prediction needs besides the
network: the plans with only the exported configuration (normalization, target spacing, patch,
labels and their names), the mirror axes of training, the postprocessing decision, versions, and the
SHA-256 of every other file. Loading verifies every checksum first, so a damaged or edited file is an
error naming it, never a silently different prediction. No WORK folder and no training code needed.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from segpipe.core.atomic import read_json
from segpipe.core.digest import file_digest
from segpipe.core.serialization import from_dict
from segpipe.planning.plans import Configuration, Plans

MANIFEST_FILE = "segpipe_model.json"
MODEL_FOLDER_VERSION = 1
# each format's network file ending (OpenVINO's weights sit beside its .xml in a .bin)
FORMATS = {"onnx": ".onnx", "openvino": ".xml", "torchscript": ".pt"}


class ModelFolderError(ValueError):
    """A model folder that cannot be used: missing, damaged or of another version."""


@dataclass
class ModelManifest:
    """``segpipe_model.json``: a model folder's contents."""

    format: str  # a key of FORMATS
    configuration: str
    plans: Plans  # only the exported configuration
    networks: list[str]  # network files, one per ensemble member
    members: list[str]  # where each network came from: WORK-relative checkpoint paths
    mirror_axes: list[int]  # the axes test-time mirroring may use (those of training)
    window: list[int]  # one network input (C, X, Y, Z): channels and patch
    postprocessing: dict[str, Any] | None = None  # the largest-component decision, as WORK/<config> had it
    versions: dict[str, str] = field(default_factory=dict)
    files: dict[str, str] = field(default_factory=dict)  # every other file of the folder -> its SHA-256
    version: int = MODEL_FOLDER_VERSION

    @property
    def config(self) -> Configuration:
        return self.plans.configuration(self.configuration)


def sha256_of(path: str | Path) -> str:
    return file_digest(path, "sha256")


def is_model_folder(path: str | Path) -> bool:
    return (Path(path) / MANIFEST_FILE).is_file()


def verify_files(folder: Path, manifest: ModelManifest) -> None:
    """Every file the manifest lists exists with its recorded SHA-256, and every network is listed."""
    unlisted = [n for n in manifest.networks if n not in manifest.files]
    if unlisted:
        raise ModelFolderError(f"{folder / unlisted[0]}: network file without a checksum in {MANIFEST_FILE}")
    for name, expected in manifest.files.items():
        path = folder / name
        if Path(name).is_absolute() or ".." in Path(name).parts:
            raise ModelFolderError(f"{folder / MANIFEST_FILE}: file {name!r} lies outside the model folder")
        if not path.is_file():
            raise ModelFolderError(f"{path}: missing from the model folder (re-export or copy it whole)")
        if sha256_of(path) != expected:
            raise ModelFolderError(f"{path}: checksum mismatch, the file changed after export (damaged or edited)")


def load_model_folder(folder: str | Path) -> ModelManifest:
    """The manifest of ``folder``, after checking its version and every file's checksum."""
    folder = Path(folder)
    path = folder / MANIFEST_FILE
    if not path.is_file():
        raise ModelFolderError(f"{folder}: not a model folder (no {MANIFEST_FILE}; make one with segpipe export)")
    data = read_json(path)
    if not isinstance(data, dict) or data.get("version") != MODEL_FOLDER_VERSION:
        found = data.get("version") if isinstance(data, dict) else None
        raise ModelFolderError(f"{path}: model folder version {found}, this segpipe reads {MODEL_FOLDER_VERSION}")
    try:
        manifest = from_dict(ModelManifest, data, where=str(path))
    except ValueError as exc:
        raise ModelFolderError(str(exc)) from exc
    if manifest.format not in FORMATS:
        raise ModelFolderError(f"{path}: unknown format {manifest.format!r}; known: {', '.join(FORMATS)}")
    verify_files(folder, manifest)
    return manifest
