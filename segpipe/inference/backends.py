"""Network backends: the one step of inference that may leave PyTorch.

The sliding window, Gaussian weights, mirroring and accumulation stay segpipe's own
(:mod:`segpipe.inference.sliding_window`); a backend only runs the network's forward pass on a batch of
windows ``(B, C, X, Y, Z)`` -> logits ``(B, K, X, Y, Z)`` (float32, a torch tensor). Backends:
``torch`` (any device; autocast for reduced precision), ``openvino`` and ``onnxruntime`` (CPU; optional
extras ``segpipe[openvino]`` / ``segpipe[onnx]``). Each is built from a :class:`NetworkSource`: a
module in memory (a WORK folder's checkpoint) or a file of an exported model folder.

Precision: ``fp32``, ``bf16`` or ``auto``: bf16 where the CPU computes it natively (AMX or
AVX512-BF16) and the backend has bf16 kernels, fp32 elsewhere; on a GPU ``auto`` keeps training's
autocast dtype (bf16 from compute capability 8.0, else fp16).
"""

from __future__ import annotations

import importlib
import io
import logging
from collections.abc import Callable, Collection
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from types import ModuleType

import torch
from torch import nn

from segpipe.core.registry import Registry

log = logging.getLogger("segpipe")

PRECISIONS = ("auto", "fp32", "bf16")
# the extra of pyproject.toml that installs each optional runtime
EXTRAS = {"openvino": "openvino", "onnxruntime": "onnx"}
# CPU flags (/proc/cpuinfo) of native bf16 arithmetic: AMX tiles or the AVX-512 bf16 dot products
NATIVE_BF16_FLAGS = ("amx_bf16", "avx512_bf16")
# bf16 runs natively on GPUs from compute capability 8.0 (Ampere); torch.cuda.is_bf16_supported() is also
# true on older GPUs that only emulate it, slowly
NATIVE_BF16_CAPABILITY = (8, 0)
INPUT_NAME, OUTPUT_NAME = "image", "logits"


class MissingExtra(ImportError):
    """An optional runtime is not installed; the message names the extra that installs it."""

    def __init__(self, backend: str, module: str):
        extra = EXTRAS.get(backend, backend)
        super().__init__(
            f'--backend {backend} needs the {module!r} package: pip install "segpipe[{extra}]" '
            f'(or pip install -e ".[{extra}]" in a checkout)'
        )


def import_runtime(backend: str, module: str) -> ModuleType:
    """``import module`` for ``backend``, or :class:`MissingExtra` naming the extra to install."""
    try:
        return importlib.import_module(module)
    except ImportError as exc:
        raise MissingExtra(backend, module) from exc


# ---- precision ---------------------------------------------------------------------------------------


def cpu_flags(cpuinfo: str | Path = "/proc/cpuinfo") -> set[str]:
    """The feature flags of the first CPU in ``cpuinfo`` (empty where the file does not exist)."""
    try:
        text = Path(cpuinfo).read_text()
    except OSError:
        return set()
    for line in text.splitlines():
        if line.startswith("flags") and ":" in line:
            return set(line.split(":", 1)[1].split())
    return set()


def cpu_has_native_bf16(flags: Collection[str] | None = None) -> bool:
    """Whether the CPU computes bf16 natively (``amx_bf16`` or ``avx512_bf16`` among its flags)."""
    flags = cpu_flags() if flags is None else flags
    return any(f in flags for f in NATIVE_BF16_FLAGS)


@dataclass(frozen=True)
class Precision:
    """What a prediction computes in (``fp32``, ``bf16`` or ``fp16``) and why."""

    name: str
    reason: str

    @property
    def amp_dtype(self) -> torch.dtype | None:
        """The torch autocast dtype (None: full precision)."""
        return {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}[self.name]


