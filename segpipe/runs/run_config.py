"""The configuration a run folder was trained with: ``fold_<k>/configuration.json``.

Training writes it at the start of a run, with the run overrides that produced it (``segpipe train
--overrides``); prediction builds the network and windows from it rather than from ``plans.json``, so
a run with another patch size or network width predicts as it was trained. Runs without the file
trained the planned configuration.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from segpipe.core.atomic import read_json, write_json
from segpipe.core.serialization import from_dict, to_dict
from segpipe.planning.plans import Configuration

RUN_CONFIGURATION = "configuration.json"


def save_run_configuration(run_dir: Path, config: Configuration, overrides: dict[str, Any]) -> None:
    write_json(run_dir / RUN_CONFIGURATION, {"configuration": to_dict(config), "overrides": overrides})


def run_configuration(run_dir: Path, planned: Configuration) -> Configuration:
    """The configuration the run in ``run_dir`` trained: its recorded one, else the planned one."""
    path = run_dir / RUN_CONFIGURATION
    if not path.is_file():
        return planned
    return from_dict(Configuration, read_json(path)["configuration"], where=str(path))


def members_configuration(run_dirs: list[Path], planned: Configuration) -> Configuration:
    """The one configuration several runs (an ensemble's folds) trained; they must agree."""
    configs = [run_configuration(d, planned) for d in run_dirs] or [planned]
    for run_dir, config in zip(run_dirs, configs):
        if config != configs[0]:
            raise ValueError(
                f"{run_dir}: trained another configuration (patch {config.patch_size}, batch {config.batch_size}, "
                f"features {config.topology.features}) than {run_dirs[0]}; ensemble runs trained alike"
            )
    return configs[0]
