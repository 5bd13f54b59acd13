"""``--backend auto``: the fastest installed backend for this model on this machine, measured, not guessed.

On a GPU the choice is ``torch``. On a CPU every installed backend that can run the model is built and
times one window batch (the batch prediction sends: ``--batch-windows`` windows in every mirroring),
after one untimed warm-up; the fastest wins. The result is cached in
``~/.cache/segpipe/backend_choice.json`` (or ``$SEGPIPE_CACHE_DIR``), keyed by the machine (CPU model,
cores, threads), the model's identity, the precision asked for and the batch, so later predictions of
the same model build only the chosen backend.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import platform
import time
from collections.abc import Collection
from dataclasses import dataclass, field
from pathlib import Path

import torch

from segpipe.core.atomic import read_json, write_json
from segpipe.inference.backends import (
    BACKENDS,
    NetworkSource,
    Precision,
    Runner,
    build_runner,
    resolve_precision,
    torch_threads,
)

log = logging.getLogger("segpipe")

CACHE_ENV = "SEGPIPE_CACHE_DIR"
CACHE_FILE = "backend_choice.json"
TIMED_RUNS = 2  # best of, after one warm-up


@dataclass
class BackendChoice:
    """The backend and precision a prediction runs with, and how they were chosen."""

    backend: str
    precision: Precision
    how: str  # "asked for", "GPU", "measured", "cached measurement", "only one installed"
    seconds: dict[str, float] = field(default_factory=dict)  # one window batch, per measured backend

    def describe(self) -> str:
        timing = ", ".join(f"{k} {v:.3f} s" for k, v in sorted(self.seconds.items(), key=lambda kv: kv[1]))
        how = f"{self.how}: {timing} per window batch" if timing else self.how
        return f"backend {self.backend} ({how}); precision {self.precision.name} ({self.precision.reason})"


def cache_file() -> Path:
    root = os.environ.get(CACHE_ENV) or Path.home() / ".cache" / "segpipe"
    return Path(root) / CACHE_FILE


def cpu_model() -> str:
    """The CPU's model name (``/proc/cpuinfo``), else what ``platform`` says."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def choice_key(model_key: str, precision: str, batch: int, window: tuple[int, ...]) -> str:
    """What a cached measurement is valid for: this machine and thread count, this model, precision and batch."""
    parts = [cpu_model(), str(os.cpu_count()), str(torch_threads()), model_key, precision, str(batch), str(window)]
    return hashlib.sha256("\n".join(parts).encode()).hexdigest()[:24]


def time_runner(runner: Runner, example: torch.Tensor, repeats: int = TIMED_RUNS) -> float:
    """Seconds of one forward pass of ``example``: the best of ``repeats`` after one warm-up."""
    runner(example)
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        runner(example)
        best = min(best, time.perf_counter() - start)
    return best


def candidates(source: NetworkSource, precision: str, device: torch.device, flags: Collection[str] | None) -> list[str]:
    """Installed backends that run ``source`` on ``device`` in ``precision`` (bf16: those with bf16 kernels)."""
    out = []
    for name in BACKENDS.names():
        backend = BACKENDS.get(name)
        if not backend.reads(source) or (backend.cpu_only and device.type != "cpu"):
            continue
        if precision == "bf16" and not backend.supports_bf16:
            continue
        if backend.available(name):
            out.append(name)
    return out


def _read_cache(path: Path) -> dict:
    try:
        data = read_json(path)
    except (OSError, ValueError):
        return {}
    return data if isinstance(data, dict) else {}


def choose_backend(
    source: NetworkSource,
    backend: str,
    precision: str,
    device: torch.device,
    batch: int,
    model_key: str,
    flags: Collection[str] | None = None,
) -> tuple[BackendChoice, Runner | None]:
    """The backend for ``source`` and, when it was built to measure it, its runner (else None).

    ``backend`` other than ``auto`` is taken as asked; ``auto``: ``torch`` on a GPU, else the fastest
    of :func:`candidates`, measured on a ``batch`` of zero windows (or read from the cache)."""
    if backend != "auto":
        return BackendChoice(backend, resolve_precision(precision, device, backend, flags), "asked for"), None
    if device.type != "cpu":
        return BackendChoice("torch", resolve_precision(precision, device, "torch", flags), "GPU"), None
    names = candidates(source, precision, device, flags)
    if not names:
        raise ValueError(f"no installed backend runs a {source.format} model in {precision}; see --backend")
    if len(names) == 1:
        only = BackendChoice(names[0], resolve_precision(precision, device, names[0], flags), "only one installed")
        return only, None
    path, key = cache_file(), choice_key(model_key, precision, batch, source.window)
    cached = _read_cache(path).get(key)
    if isinstance(cached, dict) and cached.get("backend") in names:
        name = cached["backend"]
        chosen = BackendChoice(name, resolve_precision(precision, device, name, flags), "cached measurement")
        chosen.seconds = {k: float(v) for k, v in cached.get("seconds", {}).items()}
        return chosen, None
    example = source.example(batch)
    seconds: dict[str, float] = {}
    runners: dict[str, Runner] = {}
    for name in names:
        runner = build_runner(name, source, resolve_precision(precision, device, name, flags), device)
        seconds[name] = time_runner(runner, example)
        runners[name] = runner
        log.info("backend %s: %.3f s per window batch of %d", name, seconds[name], batch)
    name = min(seconds, key=seconds.__getitem__)
    with_choice = {**_read_cache(path), key: {"backend": name, "seconds": seconds, "cpu": cpu_model()}}
    try:
        write_json(path, with_choice)
    except OSError as exc:  # a read-only home: measure again next time
        log.warning("could not cache the backend choice in %s (%s)", path, exc)
    chosen = BackendChoice(name, resolve_precision(precision, device, name, flags), "measured", seconds)
    return chosen, runners[name]


def source_key(paths: list[Path]) -> str:
    """A model identity for the cache: the files' paths, sizes and modification times."""
    parts = []
    for p in paths:
        st = p.stat()
        parts.append(f"{p.resolve()}:{st.st_size}:{st.st_mtime_ns}")
    return json.dumps(parts)
