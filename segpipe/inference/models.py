"""Which networks predict, and on what: a WORK folder's members or an exported model folder, each network
on the chosen backend and precision.

:mod:`segpipe.inference.predict` calls :func:`load_work_models` (plans, checkpoints, mirror axes and the
postprocessing decision of a WORK folder) or :func:`load_folder_models` (the same from a model folder's
manifest, checksums verified) and gets a :class:`LoadedModels`; the backend is chosen once per call
(:func:`segpipe.inference.backend_choice.choose_backend`) and every member runs on it.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import TYPE_CHECKING

import torch

from segpipe.core.paths import WorkDir
from segpipe.inference.backend_choice import BackendChoice, choose_backend, source_key
from segpipe.inference.backends import NetworkSource, Runner, build_runner
from segpipe.inference.ensemble import Members, inference_mirror_axes, load_members, member_paths
from segpipe.inference.model_folder import load_model_folder
from segpipe.inference.postprocessing import load_decision
from segpipe.planning.plans import Configuration, Plans, load_plans
from segpipe.runs.run_config import members_configuration

if TYPE_CHECKING:  # predict imports this module; the options are only read here
    from segpipe.inference.predict import PredictOptions


@dataclass
class LoadedModels:
    """What predicting needs besides the images, from a WORK folder or a model folder."""

    plans: Plans
    config: Configuration
    networks: list[Runner]  # one per ensemble member
    mirror_axes: tuple[int, ...]  # those of training
    decision: dict | None  # the postprocessing decision (None: none, or switched off)
    choice: BackendChoice
    # the same networks built anew on another device (torch), for a case that falls back to the CPU
    reload: Callable[[torch.device], list[Runner]]


def build_networks(
    sources: Sequence[NetworkSource],
    options: PredictOptions,
    device: torch.device,
    model_key: str,
    mirror_axes: tuple[int, ...],
) -> tuple[list[Runner], BackendChoice]:
    """The runners of ``sources`` on the backend and precision of ``options`` (``auto``: measured on the first
    source with a batch of ``batch_windows`` windows in every mirroring along ``mirror_axes``)."""
    batch = options.batch_windows * (2 ** len(mirror_axes) if options.tta else 1)
    choice, first = choose_backend(sources[0], options.backend, options.precision, device, batch, model_key)
    runners = [first] if first is not None else []
    runners += [build_runner(choice.backend, s, choice.precision, device) for s in sources[len(runners) :]]
    return runners, choice


def load_work_models(
    work: Path, config_name: str, members: Members, options: PredictOptions, device: torch.device
) -> LoadedModels:
    """The members' checkpoints of a WORK folder on the chosen backend, with the plans, the mirror axes of
    training and (unless switched off) ``WORK/<config>/postprocessing.json``."""
    plans = load_plans(WorkDir(work).plans)
    # the configuration the members trained (run overrides may have changed patch, batch or width)
    run_dirs = [WorkDir(work).run(config_name, f) for f in members.folds]
    config = members_configuration(run_dirs, plans.configuration(config_name))
    modules = load_members(work, plans, config, members, device)
    mirror_axes = inference_mirror_axes(work, config_name, members)
    window = (len(plans.channel_names) + (len(plans.foreground_labels) if config.previous_stage else 0),)
    sources = [NetworkSource((*window, *config.patch_size), module=m) for m in modules]
    # the model's identity only matters to a cached measurement of --backend auto
    key = source_key(member_paths(work, config_name, members)) if options.backend == "auto" else ""
    networks, choice = build_networks(sources, options, device, key, mirror_axes)
    decision = load_decision(WorkDir(work).postprocessing(config_name)) if options.postprocess else None

    def reload(d: torch.device) -> list[Runner]:
        return load_work_models(work, config_name, members, replace(options, backend="torch"), d).networks

    return LoadedModels(plans, config, networks, mirror_axes, decision, choice, reload)


def load_folder_models(model_dir: Path, options: PredictOptions, device: torch.device) -> LoadedModels:
    """A model folder (``segpipe export``), its checksums verified, its networks on the chosen backend."""
    manifest = load_model_folder(model_dir)
    mirror_axes = tuple(manifest.mirror_axes)
    window = tuple(manifest.window)
    sources = [NetworkSource(window, path=model_dir / n, format=manifest.format) for n in manifest.networks]
    key = ",".join(manifest.files[n] for n in manifest.networks)  # the networks' SHA-256
    networks, choice = build_networks(sources, options, device, key, mirror_axes)
    decision = manifest.postprocessing if options.postprocess else None

    def reload(d: torch.device) -> list[Runner]:
        return load_folder_models(model_dir, options, d).networks

    return LoadedModels(manifest.plans, manifest.config, networks, mirror_axes, decision, choice, reload)
