"""Batch prediction of NIfTI folders: preprocess, sliding windows, resample back, write NIfTI.

Reads ``WORK/plans.json`` and the run folders' checkpoints; writes ``OUT/<case>.nii.gz`` (uint8,
the input's exact shape, affine and orientation) and optionally ``OUT/<case>.npz`` probabilities.
When ``WORK/<config>/postprocessing.json`` exists (``segpipe postprocess``), its largest-component
decision is applied to the label maps (not to the probabilities) unless ``postprocess`` is off.
The next case is read and preprocessed in a background thread while the current one runs.

A failing case (unreadable or invalid input, a full or read-only output folder) is listed in
``OUT/failures.json`` with its file and problem, leaves no output behind, and the others still run;
the stage then ends with :class:`StageFailed`. A case is skipped when its output exists and its
inputs are unchanged since (see :mod:`segpipe.inference.manifest`), so a folder that was half done resumes.
A case's accumulators stay on the device when they fit and go to the CPU otherwise (see
:func:`segpipe.inference.sliding_window.choose_accumulation_device`). The networks run on the backend
and precision of ``PredictOptions`` (:mod:`segpipe.inference.backends`); a model folder made by
``segpipe export`` predicts through :func:`predict_model_folder`, without a WORK folder. Under torchrun
each rank predicts its share of the cases and rank 0 checks and merges the result (:func:`merge_ranks`).
"""

from __future__ import annotations

import contextlib
import logging
import math
import os
import time
from collections.abc import Callable, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
import torch
from tqdm.auto import tqdm

from segpipe.core.atomic import remove_stale_temporaries, save_npz, write_json
from segpipe.core.errors import PREDICT_MEMORY_REMEDY, DeviceFailed, StageFailed, poisons_device, with_remedy
from segpipe.core.paths import WorkDir
from segpipe.data.dataset import CaseData, CaseFiles, list_prediction_inputs, read_case
from segpipe.data.nifti import InputError, save_nifti, strip_nifti_ending
from segpipe.inference.backends import NATIVE_BF16_CAPABILITY, Runner
from segpipe.inference.decode import label_map
from segpipe.inference.ensemble import Members
from segpipe.inference.manifest import FileIdentity, PredictionManifest, input_identity
from segpipe.inference.models import LoadedModels, load_folder_models, load_work_models
from segpipe.inference.postprocessing import apply_postprocessing
from segpipe.inference.sliding_window import (
    accumulator_bytes,
    choose_accumulation_device,
    forward_batch_bytes,
    mirror_combinations,
    predict_probabilities,
    release_cached_memory,
)
from segpipe.planning.plans import Configuration, Plans, load_plans
from segpipe.preprocessing.cascade import MissingPreviousStage, read_previous_stage, with_previous_stage
from segpipe.preprocessing.preprocess import PreprocessedCase, preprocess_case
from segpipe.preprocessing.resampling import resample_probabilities
from segpipe.runs.checkpoint import FINAL
from segpipe.scale import distributed
from segpipe.scale.distributed import SINGLE, DistInfo, device_for, gather_reports, shard

log = logging.getLogger("segpipe")


@dataclass
class PredictOptions:
    step: float = 0.5
    tta: bool = True
    batch_windows: int = 1
    save_probabilities: bool = False
    overwrite: bool = False
    postprocess: bool = True  # apply WORK/<config>/postprocessing.json when it exists
    mirror_axes: tuple[int, ...] = (0, 1, 2)  # with tta; predict_folder takes them from the checkpoints
    # device memory (MB) a case's accumulators may take; None: SEGPIPE_DEVICE_MEMORY_LIMIT_MB, else
    # a share of the device's free memory (CUDA)
    device_memory_limit_mb: float | None = None
    backend: str = "torch"  # torch, openvino, onnxruntime, or auto: the fastest installed (the CLI's default)
    precision: str = "auto"  # fp32, bf16, or auto: bf16 where the CPU or GPU has it natively


MEMORY_LIMIT_ENV = "SEGPIPE_DEVICE_MEMORY_LIMIT_MB"


def memory_limit_bytes(options: PredictOptions) -> int | None:
    """The forced device-memory limit: the option, else the environment variable, else None."""
    mb = options.device_memory_limit_mb
    if mb is None and os.environ.get(MEMORY_LIMIT_ENV):
        try:
            mb = float(os.environ[MEMORY_LIMIT_ENV])
        except ValueError as exc:
            raise ValueError(f"{MEMORY_LIMIT_ENV}={os.environ[MEMORY_LIMIT_ENV]!r} is not a number of MB") from exc
    return None if mb is None else int(mb * 2**20)


