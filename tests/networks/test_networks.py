"""Networks, optimizers and losses by name: every registered network in 2D and 3D, unknown names
refused with the list, and a network registered from this file trained through the CLI."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from click.testing import Result
from conftest import run_cli
from torch import nn

from segpipe.core.atomic import read_json, write_json
from segpipe.networks.build import build_network
from segpipe.networks.registry import NETWORKS, NetworkInput
from segpipe.planning.plans import Configuration, NetworkSpec, Topology, load_preset
from segpipe.runs.checkpoint import FINAL, load_checkpoint
from segpipe.training.losses import DiceCE, build_loss
from segpipe.training.optimizers import OPTIMIZERS

TOPO_3D = Topology([[3, 3, 3]] * 4, [[1, 1, 1]] + [[2, 2, 2]] * 3, [8, 16, 16, 16])
TOPO_2D = Topology([[3, 1, 3]] * 4, [[1, 1, 1]] + [[2, 1, 2]] * 3, [8, 16, 16, 16])


def ok(result: Result) -> str:
    assert result.exit_code == 0, f"exit {result.exit_code}\n{result.output}\n{result.exception!r}"
    return result.output


@pytest.mark.parametrize("name", ["dynunet", "resenc", "segresnet"])
@pytest.mark.parametrize("two_d", [False, True])
def test_registered_networks_in_2d_and_3d(name: str, two_d: bool) -> None:
    patch = [32, 1, 24] if two_d else [32, 32, 24]
    config = Configuration(
        "2d" if two_d else "3d_fullres",
        [1, 1, 1],
        [32, 32, 24],
        patch,
        2,
        TOPO_2D if two_d else TOPO_3D,
        "3d_fullres",
        slice_axis=1 if two_d else None,
        network=NetworkSpec(name),
    )
    net = build_network(config, 1, 3, deep_supervision=True, extra_in_channels=2).train()
    x = torch.randn(2, 3, 32, 5 if two_d else 32, 24)  # 1 image + 2 cascade channels; 2d: 5 slices at once
    out = net(x)
    heads = out if isinstance(out, tuple) else (out,)
    assert heads[0].shape == (2, 3, *x.shape[2:])
    for i, head in enumerate(heads[1:], start=1):  # lower heads at their own resolution (2d: slices kept)
        expected = [s // 2**i if not (two_d and a == 1) else s for a, s in enumerate(x.shape[2:])]
        assert list(head.shape[2:]) == expected
    assert net.eval()(x).shape == (2, 3, *x.shape[2:])


@pytest.mark.parametrize("name", ["dynunet", "resenc", "segresnet"])
def test_checkpoints_of_every_network_load_for_prediction(name: str, tmp_path: Path) -> None:
    """load_model rebuilds the trained network (deep-supervision heads and all) and gives the same output."""
    from segpipe.planning.plans import Plans, TrainingSettings
    from segpipe.runs.checkpoint import load_model, save_checkpoint

    config = Configuration("3d_fullres", [1, 1, 1], [32] * 3, [32] * 3, 2, TOPO_3D, "x", network=NetworkSpec(name))
    plans = Plans(
        "t", "default", ["MRI"], {"background": 0, "a": 1}, [], {"3d_fullres": config}, TrainingSettings(), [1.0] * 3
    )
    trained = build_network(config, 1, 2, deep_supervision=True)
    save_checkpoint(tmp_path / "c.pt", {"model": trained.state_dict()})
    loaded = load_model(tmp_path / "c.pt", plans, config, torch.device("cpu"))
    x = torch.randn(1, 1, 32, 32, 32)
    torch.testing.assert_close(loaded(x), trained.eval()(x))


def test_unknown_names_are_refused_with_the_list() -> None:
    config = Configuration("3d_fullres", [1, 1, 1], [32] * 3, [32] * 3, 2, TOPO_3D, "x", network=NetworkSpec("unet9"))
    with pytest.raises(KeyError, match="unknown network 'unet9'; known: .*dynunet, resenc, segresnet"):
        build_network(config, 1, 2)
    with pytest.raises(KeyError, match="unknown optimizer 'lion'; known: adamw, sgd"):
        OPTIMIZERS.get("lion")
    with pytest.raises(KeyError, match="unknown loss 'dice_focal'; known: dice_ce, dice_topk"):
        build_loss("dice_focal", True)
    with pytest.raises(ValueError, match="network 'dynunet'"):
        build_network(
            Configuration(
                "3d_fullres", [1] * 3, [32] * 3, [32] * 3, 2, TOPO_3D, "x", network=NetworkSpec("dynunet", {"depth": 3})
            ),
            1,
            2,
        )


def test_dice_topk_takes_the_hardest_tenth() -> None:
    """nnU-Net's TopKLoss(k=10): the mean cross-entropy of the 10% largest voxel losses, worked by hand."""
    rng = np.random.default_rng(0)
    logits = rng.normal(size=(1, 2, 10, 10, 1)).astype(np.float32)
    target = rng.integers(0, 2, size=(1, 1, 10, 10, 1))
    logp = logits - np.log(np.exp(logits).sum(axis=1, keepdims=True))
    per_voxel = -np.take_along_axis(logp, target, axis=1).ravel()
    top = np.sort(per_voxel)[-10:].mean()  # 10% of 100 voxels
    t = torch.from_numpy(target)
    dice_only = float(DiceCE(True, weight_ce=0.0)(torch.from_numpy(logits), t))
    assert float(DiceCE(True, top_k=0.1)(torch.from_numpy(logits), t)) == pytest.approx(top + dice_only, rel=1e-5)


