"""Single benchmark entry point for segpipe, optionally compared against nnU-Net v2.

    python benchmarks/run.py --which preprocess|train|predict [--against nnunet] [--data DIR] [--workers N]
                             [--device auto|cpu|cuda] [--warmup-iters N] [--iters N] [--cases N]
                             [--backend B[,B...]] [--precision P[,P...]] [--quick] [--nnunet-bin DIR] [--keep]

Prints one JSON line per measured stage to stdout; everything else (child logs, notes) goes to
stderr. Installs nothing: nnU-Net must already be importable here or live in ``--nnunet-bin``.
Each benchmark is one function in the ``BENCHMARKS`` table; train and predict start from the same
plan + preprocess setup that the preprocess benchmark times. See ``benchmarks/README.md``.
"""

from __future__ import annotations

import argparse
import contextlib
import importlib.util
import json
import os
import platform
import re
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
SEGPIPE = [sys.executable, str(REPO / "cli.py")]
SEGPIPE_TRAIN_PROBE = REPO / "benchmarks" / "segpipe_train_probe.py"
NNUNET_TRAIN_PROBE = REPO / "benchmarks" / "nnunet_train_probe.py"
DEFAULT_DATA = REPO.parent / "shared" / "data" / "Task04_Hippocampus"
NNUNET_PROBE = "nnUNetv2_plan_and_preprocess"
NNUNET_FALLBACK_BIN = Path("/tmp/nnu/bin")
CONFIG = "3d_fullres"
FOLD = 0
MODEL_ITERS = 2  # training iterations of the models that the predict benchmark times (weights do not matter)
QUICK_TRAIN_CASES = 5  # the 5-fold split needs 5 cases


@dataclass(frozen=True)
class Sizes:
    """How much each benchmark measures: training iterations (untimed warm-up, timed) and predicted cases."""

    warmup_iters: int
    iters: int
    cases: int


FULL = Sizes(warmup_iters=10, iters=50, cases=60)
QUICK = Sizes(warmup_iters=2, iters=3, cases=2)
DEFAULT_WORKERS = {"train": 2, "predict": 2}  # preprocess: all cores
BACKENDS = ("auto", "torch", "openvino", "onnxruntime")  # segpipe predict --backend
PRECISIONS = ("auto", "fp32", "bf16")


@dataclass
class Run:
    """Wall time and peak resident memory (one process of the tree, MB) of a finished command."""

    seconds: float
    peak_rss_mb: float


def run_timed(cmd: list[str], log: Path, env: dict[str, str] | None = None) -> Run:
    """Run ``cmd`` to completion, appending its output to ``log``; exit with its log tail on failure.

    Peak RSS comes from ``os.wait4`` on this very child: the largest ``ru_maxrss`` among the child and
    its reaped descendants (worker processes), so one measurement never leaks into the next.
    """
    with log.open("a") as out:
        out.write(f"$ {' '.join(cmd)}\n")
        out.flush()
        start = time.perf_counter()
        proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, env=env)
        _, status, usage = os.wait4(proc.pid, 0)
        seconds = time.perf_counter() - start
    proc.returncode = os.waitstatus_to_exitcode(status)
    if proc.returncode != 0:
        tail = "".join(log.read_text().splitlines(keepends=True)[-40:])
        sys.exit(f"command failed ({proc.returncode}): {' '.join(cmd)}\n--- {log} (tail) ---\n{tail}")
    scale = 1024 * 1024 if sys.platform == "darwin" else 1024  # ru_maxrss: bytes on macOS, KiB on Linux
    return Run(seconds, usage.ru_maxrss / scale)


def host_info() -> dict[str, object]:
    """The machine a result was measured on."""
    return {
        "platform": platform.platform(),
        "machine": platform.machine(),
        "cpus": os.cpu_count(),
        "python": platform.python_version(),
    }


