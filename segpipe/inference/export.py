"""``segpipe export``: a WORK folder's trained members -> a self-contained model folder.

Reads ``WORK/plans.json``, the members' checkpoints (as ``predict`` chooses them: folds, final / best /
SWA weights or cycle snapshots) and ``WORK/<config>/postprocessing.json``; writes a model folder
(:mod:`segpipe.inference.model_folder`) with each member's network in ``onnx``, ``openvino`` (IR) or
``torchscript``. The folder is built beside its target and renamed into place, so an interrupted
export leaves the previous folder (or none), never half of one.
"""

from __future__ import annotations

import contextlib
import os
import platform
import secrets
import shutil
from collections.abc import Callable
from dataclasses import replace
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path

import torch
from torch import nn

from segpipe.core.atomic import write_json
from segpipe.core.paths import WorkDir
from segpipe.core.serialization import to_dict
from segpipe.inference.backends import import_runtime, write_onnx
from segpipe.inference.ensemble import Members, inference_mirror_axes, member_paths
from segpipe.inference.model_folder import FORMATS, MANIFEST_FILE, ModelManifest, is_model_folder, sha256_of
from segpipe.inference.postprocessing import load_decision
from segpipe.planning.plans import load_plans
from segpipe.runs.checkpoint import load_model
from segpipe.runs.run_config import members_configuration


def _write_onnx(model: nn.Module, example: torch.Tensor, path: Path) -> list[Path]:
    write_onnx(model, example, path)
    return [path]


def _write_openvino(model: nn.Module, example: torch.Tensor, path: Path) -> list[Path]:
    ov = import_runtime("openvino", "openvino")
    shape = ov.PartialShape([-1, *example.shape[1:]])  # dynamic batch: all mirrors of a window batch at once
    with torch.no_grad():
        converted = ov.convert_model(model, example_input=example, input=[shape])
    ov.save_model(converted, str(path), compress_to_fp16=False)  # fp32 weights: precision is chosen at predict
    return [path, path.with_suffix(".bin")]


def _write_torchscript(model: nn.Module, example: torch.Tensor, path: Path) -> list[Path]:
    with torch.no_grad():
        traced = torch.jit.trace(model, example)  # the window shape is fixed, so tracing sees every branch
    torch.jit.save(traced, str(path))
    return [path]


WRITERS: dict[str, Callable[[nn.Module, torch.Tensor, Path], list[Path]]] = {
    "onnx": _write_onnx,
    "openvino": _write_openvino,
    "torchscript": _write_torchscript,
}


def versions(fmt: str) -> dict[str, str]:
    """The versions a model folder was made with (the runtime of its format included)."""
    out = {"python": platform.python_version(), "torch": torch.__version__}
    for package in ("segpipe", {"onnx": "onnx", "openvino": "openvino"}.get(fmt)):
        if package:
            with contextlib.suppress(PackageNotFoundError):
                out[package] = version(package)
    return out


def export_model(work: Path, out: Path, config_name: str, members: Members, fmt: str = "onnx") -> ModelManifest:
    """Write the model folder ``out`` for ``members`` of ``config_name``; return its manifest.

    ``out`` must not exist, be empty, or be a model folder (replaced whole)."""
    if fmt not in WRITERS:
        raise ValueError(f"--format {fmt!r}: use one of {', '.join(WRITERS)}")
    out = Path(out)
    if out.exists() and any(out.iterdir()) and not is_model_folder(out):
        raise FileExistsError(f"{out}: exists and is not a model folder; choose an empty or new folder")
    wd = WorkDir(work)
    plans = load_plans(wd.plans)
    # the configuration the members trained (run overrides may have changed patch, batch or width)
    config = members_configuration([wd.run(config_name, f) for f in members.folds], plans.configuration(config_name))
    if config.previous_stage:
        raise ValueError(f"{config_name} is a cascade stage; export supports single-stage configurations")
    paths = member_paths(work, config_name, members)
    window = [len(plans.channel_names), *config.patch_size]
    example = torch.zeros((1, *window))
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.parent / f".{out.name}.{os.getpid()}.{secrets.token_hex(4)}.tmp"
    tmp.mkdir()  # not mkdtemp: its 0700 would stay on the model folder
    try:
        networks, written = [], []
        for i, path in enumerate(paths):
            model = load_model(path, plans, config, torch.device("cpu"))
            name = f"network_{i}{FORMATS[fmt]}"
            written += WRITERS[fmt](model, example, tmp / name)
            networks.append(name)
        manifest = ModelManifest(
            format=fmt,
            configuration=config_name,
            plans=replace(plans, configurations={config_name: config}),
            networks=networks,
            members=[str(p.relative_to(work)) for p in paths],
            mirror_axes=list(inference_mirror_axes(work, config_name, members)),
            window=window,
            postprocessing=load_decision(wd.postprocessing(config_name)),
            versions=versions(fmt),
            files={p.name: sha256_of(p) for p in written},
        )
        write_json(tmp / MANIFEST_FILE, to_dict(manifest))
        _swap_in(tmp, out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return manifest


def _swap_in(tmp: Path, out: Path) -> None:
    """Rename the finished folder ``tmp`` to ``out``, the previous ``out`` (if any) removed after."""
    old = None
    if out.exists():
        old = out.with_name(f".{out.name}.{os.getpid()}.old")
        os.replace(out, old)
    os.replace(tmp, out)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)
