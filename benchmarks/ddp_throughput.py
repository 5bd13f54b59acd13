"""Training throughput with one process or several (DDP), at the same global batch.

    python benchmarks/ddp_throughput.py --prepare WORK                       # synthetic data, plan, preprocess
    python benchmarks/ddp_throughput.py --work WORK --iters 20               # one process
    torchrun --standalone --nproc_per_node 2 benchmarks/ddp_throughput.py --work WORK --iters 20

Times ``--iters`` training iterations of fold 0 (data drawn and augmented in the training process,
no workers; after 2 warm-up iterations) and prints one JSON line from rank 0: iterations and patches
per second. Under torchrun each rank draws ``batch / world_size`` patches, so the global batch and
the work per iteration are the same as in one process.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))


def prepare(work: Path, shape: str) -> None:
    from click.testing import CliRunner

    from cli import main

    data = work.parent / f"{work.name}_data"
    for args in (
        ["synth", str(data), "--cases", "8", "--shape", shape, "--seed", "0"],
        ["plan", str(data), "-o", str(work), "--preset", "cpu", "--workers", "1"],
        ["preprocess", str(data), "-o", str(work), "--workers", "1"],
    ):
        result = CliRunner().invoke(main, args)
        if result.exit_code:
            raise SystemExit(result.output)
    print(f"prepared {work}", file=sys.stderr)


def measure(work: Path, iters: int, device: str, config: str) -> dict | None:
    import torch

    from segpipe.scale import distributed
    from segpipe.training.loop import setup, train_batches, train_step

    info = distributed.init(device)
    warmup = 2
    overrides = {"epochs": 1, "iters_per_epoch": warmup + iters, "num_workers": 0, "num_folds": 2}
    run = setup(work, config, 0, overrides, device=device, dist=info)
    run.model.train()
    batches = iter(train_batches(run, 0))
    for i in range(warmup + iters):
        if i == warmup:
            distributed.barrier()
            start = time.perf_counter()
        train_step(run, next(batches))
        run.state.iteration += 1
    if run.device.type == "cuda":
        torch.cuda.synchronize()
    distributed.barrier()
    seconds = time.perf_counter() - start
    distributed.cleanup()
    if not info.is_main:
        return None
    global_batch = run.train_spec.batch_size * info.world_size
    return {
        "benchmark": "ddp_train",
        "processes": info.world_size,
        "threads_per_process": torch.get_num_threads(),
        "device": str(run.device),
        "patch": run.config.patch_size,
        "global_batch": global_batch,
        "iterations": iters,
        "seconds": round(seconds, 2),
        "iters_per_s": round(iters / seconds, 3),
        "patches_per_s": round(iters * global_batch / seconds, 3),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--work", type=Path)
    parser.add_argument("--prepare", type=Path, help="Write a synthetic dataset, plan and preprocess it here.")
    parser.add_argument("--shape", default="64,64,48")
    parser.add_argument("--iters", type=int, default=20)
    parser.add_argument("--device", default="auto")
    parser.add_argument("--config", default="3d_fullres")
    args = parser.parse_args()
    if args.prepare:
        prepare(args.prepare, args.shape)
        return
    if args.work is None:
        parser.error("give --work (or --prepare)")
    result = measure(args.work, args.iters, args.device, args.config)
    if result is not None:
        print(json.dumps(result))


if __name__ == "__main__":
    main()
