"""Steady-state training iterations per second of nnU-Net v2; run by nnU-Net's own interpreter.

    nnUNet_raw=R nnUNet_preprocessed=P nnUNet_results=S nnUNet_n_proc_DA=2 \
        PYTHON_OF_NNUNET benchmarks/nnunet_train_probe.py --dataset 4 --warmup 10 --iters 50 --device cpu

Builds the trainer the way ``nnUNetv2_train DATASET 3d_fullres FOLD -device D`` does
(``get_trainer_from_args``, the same torch thread counts and cuDNN setting) and starts it
(``on_train_start``: network, optimizer, and ``nnUNet_n_proc_DA`` data-augmentation processes).
Then it runs ``train_step(next(trainer.dataloader_train))`` -- the body of nnU-Net's own epoch loop,
data loading included -- ``--warmup`` times untimed and ``--iters`` times timed, and prints one JSON
line. At the end ``on_train_end`` writes ``fold_K/checkpoint_final.pth`` (which the predict benchmark
uses) and stops the augmentation processes. Needs nnunetv2 and torch; not segpipe.
"""

from __future__ import annotations

import argparse
import multiprocessing
from pathlib import Path

import torch
from nnunetv2.run.run_training import get_trainer_from_args
from nnunetv2.utilities.default_n_proc_DA import get_allowed_n_proc_DA
from probe_timing import report, time_iterations, timing_record


def set_threads_like_nnunet_train(device: torch.device) -> None:
    """The thread settings of ``nnUNetv2_train`` (``run_training_entry`` and ``run_training``)."""
    if device.type == "cpu":
        torch.set_num_threads(multiprocessing.cpu_count())
    else:
        torch.set_num_threads(1)
        torch.set_num_interop_threads(1)
    if torch.cuda.is_available():
        torch.backends.cudnn.deterministic = False
        torch.backends.cudnn.benchmark = True


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dataset", required=True, help="nnU-Net dataset id or name.")
    parser.add_argument("--config", default="3d_fullres")
    parser.add_argument("--fold", type=int, default=0)
    parser.add_argument("--warmup", type=int, default=10, help="Untimed iterations first.")
    parser.add_argument("--iters", type=int, default=50, help="Timed iterations.")
    parser.add_argument("--device", choices=["cpu", "cuda"], default="cuda")
    parser.add_argument("--result", type=Path, default=None, help="Also write the JSON line to this file.")
    args = parser.parse_args()

    device = torch.device(args.device)
    set_threads_like_nnunet_train(device)
    trainer = get_trainer_from_args(args.dataset, args.config, args.fold, device=device)
    trainer.on_train_start()
    trainer.on_epoch_start()
    trainer.on_train_epoch_start()  # network.train(), learning rate of epoch 0

    def step() -> None:
        trainer.train_step(next(trainer.dataloader_train))  # returns the loss on the CPU: waits for the device

    sync = torch.cuda.synchronize if device.type == "cuda" else lambda: None
    seconds = time_iterations(step, args.warmup, args.iters, sync)
    config = trainer.configuration_manager
    result = timing_record(
        "nnunet",
        args.warmup,
        args.iters,
        seconds,
        device=str(trainer.device),
        workers=get_allowed_n_proc_DA(),
        torch=torch.__version__,
        threads=torch.get_num_threads(),
        compiled=trainer._do_i_compile(),  # torch.compile: nnU-Net's default on CUDA
        patch=list(config.patch_size),
        batch=trainer.batch_size,
        features=list(config.network_arch_init_kwargs.get("features_per_stage", [])),
    )
    trainer.on_train_end()
    report(result, args.result)


if __name__ == "__main__":
    main()