def count_cases(data: Path) -> int:
    """Number of labelled training cases listed in the dataset's ``dataset.json``."""
    meta = json.loads((data / "dataset.json").read_text())
    return len(meta.get("training", [])) or int(meta.get("numTraining", 0))


def msd_task_id(data: Path) -> int:
    """The MSD task number of a dataset folder (``Task04_Hippocampus`` -> 4), used as nnU-Net's id."""
    match = re.match(r"Task(\d+)_", data.name)
    if not match:
        sys.exit(f"cannot derive a dataset id from {data.name!r}: expected an MSD folder name like Task04_Name")
    return int(match.group(1))


def resolve_device(name: str) -> str:
    """``auto`` -> ``cuda`` when this interpreter's torch sees a GPU, else ``cpu``; both tools get the result."""
    if name != "auto":
        return name
    import torch  # only here: the other benchmarks and --help stay light

    return "cuda" if torch.cuda.is_available() else "cpu"


def find_nnunet_bin(explicit: Path | None) -> Path:
    """Directory holding the ``nnUNetv2_*`` commands: the option, PATH, this interpreter's, or the fallback."""
    candidates: list[Path] = []
    if explicit is not None:
        candidates.append(explicit)
    else:
        if on_path := shutil.which(NNUNET_PROBE):
            candidates.append(Path(on_path).parent)
        if importlib.util.find_spec("nnunetv2") is not None:
            candidates.append(Path(sys.executable).parent)
        candidates.append(NNUNET_FALLBACK_BIN)
    for directory in candidates:
        if (directory / NNUNET_PROBE).exists():
            return directory
    sys.exit(f"nnU-Net v2 not found (looked in {', '.join(map(str, candidates))}); pass --nnunet-bin DIR")


@dataclass(frozen=True)
class NnUNet:
    """An nnU-Net v2 installation (its ``nnUNetv2_*`` commands and interpreter) and the folder holding
    its ``raw``, ``preprocessed`` and ``results`` folders for one benchmark run."""

    bin_dir: Path
    root: Path

    @property
    def python(self) -> Path:
        """The interpreter next to the commands (the one that imports ``nnunetv2``)."""
        for name in ("python", "python3"):
            if (self.bin_dir / name).exists():
                return self.bin_dir / name
        sys.exit(f"no python next to the nnU-Net commands in {self.bin_dir}")

    def env(self, workers: int | None = None) -> dict[str, str]:
        """This environment plus nnU-Net's folders, its commands on PATH and, if given, ``nnUNet_n_proc_DA``."""
        env = dict(os.environ)
        for var, sub in (("nnUNet_raw", "raw"), ("nnUNet_preprocessed", "preprocessed"), ("nnUNet_results", "results")):
            (self.root / sub).mkdir(parents=True, exist_ok=True)
            env[var] = str(self.root / sub)
        env["PATH"] = f"{self.bin_dir}{os.pathsep}{env.get('PATH', '')}"
        if workers is not None:
            env["nnUNet_n_proc_DA"] = str(workers)
        return env

    def command(self, name: str, *args: str) -> list[str]:
        return [str(self.bin_dir / name), *args]


def make_quick_dataset(root: Path, log: Path, cases: int = 4) -> Path:
    """A tiny synthetic MSD dataset (``cases`` cases of 32x32x24) for smoke-testing the benchmark itself."""
    data = root / "Task01_Quick"
    run_timed([*SEGPIPE, "synth", str(data), "--cases", str(cases), "--shape", "32,32,24"], log)
    return data


def time_segpipe_preprocess(data: Path, work: Path, workers: int, log: Path) -> dict[str, Run]:
    """Time ``segpipe plan`` then ``segpipe preprocess`` into ``work``."""
    common = [str(data), "-o", str(work), "--workers", str(workers)]
    return {
        "plan": run_timed([*SEGPIPE, "plan", *common], log),
        "preprocess": run_timed([*SEGPIPE, "preprocess", *common], log),
    }