def resolve_device(name: str) -> torch.device:
    """``auto`` -> CUDA when available, else CPU."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise RuntimeError("--device cuda was asked for but no CUDA device is available")
    return torch.device(name)


def amp_dtype_for(device: torch.device) -> torch.dtype | None:
    """bf16 where the GPU computes it natively (compute capability >= 8.0), fp16 (with a gradient scaler
    in training) otherwise; full precision on the CPU."""
    if device.type != "cuda":
        return None
    native = torch.cuda.get_device_capability(device) >= NATIVE_BF16_CAPABILITY
    return torch.bfloat16 if native else torch.float16


def restore_geometry(probs: torch.Tensor, pre: PreprocessedCase, softmax: bool = True) -> np.ndarray:
    """Probabilities at the configuration's spacing -> ``(C, X, Y, Z)`` in the original image grid
    (outside the non-zero box: background, i.e. class 0 for softmax outputs, no region for sigmoid ones)."""
    props = pre.properties
    box = props.crop_box
    cropped = resample_probabilities(probs, [hi - lo for lo, hi in box]).cpu().numpy()
    full = np.zeros((probs.shape[0], *props.original_shape), dtype=np.float32)
    if softmax:
        full[0] = 1.0
    full[(slice(None), *[slice(lo, hi) for lo, hi in box])] = cropped
    return full


def restore_label_map(
    probs: torch.Tensor, pre: PreprocessedCase, labels: list[int], regions_class_order: list[int] | None = None
) -> np.ndarray:
    """Probabilities at the configuration's spacing -> ``(X, Y, Z)`` label values in the original grid;
    equals ``label_map(restore_geometry(probs, pre))`` without the full-size probabilities."""
    props = pre.properties
    box = props.crop_box
    inside = label_map(resample_probabilities(probs, [hi - lo for lo, hi in box]), labels, regions_class_order)
    seg = np.zeros(props.original_shape, dtype=inside.dtype)  # outside the non-zero box: background
    seg[tuple(slice(lo, hi) for lo, hi in box)] = inside
    return seg


def average_probabilities(
    models: Sequence[Runner],
    pre: PreprocessedCase,
    plans: Plans,
    config: Configuration,
    options: PredictOptions,
    device: torch.device,
    accumulate_on: torch.device | None = None,
) -> torch.Tensor:
    """The models' softmax averaged over windows and mirrors, ``(C, x, y, z)`` at the configuration's
    spacing, on ``accumulate_on`` (default ``device``)."""
    image = torch.from_numpy(np.ascontiguousarray(pre.image))
    total = None
    for model in models:
        p = predict_probabilities(
            model,
            image,
            config.patch_size,
            plans.num_classes,
            step=options.step,
            mirror_axes=options.mirror_axes if options.tta else (),
            device=device,
            batch_windows=options.batch_windows,
            accumulate_on=accumulate_on,
            amp_dtype=None,  # the runners compute in their backend's precision
            sigmoid=plans.regions is not None,
        )
        with torch.inference_mode():  # p is an inference tensor: sum it in place inside that mode
            if total is None:
                total = p
            else:
                total += p
                del p
    assert total is not None
    if len(models) > 1:
        with torch.inference_mode():
            total /= len(models)
    return total


def case_device_bytes(
    pre: PreprocessedCase,
    config: Configuration,
    num_classes: int,
    num_models: int,
    options: PredictOptions | None = None,
) -> int:
    """Device memory that predicting one case with its accumulators there takes: the sliding-window
    accumulators, the running sum over models, the probabilities resampled back to the original
    spacing and (with ``options``) the forward batch: every mirroring of ``batch_windows`` windows
    with the network's activations (:func:`segpipe.inference.sliding_window.forward_batch_bytes`)."""
    shape = [max(s, p) for s, p in zip(pre.image.shape[1:], config.patch_size)]
    need = accumulator_bytes(shape, num_classes, pre.image.shape[0])
    if num_models > 1:
        need += 4 * num_classes * math.prod(pre.image.shape[1:])
    box = [hi - lo for lo, hi in pre.properties.crop_box]
    if box != list(pre.image.shape[1:]):
        need += 4 * num_classes * math.prod(box)
    if options is not None:
        mirrors = len(mirror_combinations(options.mirror_axes if options.tta else ()))
        need += forward_batch_bytes(
            config.patch_size,
            config.topology.features,
            config.topology.strides,
            pre.image.shape[0],
            num_classes,
            options.batch_windows * mirrors,
        )
    return need


