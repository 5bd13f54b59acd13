"""Steady-state training iterations per second of segpipe, measured like nnU-Net's probe.

    python benchmarks/segpipe_train_probe.py --work WORK --warmup 10 --iters 50 --workers 2 --device cpu

Builds the run the way ``segpipe train WORK --config C --fold K`` does (``training.setup``: plans,
splits, network, optimizer, sampler) with the epoch's training batches drawn by ``--workers``
DataLoader processes, as ``training.fit`` draws them. Then it runs fit's per-iteration work (set the
learning rate, ``next(batch)`` + ``train_step``, read the loss every ``LOSS_DISPLAY_EVERY``-th
iteration) ``--warmup`` times untimed and ``--iters`` times timed, and prints one JSON line. Writes
no checkpoint; like ``segpipe train`` it creates ``WORK/splits.json`` when that is missing.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch
from probe_timing import report, time_iterations, timing_record

from segpipe.training.loop import LOSS_DISPLAY_EVERY, augment_in_workers, setup, train_batches, train_step
from segpipe.training.sampling import make_loader
from segpipe.training.schedules import learning_rate


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--work", type=Path, required=True, help="Preprocessed segpipe work folder.")
    parser.add_argument("--config", default="3d_fullres")
    parser.add_argument("--fold", type=int, default=0)
    parser.add_argument("--warmup", type=int, default=10, help="Untimed iterations first.")
    parser.add_argument("--iters", type=int, default=50, help="Timed iterations.")
    parser.add_argument("--workers", type=int, default=2, help="DataLoader worker processes.")
    parser.add_argument("--device", default="auto", help="auto, cpu or cuda.")
    parser.add_argument("--compile", action="store_true", help="torch.compile the network (segpipe train --compile).")
    parser.add_argument("--augment-on", default="auto", choices=["auto", "device", "workers"])
    parser.add_argument("--result", type=Path, default=None, help="Also write the JSON line to this file.")
    args = parser.parse_args()

    # one epoch long enough for warm-up and measurement, so no loader restarts inside the timing
    overrides = {
        "epochs": 1,
        "iters_per_epoch": args.warmup + args.iters,
        "num_workers": args.workers,
        "compile": args.compile,
        "augment_on": args.augment_on,
    }
    run = setup(args.work, args.config, args.fold, overrides, device=args.device)
    run.model.train()
    batches = iter(make_loader(train_batches(run, 0), args.workers, pin_memory=run.device.type == "cuda"))

    def step() -> None:
        lr = learning_rate(run.progress(), run.settings)
        for group in run.optimizer.param_groups:
            group["lr"] = lr
        loss = train_step(run, next(batches))
        run.state.iteration += 1
        if run.state.iteration % LOSS_DISPLAY_EVERY == 1:
            float(loss)  # fit shows the loss of every N-th iteration: a wait for the device

    sync = torch.cuda.synchronize if run.device.type == "cuda" else lambda: None
    seconds = time_iterations(step, args.warmup, args.iters, sync)
    record = timing_record(
        "segpipe",
        args.warmup,
        args.iters,
        seconds,
        device=str(run.device),
        workers=args.workers,
        torch=torch.__version__,
        threads=torch.get_num_threads(),
        compiled=run.settings.compile,
        augment_on="workers" if augment_in_workers(run.settings, run.device) else "device",
        patch=list(run.config.patch_size),
        batch=run.train_spec.batch_size,
        features=list(run.config.topology.features),
    )
    report(record, args.result)


if __name__ == "__main__":
    main()
