"""segpipe's command line: a table of commands, each parsing its options and calling one stage.

Heavy modules (torch, monai) are imported inside the commands so ``--help`` is instant.
"""

from __future__ import annotations

import sys
from pathlib import Path

import click


def _workers(value: int | None) -> int:
    from segpipe.core.parallel import default_workers

    return value if value else default_workers()


def _fail(exc: Exception, remedy: str | None = None) -> None:
    """Exit 1 with the error in one line (naming ``remedy`` when the device ran out of memory); with
    ``--verbose`` (before the command) its traceback first."""
    from segpipe.core.errors import with_remedy

    ctx = click.get_current_context(silent=True)
    if ctx is not None and ctx.find_root().params.get("verbose"):
        import traceback

        click.echo("".join(traceback.format_exception(exc)), err=True)
    click.echo(f"error: {with_remedy(exc, remedy) if remedy else exc}", err=True)
    sys.exit(1)


POSITIVE = click.FloatRange(min=0, min_open=True)


def _model_option(help_text: str):
    """``-m/--model``: the folder the models (and their plans) come from."""
    return click.option("-m", "--model", "work", required=True, type=click.Path(path_type=Path), help=help_text)


@click.group()
@click.version_option(package_name="segpipe")
@click.option("--verbose", is_flag=True, help="On failure, print the traceback too (segpipe --verbose COMMAND ...).")
def main(verbose: bool) -> None:
    """segpipe: plan, preprocess, train, predict and evaluate 3D segmentation (NIfTI in, NIfTI out)."""


@main.command()
@click.argument("dataset", type=click.Path(path_type=Path))
def check(dataset: Path) -> None:
    """Validate a dataset (MSD or nnU-Net v2 layout) and list every problem."""
    from segpipe.data.dataset import check_dataset

    problems = check_dataset(dataset)
    for p in problems:
        click.echo(f"- {p}")
    if problems:
        click.echo(f"{len(problems)} problem(s) found in {dataset}", err=True)
        sys.exit(1)
    click.echo(f"{dataset}: no problems found")


@main.command()
@click.option("--out", type=click.Path(path_type=Path), default=Path("segpipe_demo"), show_default=True)
@click.option("--minutes", type=float, default=4.0, show_default=True, help="Total time budget.")
@click.option("--device", default="auto", show_default=True)
def demo(out: Path, minutes: float, device: str) -> None:
    """Synthetic data -> plan -> preprocess -> train -> predict -> Dice, in a few minutes on a CPU."""
    from segpipe.demo import run_demo
    from segpipe.evaluation.metrics import summary_table

    click.echo(summary_table(run_demo(out, minutes, device)))


@main.command()
@click.argument("out", type=click.Path(path_type=Path))
@click.option("--cases", default=20, show_default=True, help="Labelled training cases.")
@click.option("--test-cases", default=0, show_default=True, help="Unlabelled cases in imagesTs.")
@click.option("--shape", default="64,64,48", show_default=True, help="Volume shape X,Y,Z (voxels).")
@click.option("--spacing", default="1,1,1", show_default=True, help="Voxel spacing X,Y,Z (mm).")
@click.option("--labels", default=2, show_default=True, help="Number of foreground labels.")
@click.option("--seed", default=0, show_default=True)
@click.option("--body-fill", type=float, default=None, help="Body size / field of view (default 0.78-0.9; CT ~0.93).")
def synth(
    out: Path, cases: int, test_cases: int, shape: str, spacing: str, labels: int, seed: int, body_fill: float | None
) -> None:
    """Write a synthetic MSD-layout dataset of random phantoms."""
    from segpipe.data.synth import make_synthetic_dataset

    make_synthetic_dataset(
        out,
        cases=cases,
        shape=tuple(int(v) for v in shape.split(",")),
        spacing=tuple(float(v) for v in spacing.split(",")),
        labels=labels,
        test_cases=test_cases,
        seed=seed,
        body_fill=body_fill,
    )
    click.echo(f"wrote {cases} training and {test_cases} test cases to {out}")