Attempt = tuple[torch.device, torch.device, str]  # (network device, accumulators' device, how it is said)


def fallback_attempts(device: torch.device, accumulate_on: torch.device) -> list[Attempt]:
    """How one case is tried when the device runs out of memory, in order: as chosen, then with the
    accumulators on the CPU, then the whole case on the CPU (steps that change nothing are left out)."""
    cpu = torch.device("cpu")
    attempts = [(device, accumulate_on, "as planned")]
    if accumulate_on.type != "cpu":
        attempts.append((device, cpu, "with its accumulators on the CPU"))
    if device.type != "cpu":
        attempts.append((cpu, cpu, "on the CPU"))
    return attempts


def with_fallbacks(case_id: str, attempts: list[Attempt], run: Callable[[torch.device, torch.device], torch.Tensor]):
    """``run(device, accumulate_on)`` for the first attempt that does not run out of device memory
    (window batches are halved inside each attempt first); each step down is logged once."""
    for i, (device, accumulate_on, _) in enumerate(attempts):
        try:
            return run(device, accumulate_on)
        except torch.OutOfMemoryError:
            if i + 1 == len(attempts):
                raise
            release_cached_memory(device)
            log.warning(
                "%s: out of device memory even with one window a batch; retrying %s", case_id, attempts[i + 1][2]
            )
    raise AssertionError("no attempts")


def predict_case_probabilities(
    models: Sequence[Runner],
    pre: PreprocessedCase,
    plans: Plans,
    config: Configuration,
    options: PredictOptions,
    device: torch.device,
) -> np.ndarray:
    """Average the models' softmax over windows and mirrors; return it in the original geometry."""
    probs = average_probabilities(models, pre, plans, config, options, device)
    return restore_geometry(probs, pre, softmax=plans.regions is None)


def write_prediction(
    out_dir: Path,
    data: CaseData,
    probs: np.ndarray,
    labels: list[int],
    save_probs: bool,
    postprocessing: dict | None = None,
    regions_class_order: list[int] | None = None,
) -> None:
    """``probs`` ``(C, X, Y, Z)`` to label values (:func:`segpipe.inference.decode.label_map`), apply the
    ``postprocessing`` decision (if any) to the label map, and write NIfTI in the input geometry (and
    the raw probabilities if asked)."""
    if save_probs:
        save_npz(out_dir / f"{data.case_id}.npz", probabilities=probs.astype(np.float16))
    write_segmentation(out_dir, data, label_map(probs, labels, regions_class_order), postprocessing)


def write_segmentation(out_dir: Path, data: CaseData, seg: np.ndarray, postprocessing: dict | None = None) -> None:
    """A label map ``(X, Y, Z)`` (+ postprocessing) written as NIfTI in the input geometry, in its own
    dtype (uint8, or uint16 for label values above 255)."""
    if postprocessing:
        seg = apply_postprocessing(seg, postprocessing)
    save_nifti(out_dir / f"{data.case_id}.nii.gz", seg, data.reference.affine, data.reference.header, seg.dtype)


def output_files(out_dir: Path, case_id: str) -> list[Path]:
    """What ``predict`` writes for one case: the label map and, if asked, the probabilities."""
    return [out_dir / f"{case_id}.nii.gz", out_dir / f"{case_id}.npz"]


