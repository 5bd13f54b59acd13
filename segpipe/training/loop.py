"""Training one fold of one configuration.

Reads ``WORK/plans.json``, ``WORK/splits.json`` and ``WORK/preprocessed/``; writes the run folder
``WORK/<config>/fold_<k>/`` (checkpoints, ``log.csv``, ``progress.png``). :func:`setup` builds the
ready parts (model, loss, optimizer, loaders) from the plans; :func:`fit` is the short loop that
uses them. Validation export after training lives in :mod:`segpipe.training.validation`.

Under torchrun (``dist`` from :func:`segpipe.scale.distributed.init`) the planned batch is the global batch:
each of the ``world_size`` ranks draws ``batch_size / world_size`` patches from its own rank-seeded
sampler, DDP averages the gradients, and all ranks keep identical weights. Rank 0's clock decides the
time budget for all; validation batches are split the same way and their counts summed over ranks;
only rank 0 writes checkpoints, ``log.csv``, ``progress.png``, snapshots and ``swa.pt``. The Dice
term is a batch Dice over each rank's share, so a DDP run matches one process with the global batch
exactly for the cross-entropy term and approximately for the Dice term.
"""

from __future__ import annotations

import contextlib
import copy
import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn
from tqdm.auto import tqdm

from segpipe.augmentation.batched import augment_batch
from segpipe.augmentation.draw import AUGMENTATIONS, Augmenter, choose_geometry
from segpipe.core.atomic import read_json, remove_stale_temporaries
from segpipe.core.paths import WorkDir
from segpipe.core.serialization import from_dict, to_dict
from segpipe.evaluation.metrics import target_key
from segpipe.inference.predict import amp_dtype_for, resolve_device
from segpipe.networks.build import build_network
from segpipe.planning.overrides import Overrides, RunOverrides, apply_run_overrides, split_overrides, train_subset
from segpipe.planning.planner import slice_axis
from segpipe.planning.plans import Configuration, Plans, TrainingSettings, load_plans
from segpipe.planning.splits import load_or_create_splits
from segpipe.preprocessing.cascade import prepare_training_inputs
from segpipe.preprocessing.preprocess import list_preprocessed
from segpipe.runs import runlog
from segpipe.runs.checkpoint import BEST, FINAL, LATEST, load_checkpoint, rng_state, save_checkpoint, set_rng_state
from segpipe.runs.run_config import run_configuration, save_run_configuration
from segpipe.runs.snapshots import SWA_FILE, WeightAverage, has_batch_norm, snapshot_path
from segpipe.scale import distributed
from segpipe.scale.distributed import SINGLE, DistInfo
from segpipe.training.losses import build_loss
from segpipe.training.optimizers import OPTIMIZERS
from segpipe.training.sampling import PatchBatches, SamplerSpec, make_loader, stack_crops
from segpipe.training.schedules import cycle_ends, learning_rate, training_progress

# The progress bar shows the loss of every N-th iteration: each display waits for the GPU.
LOSS_DISPLAY_EVERY = 10
# Under DDP the ranks agree on rank 0's clock every N-th iteration (a broadcast, which waits for the
# device), not after every step.
CLOCK_AGREE_EVERY = 10