def resolve_precision(
    requested: str, device: torch.device, backend: str, flags: Collection[str] | None = None
) -> Precision:
    """``requested`` (``auto``, ``fp32``, ``bf16``) -> the precision ``backend`` runs on ``device``.

    ``auto`` on a GPU: bf16 from compute capability 8.0, else fp16 (as training's autocast). ``auto``
    on a CPU: bf16 when the CPU has native bf16 (``flags``: its feature flags, default /proc/cpuinfo)
    and the backend has bf16 kernels, else fp32. An explicit ``bf16`` a backend cannot run is an error."""
    if requested not in PRECISIONS:
        raise ValueError(f"--precision {requested!r}: use one of {', '.join(PRECISIONS)}")
    supports_bf16 = BACKENDS.get(backend).supports_bf16
    if requested == "bf16" and not supports_bf16:
        raise ValueError(f"--backend {backend} has no bf16 kernels on the CPU; use --precision fp32 or another backend")
    if requested != "auto":
        return Precision(requested, "asked for")
    if device.type == "cuda":
        native = torch.cuda.get_device_capability(device) >= NATIVE_BF16_CAPABILITY
        return Precision("bf16", "GPU with native bf16") if native else Precision("fp16", "GPU without native bf16")
    flags = cpu_flags() if flags is None else flags
    if not cpu_has_native_bf16(flags):
        return Precision("fp32", "the CPU has no native bf16 (no amx_bf16 or avx512_bf16)")
    if not supports_bf16:
        return Precision("fp32", f"{backend} has no bf16 kernels")
    found = ", ".join(f for f in NATIVE_BF16_FLAGS if f in flags)
    return Precision("bf16", f"the CPU has native bf16 ({found})")


# ---- sources and runners -----------------------------------------------------------------------------


@dataclass(frozen=True)
class NetworkSource:
    """A network to run: ``module`` in memory, or ``path`` to an exported file of ``format``
    (``onnx``, ``openvino`` or ``torchscript``). ``window`` is the input of one window ``(C, X, Y, Z)``."""

    window: tuple[int, ...]
    module: nn.Module | None = None
    path: Path | None = None
    format: str | None = None

    def example(self, batch: int = 1) -> torch.Tensor:
        return torch.zeros((batch, *self.window), dtype=torch.float32)


Runner = Callable[[torch.Tensor], torch.Tensor]  # (B, C, X, Y, Z) windows -> (B, K, X, Y, Z) float logits


@dataclass(frozen=True)
class Backend:
    """A registered backend: how to build a runner, which sources it reads, whether it has bf16 kernels."""

    build: Callable[[NetworkSource, Precision, torch.device], Runner]
    formats: tuple[str, ...]  # exported formats it runs (a module in memory: always)
    supports_bf16: bool
    cpu_only: bool
    module: str  # the package it needs (checked before building)

    def available(self, name: str) -> bool:
        """Whether its runtime imports (what ``--backend auto`` chooses among)."""
        try:
            import_runtime(name, self.module)
        except MissingExtra:
            return False
        return True

    def reads(self, source: NetworkSource) -> bool:
        return source.module is not None or source.format in self.formats


BACKENDS: Registry[Backend] = Registry("backend")


def build_runner(name: str, source: NetworkSource, precision: Precision, device: torch.device) -> Runner:
    """The runner of backend ``name`` for ``source``; errors say what to install or use instead."""
    backend = BACKENDS.get(name)
    if not backend.reads(source):
        readers = [b for b in BACKENDS.names() if BACKENDS.get(b).reads(source)]
        raise ValueError(f"--backend {name} cannot run a {source.format} model; use --backend {' or '.join(readers)}")
    if backend.cpu_only and device.type != "cpu":
        raise ValueError(f"--backend {name} runs on the CPU; use --device cpu or --backend torch")
    import_runtime(name, backend.module)
    return backend.build(source, precision, device)


class TorchRunner:
    """A torch module (eval mode) on ``device``, under autocast for a reduced ``precision``."""

    def __init__(self, module: nn.Module, precision: Precision, device: torch.device):
        self.module = module.to(device).eval()
        self.dtype = precision.amp_dtype
        self.device = device

    @torch.inference_mode()
    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        with torch.autocast(self.device.type, dtype=self.dtype, enabled=self.dtype is not None):
            return self.module(x).float()


def _build_torch(source: NetworkSource, precision: Precision, device: torch.device) -> Runner:
    module = source.module
    if module is None:
        assert source.path is not None
        module = torch.jit.load(str(source.path), map_location=device)
    return TorchRunner(module, precision, device)


def torch_threads() -> int:
    """The CPU threads every backend uses: torch's (``torch.set_num_threads``, OMP_NUM_THREADS)."""
    return torch.get_num_threads()


