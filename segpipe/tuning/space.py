"""The search space of ``segpipe tune``: a JSON file under ``plans/search/``, loaded into :class:`SearchSpace`.

Format::

    {"description": "...",
     "fixed": {"iters_per_epoch": 100},                       # overrides every trial gets
     "params": {
       "initial_lr": {"type": "float", "low": 0.001, "high": 0.03, "log": true},
       "schedule":   {"type": "categorical", "choices": ["poly", "cosine"]},
       "cycles":     {"type": "int", "low": 1, "high": 4, "when": {"schedule": ["cosine"]}}}}

Every key of ``fixed`` and ``params`` is a run override (a training setting or a
:class:`~segpipe.planning.overrides.RunOverrides` field); anything else is an error naming the key
and the file. ``when`` makes a parameter conditional on the value an earlier categorical parameter
took; parameters are drawn in file order.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from segpipe.augmentation.draw import AUGMENTATIONS
from segpipe.core.atomic import read_json
from segpipe.core.serialization import from_dict
from segpipe.planning.overrides import check_keys, split_overrides
from segpipe.planning.plans import PRESET_DIR
from segpipe.training.losses import LOSSES
from segpipe.training.optimizers import OPTIMIZERS
from segpipe.training.schedules import SCHEDULES

SEARCH_DIR = PRESET_DIR / "search"
KINDS = ("float", "int", "categorical")
# settings whose values are registry names: a choice that names nothing is refused at load
NAMED = {"schedule": SCHEDULES, "optimizer": OPTIMIZERS, "loss": LOSSES, "augmentation": AUGMENTATIONS}


@dataclass
class ParamSpec:
    """One searched setting: a float or int range, or categorical choices."""

    type: str
    low: float | None = None
    high: float | None = None
    log: bool = False
    step: float | None = None
    choices: list[Any] | None = None
    when: dict[str, list[Any]] | None = None  # draw only if these earlier parameters took one of these values


@dataclass
class SearchSpace:
    description: str = ""
    fixed: dict[str, Any] = field(default_factory=dict)
    params: dict[str, ParamSpec] = field(default_factory=dict)


def resolve_space(name_or_path: str | Path) -> Path:
    """A space file by path, or by name in ``plans/search/``."""
    path = Path(name_or_path)
    if path.suffix != ".json":
        path = SEARCH_DIR / f"{name_or_path}.json"
    if not path.is_file():
        known = ", ".join(sorted(p.stem for p in SEARCH_DIR.glob("*.json")))
        raise FileNotFoundError(f"search space {name_or_path!r} not found; in {SEARCH_DIR}: {known}")
    return path


def load_space(name_or_path: str | Path) -> SearchSpace:
    """Read and check a space file; every error names the file and the key."""
    path = resolve_space(name_or_path)
    where = str(path)
    space = from_dict(SearchSpace, read_json(path), where=where)
    check_keys(space.fixed, f"{where}: fixed")
    check_keys(space.params, f"{where}: params")
    split_overrides(space.fixed, where=f"{where}: fixed")
    seen: dict[str, ParamSpec] = {}
    for key, spec in space.params.items():
        _check_param(key, spec, seen, f"{where}: params.{key}")
        if key in space.fixed:
            raise ValueError(f"{where}: {key!r} is both fixed and searched")
        seen[key] = spec
    return space


def _check_param(key: str, spec: ParamSpec, earlier: dict[str, ParamSpec], where: str) -> None:
    if spec.type not in KINDS:
        raise ValueError(f"{where}: type {spec.type!r}; use one of {', '.join(KINDS)}")
    if spec.type == "categorical":
        if not spec.choices:
            raise ValueError(f"{where}: categorical needs a non-empty 'choices' list")
        values = spec.choices
    else:
        if spec.low is None or spec.high is None or not spec.low < spec.high:
            raise ValueError(f"{where}: needs 'low' < 'high', got {spec.low} and {spec.high}")
        if spec.log and spec.low <= 0:
            raise ValueError(f"{where}: a log range needs 'low' > 0")
        values = [spec.low, spec.high] if spec.type == "float" else [int(spec.low), int(spec.high)]
    for value in values:  # every value must be a valid override of this key
        split_overrides({key: value}, where=where)
        if key in NAMED and value not in NAMED[key].names():
            raise ValueError(f"{where}: {value!r} is no {NAMED[key].kind}; known: {', '.join(NAMED[key].names())}")
    for cond, allowed in (spec.when or {}).items():
        parent = earlier.get(cond)
        if parent is None or parent.type != "categorical":
            raise ValueError(f"{where}: 'when' names {cond!r}, which is no earlier categorical parameter")
        missing = [v for v in allowed if v not in (parent.choices or [])]
        if missing:
            raise ValueError(f"{where}: 'when' {cond} values {missing} are not among its choices")


def suggest(trial: Any, space: SearchSpace) -> dict[str, Any]:
    """Draw one trial's overrides from an ``optuna.Trial``: the fixed ones and the drawn parameters."""
    drawn: dict[str, Any] = {}
    for key, spec in space.params.items():
        if any(drawn.get(cond, _MISSING) not in allowed for cond, allowed in (spec.when or {}).items()):
            continue
        if spec.type == "categorical":
            drawn[key] = trial.suggest_categorical(key, spec.choices)
        elif spec.type == "int":
            drawn[key] = trial.suggest_int(key, int(spec.low), int(spec.high), step=int(spec.step or 1), log=spec.log)
        else:
            drawn[key] = trial.suggest_float(key, spec.low, spec.high, step=spec.step, log=spec.log)
    return {**space.fixed, **drawn}


_MISSING = object()
