"""Shared fixtures: a small synthetic MSD dataset, nnU-Net v2 layout copies of it, CLI and file helpers."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner, Result

from cli import main
from segpipe.core.atomic import read_json, write_json
from segpipe.data.nifti import load_nifti, save_nifti, strip_nifti_ending
from segpipe.data.synth import make_synthetic_dataset

# The suite's CLI predictions run torch fp32 as before segpipe export existed (the tests of --backend auto
# and bf16 ask for them), so no test spends seconds measuring backends for a throw-away model.
os.environ.setdefault("SEGPIPE_BACKEND", "torch")
os.environ.setdefault("SEGPIPE_PRECISION", "fp32")


@pytest.fixture(autouse=True, scope="session")
def _backend_cache(tmp_path_factory: pytest.TempPathFactory) -> None:
    """Measured backend choices go to a temporary folder, never to the user's ~/.cache."""
    os.environ["SEGPIPE_CACHE_DIR"] = str(tmp_path_factory.mktemp("segpipe_cache"))


HIPPOCAMPUS = Path(__file__).parents[1].parent / "shared/data/Task04_Hippocampus"
requires_hippocampus = pytest.mark.skipif(
    not (HIPPOCAMPUS / "dataset.json").is_file(), reason="needs ../shared/data/Task04_Hippocampus (not present)"
)

SYNTH_CASES = 6
SYNTH_SHAPE = (32, 32, 24)
SYNTH_LABELS = 2
NNUNET_LABELS = {"background": 0, "a": 1, "b": 2}


@pytest.fixture(scope="session")
def synthetic_dataset(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """6 labelled cases of about (32, 32, 24), labels 1 and 2, MSD layout. Read-only: copy before breaking."""
    out = tmp_path_factory.mktemp("synthetic") / "Task00_Synth"
    return make_synthetic_dataset(out, cases=SYNTH_CASES, shape=SYNTH_SHAPE, labels=SYNTH_LABELS, seed=0)


@pytest.fixture
def msd_copy(synthetic_dataset: Path, tmp_path: Path) -> Path:
    """A private, writable copy of the synthetic dataset."""
    return Path(shutil.copytree(synthetic_dataset, tmp_path / "msd"))


def channel_data(image: np.ndarray, channel: int) -> np.ndarray:
    """What channel ``channel`` of a converted multi-channel case holds: the image times ``channel + 1``."""
    return (image * (channel + 1)).astype(np.float32)


def write_nnunet_dataset(msd_root: Path, out: Path, cases: int = 3, channels: int = 1) -> Path:
    """Convert the first ``cases`` cases of an MSD dataset to the nnU-Net v2 layout.

    ``imagesTr/CASE_XXXX.nii.gz`` per channel (channel ``c`` = image x (c + 1)), ``labelsTr/CASE.nii.gz``.
    """
    meta = read_json(msd_root / "dataset.json")
    for entry in meta["training"][:cases]:
        case_id = strip_nifti_ending(Path(entry["image"]).name)
        image = load_nifti(msd_root / entry["image"])
        label = load_nifti(msd_root / entry["label"], dtype=np.uint8)
        for c in range(channels):
            save_nifti(out / "imagesTr" / f"{case_id}_{c:04d}.nii.gz", channel_data(image.data, c), image.affine)
        save_nifti(out / "labelsTr" / f"{case_id}.nii.gz", label.data, label.affine, dtype=np.uint8)
    names = ["MRI", "T2"][:channels] if channels <= 2 else [f"ch{c}" for c in range(channels)]
    write_json(
        out / "dataset.json",
        {
            "name": "SynthNN",
            "channel_names": {str(c): name for c, name in enumerate(names)},
            "labels": NNUNET_LABELS,
            "numTraining": cases,
            "file_ending": ".nii.gz",
        },
    )
    return out


@pytest.fixture
def nnunet_dataset(synthetic_dataset: Path, tmp_path: Path) -> Path:
    """3 cases in the nnU-Net v2 layout, one channel ``MRI``."""
    return write_nnunet_dataset(synthetic_dataset, tmp_path / "nnunet", cases=3, channels=1)


@pytest.fixture
def nnunet_dataset_2ch(synthetic_dataset: Path, tmp_path: Path) -> Path:
    """3 cases in the nnU-Net v2 layout, two channels (``MRI`` = image, ``T2`` = 2 x image)."""
    return write_nnunet_dataset(synthetic_dataset, tmp_path / "nnunet2", cases=3, channels=2)


def run_cli(*args: object) -> Result:
    """Invoke the ``segpipe`` command group in-process; ``result.output`` holds stdout and stderr."""
    return CliRunner().invoke(main, [str(a) for a in args])


def truncate(path: Path, fraction: float = 0.5) -> None:
    """Cut a file to ``fraction`` of its bytes, as an interrupted copy would leave it."""
    data = path.read_bytes()
    path.write_bytes(data[: int(len(data) * fraction)])