@main.command()
@click.argument("dataset", type=click.Path(path_type=Path))
@click.option("-o", "--out", "work", required=True, type=click.Path(path_type=Path), help="Work folder.")
@click.option("--preset", default="default", show_default=True, help="Planner preset: a name in plans/ or a JSON path.")
@click.option("--workers", type=int, default=None, help="Processes (default: all cores).")
def plan(dataset: Path, work: Path, preset: str, workers: int | None) -> None:
    """Fingerprint a dataset and write WORK/plans.json."""
    from segpipe.core.errors import StageFailed
    from segpipe.data.nifti import InputError
    from segpipe.planning.planner import describe_plans, run_plan

    try:
        plans = run_plan(dataset, work, preset, _workers(workers))
    except (StageFailed, InputError, OSError, ValueError) as exc:
        _fail(exc)
    click.echo(describe_plans(plans))


@main.command()
@click.argument("dataset", type=click.Path(path_type=Path))
@click.option("-o", "--out", "work", required=True, type=click.Path(path_type=Path), help="Work folder.")
@click.option("--configs", default=None, help="Comma-separated configurations (default: all planned).")
@click.option("--preset", default="default", show_default=True, help="Preset for plan, when plans.json is missing.")
@click.option("--workers", type=int, default=None, help="Processes (default: all cores).")
@click.option("--overwrite", is_flag=True, help="Redo cases that are already preprocessed.")
def preprocess(
    dataset: Path, work: Path, configs: str | None, preset: str, workers: int | None, overwrite: bool
) -> None:
    """Crop, resample, normalize and store cases (runs plan first if WORK/plans.json is missing)."""
    import time

    from segpipe.core.errors import StageFailed
    from segpipe.core.paths import WorkDir
    from segpipe.data.nifti import InputError
    from segpipe.planning.planner import describe_plans, run_plan
    from segpipe.preprocessing.preprocess import run_preprocessing

    start = time.perf_counter()
    try:
        if not WorkDir(work).plans.exists():
            click.echo(describe_plans(run_plan(dataset, work, preset, _workers(workers))))
        summary = run_preprocessing(work, configs.split(",") if configs else None, _workers(workers), overwrite)
    except (StageFailed, InputError, OSError, ValueError, KeyError) as exc:
        _fail(exc)
    click.echo(f"preprocessed {summary} in {time.perf_counter() - start:.1f} s")


def _folds(value: str) -> list[int]:
    return [int(v) for v in value.split(",") if v.strip()]


