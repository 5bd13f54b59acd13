"""segpipe's command line: a table of commands, each parsing its options and calling one stage.

Heavy modules (torch, monai) are imported inside the commands so ``--help`` is instant.
"""

from __future__ import annotations

import sys
from pathlib import Path

import click


def _workers(value: int | None) -> int:
    from segpipe.parallel import default_workers

    return value if value else default_workers()


def _fail(exc: Exception) -> None:
    click.echo(f"error: {exc}", err=True)
    sys.exit(1)


@click.group()
@click.version_option(package_name="segpipe")
def main() -> None:
    """segpipe: plan, preprocess, train, predict and evaluate 3D segmentation (NIfTI in, NIfTI out)."""


@main.command()
@click.argument("dataset", type=click.Path(path_type=Path))
def check(dataset: Path) -> None:
    """Validate a dataset (MSD or nnU-Net v2 layout) and list every problem."""
    from segpipe.dataset import check_dataset

    problems = check_dataset(dataset)
    for p in problems:
        click.echo(f"- {p}")
    if problems:
        click.echo(f"{len(problems)} problem(s) found in {dataset}", err=True)
        sys.exit(1)
    click.echo(f"{dataset}: no problems found")


@main.command()
@click.argument("out", type=click.Path(path_type=Path))
@click.option("--cases", default=20, show_default=True, help="Labelled training cases.")
@click.option("--test-cases", default=0, show_default=True, help="Unlabelled cases in imagesTs.")
@click.option("--shape", default="64,64,48", show_default=True, help="Volume shape X,Y,Z (voxels).")
@click.option("--spacing", default="1,1,1", show_default=True, help="Voxel spacing X,Y,Z (mm).")
@click.option("--labels", default=2, show_default=True, help="Number of foreground labels.")
@click.option("--seed", default=0, show_default=True)
def synth(out: Path, cases: int, test_cases: int, shape: str, spacing: str, labels: int, seed: int) -> None:
    """Write a synthetic MSD-layout dataset of random phantoms."""
    from segpipe.synth import make_synthetic_dataset

    make_synthetic_dataset(
        out,
        cases=cases,
        shape=tuple(int(v) for v in shape.split(",")),
        spacing=tuple(float(v) for v in spacing.split(",")),
        labels=labels,
        test_cases=test_cases,
        seed=seed,
    )
    click.echo(f"wrote {cases} training and {test_cases} test cases to {out}")


@main.command()
@click.argument("dataset", type=click.Path(path_type=Path))
@click.option("-o", "--out", "work", required=True, type=click.Path(path_type=Path), help="Work folder.")
@click.option("--preset", default="default", show_default=True, help="Planner preset: a name in plans/ or a JSON path.")
@click.option("--workers", type=int, default=None, help="Processes (default: all cores).")
def plan(dataset: Path, work: Path, preset: str, workers: int | None) -> None:
    """Fingerprint a dataset and write WORK/plans.json."""
    from segpipe.errors import StageFailed
    from segpipe.nifti import InputError
    from segpipe.planning import describe_plans, run_plan

    try:
        plans = run_plan(dataset, work, preset, _workers(workers))
    except (StageFailed, InputError, FileNotFoundError, ValueError) as exc:
        _fail(exc)
    click.echo(describe_plans(plans))


@main.command()
@click.argument("dataset", type=click.Path(path_type=Path))
@click.option("-o", "--out", "work", required=True, type=click.Path(path_type=Path), help="Work folder.")
@click.option("--configs", default=None, help="Comma-separated configurations (default: all planned).")
@click.option("--preset", default="default", show_default=True, help="Preset for plan, when plans.json is missing.")
@click.option("--workers", type=int, default=None, help="Processes (default: all cores).")
@click.option("--overwrite", is_flag=True, help="Redo cases that are already preprocessed.")
def preprocess(dataset: Path, work: Path, configs: str | None, preset: str, workers: int | None, overwrite: bool) -> None:
    """Crop, resample, normalize and store cases (runs plan first if WORK/plans.json is missing)."""
    import time

    from segpipe.errors import StageFailed
    from segpipe.nifti import InputError
    from segpipe.paths import WorkDir
    from segpipe.planning import describe_plans, run_plan
    from segpipe.preprocessing import run_preprocessing

    start = time.perf_counter()
    try:
        if not WorkDir(work).plans.exists():
            click.echo(describe_plans(run_plan(dataset, work, preset, _workers(workers))))
        summary = run_preprocessing(work, configs.split(",") if configs else None, _workers(workers), overwrite)
    except (StageFailed, InputError, FileNotFoundError, ValueError, KeyError) as exc:
        _fail(exc)
    click.echo(f"preprocessed {summary} in {time.perf_counter() - start:.1f} s")


if __name__ == "__main__":
    main()