class SharedClock:
    """The training seconds of an epoch as every rank sees them.

    In one process: the wall clock. Under DDP: rank 0's clock, broadcast every ``every`` iterations; in
    between each rank extrapolates from the agreed readings alone (the last one plus the agreed seconds
    per iteration), so all ranks compute the same learning rate, snapshot and stop iteration without a
    host-device synchronisation per step."""

    def __init__(
        self,
        seconds_before: float,
        per_iteration: float,
        every: int,
        shared: bool,
        agree: Callable[[float], float] | None = None,
        now: Callable[[], float] | None = None,
    ):
        self.now = now or time.perf_counter
        self.agree = agree or distributed.agree
        self.started = self.now()
        self.seconds_before = seconds_before
        self.every, self.shared = every, shared
        self.agreed, self.agreed_at = seconds_before, 0
        self.per_iteration = per_iteration  # agreed seconds per iteration (from the previous epoch at first)

    def local(self) -> float:
        return self.seconds_before + self.now() - self.started

    def tick(self, iterations: int) -> float:
        """Seconds after ``iterations`` iterations of this epoch."""
        if not self.shared:
            return self.local()
        if iterations % self.every:
            return self.agreed + (iterations - self.agreed_at) * self.per_iteration
        return self.sync(iterations)

    def sync(self, iterations: int) -> float:
        """Agree on rank 0's clock now (all ranks call it at the same iteration)."""
        agreed = self.agree(self.local())
        if iterations > self.agreed_at:
            self.per_iteration = (agreed - self.agreed) / (iterations - self.agreed_at)
        self.agreed, self.agreed_at = agreed, iterations
        return agreed


VALIDATION_SEED_OFFSET = 1_000_003  # validation patches differ from training patches of the same epoch


@dataclass
class RunState:
    """Counters that a checkpoint carries across a resume."""

    epoch: int = 0  # epochs completed
    iteration: int = 0
    seconds: float = 0.0  # training wall time spent (resumes add to it)
    done: bool = False
    snapshots: int = 0  # cycle-end snapshots taken
    ema_dice: float | None = None  # exponential moving average of the epochs' pseudo-Dice (nnU-Net's ema_fg_dice)
    best_ema_dice: float | None = None  # the best of it so far: checkpoint_best.pt holds those weights


@dataclass
class TrainingRun:
    """The ready parts of a run; ``fit`` needs nothing else."""

    run_dir: Path
    plans: Plans
    config: Configuration
    settings: TrainingSettings
    model: nn.Module  # the plain network: checkpoints, validation, snapshots
    loss: nn.Module
    optimizer: torch.optim.Optimizer
    scaler: torch.amp.GradScaler
    device: torch.device
    amp_dtype: torch.dtype | None
    train_spec: SamplerSpec
    val_spec: SamplerSpec
    augmenter: Augmenter
    time_budget: float | None
    state: RunState = field(default_factory=RunState)
    swa: WeightAverage | None = None
    dist: DistInfo = SINGLE
    ddp: nn.Module | None = None  # the DDP wrapper of ``model`` under torchrun
    compiled: nn.Module | None = None  # torch.compile of the DDP wrapper or the model (settings.compile)
    run_overrides: RunOverrides = field(default_factory=RunOverrides)  # stored in checkpoints for resume

    @property
    def forward_model(self) -> nn.Module:
        """What training steps call: compiled or not, the DDP wrapper (which averages gradients over
        ranks) or the model."""
        if self.compiled is not None:
            return self.compiled
        return self.ddp if self.ddp is not None else self.model

    @property
    def total_iterations(self) -> int:
        return self.settings.epochs * self.settings.iters_per_epoch

    def progress(self) -> float:
        return training_progress(self.state.iteration, self.total_iterations, self.state.seconds, self.time_budget)