def merge_ranks(
    output_dir: Path,
    dist: DistInfo,
    cases: list[CaseFiles],
    predicted: list[str],
    problems: dict[str, str],
    summary: dict,
    manifest: PredictionManifest,
) -> tuple[dict[str, str], dict]:
    """The final step of a sharded prediction. Each rank writes ``OUT/predict.rank<k>.json`` (its
    cases, those it predicted and its failures) and its manifest shard; rank 0 then merges the failures,
    adds every case of ``cases`` that has no output and no recorded failure, and folds the ranks'
    manifest shards into the manifest. Returns the merged problems and summary on rank 0, this rank's
    elsewhere."""
    mine = [c.case_id for c in shard(cases, dist)]
    manifest.save()  # this rank's shard as it ends (also when it predicted nothing)
    report = {"cases": mine, "predicted": predicted, "failures": problems, "summary": summary}
    reports = gather_reports(output_dir, "predict", report, dist)
    if not dist.is_main:
        return problems, summary
    merged: dict[str, str] = {}
    for r in reports:
        merged.update(r["failures"])
    manifest.merge_shards()
    for c in cases:
        if c.case_id not in merged and not output_files(output_dir, c.case_id)[0].exists():
            merged[c.case_id] = "no output was written (its rank stopped early?)"
    totals = {k: sum(r["summary"][k] for r in reports) for k in ("predicted", "skipped")}
    return merged, {**summary, **totals, "failed": len(merged), "ranks": dist.world_size}


def case_inputs(case: CaseFiles, config: Configuration, previous_stage: dict[str, Path] | None) -> list[str]:
    """The files a case's output depends on: its images and, for a cascade, its stage-1 segmentation."""
    if previous_stage is None:
        return list(case.images)
    if case.case_id not in previous_stage:
        raise InputError(case.images[0], f"no {config.previous_stage} segmentation of this case for the cascade")
    return [*case.images, str(previous_stage[case.case_id])]


def load_case(
    case: CaseFiles, plans: Plans, config: Configuration, previous_stage: dict[str, Path] | None = None
) -> tuple[list[FileIdentity], CaseData, PreprocessedCase]:
    """Read and preprocess one case: its inputs' identity (taken before reading, so a file changed
    meanwhile is redone next time), its geometry (the raw image is not needed any more) and the
    preprocessed case (with the stage-1 segmentation of a cascade)."""
    identity = input_identity(case_inputs(case, config, previous_stage))
    data = read_case(case, len(plans.channel_names))
    pre = preprocess_case(data, plans, config, case)
    if previous_stage is not None:
        path = previous_stage[case.case_id]
        pre = with_previous_stage(pre, read_previous_stage(path), plans, config, path)
    return identity, data.geometry_only(), pre


def case_problem(case_id: str, where: str, exc: Exception) -> str:
    """What a failed case's entry in ``failures.json`` says; an error that leaves the device unusable
    stops the run instead (:class:`DeviceFailed`), rather than failing every later case."""
    if isinstance(exc, InputError):
        return str(exc)
    if poisons_device(exc):
        raise DeviceFailed(case_id, exc) from exc
    return f"{where}: {type(exc).__name__}: {with_remedy(exc, PREDICT_MEMORY_REMEDY)}"


def predict_folder(
    input_dir: Path,
    output_dir: Path,
    work: Path,
    config_name: str,
    members: Members,
    options: PredictOptions,
    device: str = "auto",
    cases: list[CaseFiles] | None = None,
    dist: DistInfo = SINGLE,
    previous_stage: dict[str, Path] | None = None,
) -> dict:
    """Predict every case of ``input_dir`` (or the given ``cases``) with members of a WORK folder; see
    the module docstring.

    A cascade stage 2 needs ``previous_stage``: each case's stage-1 segmentation file (see
    :func:`predict_cascade`). Under torchrun (``dist``) each rank predicts every ``world_size``-th case;
    see :func:`merge_ranks`."""
    dev = device_for(resolve_device(device), dist)
    config = load_plans(WorkDir(work).plans).configuration(config_name)
    if config.previous_stage and previous_stage is None:
        raise ValueError(f"{config_name} needs stage-1 ({config.previous_stage}) segmentations of the cases")
    loaded = load_work_models(work, config_name, members, options, dev)
    return predict_loaded(input_dir, output_dir, loaded, options, dev, cases, dist, previous_stage)


def predict_model_folder(
    input_dir: Path,
    output_dir: Path,
    model_dir: Path,
    options: PredictOptions,
    device: str = "auto",
    dist: DistInfo = SINGLE,
) -> dict:
    """Predict every case of ``input_dir`` with a model folder of ``segpipe export`` (no WORK folder)."""
    dev = device_for(resolve_device(device), dist)
    loaded = load_folder_models(model_dir, options, dev)
    return predict_loaded(input_dir, output_dir, loaded, options, dev, dist=dist)


