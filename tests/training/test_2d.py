"""The 2d configuration end to end on a small thick-slice synthetic set, through the CLI.

Plan (2d planned beside 3d_fullres, slicing the coarse axis), train on slices of the 3d_fullres data,
predict slice by slice, evaluate, decide postprocessing and report 2d beside 3d_fullres and their
ensemble; plus the pieces that make 2d differ: in-plane mirroring, one window per slice.
"""

from __future__ import annotations

from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch
from click.testing import Result
from conftest import run_cli

from segpipe.core.atomic import read_json
from segpipe.inference.sliding_window import predict_probabilities, window_starts
from segpipe.planning.plans import FULLRES, TWO_D, load_plans
from segpipe.runs.checkpoint import FINAL, load_checkpoint, mirror_axes_of

TRAIN = "--fold 0 --epochs 1 --iters-per-epoch 3 --val-iters 1 --num-folds 2 --device cpu --workers 0 --seed 1"


def ok(result: Result) -> str:
    assert result.exit_code == 0, f"exit {result.exit_code}\n{result.output}\n{result.exception!r}"
    return result.output


@pytest.fixture(scope="module")
def thick_work(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    root = tmp_path_factory.mktemp("thick")
    data, work = root / "Task09_Thick", root / "work"
    ok(run_cli("synth", data, "--cases", 6, "--test-cases", 2, "--shape", "48,40,14", "--spacing", "1,1,3.2"))
    ok(run_cli("preprocess", data, "-o", work, "--preset", "cpu", "--workers", 1))
    return data, work


def test_2d_is_planned_slicing_the_coarse_axis(thick_work: tuple[Path, Path]) -> None:
    _, work = thick_work
    plans = load_plans(work / "plans.json")
    assert list(plans.configurations)[:2] == [TWO_D, FULLRES]
    two_d, full = plans.configurations[TWO_D], plans.configurations[FULLRES]
    assert two_d.slice_axis == 2 and full.slice_axis is None
    assert two_d.patch_size[2] == 1 and two_d.data_identifier == full.data_identifier
    assert all(k[2] == 1 for k in two_d.topology.kernel_sizes) and all(s[2] == 1 for s in two_d.topology.strides)
    # in-plane: the median in-plane shape rounded up to the pooling divisor (no memory limit bites here)
    divisor = two_d.topology.divisor()
    for axis in (0, 1):
        assert two_d.patch_size[axis] == -(-full.median_shape[axis] // divisor[axis]) * divisor[axis]


def test_2d_trains_predicts_evaluates_and_reports(thick_work: tuple[Path, Path], tmp_path: Path) -> None:
    data, work = thick_work
    out = ok(run_cli("train", work, "--config", TWO_D, *TRAIN.split()))
    assert "augmentation 2d (out-of-plane axis 2), mirroring axes [0, 1]" in out
    run_dir = work / TWO_D / "fold_0"
    ckpt = load_checkpoint(run_dir / FINAL)
    assert ckpt["mirror_axes"] == [0, 1] and mirror_axes_of(run_dir / FINAL) == (0, 1)
    first_conv = next(v for k, v in ckpt["model"].items() if k.endswith("conv.weight"))
    assert first_conv.dim() == 4  # a real 2D network (out, in, kx, ky)
    splits = read_json(work / "splits.json")
    summary = read_json(run_dir / "validation" / "summary.json")
    assert sorted(c["case"] for c in summary["per_case"]) == sorted(splits[0]["val"])

    ok(run_cli("train", work, "--config", FULLRES, *TRAIN.split()))
    assert mirror_axes_of(work / FULLRES / "fold_0" / FINAL) == (0, 1, 2)

    pred = tmp_path / "pred"
    ok(run_cli("predict", "-i", data / "imagesTs", "-o", pred, "-m", work, "--config", TWO_D, "--folds", 0))
    for image in sorted((data / "imagesTs").glob("*.nii.gz")):
        written, source = nib.load(str(pred / image.name)), nib.load(str(image))
        assert written.shape == source.shape[:3]
        np.testing.assert_allclose(written.affine, source.affine, atol=1e-5)
    ok(run_cli("evaluate", run_dir / "validation", data / "labelsTr", "-o", tmp_path / "summary.json"))
    assert read_json(tmp_path / "summary.json")["num_cases"] == len(splits[0]["val"])

    ok(run_cli("postprocess", work, "--config", TWO_D))
    assert (work / TWO_D / "postprocessing.json").is_file()
    ok(run_cli("report", work))
    names = [c["name"] for c in read_json(work / "report" / "report.json")["candidates"]]
    assert {"2d:final", "3d_fullres:final", "ensemble(2d+3d_fullres)"} <= set(names)


class CountingSlices(torch.nn.Module):
    """Background 1, foreground 0 everywhere; records each forward batch's shape."""

    def __init__(self) -> None:
        super().__init__()
        self.shapes: list[tuple[int, ...]] = []

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.shapes.append(tuple(x.shape))
        out = torch.zeros(x.shape[0], 2, *x.shape[2:])
        out[:, 0] = 1.0
        return out


def test_2d_windows_visit_every_slice_once_with_in_plane_mirrors() -> None:
    assert window_starts(14, 1, 0.5) == list(range(14))
    assert window_starts(100, 40, 0.5) == [0, 20, 40, 60]  # 3d unchanged
    model = CountingSlices()
    probs = predict_probabilities(model, torch.zeros(1, 32, 24, 7), (32, 24, 1), 2, mirror_axes=(0, 1))
    assert probs.shape == (2, 32, 24, 7)
    assert len(model.shapes) == 7 and all(s == (4, 1, 32, 24, 1) for s in model.shapes)  # 4 mirrorings
    torch.testing.assert_close(probs[0], torch.full((32, 24, 7), 1 / (1 + np.exp(-1.0))))