def setup(
    work: Path,
    config_name: str,
    fold: int,
    overrides: dict[str, Any] | None = None,
    time_budget: float | None = None,
    device: str = "auto",
    resume: bool = False,
    dist: DistInfo = SINGLE,
) -> TrainingRun:
    """Build a run from the plans (and, with ``resume``, its latest checkpoint); under DDP (``dist``)
    every rank builds the same run with its share of the batch."""
    wd = WorkDir(work)
    plans = load_plans(wd.plans)
    split_up = split_overrides(overrides or {})
    overrides, run_overrides = split_up.training, split_up.run
    config = apply_run_overrides(plans.configuration(config_name), run_overrides)
    run_dir = wd.run(config_name, fold)
    if dist.is_main:  # rank 0 alone writes the run folder
        remove_stale_temporaries(run_dir)  # a checkpoint half-written by a killed run
    latest = run_dir / LATEST
    ckpt = None
    if resume and latest.exists():
        ckpt = load_checkpoint(latest)
        if ckpt["plans_hash"] != plans.fingerprint_hash():
            raise RuntimeError(f"{latest}: was trained with different plans than {wd.plans}; start a new run")
        settings = from_dict(TrainingSettings, {**ckpt["settings"], **overrides})
        time_budget = time_budget if time_budget is not None else ckpt.get("time_budget")
        config = _resumed_configuration(run_dir, config, run_overrides)
        run_overrides = from_dict(RunOverrides, ckpt.get("run_overrides") or {})
    elif latest.exists() and not resume:
        raise FileExistsError(f"{run_dir} already holds a run: add --resume to continue it, or remove the folder")
    else:
        settings = plans.with_training(**overrides).training
    folder = wd.preprocessed(config.data_identifier)
    cases = list_preprocessed(folder)
    if not cases:
        raise FileNotFoundError(f"{folder}: no preprocessed cases; run `segpipe preprocess` first")
    previous = None
    with distributed.main_first(dist):  # rank 0 creates splits.json (and stage-2 inputs), the others read them
        if config.previous_stage:
            previous = prepare_training_inputs(work, plans, config)  # refuses while stage 1 is missing
        splits = load_or_create_splits(wd.splits, cases, settings.num_folds, settings.seed)
    if not 0 <= fold < len(splits):
        raise ValueError(f"fold {fold} does not exist: {wd.splits} has {len(splits)} folds")
    split = splits[fold]
    if dist.is_main and ckpt is None:
        save_run_configuration(run_dir, config, Overrides(overrides, run_overrides).as_dict())

    dev = distributed.device_for(resolve_device(device), dist)
    batch_size = distributed.per_rank_batch(config.batch_size, dist)
    torch.manual_seed(settings.seed + fold)
    channels = len(plans.channel_names)
    extra = len(plans.foreground_labels) if previous else 0  # the cascade's one-hot stage-1 channels
    model = build_network(config, channels, plans.num_classes, settings.deep_supervision, extra).to(dev)
    if settings.channels_last:
        model = model.to(memory_format=torch.channels_last_3d)
    if dev.type == "cuda":
        torch.backends.cudnn.benchmark = True  # fixed patch size: let cuDNN pick the fastest kernels once
    optimizer = OPTIMIZERS.get(settings.optimizer)(model.parameters(), settings)
    amp = amp_dtype_for(dev)
    scaler = torch.amp.GradScaler(dev.type, enabled=amp == torch.float16)

    def spec(ids: list[str]) -> SamplerSpec:
        return SamplerSpec(
            folder,
            ids,
            config.patch_size,
            batch_size,
            distributed.per_rank_oversample(config.batch_size, settings.oversample_foreground, dist),
            list(range(1, plans.num_label_classes)),
            previous,
        )

    run = TrainingRun(
        run_dir=run_dir,
        plans=plans,
        config=config,
        settings=settings,
        model=model,
        loss=build_loss(settings.loss, config.batch_dice, plans.ignore_class, plans.region_classes),
        optimizer=optimizer,
        scaler=scaler,
        device=dev,
        amp_dtype=amp,
        train_spec=spec(train_subset(split["train"], run_overrides.train_fraction)),
        val_spec=spec(split["val"]),
        augmenter=build_augmenter(plans, config, settings, extra),
        time_budget=time_budget,
        swa=WeightAverage() if settings.swa else None,
        dist=dist,
        run_overrides=run_overrides,
    )
    if ckpt is not None:
        model.load_state_dict(ckpt["model"])
        optimizer.load_state_dict(ckpt["optimizer"])
        scaler.load_state_dict(ckpt["scaler"])
        set_rng_state(ckpt["rng"])
        run.state = RunState(**ckpt["state"])
        if run.swa is not None and ckpt.get("swa"):
            run.swa.load_state_dict(ckpt["swa"])
        # more epochs on a finished run extend it
        run.state.done = run.state.done and run.progress() >= 1.0
        if dist.is_main:
            runlog.truncate_after(run_dir / "log.csv", run.state.epoch)
    run.ddp = distributed.wrap(model, dist, dev) if dist.enabled else None
    if settings.compile:
        run.compiled = torch.compile(run.ddp or model)
    return run