def predict_loaded(
    input_dir: Path,
    output_dir: Path,
    loaded: LoadedModels,
    options: PredictOptions,
    dev: torch.device,
    cases: list[CaseFiles] | None = None,
    dist: DistInfo = SINGLE,
    previous_stage: dict[str, Path] | None = None,
) -> dict:
    """Predict every case of ``input_dir`` (or ``cases``) with ``loaded``; see :func:`predict_folder`."""
    plans, config, models, decision = loaded.plans, loaded.config, loaded.networks, loaded.decision
    options = replace(options, mirror_axes=loaded.mirror_axes)
    problems: dict[str, str] = {}
    if cases is None:
        cases, listing_problems = list_prediction_inputs(input_dir, len(plans.channel_names))
        problems.update({e.path: e.problem for e in listing_problems})
    if not cases and not problems:
        raise InputError(input_dir, "no NIfTI files to predict")
    all_cases, cases = cases, shard(cases, dist)
    if not dist.is_main:
        problems = {}  # listing problems are reported once, by rank 0
    output_dir.mkdir(parents=True, exist_ok=True)
    distributed.barrier()  # every rank has started before any sweeps: none deletes a file being written
    remove_stale_temporaries(output_dir)  # this host's dead processes' files only
    manifest = PredictionManifest(output_dir, rank=dist.rank if dist.enabled else None)
    if dist.enabled:
        manifest.owned = {c.case_id for c in cases}
    limit = memory_limit_bytes(options)

    def inputs(case: CaseFiles) -> list[str]:
        return case_inputs(case, config, previous_stage)

    def finished(case: CaseFiles) -> bool:
        nifti, npz = output_files(output_dir, case.case_id)
        return (
            not options.overwrite
            and nifti.exists()
            and (npz.exists() or not options.save_probabilities)
            and (previous_stage is None or case.case_id in previous_stage)
            and manifest.is_current(case.case_id, inputs(case))
        )

    todo = [c for c in cases if not finished(c)]

    def load(case: CaseFiles) -> tuple[list[FileIdentity], CaseData, PreprocessedCase]:
        return load_case(case, plans, config, previous_stage)

    models_on = {dev: models}

    def models_for(device: torch.device) -> list[Runner]:
        """The members on ``device``; CPU copies are built only when a case falls back to the CPU."""
        if device not in models_on:
            models_on[device] = loaded.reload(device)
        return models_on[device]

    def predict_one(case: CaseFiles, read: Future) -> str | None:
        """Predict and write one case; return its problem (None: done). Its arrays die on return."""
        where = case.images[0]  # the file an error is reported against: the input, then the output
        try:
            identity, data, pre = read.result()
            need = case_device_bytes(pre, config, plans.num_classes, len(models), options)
            attempts = fallback_attempts(dev, choose_accumulation_device(need, dev, limit))
            probs = with_fallbacks(
                case.case_id,
                attempts,
                lambda d, acc: average_probabilities(models_for(d), pre, plans, config, options, d, acc),
            )
            where = str(output_files(output_dir, case.case_id)[0])
            order = plans.regions_class_order
            if options.save_probabilities:
                full = restore_geometry(probs, pre, softmax=order is None)
                del probs
                write_prediction(output_dir, data, full, plans.foreground_labels, True, decision, order)
            else:
                seg = restore_label_map(probs, pre, plans.foreground_labels, order)
                del probs
                write_segmentation(output_dir, data, seg, decision)
            manifest.record(case.case_id, identity)
            return None
        except (InputError, ValueError, RuntimeError, OSError, MemoryError) as exc:
            return case_problem(case.case_id, where, exc)

    start = time.perf_counter()
    with ThreadPoolExecutor(max_workers=1) as reader:
        pending: Future | None = reader.submit(load, todo[0]) if todo else None
        for i, case in enumerate(tqdm(todo, desc="predict", unit="case", dynamic_ncols=True)):
            assert pending is not None
            current = pending
            pending = reader.submit(load, todo[i + 1]) if i + 1 < len(todo) else None
            problem = predict_one(case, current)
            del current  # its result holds the case's arrays
            if problem is not None:
                problems[case.case_id] = problem
                for path in output_files(output_dir, case.case_id):  # a failed case leaves no output
                    with contextlib.suppress(OSError):
                        path.unlink()
                manifest.forget(case.case_id)
    summary = {
        "predicted": len(todo) - sum(c.case_id in problems for c in todo),
        "skipped": len(cases) - len(todo),
        "failed": len(problems),
        "seconds": round(time.perf_counter() - start, 2),
        "postprocessing": decision is not None,
        "backend": loaded.choice.backend,
        "precision": loaded.choice.precision.name,
        "choice": loaded.choice.describe(),
    }
    if dist.enabled:
        predicted = [c.case_id for c in todo if c.case_id not in problems]
        problems, summary = merge_ranks(output_dir, dist, all_cases, predicted, problems, summary, manifest)
        if not dist.is_main:
            return summary  # rank 0 reports the failures of all ranks
    failures_path = output_dir / "failures.json"
    if problems:
        try:
            write_json(failures_path, {"failures": problems})
        except OSError as exc:
            problems[str(failures_path)] = f"could not be written ({exc})"
        raise StageFailed("predict", problems)
    with contextlib.suppress(FileNotFoundError):
        failures_path.unlink()
    return summary