def time_nnunet_preprocess(data: Path, nnunet: NnUNet, workers: int, log: Path) -> dict[str, Run]:
    """Convert ``data`` for nnU-Net (untimed), then time fingerprint + planning and 3d_fullres preprocessing."""
    env = nnunet.env()
    task, np_ = str(msd_task_id(data)), str(workers)

    def run(name: str, *args: str) -> Run:
        return run_timed(nnunet.command(name, *args), log, env)

    run("nnUNetv2_convert_MSD_dataset", "-i", str(data), "-np", np_)
    fingerprint = run("nnUNetv2_extract_fingerprint", "-d", task, "-np", np_)
    planning = run("nnUNetv2_plan_experiment", "-d", task)
    return {
        "plan": Run(fingerprint.seconds + planning.seconds, max(fingerprint.peak_rss_mb, planning.peak_rss_mb)),
        "preprocess": run("nnUNetv2_preprocess", "-d", task, "-c", CONFIG, "-np", np_),
    }


def with_total(runs: dict[str, Run]) -> dict[str, Run]:
    """Add a ``total`` entry: summed time, largest peak memory."""
    total = Run(sum(r.seconds for r in runs.values()), max(r.peak_rss_mb for r in runs.values()))
    return {**runs, "total": total}


@dataclass
class Prepared:
    """A dataset planned and preprocessed by segpipe and, when compared, by nnU-Net: where train and
    predict start, with the times of getting there (the preprocess benchmark's measurement)."""

    data: Path
    segpipe_work: Path
    segpipe_runs: dict[str, Run]
    nnunet: NnUNet | None = None
    nnunet_runs: dict[str, Run] | None = None


def prepare(args: argparse.Namespace, tmp: Path, log: Path, quick_cases: int = 4) -> Prepared:
    """The dataset (``--data``, or a synthetic one of ``quick_cases`` cases with ``--quick``) planned and
    preprocessed by segpipe into ``tmp/segpipe``, and by nnU-Net into ``tmp/nnunet`` with ``--against nnunet``."""
    nnunet = None
    if args.against == "nnunet":
        if args.quick:
            print("--quick: skipping nnU-Net", file=sys.stderr)
        else:
            nnunet = NnUNet(find_nnunet_bin(args.nnunet_bin), tmp / "nnunet")  # exits first if there is none
    data = make_quick_dataset(tmp, log, quick_cases) if args.quick else args.data.resolve()
    if not (data / "dataset.json").exists():
        sys.exit(f"no dataset.json in {data}")
    segpipe_runs = time_segpipe_preprocess(data, tmp / "segpipe", args.workers, log)
    nnunet_runs = time_nnunet_preprocess(data, nnunet, args.workers, log) if nnunet else None
    return Prepared(data, tmp / "segpipe", segpipe_runs, nnunet, nnunet_runs)


def bench_preprocess(args: argparse.Namespace, tmp: Path, log: Path) -> list[dict[str, object]]:
    """Plan + preprocess with segpipe (and nnU-Net with ``--against nnunet``); one record per stage."""
    prepared = prepare(args, tmp, log)
    ours = with_total(prepared.segpipe_runs)
    theirs = with_total(prepared.nnunet_runs) if prepared.nnunet_runs else None

    records = []
    for stage in ("preprocess", "plan", "total"):
        seg = ours[stage]
        nnu = theirs[stage] if theirs else None
        records.append(
            {
                "benchmark": "preprocess",
                "stage": stage,
                "segpipe_s": round(seg.seconds, 3),
                "nnunet_s": round(nnu.seconds, 3) if nnu else None,
                "ratio": round(seg.seconds / nnu.seconds, 3) if nnu else None,
                "workers": args.workers,
                "cases": count_cases(prepared.data),
                "host": host_info(),
                "segpipe_peak_rss_mb": round(seg.peak_rss_mb, 1),
                "nnunet_peak_rss_mb": round(nnu.peak_rss_mb, 1) if nnu else None,
            }
        )
    return records


@dataclass
class Probe:
    """What a training probe printed (``*_train_probe.py``) and the peak memory of its process tree."""

    result: dict[str, Any]
    peak_rss_mb: float


