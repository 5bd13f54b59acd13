"""``segpipe export`` and ``predict -m MODEL_DIR``: a small model trained through the CLI, exported to every
format; each exported network against the torch module on the same windows, whole predictions against the
WORK folder's torch fp32 ones, bf16 close to fp32, a model folder predicting in a process that never imports
training code, and a tampered file refused by name."""

from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
import sys
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch

from segpipe.core.atomic import read_json
from segpipe.inference.backends import NetworkSource, Precision, build_runner
from segpipe.inference.model_folder import MANIFEST_FILE, ModelFolderError, load_model_folder
from segpipe.planning.plans import load_plans
from segpipe.runs.checkpoint import FINAL, load_model
from tests.conftest import run_cli

REPO = Path(__file__).resolve().parents[2]
TRAIN = "--fold 0 --epochs 1 --iters-per-epoch 10 --val-iters 1 --num-folds 2 --workers 0 --device cpu --no-validation"
# (format, backend) pairs that run an exported folder
RUNS = [("onnx", "onnxruntime"), ("onnx", "openvino"), ("openvino", "openvino"), ("torchscript", "torch")]


def ok(result):
    assert result.exit_code == 0, result.output
    return result


@pytest.fixture(scope="module")
def trained(synthetic_dataset: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A WORK folder whose fold 0 trained 10 iterations (enough for non-trivial label maps)."""
    work = tmp_path_factory.mktemp("export") / "work"
    ok(
        run_cli(
            "preprocess", synthetic_dataset, "-o", work, "--preset", "cpu", "--workers", 1, "--configs", "3d_fullres"
        )
    )
    ok(run_cli("train", work, *TRAIN.split()))
    return work


@pytest.fixture(scope="module")
def exported(trained: Path) -> dict[str, Path]:
    out = {}
    for fmt in ("onnx", "openvino", "torchscript"):
        out[fmt] = trained.parent / f"model_{fmt}"
        ok(run_cli("export", trained, "-o", out[fmt], "--format", fmt))
    return out


@pytest.fixture(scope="module")
def torch_fp32(trained: Path, synthetic_dataset: Path) -> Path:
    """The WORK folder's prediction of every training image: torch, fp32, with probabilities."""
    out = trained.parent / "pred_torch_fp32"
    args = ["-m", trained, "--backend", "torch", "--precision", "fp32", "--save-probabilities"]
    ok(run_cli("predict", "-i", synthetic_dataset / "imagesTr", "-o", out, *args))
    return out


def labels(folder: Path) -> dict[str, np.ndarray]:
    return {p.name: np.asarray(nib.load(str(p)).dataobj) for p in sorted(folder.glob("*.nii.gz"))}


def dice(a: np.ndarray, b: np.ndarray, k: int) -> float:
    both = (a == k).sum() + (b == k).sum()
    return 1.0 if both == 0 else 2 * ((a == k) & (b == k)).sum() / both


def test_manifest_holds_what_prediction_needs(trained: Path, exported: dict[str, Path]) -> None:
    manifest = load_model_folder(exported["onnx"])
    plans = load_plans(trained / "plans.json")
    assert list(manifest.plans.configurations) == ["3d_fullres"]  # the plans subset
    assert manifest.config == plans.configuration("3d_fullres")
    assert manifest.plans.labels == plans.labels and manifest.plans.normalization == plans.normalization
    assert manifest.members == ["3d_fullres/fold_0/checkpoint_final.pt"]
    assert manifest.mirror_axes == [0, 1, 2] and manifest.window == [1, *plans.configuration("3d_fullres").patch_size]
    assert {"torch", "python"} <= set(manifest.versions)
    # checksums, recomputed here, of every file but the manifest
    files = sorted(p.name for p in exported["openvino"].iterdir() if p.name != MANIFEST_FILE)
    assert files == ["network_0.bin", "network_0.xml"]
    recorded = read_json(exported["openvino"] / MANIFEST_FILE)["files"]
    assert recorded == {n: hashlib.sha256((exported["openvino"] / n).read_bytes()).hexdigest() for n in files}


@pytest.mark.parametrize("fmt, backend", RUNS)
def test_exported_network_equals_the_torch_module_on_the_same_windows(
    trained: Path, exported: dict[str, Path], fmt: str, backend: str
) -> None:
    """Softmax of the exported file within 1e-3 of the checkpoint's torch module (fp32), on a batch of
    windows of another size than the export example (dynamic batch)."""
    plans = load_plans(trained / "plans.json")
    config = plans.configuration("3d_fullres")
    module = load_model(trained / "3d_fullres" / "fold_0" / FINAL, plans, config, torch.device("cpu"))
    manifest = load_model_folder(exported[fmt])
    x = torch.randn(6, *manifest.window, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        expected = torch.softmax(module(x), 1)
    source = NetworkSource(tuple(manifest.window), path=exported[fmt] / manifest.networks[0], format=fmt)
    runner = build_runner(backend, source, Precision("fp32", ""), torch.device("cpu"))
    got = torch.softmax(runner(x), 1)
    assert (got - expected).abs().max().item() < 1e-3


@pytest.mark.parametrize("fmt, backend", RUNS)
def test_model_folder_predicts_as_the_work_folder(
    exported: dict[str, Path], torch_fp32: Path, synthetic_dataset: Path, tmp_path: Path, fmt: str, backend: str
) -> None:
    """Whole cases (preprocessing, windows, mirroring, resampling back): probabilities within 1e-3 of the WORK
    folder's torch fp32 prediction (plus float16 storage), label maps equal but for near-ties."""
    out = tmp_path / "pred"
    args = ["-m", exported[fmt], "--backend", backend, "--precision", "fp32", "--save-probabilities"]
    result = ok(run_cli("predict", "-i", synthetic_dataset / "imagesTr", "-o", out, *args))
    assert f"'backend': '{backend}'" in result.output and "'precision': 'fp32'" in result.output
    for name in labels(torch_fp32):
        case = name.removesuffix(".nii.gz")
        with np.load(out / f"{case}.npz") as a, np.load(torch_fp32 / f"{case}.npz") as b:
            diff = np.abs(a["probabilities"].astype(np.float32) - b["probabilities"].astype(np.float32)).max()
        assert diff < 1e-3 + 1e-3, (case, diff)  # 1e-3, and one float16 step near 1 in each file
    ours, reference = labels(out), labels(torch_fp32)
    assert ours.keys() == reference.keys()
    for name in ours:
        assert (ours[name] == reference[name]).mean() > 0.999, name


@pytest.mark.parametrize("fmt, backend", [("onnx", "openvino"), ("torchscript", "torch")])
def test_bf16_dice_close_to_fp32(
    exported: dict[str, Path], torch_fp32: Path, synthetic_dataset: Path, tmp_path: Path, fmt: str, backend: str
) -> None:
    out = tmp_path / "pred"
    args = ["-m", exported[fmt], "--backend", backend, "--precision", "bf16"]
    ok(run_cli("predict", "-i", synthetic_dataset / "imagesTr", "-o", out, *args))
    ours, reference = labels(out), labels(torch_fp32)
    for k in (1, 2):
        mean = np.mean([dice(ours[n], reference[n], k) for n in reference])
        assert mean > 0.97, (k, mean)  # agreement with fp32's own labels, not with the ground truth


def test_model_folder_predicts_elsewhere_without_training_code(
    exported: dict[str, Path], torch_fp32: Path, synthetic_dataset: Path, tmp_path: Path
) -> None:
    """A copy of the folder, predicted in a fresh process, with no WORK folder; segpipe.training never imported."""
    model = Path(shutil.copytree(exported["onnx"], tmp_path / "moved" / "model"))
    out = tmp_path / "pred"
    script = (
        "import sys\n"
        "from cli import main\n"
        f"argv = ['predict', '-i', {str(synthetic_dataset / 'imagesTr')!r}, '-o', {str(out)!r}, '-m', {str(model)!r},"
        " '--backend', 'onnxruntime']\n"
        "main(argv, standalone_mode=False)\n"
        "imported = sorted(m for m in sys.modules if m.startswith('segpipe.training'))\n"
        "assert not imported, imported\n"
        "print('no training modules')\n"
    )
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    proc = subprocess.run([sys.executable, "-c", script], cwd=REPO, env=env, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "no training modules" in proc.stdout
    ours, reference = labels(out), labels(torch_fp32)
    assert ours.keys() == reference.keys()
    assert all((ours[n] == reference[n]).mean() > 0.999 for n in ours)


def test_tampered_or_missing_file_is_refused_by_name(
    exported: dict[str, Path], synthetic_dataset: Path, tmp_path: Path
) -> None:
    model = Path(shutil.copytree(exported["onnx"], tmp_path / "model"))
    network = model / "network_0.onnx"
    data = bytearray(network.read_bytes())
    data[len(data) // 2] ^= 0xFF  # one flipped byte
    network.write_bytes(bytes(data))
    with pytest.raises(ModelFolderError, match="network_0.onnx: checksum mismatch"):
        load_model_folder(model)
    result = run_cli("predict", "-i", synthetic_dataset / "imagesTr", "-o", tmp_path / "out", "-m", model)
    assert result.exit_code == 1 and "network_0.onnx: checksum mismatch" in result.output
    assert not (tmp_path / "out").exists() or not list((tmp_path / "out").glob("*.nii.gz"))
    network.unlink()
    with pytest.raises(ModelFolderError, match="network_0.onnx: missing"):
        load_model_folder(model)


def test_export_replaces_a_model_folder_but_no_other(trained: Path, exported: dict[str, Path], tmp_path: Path) -> None:
    other = tmp_path / "notes"
    other.mkdir()
    (other / "keep.txt").write_text("mine")
    result = run_cli("export", trained, "-o", other)
    assert result.exit_code == 1 and "not a model folder" in result.output
    assert (other / "keep.txt").read_text() == "mine"
    model = Path(shutil.copytree(exported["torchscript"], tmp_path / "model"))
    ok(run_cli("export", trained, "-o", model, "--format", "onnx"))
    assert load_model_folder(model).format == "onnx" and not (model / "network_0.pt").exists()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no temporary folder left behind


def test_model_folder_with_fold_options_is_an_error(exported: dict[str, Path], synthetic_dataset: Path) -> None:
    result = run_cli(
        "predict", "-i", synthetic_dataset / "imagesTr", "-o", "unused", "-m", exported["onnx"], "--folds", "0"
    )
    assert result.exit_code == 1 and "model folder" in result.output


def test_auto_backend_measures_the_installed_runtimes_on_a_model_folder(
    exported: dict[str, Path], torch_fp32: Path, synthetic_dataset: Path, tmp_path: Path
) -> None:
    """--backend auto on an ONNX folder: both runtimes that read ONNX are timed and the choice is logged."""
    out = tmp_path / "pred"
    args = ["-m", exported["onnx"], "--backend", "auto", "--precision", "fp32"]
    result = ok(run_cli("predict", "-i", synthetic_dataset / "imagesTr", "-o", out, *args))
    assert "(measured: " in result.output and "openvino" in result.output and "onnxruntime" in result.output
    ours, reference = labels(out), labels(torch_fp32)
    assert all((ours[n] == reference[n]).mean() > 0.999 for n in reference)