@main.command()
@click.argument("work", type=click.Path(path_type=Path))
@click.option("--config", default="3d_fullres", show_default=True, help="Configuration to train.")
@click.option("--fold", required=True, help="Fold to train (0..K-1), several (0,2), or 'all': in sequence.")
@click.option("--epochs", type=click.IntRange(min=1), default=None, help="Epochs (default from plans: 1000).")
@click.option("--iters-per-epoch", type=click.IntRange(min=1), default=None, help="Iterations per epoch (default 250).")
@click.option(
    "--val-iters", type=click.IntRange(min=1), default=None, help="Validation batches per epoch (default 50)."
)
@click.option("--time-budget", type=POSITIVE, default=None, help="Seconds; the schedule runs over wall-clock time.")
@click.option(
    "--schedule",
    default=None,
    help="A schedule preset (plans/schedules/: poly, sgdr3, sgdr-grow, fge, swa; its whole recipe, which "
    "other options given here override) or a registered schedule (poly, constant, cosine, cyclic, "
    "poly_constant). Default poly.",
)
@click.option("--optimizer", default=None, help="Optimizer: sgd (default, nnU-Net's) or adamw.")
@click.option("--loss", default=None, help="Loss: dice_ce (default) or dice_topk.")
@click.option("--lr", "initial_lr", type=POSITIVE, default=None, help="Initial learning rate (default 0.01).")
@click.option(
    "--cycles",
    type=click.IntRange(min=1),
    default=None,
    help="cosine/cyclic: number of cycles (a snapshot at each end).",
)
@click.option("--cycle-mult", type=POSITIVE, default=None, help="cosine: each cycle this many times the previous.")
@click.option("--min-lr", type=click.FloatRange(min=0), default=None, help="cosine: LR at the end of each cycle.")
@click.option(
    "--warmup",
    "warmup_fraction",
    type=click.FloatRange(0, 1, max_open=True),
    default=None,
    help="Linear warm-up over this fraction.",
)
@click.option("--swa/--no-swa", default=None, help="Keep a running average of the snapshot weights (swa.pt).")
@click.option("--accumulate", type=click.IntRange(min=1), default=None, help="Gradient accumulation over N batches.")
@click.option(
    "--augment-on",
    type=click.Choice(["auto", "device", "workers"]),
    default=None,
    help="Where the batch augmentation runs (auto: on the GPU when training on one, else in the workers).",
)
@click.option("--compile/--no-compile", "compile", default=None, help="torch.compile the network.")
@click.option("--channels-last/--no-channels-last", "channels_last", default=None, help="channels_last_3d (GPU).")
@click.option(
    "--num-folds", type=click.IntRange(min=2), default=None, help="Folds when splits.json is created (default 5)."
)
@click.option("--seed", type=int, default=None, help="Seed for splits, initialisation and sampling.")
@click.option(
    "--workers", "num_workers", type=click.IntRange(min=0), default=None, help="Data-loader worker processes."
)
@click.option("--device", default="auto", show_default=True, help="auto, cpu, cuda or cuda:N.")
@click.option(
    "--resume", is_flag=True, help="Continue from the latest checkpoint (more --epochs extend a finished run)."
)
@click.option("--no-validation", is_flag=True, help="Skip predicting the fold's validation cases at the end.")
@click.option("--no-val-tta", is_flag=True, help="Predict the validation cases without mirroring (8x faster on CPU).")
@click.option("--gpus", default=None, help="GPU ids (0,1,2,3): train the folds in parallel, one process per GPU.")
@click.option(
    "--overrides",
    "overrides_file",
    type=click.Path(path_type=Path, dir_okay=False),
    default=None,
    help="JSON of setting overrides (e.g. WORK/tune/best.json); options given here win over it.",
)
def train(
    work: Path,
    config: str,
    fold: str,
    time_budget: float | None,
    device: str,
    resume: bool,
    no_validation: bool,
    no_val_tta: bool,
    gpus: str | None,
    overrides_file: Path | None,
    **overrides: object,
) -> None:
    """Train one fold (or all); at the end predict its validation cases and write validation/summary.json.

    Under torchrun (one process per GPU) the folds train with DistributedDataParallel."""
    from segpipe.core.errors import TRAIN_MEMORY_REMEDY
    from segpipe.evaluation.metrics import summary_table
    from segpipe.planning.overrides import load_overrides
    from segpipe.runs.runlog import say
    from segpipe.scale import distributed
    from segpipe.training.loop import fit, num_folds, setup
    from segpipe.training.validation import validate_fold

    try:
        given = {k: v for k, v in overrides.items() if v is not None}  # explicit options win
        if overrides_file is not None:
            given = {**load_overrides(overrides_file).as_dict(), **given}
        if given.get("schedule"):  # a preset's recipe, under everything given
            from segpipe.training.schedules import schedule_overrides

            given = {**schedule_overrides(str(given.pop("schedule"))), **given}
        overrides = given
        folds = list(range(num_folds(work, overrides.get("num_folds")))) if fold == "all" else _folds(fold)
        if gpus:
            _train_on_gpus(work, config, folds, _folds(gpus), device)
            return
        dist = distributed.init(device)
        for f in folds:
            run = setup(work, config, f, overrides, time_budget, device, resume, dist)
            state = fit(run)
            if dist.is_main:
                say(
                    run.run_dir,
                    f"fold {f}: {state.iteration} iterations in {state.seconds:.0f} s "
                    f"({state.seconds / max(state.iteration, 1):.3f} s/iteration); checkpoints in {run.run_dir}",
                )
            if not no_validation:
                summary = validate_fold(work, config, f, device, tta=not no_val_tta, dist=dist)
                if dist.is_main:
                    say(run.run_dir, summary_table(summary))
    except (OSError, ValueError, KeyError, RuntimeError, NotImplementedError) as exc:
        _fail(exc, TRAIN_MEMORY_REMEDY)
    finally:
        distributed.cleanup()