def run_probe(cmd: list[str], result: Path, log: Path, env: dict[str, str] | None = None) -> Probe:
    """Run a training probe that writes its JSON line to ``result``."""
    run = run_timed([*cmd, "--result", str(result)], log, env)
    return Probe(json.loads(result.read_text()), run.peak_rss_mb)


def time_segpipe_train(
    work: Path, workers: int, device: str, warmup: int, iters: int, log: Path, compile_: bool = False
) -> Probe:
    """Training iterations of segpipe (``segpipe_train_probe.py``, this interpreter, ``workers``
    data-loading processes; ``compile_``: ``torch.compile``)."""
    cmd = [sys.executable, str(SEGPIPE_TRAIN_PROBE), "--work", str(work), "--config", CONFIG, "--fold", str(FOLD)]
    cmd += ["--warmup", str(warmup), "--iters", str(iters), "--workers", str(workers), "--device", device]
    cmd += ["--compile"] if compile_ else []
    return run_probe(cmd, work / "train_probe.json", log)


def time_nnunet_train(
    data: Path, nnunet: NnUNet, workers: int, device: str, warmup: int, iters: int, log: Path
) -> Probe:
    """Training iterations of nnU-Net (``nnunet_train_probe.py``, nnU-Net's interpreter, ``workers``
    augmentation processes); leaves ``fold_0/checkpoint_final.pth`` in nnU-Net's results folder."""
    cmd = [str(nnunet.python), str(NNUNET_TRAIN_PROBE), "--dataset", str(msd_task_id(data))]
    cmd += ["--config", CONFIG, "--fold", str(FOLD), "--warmup", str(warmup), "--iters", str(iters)]
    cmd += ["--device", device]
    return run_probe(cmd, nnunet.root / f"train_probe_{warmup}_{iters}.json", log, nnunet.env(workers))


def setup_of(probe: Probe) -> dict[str, object]:
    """What a probe trained and how: patch, batch, features per stage, data-loading workers, device,
    torch version and threads, and whether the network was compiled (``torch.compile``)."""
    keys = ("patch", "batch", "features", "workers", "device", "torch", "threads", "compiled")
    return {k: probe.result.get(k) for k in keys}


def note_differences(ours: Probe, theirs: Probe) -> None:
    """Say on stderr where the two tools did not train the same thing the same way."""
    a, b = setup_of(ours), setup_of(theirs)
    for key in ("patch", "batch", "features", "workers", "device"):
        if a[key] != b[key]:
            print(f"note: different {key}: segpipe {a[key]}, nnU-Net {b[key]}", file=sys.stderr)


def bench_train(args: argparse.Namespace, tmp: Path, log: Path) -> list[dict[str, object]]:
    """Steady-state training iterations per second of the 3d_fullres plan, fold 0, segpipe (and nnU-Net)."""
    prepared = prepare(args, tmp, log, QUICK_TRAIN_CASES)
    common = (args.workers, args.device, args.warmup_iters, args.iters)
    ours = time_segpipe_train(prepared.segpipe_work, *common, log, args.compile)
    theirs = None
    if prepared.nnunet is not None:
        theirs = time_nnunet_train(prepared.data, prepared.nnunet, *common, log)
        note_differences(ours, theirs)
    seg_s, nnu_s = ours.result["s_per_it"], theirs.result["s_per_it"] if theirs else None
    return [
        {
            "benchmark": "train",
            "stage": "iterations_per_second",
            "segpipe_it_s": round(ours.result["it_s"], 4),
            "nnunet_it_s": round(theirs.result["it_s"], 4) if theirs else None,
            "segpipe_s": round(seg_s, 4),  # seconds per iteration
            "nnunet_s": round(nnu_s, 4) if nnu_s else None,
            "ratio": round(seg_s / nnu_s, 3) if nnu_s else None,  # < 1: segpipe is faster
            "warmup_iters": args.warmup_iters,
            "iters": args.iters,
            "device": args.device,
            "workers": args.workers,
            "cases": count_cases(prepared.data),
            "host": host_info(),
            "segpipe_peak_rss_mb": round(ours.peak_rss_mb, 1),
            "nnunet_peak_rss_mb": round(theirs.peak_rss_mb, 1) if theirs else None,
            "segpipe_setup": setup_of(ours),
            "nnunet_setup": setup_of(theirs) if theirs else None,
        }
    ]