class OpenVINORunner:
    """An OpenVINO model compiled for the CPU, dynamic in the batch axis."""

    def __init__(self, compiled: object):
        self.request = compiled.create_infer_request()  # type: ignore[attr-defined]

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        out = self.request.infer({0: x.detach().cpu().numpy()})
        return torch.from_numpy(next(iter(out.values())).copy())


@lru_cache(maxsize=1)
def _openvino_core() -> object:
    return import_runtime("openvino", "openvino").Core()


def openvino_model(source: NetworkSource) -> object:
    """The source as an ``openvino.Model`` with a dynamic batch axis: read from its file, or converted
    from the module in memory."""
    ov = import_runtime("openvino", "openvino")
    if source.path is not None and source.format in ("onnx", "openvino"):
        return _openvino_core().read_model(str(source.path))  # type: ignore[attr-defined]
    module = source.module if source.module is not None else torch.jit.load(str(source.path), map_location="cpu")
    shape = ov.PartialShape([-1, *source.window])  # -1: any batch (all mirrors of a window batch at once)
    with torch.inference_mode(False), torch.no_grad():
        return ov.convert_model(module.eval(), example_input=source.example(), input=[shape])


def _build_openvino(source: NetworkSource, precision: Precision, device: torch.device) -> Runner:
    config = {
        # set both ways: OpenVINO itself defaults to bf16 on CPUs that have it
        "INFERENCE_PRECISION_HINT": {"fp32": "f32", "bf16": "bf16"}[precision.name],
        "PERFORMANCE_HINT": "LATENCY",  # one stream using every thread: one batch at a time
        "INFERENCE_NUM_THREADS": torch_threads(),
    }
    compiled = _openvino_core().compile_model(openvino_model(source), "CPU", config)  # type: ignore[attr-defined]
    return OpenVINORunner(compiled)


class ONNXRuntimeRunner:
    """An ONNX Runtime session on the CPU."""

    def __init__(self, session: object):
        self.session = session
        self.input = session.get_inputs()[0].name  # type: ignore[attr-defined]

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        out = self.session.run(None, {self.input: x.detach().cpu().numpy()})  # type: ignore[attr-defined]
        return torch.from_numpy(out[0])


def onnx_bytes(module: nn.Module, source: NetworkSource) -> bytes:
    """``module`` as an ONNX model (opset 17, dynamic batch axis), in memory."""
    buffer = io.BytesIO()
    write_onnx(module, source.example(), buffer)
    return buffer.getvalue()


def write_onnx(module: nn.Module, example: torch.Tensor, target: str | Path | io.BytesIO) -> None:
    """Export ``module`` to ONNX at ``target``: input ``image``, output ``logits``, the batch axis dynamic.

    TorchScript-based exporter (``dynamo=False``): it needs no extra package and handles the U-Nets'
    instance norms and transposed convolutions."""
    import warnings

    with warnings.catch_warnings(), torch.inference_mode(False), torch.no_grad():
        warnings.simplefilter("ignore")  # deprecation and tracer notes of the exporter, not ours to act on
        torch.onnx.export(
            module.eval(),
            (example,),
            target,
            input_names=[INPUT_NAME],
            output_names=[OUTPUT_NAME],
            dynamic_axes={INPUT_NAME: {0: "batch"}, OUTPUT_NAME: {0: "batch"}},
            opset_version=17,
            dynamo=False,
        )


def _build_onnxruntime(source: NetworkSource, precision: Precision, device: torch.device) -> Runner:
    ort = import_runtime("onnxruntime", "onnxruntime")
    options = ort.SessionOptions()
    options.intra_op_num_threads = torch_threads()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    if source.path is not None and source.format == "onnx":
        model: str | bytes = str(source.path)
    else:
        assert source.module is not None
        model = onnx_bytes(source.module, source)
    return ONNXRuntimeRunner(ort.InferenceSession(model, options, providers=["CPUExecutionProvider"]))


BACKENDS.register("torch")(Backend(_build_torch, ("torchscript",), supports_bf16=True, cpu_only=False, module="torch"))
BACKENDS.register("openvino")(
    Backend(_build_openvino, ("onnx", "openvino", "torchscript"), supports_bf16=True, cpu_only=True, module="openvino")
)
# ONNX Runtime's CPU provider has no bf16 convolutions: fp32 only
BACKENDS.register("onnxruntime")(
    Backend(_build_onnxruntime, ("onnx",), supports_bf16=False, cpu_only=True, module="onnxruntime")
)
