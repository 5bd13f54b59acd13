"""Backends and precision: CPU flag detection, the precision rule, the measured ``--backend auto`` and its
cache, and the errors for a missing optional runtime or an impossible combination. No trained model needed."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch
from torch import nn

from segpipe.inference import backend_choice, backends
from segpipe.inference.backends import (
    MissingExtra,
    NetworkSource,
    Precision,
    build_runner,
    cpu_flags,
    cpu_has_native_bf16,
    resolve_precision,
)
from segpipe.networks.build import SliceNetwork

CPU = torch.device("cpu")
WINDOW = (1, 8, 8, 8)


def tiny_net() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv3d(1, 4, 3, padding=1), nn.LeakyReLU(), nn.Conv3d(4, 3, 1)).eval()


def test_cpu_flags_read_the_flags_line(tmp_path: Path) -> None:
    info = tmp_path / "cpuinfo"
    info.write_text("processor\t: 0\nmodel name\t: Fake CPU\nflags\t\t: fpu avx2 avx512f avx512_bf16 amx_tile\n\n")
    assert cpu_flags(info) == {"fpu", "avx2", "avx512f", "avx512_bf16", "amx_tile"}
    assert cpu_flags(tmp_path / "absent") == set()


@pytest.mark.parametrize(
    "flags, native",
    [({"avx512_bf16"}, True), ({"amx_bf16", "amx_tile"}, True), ({"avx512f", "avx2"}, False), (set(), False)],
)
def test_native_bf16_needs_amx_or_avx512_bf16(flags: set[str], native: bool) -> None:
    assert cpu_has_native_bf16(flags) is native
    expected = "bf16" if native else "fp32"
    assert resolve_precision("auto", CPU, "torch", flags).name == expected
    assert resolve_precision("auto", CPU, "openvino", flags).name == expected
    # no bf16 kernels in ONNX Runtime's CPU provider: auto stays fp32 whatever the CPU
    assert resolve_precision("auto", CPU, "onnxruntime", flags).name == "fp32"
    assert resolve_precision("fp32", CPU, "torch", flags).name == "fp32"  # asked for: kept
    assert resolve_precision("bf16", CPU, "torch", flags).name == "bf16"


def test_precision_reason_names_the_flag() -> None:
    chosen = resolve_precision("auto", CPU, "openvino", {"amx_bf16"})
    assert chosen.name == "bf16" and "amx_bf16" in chosen.reason
    assert "no native bf16" in resolve_precision("auto", CPU, "torch", {"avx2"}).reason


def test_impossible_precision_and_device_are_errors() -> None:
    with pytest.raises(ValueError, match="no bf16 kernels"):
        resolve_precision("bf16", CPU, "onnxruntime", {"avx512_bf16"})
    with pytest.raises(ValueError, match="--precision"):
        resolve_precision("fp16x", CPU, "torch", set())
    source = NetworkSource(WINDOW, module=tiny_net())
    with pytest.raises(ValueError, match="runs on the CPU"):  # checked before any CUDA is touched
        build_runner("openvino", source, Precision("fp32", ""), torch.device("cuda"))
    onnx_file = NetworkSource(WINDOW, path=Path("x.onnx"), format="onnx")
    with pytest.raises(ValueError, match="cannot run a onnx model"):
        build_runner("torch", onnx_file, Precision("fp32", ""), CPU)


def test_gpu_auto_keeps_the_autocast_rule(monkeypatch: pytest.MonkeyPatch) -> None:
    """On a GPU auto is bf16 from compute capability 8.0, fp16 below (fake capabilities: no GPU here)."""
    for capability, expected in [((7, 5), "fp16"), ((8, 0), "bf16"), ((9, 0), "bf16")]:
        monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None, c=capability: c)
        assert resolve_precision("auto", torch.device("cuda"), "torch", set()).name == expected


@pytest.mark.parametrize(
    "backend, module, extra", [("openvino", "openvino", "openvino"), ("onnxruntime", "onnxruntime", "onnx")]
)
def test_missing_runtime_names_the_extra(
    monkeypatch: pytest.MonkeyPatch, backend: str, module: str, extra: str
) -> None:
    monkeypatch.setitem(sys.modules, module, None)  # as if not installed: import raises ImportError
    backends._openvino_core.cache_clear()
    source = NetworkSource(WINDOW, module=tiny_net())
    with pytest.raises(MissingExtra, match=rf"segpipe\[{extra}\]"):
        build_runner(backend, source, Precision("fp32", ""), CPU)
    assert backend not in backend_choice.candidates(source, "fp32", CPU, set())
    backends._openvino_core.cache_clear()


def test_without_the_extras_auto_is_torch(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv(backend_choice.CACHE_ENV, str(tmp_path))
    for module in ("openvino", "onnxruntime"):
        monkeypatch.setitem(sys.modules, module, None)
    choice, runner = backend_choice.choose_backend(
        NetworkSource(WINDOW, module=tiny_net()), "auto", "auto", CPU, 2, "k", {"avx2"}
    )
    assert (choice.backend, choice.precision.name, runner) == ("torch", "fp32", None)


def test_auto_picks_the_fastest_measured_and_caches_it(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """The choice follows the timings (faked here, per runner type), not a fixed order; a second call
    reads the cache and builds nothing."""
    monkeypatch.setenv(backend_choice.CACHE_ENV, str(tmp_path))
    monkeypatch.setattr(backend_choice, "candidates", lambda *a: ["onnxruntime", "openvino", "torch"])
    fake = {"TorchRunner": 0.2, "OpenVINORunner": 0.9, "ONNXRuntimeRunner": 0.5}
    monkeypatch.setattr(backend_choice, "time_runner", lambda runner, example: fake[type(runner).__name__])
    source = NetworkSource(WINDOW, module=tiny_net())
    choice, runner = backend_choice.choose_backend(source, "auto", "fp32", CPU, 4, "model-a", {"avx2"})
    assert choice.backend == "torch" and choice.how == "measured" and isinstance(runner, backends.TorchRunner)
    assert choice.seconds == {"torch": 0.2, "openvino": 0.9, "onnxruntime": 0.5}
    assert "torch 0.200 s" in choice.describe()

    monkeypatch.setattr(backend_choice, "build_runner", lambda *a: pytest.fail("a cached choice builds nothing"))
    again, runner = backend_choice.choose_backend(source, "auto", "fp32", CPU, 4, "model-a", {"avx2"})
    assert (again.backend, again.how, runner) == ("torch", "cached measurement", None)

    # another model is measured anew: now ONNX Runtime is the fastest
    monkeypatch.undo()
    monkeypatch.setenv(backend_choice.CACHE_ENV, str(tmp_path))
    monkeypatch.setattr(backend_choice, "candidates", lambda *a: ["onnxruntime", "torch"])
    fake = {"TorchRunner": 0.7, "ONNXRuntimeRunner": 0.3}
    monkeypatch.setattr(backend_choice, "time_runner", lambda runner, example: fake[type(runner).__name__])
    other, _ = backend_choice.choose_backend(source, "auto", "fp32", CPU, 4, "model-b", {"avx2"})
    assert other.backend == "onnxruntime" and other.how == "measured"


def test_time_runner_is_the_best_of_the_timed_runs() -> None:
    calls = []
    assert backend_choice.time_runner(lambda x: calls.append(x), torch.zeros(1), repeats=3) >= 0
    assert len(calls) == 4  # one warm-up, three timed


def tiny_2d_net() -> nn.Module:
    """A 2d configuration's network: slices along Z folded into the batch (reshapes that must stay dynamic)."""
    torch.manual_seed(0)
    return SliceNetwork(nn.Sequential(nn.Conv2d(1, 4, 3, padding=1), nn.LeakyReLU(), nn.Conv2d(4, 3, 1)), 2).eval()


@pytest.mark.parametrize("backend", ["torch", "openvino", "onnxruntime"])
@pytest.mark.parametrize("make, window", [(tiny_net, WINDOW), (tiny_2d_net, (1, 8, 8, 1))])
def test_runners_of_a_module_match_torch_fp32(backend: str, make, window: tuple[int, ...]) -> None:
    """Every backend built from a module in memory (a WORK folder's checkpoint) computes the same logits,
    at a batch size other than the one it was converted with (the batch axis is dynamic)."""
    net = make()
    x = torch.randn(5, *window, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        expected = net(x)
    runner = build_runner(backend, NetworkSource(window, module=net), Precision("fp32", ""), CPU)
    torch.testing.assert_close(runner(x), expected, atol=1e-4, rtol=1e-4)