class Tiny(nn.Module):
    """Two convolutions: the smallest network that trains through segpipe's loop."""

    def __init__(self, net: NetworkInput, width: int = 4):
        super().__init__()
        conv = nn.Conv3d if net.spatial_dims == 3 else nn.Conv2d
        self.body = nn.Sequential(
            conv(net.in_channels, width, 3, padding=1), nn.LeakyReLU(), conv(width, net.out_channels, 1)
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.body(x)


@pytest.fixture(scope="module")
def tiny_registered():
    if "tiny_test" not in NETWORKS:
        NETWORKS.register("tiny_test")(Tiny)  # the README's "Extending segpipe": one function, one line
    return "tiny_test"


def test_a_network_registered_here_trains_and_predicts_through_the_cli(
    tiny_registered: str, synthetic_dataset: Path, tmp_path: Path
) -> None:
    work = tmp_path / "work"
    ok(run_cli("preprocess", synthetic_dataset, "-o", work, "--preset", "cpu", "--workers", 1))
    plans = read_json(work / "plans.json")
    plans["configurations"]["3d_fullres"]["network"] = {"name": tiny_registered, "kwargs": {"width": 6}}
    write_json(work / "plans.json", plans)
    args = "--fold 0 --epochs 1 --iters-per-epoch 2 --val-iters 1 --num-folds 2 --workers 0 --device cpu --no-val-tta"
    ok(run_cli("train", work, *args.split(), "--optimizer", "adamw", "--lr", "0.001", "--loss", "dice_topk"))
    ckpt = load_checkpoint(work / "3d_fullres" / "fold_0" / FINAL)
    assert ckpt["state"]["iteration"] == 2
    assert ckpt["model"]["body.0.weight"].shape[0] == 6  # the kwargs from the plans reached the builder
    assert ckpt["settings"]["optimizer"] == "adamw" and "exp_avg" in str(ckpt["optimizer"]["state"])
    ok(run_cli("predict", "-i", synthetic_dataset / "imagesTr", "-o", tmp_path / "pred", "-m", work, "--no-tta"))
    assert len(list((tmp_path / "pred").glob("*.nii.gz"))) == 6


def test_resenc_preset_selects_resenc(synthetic_dataset: Path, tmp_path: Path) -> None:
    assert load_preset("resenc").network == NetworkSpec("resenc", {})
    work = tmp_path / "work"
    ok(run_cli("plan", Path(shutil.copytree(synthetic_dataset, tmp_path / "d")), "-o", work, "--preset", "resenc"))
    assert {c["network"]["name"] for c in read_json(work / "plans.json")["configurations"].values()} == {"resenc"}


DDP_STEPS = """
import socket, sys
import torch, torch.distributed as dist
from segpipe.networks.build import build_network
from segpipe.planning.plans import Configuration, NetworkSpec, Topology
from segpipe.training.losses import build_loss

with socket.socket() as sock:
    sock.bind(("127.0.0.1", 0))
    port = sock.getsockname()[1]
dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=0, world_size=1)
topology = Topology(*TOPOLOGY)
for name in sys.argv[1:]:
    config = Configuration("3d_fullres", [1, 1, 1], [32] * 3, [32] * 3, 2, topology, "x", network=NetworkSpec(name))
    model = torch.nn.parallel.DistributedDataParallel(build_network(config, 1, 3, deep_supervision=True))
    loss, optimizer = build_loss("dice_ce", batch_dice=False), torch.optim.SGD(model.parameters(), lr=0.01)
    for _ in range(2):
        value = loss(model(torch.randn(2, 1, 32, 32, 32)), torch.randint(0, 3, (2, 1, 32, 32, 32)))
        value.backward()
        optimizer.step()
        optimizer.zero_grad()
    print(name, "ok")
dist.destroy_process_group()
"""


def test_every_network_trains_under_ddp() -> None:
    """DistributedDataParallel (a one-process gloo group, in its own process: a process group per test
    process) over each network with its heads: two steps, so an unused parameter (DDP's reducer would
    wait for its gradient) fails the second one."""
    import os
    import subprocess
    import sys

    script = DDP_STEPS.replace("TOPOLOGY", repr((TOPO_3D.kernel_sizes, TOPO_3D.strides, TOPO_3D.features)))
    names = ["dynunet", "resenc", "segresnet"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run([sys.executable, "-c", script, *names], capture_output=True, text=True, timeout=300, env=env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.split() == [w for n in names for w in (n, "ok")]


@pytest.mark.parametrize("name", ["dynunet", "resenc", "segresnet"])
def test_every_network_exports_and_runs_in_each_backend(name: str, tmp_path: Path) -> None:
    """Each registered network, as prediction loads it, exported to ONNX and OpenVINO IR: the runtimes'
    logits equal torch's on the same windows, at another batch size than the export's (dynamic batch)."""
    from segpipe.inference.backends import NetworkSource, Precision, build_runner
    from segpipe.inference.export import FORMATS, WRITERS

    config = Configuration("3d_fullres", [1, 1, 1], [32] * 3, [32] * 3, 2, TOPO_3D, "x", network=NetworkSpec(name))
    torch.manual_seed(0)
    model = build_network(config, 1, 3, deep_supervision=True).eval()
    x = torch.randn(3, 1, 32, 32, 32)
    with torch.no_grad():
        expected = model(x)
    fp32 = Precision("fp32", "test")
    for fmt, backend in [("onnx", "onnxruntime"), ("onnx", "openvino"), ("openvino", "openvino")]:
        folder = tmp_path / fmt
        folder.mkdir(exist_ok=True)
        written = WRITERS[fmt](model, torch.zeros(1, 1, 32, 32, 32), folder / f"net{FORMATS[fmt]}")
        source = NetworkSource((1, 32, 32, 32), path=written[0], format=fmt)
        got = build_runner(backend, source, fp32, torch.device("cpu"))(x)
        torch.testing.assert_close(got, expected, atol=1e-3, rtol=1e-3, msg=f"{fmt} on {backend}")