def predict_configuration(
    input_dir: Path,
    output_dir: Path,
    work: Path,
    config_name: str,
    members: Members,
    options: PredictOptions,
    device: str = "auto",
    prev_stage_dir: Path | None = None,
    dist: DistInfo = SINGLE,
) -> dict:
    """``segpipe predict``: :func:`predict_cascade` for a cascade stage, else :func:`predict_folder`."""
    if load_plans(WorkDir(work).plans).configuration(config_name).previous_stage:
        return predict_cascade(input_dir, output_dir, work, config_name, members, options, device, prev_stage_dir, dist)
    if prev_stage_dir is not None:
        raise ValueError(f"--prev-stage is for cascade configurations; {config_name} has no previous stage")
    return predict_folder(input_dir, output_dir, work, config_name, members, options, device, dist=dist)


STAGE1_FOLDER = "stage1_{config}"  # inside the output folder: stage 1's segmentations, reusable with --prev-stage


def predict_cascade(
    input_dir: Path,
    output_dir: Path,
    work: Path,
    config_name: str,
    members: Members,
    options: PredictOptions,
    device: str = "auto",
    prev_stage_dir: Path | None = None,
    dist: DistInfo = SINGLE,
) -> dict:
    """Both stages of a cascade on a folder: stage 1 (the fold ensemble of every trained fold of the
    previous configuration, no postprocessing) writes ``OUT/stage1_<config>/``, unless
    ``prev_stage_dir`` already holds its segmentations; then stage 2 with ``members``.

    Cases that fail in stage 1 are reported by stage 2 (no segmentation to build on), after every
    other case is written."""
    plans = load_plans(WorkDir(work).plans)
    config = plans.configuration(config_name)
    stage1 = config.previous_stage
    if stage1 is None:
        raise ValueError(f"{config_name} is not a cascade stage; use predict_folder")
    summary: dict = {}
    if prev_stage_dir is None:
        folds = trained_folds(work, stage1)
        if not folds:
            raise MissingPreviousStage(
                f"{config_name} needs a trained {stage1}: run `segpipe train {work} --config {stage1} --fold all`"
            )
        prev_stage_dir = output_dir / STAGE1_FOLDER.format(config=stage1)
        stage1_options = PredictOptions(**{**vars(options), "save_probabilities": False, "postprocess": False})
        try:
            summary["stage1"] = predict_folder(
                input_dir, prev_stage_dir, work, stage1, Members(folds), stage1_options, device, dist=dist
            )
        except StageFailed as exc:  # go on with the cases stage 1 could do; stage 2 reports the others
            summary["stage1"] = {"failed": len(exc.problems)}
    elif not prev_stage_dir.is_dir():
        raise InputError(prev_stage_dir, "--prev-stage folder not found")
    segs = {
        strip_nifti_ending(p.name): p for p in sorted(prev_stage_dir.iterdir()) if p.name.endswith((".nii", ".nii.gz"))
    }
    summary.update(
        predict_folder(
            input_dir, output_dir, work, config_name, members, options, device, dist=dist, previous_stage=segs
        )
    )
    return summary


def trained_folds(work: Path, config_name: str) -> list[int]:
    """The folds of a configuration whose training finished (a final checkpoint exists)."""
    root = WorkDir(work).root / config_name
    folds = [int(p.parent.name[5:]) for p in root.glob(f"fold_*/{FINAL}") if p.parent.name[5:].isdigit()]
    return sorted(folds)