def link_prediction_inputs(data: Path, cases: int, folder: Path) -> list[str]:
    """Link the first ``cases`` training images of ``data`` (sorted) into ``folder`` as ``CASE_0000.nii.gz``
    (nnU-Net's naming, which segpipe also reads); returns the case names."""
    meta = json.loads((data / "dataset.json").read_text())
    if len(meta.get("modality", meta.get("channel_names", {"0": ""}))) != 1:
        sys.exit("the predict benchmark takes single-channel datasets only")
    images = sorted(data / entry["image"] for entry in meta["training"])
    if len(images) < cases:
        sys.exit(f"--cases {cases}: {data} has only {len(images)} training images")
    folder.mkdir(parents=True)
    names = []
    for image in images[:cases]:
        name = image.name.removesuffix(".nii.gz")
        (folder / f"{name}_0000.nii.gz").symlink_to(image.resolve())
        names.append(name)
    return names


def train_segpipe_model(work: Path, args: argparse.Namespace, log: Path) -> None:
    """A fold-0 segpipe model of the planned network, trained for ``MODEL_ITERS`` iterations (untimed)."""
    cmd = [*SEGPIPE, "train", str(work), "--config", CONFIG, "--fold", str(FOLD), "--epochs", "1"]
    cmd += ["--iters-per-epoch", str(MODEL_ITERS), "--val-iters", "1", "--no-validation"]
    cmd += ["--workers", str(args.workers), "--device", args.device]
    run_timed(cmd, log)


# the model folder (segpipe export --format) each non-torch backend predicts from, as a deployment would;
# torch and auto predict from the WORK folder (auto: its measurement of every backend included in the time)
EXPORT_FORMAT = {"openvino": "openvino", "onnxruntime": "onnx"}


def predict_variants(backends: list[str], precisions: list[str]) -> list[tuple[str, str]]:
    """Every (backend, precision) pair to time, but those a backend cannot run (ONNX Runtime has no bf16)."""
    return [(b, p) for b in backends for p in precisions if not (b == "onnxruntime" and p == "bf16")]


def export_segpipe_model(work: Path, fmt: str, log: Path) -> Path:
    """``segpipe export`` of fold 0 to ``work/model_<fmt>`` (untimed: done once per model, not per case)."""
    model = work / f"model_{fmt}"
    if not model.exists():
        run_timed([*SEGPIPE, "export", str(work), "-o", str(model), "--folds", str(FOLD), "--format", fmt], log)
    return model


def time_segpipe_predict(
    images: Path, out: Path, model: Path, device: str, log: Path, backend: str = "auto", precision: str = "auto"
) -> Run:
    """``segpipe predict`` of every image in ``images`` (mirroring TTA on by default) with fold 0 of the WORK
    folder, or with a model folder (``segpipe export``), on ``backend`` in ``precision``."""
    cmd = [*SEGPIPE, "predict", "-i", str(images), "-o", str(out), "-m", str(model)]
    if not (model / "segpipe_model.json").exists():
        cmd += ["--config", CONFIG, "--folds", str(FOLD)]
    cmd += ["--device", device, "--backend", backend, "--precision", precision]
    env = {**os.environ, "SEGPIPE_CACHE_DIR": str(out.parent / "cache")}  # auto measures afresh: timed
    return run_timed(cmd, log, env)


