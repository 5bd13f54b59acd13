"""Batch prediction of NIfTI folders: preprocess, sliding windows, resample back, write NIfTI.

Reads ``WORK/plans.json`` and the run folders' checkpoints; writes ``OUT/<case>.nii.gz`` (uint8,
the input's exact shape, affine and orientation) and optionally ``OUT/<case>.npz`` probabilities.
When ``WORK/<config>/postprocessing.json`` exists (``segpipe postprocess``), its largest-component
decision is applied to the label maps (not to the probabilities) unless ``postprocess`` is off.
The next case is read and preprocessed in a background thread while the current one runs.
A failing case is recorded in ``OUT/failures.json``; the others still run.
"""

from __future__ import annotations

import time
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import nn
from tqdm.auto import tqdm

from segpipe.atomic import save_npz, write_json
from segpipe.dataset import CaseData, CaseFiles, list_prediction_inputs, read_case
from segpipe.ensemble import Members, load_members
from segpipe.errors import StageFailed
from segpipe.inference import predict_probabilities
from segpipe.nifti import InputError, save_nifti
from segpipe.paths import WorkDir
from segpipe.plans import Configuration, Plans, load_plans
from segpipe.postprocess import apply_postprocessing, load_decision
from segpipe.preprocessing import PreprocessedCase, preprocess_case
from segpipe.resampling import resample_probabilities


@dataclass
class PredictOptions:
    step: float = 0.5
    tta: bool = True
    batch_windows: int = 1
    save_probabilities: bool = False
    overwrite: bool = False
    postprocess: bool = True  # apply WORK/<config>/postprocessing.json when it exists


def resolve_device(name: str) -> torch.device:
    """``auto`` -> CUDA when available, else CPU."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise RuntimeError("--device cuda was asked for but no CUDA device is available")
    return torch.device(name)


def amp_dtype_for(device: torch.device) -> torch.dtype | None:
    """bf16 where the GPU supports it, fp16 otherwise; full precision on the CPU."""
    if device.type != "cuda":
        return None
    return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16


def restore_geometry(probs: torch.Tensor, pre: PreprocessedCase) -> np.ndarray:
    """Probabilities at the configuration's spacing -> ``(C, X, Y, Z)`` in the original image grid."""
    props = pre.properties
    box = props.crop_box
    cropped = resample_probabilities(probs, [hi - lo for lo, hi in box]).cpu().numpy()
    full = np.zeros((probs.shape[0], *props.original_shape), dtype=np.float32)
    full[0] = 1.0  # outside the non-zero box: background
    full[(slice(None), *[slice(lo, hi) for lo, hi in box])] = cropped
    return full


def predict_case_probabilities(
    models: list[nn.Module],
    pre: PreprocessedCase,
    plans: Plans,
    config: Configuration,
    options: PredictOptions,
    device: torch.device,
) -> np.ndarray:
    """Average the models' softmax over windows and mirrors; return it in the original geometry."""
    image = torch.from_numpy(np.ascontiguousarray(pre.image))
    total = None
    for model in models:
        p = predict_probabilities(
            model,
            image,
            config.patch_size,
            plans.num_classes,
            step=options.step,
            mirror_axes=(0, 1, 2) if options.tta else (),
            device=device,
            batch_windows=options.batch_windows,
            amp_dtype=amp_dtype_for(device),
        )
        total = p if total is None else total + p
    assert total is not None
    return restore_geometry(total / len(models), pre)


def write_prediction(
    out_dir: Path,
    data: CaseData,
    probs: np.ndarray,
    labels: list[int],
    save_probs: bool,
    postprocessing: dict | None = None,
) -> None:
    """Argmax of ``probs`` ``(C, X, Y, Z)`` to label values, apply the ``postprocessing`` decision (if
    any) to the label map, and write NIfTI in the input geometry (and the raw probabilities if asked)."""
    values = np.array([0, *labels], dtype=np.uint8)
    seg = values[probs.argmax(axis=0)]
    if postprocessing:
        seg = apply_postprocessing(seg, postprocessing)
    if save_probs:
        save_npz(out_dir / f"{data.case_id}.npz", probabilities=probs.astype(np.float16))
    save_nifti(out_dir / f"{data.case_id}.nii.gz", seg, data.reference.affine, data.reference.header, np.uint8)


def predict_folder(
    input_dir: Path,
    output_dir: Path,
    work: Path,
    config_name: str,
    members: Members,
    options: PredictOptions,
    device: str = "auto",
    cases: list[CaseFiles] | None = None,
) -> dict:
    """Predict every case of ``input_dir`` (or the given ``cases``); see the module docstring."""
    dev = resolve_device(device)
    plans = load_plans(WorkDir(work).plans)
    config = plans.configuration(config_name)
    models = load_members(work, plans, config, members, dev)
    decision = load_decision(WorkDir(work).postprocessing(config_name)) if options.postprocess else None
    problems: dict[str, str] = {}
    if cases is None:
        cases, listing_problems = list_prediction_inputs(input_dir, len(plans.channel_names))
        problems.update({e.path: e.problem for e in listing_problems})
    if not cases and not problems:
        raise InputError(input_dir, "no NIfTI files to predict")
    output_dir.mkdir(parents=True, exist_ok=True)
    todo = [c for c in cases if options.overwrite or not (output_dir / f"{c.case_id}.nii.gz").exists()]

    def load(case: CaseFiles) -> tuple[CaseData, PreprocessedCase]:
        data = read_case(case, len(plans.channel_names))
        return data, preprocess_case(data, plans, config, case)

    start = time.perf_counter()
    with ThreadPoolExecutor(max_workers=1) as reader:
        pending: Future | None = reader.submit(load, todo[0]) if todo else None
        for i, case in enumerate(tqdm(todo, desc="predict", unit="case", dynamic_ncols=True)):
            assert pending is not None
            current = pending
            pending = reader.submit(load, todo[i + 1]) if i + 1 < len(todo) else None
            try:
                data, pre = current.result()
                probs = predict_case_probabilities(models, pre, plans, config, options, dev)
                write_prediction(output_dir, data, probs, plans.foreground_labels, options.save_probabilities, decision)
            except (InputError, ValueError, RuntimeError, OSError) as exc:
                problems[case.case_id] = str(exc)
    summary = {
        "predicted": len(todo) - sum(c.case_id in problems for c in todo),
        "skipped": len(cases) - len(todo),
        "failed": len(problems),
        "seconds": round(time.perf_counter() - start, 2),
        "postprocessing": decision is not None,
    }
    failures_path = output_dir / "failures.json"
    if problems:
        write_json(failures_path, {"failures": problems})
        raise StageFailed("predict", problems)
    if failures_path.exists():
        failures_path.unlink()
    return summary
