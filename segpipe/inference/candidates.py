"""Several candidate models of one configuration over the same cases in one pass.

Validation compares a fold's candidates (final weights, SWA, ensembles of its cycle snapshots) on its
held-out cases. One :func:`~segpipe.inference.predict.predict_folder` per candidate reads and
preprocesses every case once per candidate and runs a checkpoint once per candidate that holds it
(the last snapshot of a cyclic run is the final weights; the last two snapshots are in the ensemble of
all). Here each case is read and preprocessed once, each distinct set of weights runs once over it
through the same sliding-window code, and each candidate's probabilities are its members' mean. The
weights run in the order they are first listed and each sum follows that order, so when every
candidate lists its members in that order (list the largest ensemble first), every file equals that
of one ``predict_folder`` per candidate, bit for bit; otherwise to float rounding. As
``predict_folder`` with ``overwrite``, every case is predicted again.

Reads the checkpoints and the cases; writes, per candidate folder, what ``predict_folder`` writes
there: ``<case>.nii.gz``, ``<case>.npz`` (with ``save_probabilities``), the manifest and, when
cases failed, ``failures.json``. A case that fails is listed in the folders it failed for and the
other cases go on; the call then ends with :class:`StageFailed`. Under torchrun each rank predicts its
share of the cases and rank 0 merges each folder (:func:`~segpipe.inference.predict.merge_ranks`).
"""

from __future__ import annotations

import contextlib
import math
import time
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field, replace
from pathlib import Path

import torch
from tqdm.auto import tqdm

from segpipe.core.atomic import remove_stale_temporaries, write_json
from segpipe.core.errors import StageFailed
from segpipe.core.paths import WorkDir
from segpipe.data.dataset import CaseData, CaseFiles
from segpipe.data.nifti import InputError
from segpipe.inference.backends import Runner, TorchRunner, resolve_precision
from segpipe.inference.manifest import PredictionManifest
from segpipe.inference.predict import (
    PredictOptions,
    average_probabilities,
    case_device_bytes,
    case_problem,
    fallback_attempts,
    load_case,
    memory_limit_bytes,
    merge_ranks,
    output_files,
    resolve_device,
    restore_geometry,
    restore_label_map,
    with_fallbacks,
    write_prediction,
    write_segmentation,
)
from segpipe.inference.sliding_window import choose_accumulation_device
from segpipe.planning.plans import Plans, load_plans
from segpipe.preprocessing.preprocess import PreprocessedCase
from segpipe.runs.checkpoint import load_checkpoint, load_model, mirror_axes_of
from segpipe.runs.run_config import members_configuration
from segpipe.runs.snapshots import run_dir_of
from segpipe.scale import distributed
from segpipe.scale.distributed import SINGLE, DistInfo, device_for, shard

FAILURES = "failures.json"


def distinct_weights(paths: list[Path]) -> tuple[list[Path], list[int]]:
    """The checkpoints whose weights differ, in first-seen order, and for each of ``paths`` the index of
    its weights among them: identical weights (the final checkpoint of a cyclic run and its last
    snapshot) are run once."""
    kept: list[Path] = []
    states: list[dict[str, torch.Tensor]] = []
    index: list[int] = []
    for path in paths:
        state = load_checkpoint(path)["model"]
        same = next((i for i, s in enumerate(states) if _equal(s, state)), None)
        if same is None:
            kept.append(path)
            states.append(state)
            same = len(kept) - 1
        index.append(same)
    return kept, index


