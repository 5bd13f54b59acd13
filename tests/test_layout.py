"""The package layout's contract: imports between stage subpackages run one way, with no cycle.

Parses every module's ``from segpipe.X...`` imports (module level and inside functions) and checks the
graph between subpackages against the allowed direction of the data flow.
"""

from __future__ import annotations

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "segpipe"
# What each stage may import besides itself (the data flow: dataset -> ... -> reports).
ALLOWED = {
    "core": set(),
    "data": {"core"},
    "planning": {"core", "data"},
    "preprocessing": {"core", "data", "planning"},
    "augmentation": {"core"},
    "networks": {"core", "planning"},
    "runs": {"core", "planning", "networks"},
    "scale": {"core"},
    "inference": {"core", "data", "planning", "preprocessing", "networks", "runs", "scale"},
    "training": {
        "core",
        "data",
        "planning",
        "preprocessing",
        "augmentation",
        "networks",
        "runs",
        "scale",
        "inference",
        "evaluation",
    },
    "evaluation": {"core", "data", "planning", "runs", "inference"},
    # the top: searches run training and its validation inference; nothing imports it
    "tuning": {"core", "planning", "preprocessing", "augmentation", "runs", "training", "evaluation"},
}


def _imports() -> dict[str, set[str]]:
    edges: dict[str, set[str]] = {}
    for path in PACKAGE.rglob("*.py"):
        parts = path.relative_to(PACKAGE).parts
        if len(parts) < 2:
            continue  # segpipe/__init__.py, segpipe/demo.py: the top, may use every stage
        source = parts[0]
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("segpipe."):
                target = node.module.split(".")[1]
                if target != source:
                    edges.setdefault(source, set()).add(target)
    return edges


def test_every_stage_package_is_known():
    packages = {p.name for p in PACKAGE.iterdir() if (p / "__init__.py").is_file()}
    assert packages == set(ALLOWED)


def test_imports_follow_the_data_flow():
    wrong = {src: sorted(dst - ALLOWED[src]) for src, dst in _imports().items() if dst - ALLOWED[src]}
    assert not wrong, f"imports against the data flow: {wrong}"


def test_metrics_know_nothing_of_runs_and_inference_nothing_of_training():
    metrics = ast.parse((PACKAGE / "evaluation" / "metrics.py").read_text())
    modules = {n.module for n in ast.walk(metrics) if isinstance(n, ast.ImportFrom) and n.module}
    assert not any(m.startswith(("segpipe.runs", "segpipe.training")) for m in modules)
    assert "training" not in _imports().get("inference", set())


def test_nothing_below_the_top_imports_tuning():
    assert not [src for src, dst in _imports().items() if "tuning" in dst]