def time_nnunet_predict(
    images: Path, out: Path, data: Path, nnunet: NnUNet, workers: int, device: str, log: Path
) -> Run:
    """``nnUNetv2_predict`` of every image in ``images`` with fold 0's final checkpoint (TTA on by default),
    ``workers`` preprocessing and ``workers`` export processes."""
    cmd = nnunet.command("nnUNetv2_predict", "-i", str(images), "-o", str(out), "-d", str(msd_task_id(data)))
    cmd += ["-c", CONFIG, "-f", str(FOLD), "-chk", "checkpoint_final.pth", "-device", device]
    cmd += ["-npp", str(workers), "-nps", str(workers), "--disable_progress_bar"]
    return run_timed(cmd, log, nnunet.env())


def check_outputs(out: Path, names: list[str], tool: str) -> None:
    """Exit unless ``out`` holds one segmentation per case (a timing of missing work would be wrong)."""
    missing = [n for n in names if not (out / f"{n}.nii.gz").exists()]
    if missing:
        sys.exit(f"{tool} wrote no prediction for {len(missing)} case(s), e.g. {missing[0]} (in {out})")


def bench_predict(args: argparse.Namespace, tmp: Path, log: Path) -> list[dict[str, object]]:
    """Seconds to predict ``--cases`` training images with TTA, fold 0 of briefly trained models: nnU-Net
    once, segpipe once per ``--backend`` x ``--precision`` (one record each)."""
    prepared = prepare(args, tmp, log, QUICK_TRAIN_CASES)
    images = tmp / "images"
    names = link_prediction_inputs(prepared.data, args.cases, images)
    train_segpipe_model(prepared.segpipe_work, args, log)
    theirs = None
    if prepared.nnunet is not None:
        time_nnunet_train(prepared.data, prepared.nnunet, args.workers, args.device, 0, MODEL_ITERS, log)
        out = tmp / "pred_nnunet"
        theirs = time_nnunet_predict(images, out, prepared.data, prepared.nnunet, args.workers, args.device, log)
        check_outputs(out, names, "nnU-Net")
    records = []
    for backend, precision in predict_variants(args.backend, args.precision):
        fmt = EXPORT_FORMAT.get(backend)
        model = export_segpipe_model(prepared.segpipe_work, fmt, log) if fmt else prepared.segpipe_work
        out = tmp / f"pred_segpipe_{backend}_{precision}"
        ours = time_segpipe_predict(images, out, model, args.device, log, backend, precision)
        check_outputs(out, names, "segpipe")
        records.append(
            {
                "benchmark": "predict",
                "stage": "predict",
                "backend": backend,
                "precision": precision,
                "model": f"model folder ({fmt})" if fmt else "WORK folder",
                "segpipe_s": round(ours.seconds, 3),
                "nnunet_s": round(theirs.seconds, 3) if theirs else None,
                "ratio": round(ours.seconds / theirs.seconds, 3) if theirs else None,
                "speedup": round(theirs.seconds / ours.seconds, 2) if theirs else None,  # nnU-Net's time / ours
                "segpipe_s_per_case": round(ours.seconds / len(names), 4),
                "nnunet_s_per_case": round(theirs.seconds / len(names), 4) if theirs else None,
                "tta": True,
                "device": args.device,
                "workers": args.workers,
                "cases": len(names),
                "host": host_info(),
                "segpipe_peak_rss_mb": round(ours.peak_rss_mb, 1),
                "nnunet_peak_rss_mb": round(theirs.peak_rss_mb, 1) if theirs else None,
            }
        )
    return records


