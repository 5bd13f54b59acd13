"""Single benchmark entry point for segpipe, optionally compared against nnU-Net v2.

    python benchmarks/run.py --which preprocess [--against nnunet] [--data DIR] [--workers N]
                             [--quick] [--nnunet-bin DIR]

Prints one JSON line per measured stage to stdout; everything else (child logs, notes) goes to
stderr. Installs nothing: nnU-Net must already be importable here or live in ``--nnunet-bin``.
Further benchmarks (train, predict) are added as functions in the ``BENCHMARKS`` table.
"""

from __future__ import annotations

import argparse
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
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
SEGPIPE = [sys.executable, str(REPO / "cli.py")]
DEFAULT_DATA = REPO.parent / "shared" / "data" / "Task04_Hippocampus"
NNUNET_PROBE = "nnUNetv2_plan_and_preprocess"
NNUNET_FALLBACK_BIN = Path("/tmp/nnu/bin")


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


def make_quick_dataset(root: Path, log: Path) -> Path:
    """A tiny synthetic MSD dataset (4 cases of 32x32x24) for smoke-testing the benchmark itself."""
    data = root / "Task01_Quick"
    run_timed([*SEGPIPE, "synth", str(data), "--cases", "4", "--shape", "32,32,24"], log)
    return data


def time_segpipe_preprocess(data: Path, work: Path, workers: int, log: Path) -> dict[str, Run]:
    """Time ``segpipe plan`` then ``segpipe preprocess`` into ``work``."""
    common = [str(data), "-o", str(work), "--workers", str(workers)]
    return {
        "plan": run_timed([*SEGPIPE, "plan", *common], log),
        "preprocess": run_timed([*SEGPIPE, "preprocess", *common], log),
    }


def time_nnunet_preprocess(data: Path, root: Path, workers: int, bin_dir: Path, log: Path) -> dict[str, Run]:
    """Convert ``data`` for nnU-Net (untimed), then time fingerprint + planning and 3d_fullres preprocessing."""
    env = dict(os.environ)
    for var, sub in (("nnUNet_raw", "raw"), ("nnUNet_preprocessed", "preprocessed"), ("nnUNet_results", "results")):
        (root / sub).mkdir(parents=True, exist_ok=True)
        env[var] = str(root / sub)
    env["PATH"] = f"{bin_dir}{os.pathsep}{env.get('PATH', '')}"
    task, np_ = str(msd_task_id(data)), str(workers)

    def nnunet(name: str, *args: str) -> Run:
        return run_timed([str(bin_dir / name), *args], log, env)

    nnunet("nnUNetv2_convert_MSD_dataset", "-i", str(data), "-np", np_)
    fingerprint = nnunet("nnUNetv2_extract_fingerprint", "-d", task, "-np", np_)
    planning = nnunet("nnUNetv2_plan_experiment", "-d", task)
    return {
        "plan": Run(fingerprint.seconds + planning.seconds, max(fingerprint.peak_rss_mb, planning.peak_rss_mb)),
        "preprocess": nnunet("nnUNetv2_preprocess", "-d", task, "-c", "3d_fullres", "-np", np_),
    }


def with_total(runs: dict[str, Run]) -> dict[str, Run]:
    """Add a ``total`` entry: summed time, largest peak memory."""
    total = Run(sum(r.seconds for r in runs.values()), max(r.peak_rss_mb for r in runs.values()))
    return {**runs, "total": total}


def bench_preprocess(args: argparse.Namespace, tmp: Path, log: Path) -> list[dict[str, object]]:
    """Plan + preprocess with segpipe (and nnU-Net with ``--against nnunet``); one record per stage."""
    data = make_quick_dataset(tmp, log) if args.quick else args.data.resolve()
    if not (data / "dataset.json").exists():
        sys.exit(f"no dataset.json in {data}")
    ours = with_total(time_segpipe_preprocess(data, tmp / "segpipe", args.workers, log))
    theirs: dict[str, Run] | None = None
    if args.against == "nnunet":
        if args.quick:
            print("--quick: skipping nnU-Net", file=sys.stderr)
        else:
            bin_dir = find_nnunet_bin(args.nnunet_bin)
            theirs = with_total(time_nnunet_preprocess(data, tmp / "nnunet", args.workers, bin_dir, log))

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
                "cases": count_cases(data),
                "host": host_info(),
                "segpipe_peak_rss_mb": round(seg.peak_rss_mb, 1),
                "nnunet_peak_rss_mb": round(nnu.peak_rss_mb, 1) if nnu else None,
            }
        )
    return records


BENCHMARKS: dict[str, Callable[[argparse.Namespace, Path, Path], list[dict[str, object]]]] = {
    "preprocess": bench_preprocess,
}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """Command-line options."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--which", required=True, choices=sorted(BENCHMARKS), help="Benchmark to run.")
    parser.add_argument("--against", choices=["nnunet"], default=None, help="Also time this reference tool.")
    parser.add_argument("--data", type=Path, default=DEFAULT_DATA, help="MSD dataset folder (default: %(default)s).")
    parser.add_argument("--workers", type=int, default=os.cpu_count() or 1, help="Processes (default: all cores).")
    parser.add_argument("--quick", action="store_true", help="Tiny synthetic dataset, no nnU-Net (smoke test).")
    parser.add_argument("--nnunet-bin", type=Path, default=None, help="Directory with the nnUNetv2_* commands.")
    parser.add_argument("--keep", action="store_true", help="Keep the temporary work folder (path on stderr).")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> None:
    """Run the chosen benchmark in a temporary folder and print its records as JSON lines."""
    args = parse_args(argv)
    tmp = Path(tempfile.mkdtemp(prefix=f"segpipe-bench-{args.which}-"))
    try:
        records = BENCHMARKS[args.which](args, tmp, tmp / "commands.log")
    finally:
        if args.keep:
            print(f"work folder kept: {tmp}", file=sys.stderr)
        else:
            shutil.rmtree(tmp, ignore_errors=True)
    for record in records:
        print(json.dumps(record), flush=True)


if __name__ == "__main__":
    main()