def _train_on_gpus(work: Path, config: str, folds: list[int], gpus: list[int], device: str) -> None:
    """``train --gpus``: this same command once per GPU, each with its round-robin share of the folds."""
    import torch

    from segpipe.scale.distributed import from_env
    from segpipe.scale.fold_launcher import check_gpus, plan_jobs, run_jobs

    check_gpus(gpus, torch.cuda.device_count(), device, from_env().enabled)
    command = _repeat_command(click.get_current_context(), {"fold", "gpus"})
    argv = [sys.executable, str(Path(__file__).resolve()), *command]
    run_jobs(plan_jobs(argv, folds, gpus, work / config / "logs"), echo=click.echo)
    click.echo(f"trained folds {','.join(map(str, folds))} on GPUs {','.join(map(str, gpus))}")


def _repeat_command(ctx: click.Context, leave_out: set[str]) -> list[str]:
    """The command line that ``ctx`` parsed (command name, arguments, options that were given), without
    the options named in ``leave_out``: to start the same command in a child process."""
    from click.core import ParameterSource

    args: list[str] = [ctx.info_name or ""]
    for param in ctx.command.params:
        name = param.name or ""
        value = ctx.params.get(name)
        if name in leave_out or value is None or ctx.get_parameter_source(name) != ParameterSource.COMMANDLINE:
            continue
        if isinstance(param, click.Argument):
            args.append(str(value))
        elif isinstance(param, click.Option) and param.is_flag:
            args.append(param.opts[0] if value else param.secondary_opts[0])
        else:
            args += [param.opts[0], str(value)]
    return args


def _optional_fold(value: str) -> int | None:
    return None if value.lower() in ("none", "") else int(value)


@main.command()
@click.argument("work", type=click.Path(path_type=Path))
@click.option("--config", default="3d_fullres", show_default=True, help="Configuration to tune.")
@click.option("--fold", type=click.IntRange(min=0), default=0, show_default=True, help="Fold the search validates on.")
@click.option("--trials", type=click.IntRange(min=1), default=20, show_default=True, help="Finished trials in all.")
@click.option("--min-budget", type=POSITIVE, default=100, show_default=True, help="Seconds: the lowest rung.")
@click.option("--max-budget", type=POSITIVE, default=900, show_default=True, help="Seconds: each trial's budget.")
@click.option("--space", default="default", show_default=True, help="Search space: a name in plans/search/ or a path.")
@click.option("--storage", default=None, help="Optuna RDB URL (default sqlite:///WORK/tune/<study>.db).")
@click.option("--study", default=None, help="Study name (default <config>_fold<fold>).")
@click.option(
    "--pruner",
    type=click.Choice(["hyperband", "successive_halving", "none"]),
    default="hyperband",
    show_default=True,
)
@click.option("--reduction-factor", type=click.IntRange(min=2), default=3, show_default=True, help="Pruner's eta.")
@click.option("--seed", type=int, default=None, help="Sampler seed (parallel workers: a different one each).")
@click.option(
    "--heartbeat",
    type=click.IntRange(min=1),
    default=60,
    show_default=True,
    help="Seconds; a trial silent for twice this (a killed worker) is failed and queued again.",
)
@click.option("--val-tta/--no-val-tta", default=False, show_default=True, help="Mirroring in trial validation.")
@click.option(
    "--confirm-fold", default="1", show_default=True, help="Re-train best and default settings on this fold ('none')."
)
@click.option("--device", default="auto", show_default=True)
def tune(
    work: Path,
    config: str,
    fold: int,
    trials: int,
    min_budget: float,
    max_budget: float,
    space: str,
    storage: str | None,
    study: str | None,
    pruner: str,
    reduction_factor: int,
    seed: int | None,
    heartbeat: int,
    val_tta: bool,
    confirm_fold: str,
    device: str,
) -> None:
    """Search training hyper-parameters with Optuna: time-budgeted trials, pruned at rungs; writes
    WORK/tune/best.json (for train --overrides) and WORK/tune/report.html. Re-run to resume; run it in
    several processes with one --storage to search in parallel."""
    try:
        import optuna  # noqa: F401
    except ImportError:
        _fail(RuntimeError("segpipe tune needs Optuna: pip install 'segpipe[tune]'"))
    from segpipe.tuning.confirm import confirm
    from segpipe.tuning.report import write_best, write_report
    from segpipe.tuning.study import SearchOptions, run_search, tune_dir

    options = SearchOptions(
        config=config,
        fold=fold,
        trials=trials,
        min_budget=min_budget,
        max_budget=max_budget,
        space=space,
        storage=storage,
        study=study,
        device=device,
        pruner=pruner,
        reduction_factor=reduction_factor,
        seed=seed,
        heartbeat=heartbeat,
        tta=val_tta,
        confirm_fold=_optional_fold(confirm_fold),
    )
    try:
        found = run_search(work, options)
        best = write_best(tune_dir(work), found)
        if best is None:
            click.echo("no trial completed: no best.json yet")
        else:
            click.echo(
                f"best trial {found.best_trial.number}: validation Dice {found.best_trial.value:.4f}; wrote {best}"
            )
            confirmed = confirm(work, found, options)
            if confirmed is not None:
                p = confirmed["confirm_fold_wilcoxon_p"]
                click.echo(
                    f"fold {confirmed['confirm_fold']}: best {confirmed['confirm_fold_dice']:.4f}, "
                    f"defaults {confirmed['defaults_confirm_fold_dice']:.4f} "
                    f"(fold {confirmed['search_fold']}: best {confirmed['search_fold_dice']:.4f}); paired p "
                    + (f"{p:.2g}" if p is not None else "n/a")
                )
        click.echo(f"wrote {write_report(tune_dir(work), found)}")
    except (OSError, ValueError, KeyError, RuntimeError) as exc:
        _fail(exc)