BENCHMARKS: dict[str, Callable[[argparse.Namespace, Path, Path], list[dict[str, object]]]] = {
    "preprocess": bench_preprocess,
    "train": bench_train,
    "predict": bench_predict,
}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """Command-line options; unset sizes and workers take the benchmark's defaults (smaller with ``--quick``)."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--which", required=True, choices=sorted(BENCHMARKS), help="Benchmark to run.")
    parser.add_argument("--against", choices=["nnunet"], default=None, help="Also time this reference tool.")
    parser.add_argument("--data", type=Path, default=DEFAULT_DATA, help="MSD dataset folder (default: %(default)s).")
    parser.add_argument(
        "--workers",
        type=int,
        default=None,
        help="Processes: preprocess workers (default: all cores); training data-loading workers and "
        "nnU-Net's nnUNet_n_proc_DA (default 2); nnU-Net's predict -npp/-nps (default 2).",
    )
    parser.add_argument(
        "--device",
        choices=["auto", "cpu", "cuda"],
        default="auto",
        help="train, predict: device of both tools (auto: cuda if this interpreter's torch sees a GPU).",
    )
    parser.add_argument(
        "--warmup-iters",
        type=int,
        default=None,
        help=f"train: untimed iterations first (default {FULL.warmup_iters}; --quick {QUICK.warmup_iters}).",
    )
    parser.add_argument(
        "--iters",
        type=int,
        default=None,
        help=f"train: timed iterations (default {FULL.iters}; --quick {QUICK.iters}).",
    )
    parser.add_argument(
        "--cases",
        type=int,
        default=None,
        help=f"predict: images predicted (default {FULL.cases}; --quick {QUICK.cases}).",
    )
    parser.add_argument("--compile", action="store_true", help="train: segpipe with torch.compile (train --compile).")
    parser.add_argument(
        "--backend",
        default="auto",
        help="predict: comma-separated segpipe backends (auto, torch, openvino, onnxruntime); one record each.",
    )
    parser.add_argument(
        "--precision", default="auto", help="predict: comma-separated precisions (auto, fp32, bf16), for each backend."
    )
    parser.add_argument("--quick", action="store_true", help="Tiny synthetic dataset, no nnU-Net (smoke test).")
    parser.add_argument("--nnunet-bin", type=Path, default=None, help="Directory with the nnUNetv2_* commands.")
    parser.add_argument("--keep", action="store_true", help="Keep the temporary work folder (path on stderr).")
    args = parser.parse_args(argv)
    sizes = QUICK if args.quick else FULL
    args.warmup_iters = sizes.warmup_iters if args.warmup_iters is None else args.warmup_iters
    args.iters = sizes.iters if args.iters is None else args.iters
    args.cases = sizes.cases if args.cases is None else args.cases
    if args.workers is None:
        args.workers = DEFAULT_WORKERS.get(args.which, os.cpu_count() or 1)
    args.backend, args.precision = args.backend.split(","), args.precision.split(",")
    unknown = sorted(set(args.backend) - set(BACKENDS) | set(args.precision) - set(PRECISIONS))
    if unknown:
        parser.error(f"unknown --backend/--precision {', '.join(unknown)}")
    if args.warmup_iters < 0 or args.iters < 1 or args.cases < 1:
        parser.error("--iters and --cases must be at least 1, --warmup-iters at least 0")
    if args.workers < (0 if args.which == "train" else 1):  # train: 0 loads data in the training process
        parser.error(f"--workers {args.workers} is too few for --which {args.which}")
    return args


@contextlib.contextmanager
def scratch_folder(prefix: str, keep: bool) -> Iterator[Path]:
    """A temporary folder, removed afterwards unless ``keep`` (then its path goes to stderr)."""
    tmp = Path(tempfile.mkdtemp(prefix=prefix))
    try:
        yield tmp
    finally:
        if keep:
            print(f"work folder kept: {tmp}", file=sys.stderr)
        else:
            shutil.rmtree(tmp, ignore_errors=True)


def main(argv: list[str] | None = None) -> None:
    """Run the chosen benchmark in a temporary folder and print its records as JSON lines."""
    args = parse_args(argv)
    if args.which != "preprocess":
        args.device = resolve_device(args.device)
    with scratch_folder(f"segpipe-bench-{args.which}-", args.keep) as tmp:
        records = BENCHMARKS[args.which](args, tmp, tmp / "commands.log")
    for record in records:
        print(json.dumps(record), flush=True)


if __name__ == "__main__":
    main()
