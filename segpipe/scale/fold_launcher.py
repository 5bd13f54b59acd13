"""One fold per GPU: ``segpipe train WORK --fold all --gpus 0,1,2,3`` as independent processes.

The simple alternative to DDP for cross-validation: the folds are dealt round-robin to the GPUs, and
each GPU gets one ``segpipe train`` process (``CUDA_VISIBLE_DEVICES`` set to that GPU) that trains its
folds in sequence and writes the usual run folders, its output going to
``WORK/<config>/logs/train_gpu<id>.log``. The parent waits for all and reports every process that
failed. Nothing is shared between the processes, so no process group is needed.
"""

from __future__ import annotations

import os
import subprocess
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from segpipe.core.errors import StageFailed


@dataclass(frozen=True)
class FoldJob:
    gpu: int
    folds: list[int]
    argv: list[str]  # the command, without --fold
    log: Path

    @property
    def command(self) -> list[str]:
        return [*self.argv, "--fold", ",".join(map(str, self.folds))]


def assign_folds(folds: list[int], gpus: list[int]) -> dict[int, list[int]]:
    """Round-robin: the i-th GPU trains folds ``i, i + n, i + 2n, ...`` (GPUs left without a fold are left out)."""
    if not gpus:
        raise ValueError("--gpus: give at least one GPU id")
    if len(set(gpus)) != len(gpus):
        raise ValueError(f"--gpus {','.join(map(str, gpus))}: a GPU is listed twice")
    return {gpu: folds[i :: len(gpus)] for i, gpu in enumerate(gpus) if folds[i :: len(gpus)]}


def check_gpus(gpus: list[int], available: int, device: str, under_torchrun: bool) -> None:
    """Refuse ``--gpus`` where it cannot work, saying why."""
    if under_torchrun:
        raise ValueError("--gpus starts its own processes: use it without torchrun (or torchrun without --gpus)")
    if device == "cpu":
        raise ValueError("--gpus trains on GPUs: leave out --device cpu")
    if available == 0:
        raise ValueError(
            "--gpus needs CUDA GPUs, but torch sees none on this machine; train the folds one after another "
            "without --gpus (e.g. --fold all --device cpu)"
        )
    missing = [g for g in gpus if not 0 <= g < available]
    if missing:
        raise ValueError(f"--gpus: no GPU {','.join(map(str, missing))}; this machine has GPUs 0..{available - 1}")


def plan_jobs(argv: list[str], folds: list[int], gpus: list[int], log_dir: Path) -> list[FoldJob]:
    """One job per GPU that has folds; ``argv`` is the ``segpipe train`` command without ``--fold``."""
    return [
        FoldJob(gpu, gpu_folds, argv, log_dir / f"train_gpu{gpu}.log")
        for gpu, gpu_folds in assign_folds(folds, gpus).items()
    ]


def run_jobs(jobs: list[FoldJob], echo: Callable[[str], None] = print) -> None:
    """Start every job at once, each seeing only its GPU; wait for all; raise ``StageFailed`` naming
    each job that failed and its log."""
    procs: list[tuple[FoldJob, subprocess.Popen]] = []
    try:
        for job in jobs:
            job.log.parent.mkdir(parents=True, exist_ok=True)
            env = {**os.environ, "CUDA_VISIBLE_DEVICES": str(job.gpu)}
            with open(job.log, "w") as log:
                procs.append((job, subprocess.Popen(job.command, stdout=log, stderr=subprocess.STDOUT, env=env)))
            echo(f"GPU {job.gpu}: folds {','.join(map(str, job.folds))} (log: {job.log})")
        problems = {}
        for job, proc in procs:
            code = proc.wait()
            if code != 0:
                folds = ",".join(map(str, job.folds))
                problems[f"GPU {job.gpu} (folds {folds})"] = f"exited with {code}; see {job.log}"
    finally:
        for _, proc in procs:  # interrupted: stop the children too
            if proc.poll() is None:
                proc.terminate()
    if problems:
        raise StageFailed("train", problems)