@main.command()
@click.option("-i", "--input", "input_dir", required=True, type=click.Path(path_type=Path), help="NIfTI folder.")
@click.option("-o", "--output", "output_dir", required=True, type=click.Path(path_type=Path), help="Output folder.")
@_model_option("Work folder, or a model folder made by segpipe export.")
@click.option("--config", default="3d_fullres", show_default=True)
@click.option("--folds", default=None, help="Comma-separated folds to ensemble (default: every trained fold).")
@click.option(
    "--weights",
    "--checkpoint",
    "weights",
    type=click.Choice(["final", "best", "swa"]),
    default="final",
    show_default=True,
    help="Each fold's final weights, its best (moving-average pseudo-Dice) checkpoint, or its SWA weights.",
)
@click.option("--snapshots", default=None, help="Cycle snapshots instead of the weights: 'all' or 'last:N'.")
@click.option("--no-tta", is_flag=True, help="Disable mirroring test-time augmentation.")
@click.option(
    "--step",
    type=click.FloatRange(0, 1, min_open=True),
    default=0.5,
    show_default=True,
    help="Window step as a fraction of the patch.",
)
@click.option(
    "--batch-windows",
    type=click.IntRange(min=1),
    default=1,
    show_default=True,
    help="Windows per forward pass (each with all its mirrorings).",
)
@click.option("--device", default="auto", show_default=True)
@click.option(
    "--backend",
    type=click.Choice(["auto", "torch", "openvino", "onnxruntime"]),
    default="auto",
    show_default=True,
    envvar="SEGPIPE_BACKEND",
    show_envvar=True,
    help="What runs the network: auto = torch on a GPU, on a CPU the fastest installed one (measured once, cached).",
)
@click.option(
    "--precision",
    type=click.Choice(["auto", "fp32", "bf16"]),
    default="auto",
    show_default=True,
    envvar="SEGPIPE_PRECISION",
    show_envvar=True,
    help="auto = bf16 where the CPU has native bf16 (AMX, AVX512-BF16) or the GPU's autocast dtype, else fp32.",
)
@click.option(
    "--device-memory-limit",
    type=POSITIVE,
    default=None,
    help="MB a case's accumulators may take on the device; beyond it they stay on the CPU "
    "(default: env SEGPIPE_DEVICE_MEMORY_LIMIT_MB, else 60% of the free GPU memory).",
)
@click.option("--save-probabilities", is_flag=True, help="Also write CASE.npz with softmax probabilities.")
@click.option("--overwrite", is_flag=True, help="Redo cases whose output exists.")
@click.option("--no-postprocessing", is_flag=True, help="Ignore WORK/<config>/postprocessing.json.")
@click.option(
    "--prev-stage",
    type=click.Path(path_type=Path),
    default=None,
    help="Cascade: a folder of stage-1 segmentations (CASE.nii.gz) to build on instead of predicting stage 1.",
)
def predict(
    input_dir: Path,
    output_dir: Path,
    work: Path,
    config: str,
    folds: str | None,
    weights: str,
    snapshots: str | None,
    no_tta: bool,
    step: float,
    batch_windows: int,
    device: str,
    backend: str,
    precision: str,
    device_memory_limit: float | None,
    save_probabilities: bool,
    overwrite: bool,
    no_postprocessing: bool,
    prev_stage: Path | None,
) -> None:
    """Predict every NIfTI in a folder; outputs have the inputs' exact geometry.

    A cascade configuration (3d_cascade_fullres) runs both stages: stage 1 is the fold ensemble of the
    previous configuration (its segmentations go to OUTPUT/stage1_<config>/), unless --prev-stage gives them.
    Under torchrun each process predicts its share of the cases; rank 0 checks and merges the result.
    With a model folder (segpipe export) as -m, --config, --folds, --weights and --snapshots come from the folder."""
    from datetime import timedelta

    from segpipe.core.errors import PREDICT_MEMORY_REMEDY, StageFailed
    from segpipe.data.nifti import InputError
    from segpipe.inference.ensemble import Members
    from segpipe.inference.model_folder import is_model_folder
    from segpipe.inference.predict import PredictOptions, predict_configuration, predict_model_folder, trained_folds
    from segpipe.scale import distributed

    options = PredictOptions(
        step=step,
        tta=not no_tta,
        batch_windows=batch_windows,
        save_probabilities=save_probabilities,
        overwrite=overwrite,
        postprocess=not no_postprocessing,
        device_memory_limit_mb=device_memory_limit,
        backend=backend,
        precision=precision,
    )
    try:
        # the ranks meet once, at the end: rank 0 may wait long there for a rank with slower cases
        dist = distributed.init(device, timeout=timedelta(hours=24))
        if is_model_folder(work):
            if folds or snapshots or prev_stage:
                raise ValueError(f"{work} is a model folder: its members are fixed at export (drop --folds etc.)")
            summary = predict_model_folder(input_dir, output_dir, work, options, device, dist)
            click.echo(f"{f'rank {dist.rank}: ' if dist.enabled else ''}predicted {summary}")
            return
        chosen = _folds(folds) if folds else trained_folds(work, config)
        if not chosen:
            raise FileNotFoundError(f"{work / config}: no trained fold (fold_<k>/checkpoint_final.pt); train first")
        members = Members(chosen, weights, snapshots)
        summary = predict_configuration(input_dir, output_dir, work, config, members, options, device, prev_stage, dist)
    except (StageFailed, InputError, OSError, KeyError, RuntimeError, ValueError, ImportError) as exc:
        _fail(exc, PREDICT_MEMORY_REMEDY)
    finally:
        distributed.cleanup()
    click.echo(f"{f'rank {dist.rank}: ' if dist.enabled else ''}predicted {summary}")