def _equal(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


@dataclass
class _Timing:
    """Seconds spent over all cases: reading and preprocessing, each model's windows, each folder's writing."""

    cases: int = 0
    load: float = 0.0
    models: list[float] = field(default_factory=list)
    write: dict[Path, float] = field(default_factory=dict)


def predict_candidates(
    work: Path,
    config_name: str,
    candidates: dict[Path, list[Path]],
    cases: list[CaseFiles],
    options: PredictOptions,
    device: str = "auto",
    dist: DistInfo = SINGLE,
    previous_stage: dict[str, Path] | None = None,
) -> dict[Path, dict]:
    """Predict ``cases`` once for every candidate: output folder -> its member checkpoints (averaged).

    Returns, per folder, ``predict_folder``'s summary plus ``seconds_per_case`` (this candidate alone:
    reading and preprocessing, its members' windows, resampling back and writing) and
    ``forward_passes`` (its distinct members, each a full sliding-window pass with the mirrorings)."""
    if not cases:
        raise ValueError("no cases to predict")
    dev = device_for(resolve_device(device), dist)
    plans = load_plans(WorkDir(work).plans)
    # the configuration the run trained (run overrides may have changed patch, batch or width)
    config = members_configuration(
        sorted({run_dir_of(p) for members in candidates.values() for p in members}), plans.configuration(config_name)
    )
    if config.previous_stage and previous_stage is None:
        raise ValueError(f"{config_name} needs stage-1 ({config.previous_stage}) segmentations of the cases")
    ordered = [p for members in candidates.values() for p in members]
    paths, index = distinct_weights(ordered)
    members: dict[Path, list[int]] = {}
    position = 0
    for out, listed in candidates.items():
        members[out] = index[position : position + len(listed)]
        position += len(listed)
    # every member of one configuration was trained alike: the first one's mirror axes (as predict_folder)
    options = replace(options, mirror_axes=mirror_axes_of(ordered[0]))

    def runners(d: torch.device) -> list[Runner]:
        """The models on ``d`` in the options' precision (torch: validation compares every candidate alike)."""
        precision = resolve_precision(options.precision, d, "torch")
        return [TorchRunner(load_model(p, plans, config, d), precision, d) for p in paths]

    models_on = {dev: runners(dev)}

    def models_for(d: torch.device) -> list[Runner]:
        """The models on ``d``; CPU copies are read only when a case falls back to the CPU."""
        if d not in models_on:
            models_on[d] = runners(d)
        return models_on[d]

    mine = shard(cases, dist)
    for out in candidates:
        out.mkdir(parents=True, exist_ok=True)
    distributed.barrier()  # every rank has started before any sweeps: none deletes a file being written
    manifests = {}
    for out in candidates:
        remove_stale_temporaries(out)
        manifests[out] = PredictionManifest(out, rank=dist.rank if dist.enabled else None)
        if dist.enabled:
            manifests[out].owned = {c.case_id for c in mine}
    problems: dict[Path, dict[str, str]] = {out: {} for out in candidates}
    timing = _Timing(models=[0.0] * len(paths), write=dict.fromkeys(candidates, 0.0))
    limit = memory_limit_bytes(options)
    # running sums alive at once: one per candidate of several members
    open_sums = sum(len(m) > 1 for m in members.values())

    def load(case: CaseFiles) -> tuple:
        start = time.perf_counter()
        loaded = load_case(case, plans, config, previous_stage)
        return (*loaded, time.perf_counter() - start)

    def predict_one(case: CaseFiles, loaded: Future) -> None:
        """Every candidate's output of one case; problems go to ``problems``. Arrays die on return."""
        try:
            identity, data, pre, seconds = loaded.result()
        except (InputError, ValueError, RuntimeError, OSError, MemoryError) as exc:
            problem = case_problem(case.case_id, case.images[0], exc)
            for out in candidates:
                problems[out][case.case_id] = problem
            return
        timing.load += seconds
        voxels = math.prod(pre.image.shape[1:])
        sums_bytes = open_sums * 4 * plans.num_classes * voxels
        need = case_device_bytes(pre, config, plans.num_classes, 1, options) + sums_bytes
        attempts = fallback_attempts(dev, choose_accumulation_device(need, dev, limit))
        sums: dict[Path, torch.Tensor] = {}
        seen: dict[Path, int] = dict.fromkeys(candidates, 0)
        for i in range(len(paths)):
            users = [out for out in candidates if i in members[out] and out not in problems_of(case)]
            if not users:
                continue
            start = time.perf_counter()
            try:
                p = with_fallbacks(
                    case.case_id,
                    attempts,
                    lambda d, acc, i=i: average_probabilities([models_for(d)[i]], pre, plans, config, options, d, acc),
                )
            except (ValueError, RuntimeError, OSError, MemoryError) as exc:
                problem = case_problem(case.case_id, case.images[0], exc)
                for out in users:
                    problems[out][case.case_id] = problem
                continue
            timing.models[i] += time.perf_counter() - start
            for out in users:
                for _ in range(members[out].count(i)):
                    # a tensor another candidate still reads is copied before it is summed into
                    shared = len(members[out]) > 1 and (len(users) > 1 or members[out].count(i) > 1)
                    _add(sums, out, p, shared)
                    seen[out] += 1
                if seen[out] == len(members[out]):
                    total = sums.pop(out)
                    if len(members[out]) > 1:
                        with torch.inference_mode():
                            total /= len(members[out])
                    _write(out, data, pre, total, identity, case)
            del p

    def problems_of(case: CaseFiles) -> set[Path]:
        return {out for out in candidates if case.case_id in problems[out]}

    def _write(out: Path, data: CaseData, pre: PreprocessedCase, probs: torch.Tensor, identity, case) -> None:
        start = time.perf_counter()
        try:
            _write_case(out, data, pre, probs, plans, options)
            manifests[out].record(case.case_id, identity)
        except (ValueError, RuntimeError, OSError, MemoryError) as exc:
            where = str(output_files(out, case.case_id)[0])
            problems[out][case.case_id] = case_problem(case.case_id, where, exc)
        timing.write[out] += time.perf_counter() - start

    start = time.perf_counter()
    with ThreadPoolExecutor(max_workers=1) as reader:  # the next case is read while this one runs
        pending: Future | None = reader.submit(load, mine[0]) if mine else None
        for i, case in enumerate(tqdm(mine, desc="validate", unit="case", dynamic_ncols=True)):
            assert pending is not None
            current = pending
            pending = reader.submit(load, mine[i + 1]) if i + 1 < len(mine) else None
            predict_one(case, current)
            del current  # its result holds the case's arrays
            timing.cases += 1
            for out in candidates:
                if case.case_id in problems[out]:
                    _remove_outputs(out, case.case_id)
                    manifests[out].forget(case.case_id)
    seconds = time.perf_counter() - start
    return _finish(candidates, members, problems, manifests, timing, seconds, cases, mine, dist)


def _add(sums: dict[Path, torch.Tensor], out: Path, p: torch.Tensor, shared: bool) -> None:
    """Add one member's probabilities to a candidate's running sum (``shared``: start it from a copy)."""
    with torch.inference_mode():  # p is an inference tensor: sum it in place inside that mode
        if out not in sums:
            sums[out] = p.clone() if shared else p
        else:
            sums[out] += p.to(sums[out].device)


def _write_case(
    out: Path, data: CaseData, pre: PreprocessedCase, probs: torch.Tensor, plans: Plans, options: PredictOptions
) -> None:
    """One candidate's case, written as predict_folder writes it (validation: no postprocessing)."""
    order = plans.regions_class_order
    if options.save_probabilities:
        full = restore_geometry(probs, pre, softmax=order is None)
        write_prediction(out, data, full, plans.foreground_labels, True, None, order)
    else:
        write_segmentation(out, data, restore_label_map(probs, pre, plans.foreground_labels, order))


def _remove_outputs(out: Path, case_id: str) -> None:
    """A failed case leaves no output behind."""
    for path in output_files(out, case_id):
        with contextlib.suppress(OSError):
            path.unlink()


def _finish(
    candidates: dict[Path, list[Path]],
    members: dict[Path, list[int]],
    problems: dict[Path, dict[str, str]],
    manifests: dict[Path, PredictionManifest],
    timing: _Timing,
    seconds: float,
    cases: list[CaseFiles],
    mine: list[CaseFiles],
    dist: DistInfo,
) -> dict[Path, dict]:
    """Per folder: merge the ranks, write or remove ``failures.json``, the summary with seconds per
    case; then :class:`StageFailed` listing every folder's failures, if any."""
    summaries: dict[Path, dict] = {}
    failed: dict[str, str] = {}
    n = max(timing.cases, 1)
    for out in candidates:
        distinct = sorted(set(members[out]))
        own = timing.load + sum(timing.models[i] for i in distinct) + timing.write[out]
        summary = {
            "predicted": len(mine) - len(problems[out]),
            "skipped": 0,
            "failed": len(problems[out]),
            "seconds": round(seconds, 2),
            "postprocessing": False,
            "seconds_per_case": round(own / n, 3),
            "forward_passes": len(distinct),
        }
        folder_problems = problems[out]
        if dist.enabled:
            predicted = [c.case_id for c in mine if c.case_id not in folder_problems]
            folder_problems, summary = merge_ranks(
                out, dist, cases, predicted, folder_problems, summary, manifests[out]
            )
        summaries[out] = summary
        if not dist.is_main:
            continue
        failures = out / FAILURES
        if folder_problems:
            with contextlib.suppress(OSError):
                write_json(failures, {"failures": folder_problems})
            failed.update({f"{out.name}/{case}": problem for case, problem in folder_problems.items()})
        else:
            with contextlib.suppress(FileNotFoundError):
                failures.unlink()
    if failed:
        raise StageFailed("validate", failed)
    return summaries
