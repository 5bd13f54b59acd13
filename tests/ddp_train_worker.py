"""One rank of the DDP training test (``tests/test_distributed.py``), started by torchrun on the CPU (gloo).

``python -m torch.distributed.run --standalone --nproc_per_node 2 tests/ddp_train_worker.py WORK BATCHES OUT``

Each rank (1) draws its first training batch as ``fit`` would, (2) takes a few SGD steps on its slice
of the known global batches in BATCHES, once with the cross-entropy term alone and once with the
full Dice + CE loss, (3) runs ``segpipe train`` in this process (DDP through the CLI, validation
sharded), counting the files it writes. Everything it saw goes to ``OUT/rank<k>.pt``.
"""

from __future__ import annotations

import sys
from collections import Counter
from pathlib import Path

import torch

from cli import main
from segpipe.runs import runlog
from segpipe.scale import distributed
from segpipe.training import loop as training
from segpipe.training.loop import setup, train_batches, train_step

CONFIG = "3d_fullres"
OVERRIDES = {"epochs": 1, "iters_per_epoch": 2, "val_iters": 1, "num_workers": 0, "num_folds": 2}


def steps_on_known_batches(work: Path, batches: list[dict], info: distributed.DistInfo, dice: bool) -> dict:
    """A fresh run, then one optimizer step per global batch on this rank's slice of it."""
    run = setup(work, CONFIG, 0, OVERRIDES, device="cpu", dist=info)
    if not dice:
        run.loss.loss.weight_dice = 0.0  # cross-entropy alone: a mean over voxels, so DDP's average is exact
    run.model.train()
    local = run.train_spec.batch_size
    for batch in batches:
        part = {k: v[info.rank * local : (info.rank + 1) * local] for k, v in batch.items()}
        train_step(run, part)
        run.state.iteration += 1
    return {k: v.detach().clone() for k, v in run.model.state_dict().items()}


def main_worker(work: Path, batches_file: Path, out: Path) -> None:
    torch.set_num_threads(1)
    info = distributed.init("cpu")
    assert info.enabled, "start this script with torchrun"
    result: dict = {"info": (info.rank, info.world_size, info.local_rank)}
    result["agreed"] = distributed.agree(10.0 + info.rank)  # rank 0's clock for all
    result["summed"] = distributed.all_reduce_sum([1.0, info.rank]).tolist()

    run = setup(work, CONFIG, 0, OVERRIDES, device="cpu", dist=info)
    result["batch_size"] = run.train_spec.batch_size
    result["oversample"] = run.train_spec.oversample_foreground
    result["ddp"] = type(run.forward_model).__name__
    result["first_batch"] = next(iter(train_batches(run, 0)))["image"]

    batches = torch.load(batches_file)
    result["weights_ce"] = steps_on_known_batches(work, batches, info, dice=False)
    result["weights_dice_ce"] = steps_on_known_batches(work, batches, info, dice=True)

    writes: Counter = Counter()

    def counting(name: str, fn):
        def wrapper(*args, **kwargs):
            writes[name] += 1
            return fn(*args, **kwargs)

        return wrapper

    training.save_checkpoint = counting("checkpoint", training.save_checkpoint)
    runlog.append_row = counting("log_row", runlog.append_row)
    runlog.plot_progress = counting("plot", runlog.plot_progress)
    args = ["train", str(work), "--fold", "0", "--epochs", "1", "--iters-per-epoch", "2", "--val-iters", "1"]
    args += ["--num-folds", "2", "--workers", "0", "--device", "cpu", "--no-val-tta"]
    try:
        main(args, standalone_mode=False)  # calls distributed.init (already joined) and cleanup
        result["cli_exit"] = 0
    except SystemExit as exc:
        result["cli_exit"] = exc.code
    result["writes"] = dict(writes)
    torch.save(result, out / f"rank{info.rank}.pt")


if __name__ == "__main__":
    main_worker(Path(sys.argv[1]), Path(sys.argv[2]), Path(sys.argv[3]))