@main.command()
@click.argument("work", type=click.Path(path_type=Path))
@click.option("-o", "--output", "model_dir", required=True, type=click.Path(path_type=Path), help="Model folder.")
@click.option("--config", default="3d_fullres", show_default=True)
@click.option("--folds", default=None, help="Comma-separated folds to ensemble (default: every trained fold).")
@click.option(
    "--weights",
    type=click.Choice(["final", "best", "swa"]),
    default="final",
    show_default=True,
    help="Each fold's final weights, its best checkpoint, or its SWA weights.",
)
@click.option("--snapshots", default=None, help="Cycle snapshots instead of the weights: 'all' or 'last:N'.")
@click.option(
    "--format",
    "fmt",
    type=click.Choice(["onnx", "openvino", "torchscript"]),
    default="onnx",
    show_default=True,
    help="onnx (runs on onnxruntime and openvino), openvino (IR), torchscript (torch).",
)
def export(
    work: Path, model_dir: Path, config: str, folds: str | None, weights: str, snapshots: str | None, fmt: str
) -> None:
    """Write a self-contained model folder: the networks plus everything predict -m MODEL_DIR needs."""
    from segpipe.inference.backends import MissingExtra
    from segpipe.inference.ensemble import Members
    from segpipe.inference.export import export_model
    from segpipe.inference.predict import trained_folds

    try:
        chosen = _folds(folds) if folds else trained_folds(work, config)
        if not chosen:
            raise FileNotFoundError(f"{work / config}: no trained fold (fold_<k>/checkpoint_final.pt); train first")
        manifest = export_model(work, model_dir, config, Members(chosen, weights, snapshots), fmt)
    except (MissingExtra, OSError, KeyError, RuntimeError, ValueError) as exc:
        _fail(exc)
    click.echo(
        f"exported {len(manifest.networks)} {fmt} network(s) of {config} ({', '.join(manifest.members)}) to {model_dir}"
    )