def build_augmenter(plans: Plans, config: Configuration, settings: TrainingSettings, extra: int = 0) -> Augmenter:
    """The run's augmentation: the settings' named preset with the geometry the configuration's patch
    and spacing call for (``extra``: the cascade's one-hot mask channels)."""
    geometry = choose_geometry(
        config.patch_size, slice_axis(config.spacing), config.slice_axis, plans.anisotropy_threshold
    )
    return Augmenter(
        AUGMENTATIONS.get(settings.augmentation), len(plans.channel_names), extra, geometry, config.patch_size
    )


def num_folds(work: Path, requested: int | None = None) -> int:
    """Folds of ``WORK/splits.json`` if it exists, else the requested or planned number."""
    wd = WorkDir(work)
    if wd.splits.exists():
        return len(read_json(wd.splits))
    return requested or load_plans(wd.plans).training.num_folds


def _checkpoint(run: TrainingRun) -> dict[str, Any]:
    return {
        "model": run.model.state_dict(),
        "optimizer": run.optimizer.state_dict(),
        "scaler": run.scaler.state_dict(),
        "state": to_dict(run.state),
        "settings": to_dict(run.settings),
        "time_budget": run.time_budget,
        "config": run.config.name,
        "mirror_axes": list(run.augmenter.mirror_axes),
        "plans_hash": run.plans.fingerprint_hash(),
        "rng": rng_state(),
        "swa": run.swa.state_dict() if run.swa is not None else None,
        "run_overrides": to_dict(run.run_overrides),
    }


def _resumed_configuration(run_dir: Path, requested: Configuration, run_overrides: RunOverrides) -> Configuration:
    """A resumed run keeps the configuration it started with: its weights fit no other. Run overrides
    given again must produce that same configuration."""
    recorded = run_configuration(run_dir, requested)
    if run_overrides != RunOverrides() and recorded != requested:
        raise ValueError(f"{run_dir}: was started with another configuration than these overrides give")
    return recorded