@main.command()
@click.argument("pred_dir", type=click.Path(path_type=Path))
@click.argument("gt_dir", type=click.Path(path_type=Path))
@click.option("-o", "--output", type=click.Path(path_type=Path), default=None, help="summary.json path.")
@click.option("--labels", default=None, help="Comma-separated label values (default: all in the references).")
@click.option("--ignore", "ignore_label", type=int, default=None, help="Reference value that counts for no label.")
def evaluate(pred_dir: Path, gt_dir: Path, output: Path | None, labels: str | None, ignore_label: int | None) -> None:
    """Dice and HD95 (mm) per label and case of a prediction folder against references."""
    from segpipe.data.nifti import InputError
    from segpipe.evaluation.metrics import evaluate_folder, summary_table

    try:
        summary = evaluate_folder(
            pred_dir, gt_dir, _folds(labels) if labels else None, output or pred_dir / "summary.json", ignore_label
        )
    except InputError as exc:
        _fail(exc)
    click.echo(summary_table(summary))


@main.command()
@click.argument("inputs", nargs=-1, required=True, type=click.Path(path_type=Path))
@click.option("-o", "--output", "output_dir", required=True, type=click.Path(path_type=Path), help="Output folder.")
@_model_option("Work folder (labels from its plans.json).")
def ensemble(inputs: tuple[Path, ...], output_dir: Path, work: Path) -> None:
    """Average the CASE.npz probabilities of prediction folders (from --save-probabilities) case by case."""
    from segpipe.core.errors import StageFailed
    from segpipe.core.paths import WorkDir
    from segpipe.data.nifti import InputError
    from segpipe.inference.ensemble import ensemble_folders
    from segpipe.planning.plans import load_plans

    try:
        plans = load_plans(WorkDir(work).plans)
        summary = ensemble_folders(
            list(inputs), output_dir, plans.foreground_labels, regions_class_order=plans.regions_class_order
        )
    except (StageFailed, InputError, FileNotFoundError, ValueError) as exc:
        _fail(exc)
    click.echo(f"ensembled {summary['cases']} cases of {len(inputs)} folders into {output_dir}")


@main.command()
@click.argument("work", type=click.Path(path_type=Path))
@click.option("--config", default="3d_fullres", show_default=True)
def postprocess(work: Path, config: str) -> None:
    """Decide largest-component postprocessing on the folds' validation/ predictions; write postprocessing.json."""
    from segpipe.data.nifti import InputError
    from segpipe.evaluation.postprocessing_decision import describe_decision, run_postprocessing_decision

    try:
        decision = run_postprocessing_decision(work, config)
    except (InputError, FileNotFoundError, KeyError, ValueError) as exc:
        _fail(exc)
    click.echo(describe_decision(decision))
    click.echo(f"wrote {work / config / 'postprocessing.json'} (segpipe predict applies it)")


@main.command()
@click.argument("work", type=click.Path(path_type=Path))
@click.option("--configs", default=None, help="Comma-separated configurations (default: all with run folders).")
def report(work: Path, configs: str | None) -> None:
    """Compare final/SWA/snapshot weights and configuration ensembles out of fold; write WORK/report/."""
    from segpipe.data.nifti import InputError
    from segpipe.evaluation.report import build_report

    try:
        result = build_report(work, configs.split(",") if configs else None)
    except (InputError, FileNotFoundError, KeyError, ValueError) as exc:
        _fail(exc)
    for row in result["candidates"]:
        click.echo(f"{row['name']:<40} mean Dice {row['mean_dice']:.4f}  ({row['num_cases']} cases)")
    if result["under_trained"]:
        click.echo("no recommendation: the models are under-trained")
        for warning in result["warnings"]:
            click.echo(f"- {warning}")
    else:
        click.echo(f"recommended: {result['recommended']}\n{result['recommendation']['text']}")
        click.echo(result["predict_command"])
    click.echo(f"wrote {work / 'report' / 'report.html'}")


if __name__ == "__main__":
    main()