def train_step(run: TrainingRun, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """Forward and backward on one batch; the optimizer steps every ``accumulate`` batches (the loss
    is scaled by 1/``accumulate`` so accumulated gradients equal a large batch's). Returns the loss as a
    detached tensor: reading its value would wait for the GPU, so the loop does that only now and then."""
    accumulate = max(1, run.settings.accumulate)
    stepping = (run.state.iteration + 1) % accumulate == 0
    if "params" in batch:  # the workers only cropped: augment here, on the device, the batch at once
        image = stack_crops(batch["image"], batch["extent"], run.device)
        label = stack_crops(batch["label"], batch["extent"], run.device)
        image, label = augment_batch(run.augmenter, image, label, batch["params"], run.config.patch_size)
    else:
        image = batch["image"].to(run.device, non_blocking=True)
        label = batch["label"].to(run.device, non_blocking=True)
    if run.settings.channels_last:
        image = image.contiguous(memory_format=torch.channels_last_3d)
    label = label.long().clamp_min(0)  # "outside the non-zero mask" (-1) is background to the loss
    with distributed.sync_gradients(run.ddp or run.model, now=stepping):
        with torch.autocast(run.device.type, dtype=run.amp_dtype, enabled=run.amp_dtype is not None):
            logits = run.forward_model(image)
        loss = run.loss(logits, label)
        run.scaler.scale(loss / accumulate).backward()
    if stepping:
        run.scaler.unscale_(run.optimizer)
        torch.nn.utils.clip_grad_norm_(run.model.parameters(), run.settings.grad_clip)
        run.scaler.step(run.optimizer)
        run.scaler.update()
        run.optimizer.zero_grad(set_to_none=True)
    return loss.detach()


def take_snapshot(run: TrainingRun, epoch: int) -> None:
    """Save the weights at a cycle end with their validation pseudo-Dice; feed the SWA average."""
    metrics = validate(run, epoch)
    run.state.snapshots += 1
    if run.swa is not None:
        run.swa.update(run.model)
    if not run.dist.is_main:
        return
    path = snapshot_path(run.run_dir, run.state.snapshots)
    path.parent.mkdir(parents=True, exist_ok=True)
    save_checkpoint(
        path,
        {
            "model": run.model.state_dict(),
            "settings": to_dict(run.settings),
            "state": to_dict(run.state),
            "progress": run.progress(),
            "validation": metrics,
            "mirror_axes": list(run.augmenter.mirror_axes),
        },
    )
    runlog.say(
        run.run_dir, f"snapshot {run.state.snapshots} at {run.progress():.0%}: pseudo-Dice {metrics['mean_dice']:.4f}"
    )


def save_swa(run: TrainingRun) -> None:
    """Write ``swa.pt``: the averaged weights (BN statistics recomputed when the model has any)."""
    if run.swa is None or run.swa.count == 0:
        return
    model = copy.deepcopy(run.model)
    model.load_state_dict(run.swa.weights_for(model))
    if has_batch_norm(model):
        data = PatchBatches(run.train_spec, 50, run.settings.seed, 10**6, None)
        torch.optim.swa_utils.update_bn(
            (b["image"].to(run.device) for b in make_loader(data, 0, False)), model, device=run.device
        )
    save_checkpoint(
        run.run_dir / SWA_FILE,
        {
            "model": model.state_dict(),
            "settings": to_dict(run.settings),
            "swa_count": run.swa.count,
            "mirror_axes": list(run.augmenter.mirror_axes),
        },
    )


@torch.no_grad()
def validate(run: TrainingRun, epoch: int) -> dict[str, float]:
    """Validation loss and pseudo-Dice per label on sampled validation patches (no augmentation).
    Under DDP each rank validates its share of every batch and the counts are summed over ranks."""
    run.model.eval()
    seed = run.settings.seed + VALIDATION_SEED_OFFSET
    data = PatchBatches(run.val_spec, run.settings.val_iters, seed, epoch, None, rank=run.dist.rank)
    plans = run.plans
    labels = plans.evaluation_targets
    tp, fp, fn = (np.zeros(len(labels)) for _ in range(3))
    losses = []
    for batch in make_loader(data, 0, False):
        image = batch["image"].to(run.device)
        label = batch["label"].to(run.device).long().clamp_min(0)
        with torch.autocast(run.device.type, dtype=run.amp_dtype, enabled=run.amp_dtype is not None):
            logits = run.model(image)
        losses.append(float(run.loss(logits, label)))
        target = label[:, 0]
        counted = target != plans.ignore_class if plans.ignore_class is not None else torch.ones_like(target).bool()
        for i, (p, t) in enumerate(predicted_and_reference(logits, target, plans)):
            p = p & counted
            tp[i] += float((p & t).sum())
            fp[i] += float((p & ~t).sum())
            fn[i] += float((~p & t).sum())
    run.model.train()
    n = len(labels)
    totals = distributed.all_reduce_sum(np.r_[tp, fp, fn, sum(losses), len(losses)])
    tp, fp, fn, (loss_sum, batches) = totals[:n], totals[n : 2 * n], totals[2 * n : 3 * n], totals[3 * n :]
    denom = 2 * tp + fp + fn
    dice = np.where(denom > 0, 2 * tp / np.maximum(denom, 1), np.nan)
    out = {"val_loss": float(loss_sum / batches) if batches else math.nan}
    out.update({f"dice_{target_key(v)}": float(d) for v, d in zip(labels, dice)})
    out["mean_dice"] = float(np.nanmean(dice)) if np.isfinite(dice).any() else math.nan
    return out


def predicted_and_reference(logits: torch.Tensor, target: torch.Tensor, plans: Plans):
    """Per evaluation target, the predicted and reference masks of a batch: argmax == class for labels,
    sigmoid > 0.5 against the united classes for regions."""
    if plans.region_classes is None:
        pred = logits.argmax(1)
        return [(pred == k, target == k) for k in range(1, plans.num_label_classes)]
    return [
        (logits[:, r] > 0, torch.isin(target, torch.tensor(classes, device=target.device)))
        for r, classes in enumerate(plans.region_classes)
    ]


def augment_in_workers(settings: TrainingSettings, device: torch.device) -> bool:
    """Where the batch augmentation runs: in the loader workers (CPU training: they work in parallel
    with the training process) or on the training device (GPU: a few kernels instead of CPU-bound workers)."""
    choices = {"auto": device.type != "cuda", "workers": True, "device": False}
    if settings.augment_on not in choices:
        raise ValueError(f"augment_on {settings.augment_on!r}: use one of {', '.join(choices)}")
    return choices[settings.augment_on]


def train_batches(run: TrainingRun, epoch: int) -> PatchBatches:
    """The epoch's training batches of this rank (under DDP each rank draws its own: seeded by rank)."""
    settings = run.settings
    in_workers = augment_in_workers(settings, run.device)
    return PatchBatches(
        run.train_spec, settings.iters_per_epoch, settings.seed, epoch, run.augmenter, run.dist.rank, in_workers
    )


def _fmt(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.4f}"


EMA_MOMENTUM = 0.9  # nnU-Net's ema_fg_dice: 0.9 x previous + 0.1 x this epoch's pseudo-Dice


def update_ema_dice(state: RunState, dice: float) -> bool:
    """Fold an epoch's pseudo-Dice into the moving average; True when the average is a new best
    (nnunetv2/training/nnUNetTrainer/nnUNetTrainer.py ``on_epoch_end`` saves checkpoint_best then)."""
    if math.isnan(dice):
        return False
    state.ema_dice = dice if state.ema_dice is None else EMA_MOMENTUM * state.ema_dice + (1 - EMA_MOMENTUM) * dice
    if state.best_ema_dice is None or state.ema_dice > state.best_ema_dice:
        state.best_ema_dice = state.ema_dice
        return True
    return False


# Called after every epoch with the run and the epoch's validation metrics (pseudo-Dice); True stops
# training there (e.g. a pruned search trial). Under DDP rank 0's answer counts for all ranks.
EpochEnd = Callable[["TrainingRun", dict[str, float]], bool]


def fit(run: TrainingRun, num_workers: int | None = None, on_epoch_end: EpochEnd | None = None) -> RunState:
    """Train until progress reaches 1 (or ``on_epoch_end`` says stop: then without the final checkpoint);
    checkpoint, log and plot after every epoch (under DDP: rank 0)."""
    run.run_dir.mkdir(parents=True, exist_ok=True)
    settings = run.settings
    main = run.dist.is_main
    workers = settings.num_workers if num_workers is None else num_workers
    ends = cycle_ends(settings)
    run.model.train()
    if main and not run.state.done:
        g = run.augmenter.geometry
        runlog.say(
            run.run_dir,
            f"{run.config.name}: patch {run.config.patch_size}, batch {run.config.batch_size}; augmentation "
            + (f"{g.kind} (out-of-plane axis {g.axis})" if g.in_plane else "3d")
            + f", mirroring axes {list(run.augmenter.mirror_axes)}",
        )
    per_iteration = 0.0
    while not run.state.done:
        epoch = run.state.epoch
        loader = make_loader(train_batches(run, epoch), workers, pin_memory=run.device.type == "cuda")
        started = time.perf_counter()
        seconds_before = run.state.seconds
        losses: list[torch.Tensor] = []
        bar = tqdm(
            loader,
            total=settings.iters_per_epoch,
            desc=f"epoch {epoch}",
            unit="it",
            dynamic_ncols=True,
            leave=False,
            disable=not main,
        )
        lr = learning_rate(run.progress(), settings)
        # all ranks follow rank 0's clock, so that they stop at the same iteration
        clock = SharedClock(seconds_before, per_iteration, CLOCK_AGREE_EVERY, run.dist.enabled)
        for batch in bar:
            lr = learning_rate(run.progress(), settings)
            for group in run.optimizer.param_groups:
                group["lr"] = lr
            losses.append(train_step(run, batch))
            run.state.iteration += 1
            run.state.seconds = clock.tick(len(losses))
            if len(losses) % LOSS_DISPLAY_EVERY == 1:
                done = run.progress()
                eta = runlog.format_eta(run.state.seconds * (1 - done) / done if done > 0 else float("nan"))
                bar.set_postfix(loss=f"{float(losses[-1]):.3f}", lr=f"{lr:.2e}", progress=f"{done:.0%}", run_eta=eta)
            if run.state.snapshots < len(ends) and run.progress() >= ends[run.state.snapshots] - 1e-12:
                take_snapshot(run, epoch)
            if run.progress() >= 1.0:
                run.state.done = True
                break
            if settings.epoch_seconds and run.state.seconds - seconds_before >= settings.epoch_seconds:
                break  # a time-sliced epoch; every rank reads the same shared clock, so all stop here
        with contextlib.suppress(Exception):
            bar.close()
        if losses:  # every rank ends the epoch at the same iteration: agree once more, keep the pace
            clock.sync(len(losses))
            per_iteration = clock.per_iteration
        metrics = validate(run, epoch)
        if run.swa is not None and not ends and run.progress() >= 1 - settings.cyclic_fraction:
            run.swa.update(run.model)  # non-cyclic schedules: average the epoch ends of the final part
        run.state.seconds = distributed.agree(seconds_before + time.perf_counter() - started)
        run.state.epoch += 1
        train_loss = distributed.mean_over_ranks(float(torch.stack(losses).mean()) if losses else math.nan)
        if main:
            _end_epoch(run, epoch, metrics, train_loss, lr, started)
        if on_epoch_end is not None and distributed.agree(float(main and on_epoch_end(run, metrics))):
            return run.state  # stopped early: the latest checkpoint holds this epoch
    if main:
        save_checkpoint(run.run_dir / FINAL, _checkpoint(run))
        save_swa(run)
    distributed.barrier()  # the other ranks go on once rank 0's files are written
    return run.state


def _end_epoch(
    run: TrainingRun, epoch: int, metrics: dict[str, float], train_loss: float, lr: float, started: float
) -> None:
    """Rank 0 after an epoch: the moving-average pseudo-Dice, ``log.csv``, the plot, the checkpoints."""
    improved = update_ema_dice(run.state, metrics["mean_dice"])
    row = {
        "epoch": epoch,
        "iteration": run.state.iteration,
        "train_loss": train_loss,
        **metrics,
        "ema_dice": run.state.ema_dice,
        "lr": lr,
        "epoch_seconds": round(time.perf_counter() - started, 2),
        "elapsed_seconds": round(run.state.seconds, 2),
    }
    runlog.append_row(run.run_dir / "log.csv", row)
    runlog.plot_progress(run.run_dir / "log.csv", run.run_dir / "progress.png")
    checkpoint = _checkpoint(run)
    save_checkpoint(run.run_dir / LATEST, checkpoint)
    if improved:
        save_checkpoint(run.run_dir / BEST, checkpoint)
    runlog.say(
        run.run_dir,
        f"epoch {epoch}: loss {row['train_loss']:.4f}, val loss {metrics['val_loss']:.4f}, "
        f"pseudo-Dice {metrics['mean_dice']:.4f} (EMA {_fmt(run.state.ema_dice)}{', best' if improved else ''}), "
        f"lr {lr:.2e}, {row['epoch_seconds']} s",
    )
