"""The timing loop and result output shared by the training probes (``*_train_probe.py``).

Standard library only: the probes run in different interpreters (segpipe's and nnU-Net's), each
importing this file from its own folder (a script's folder is first on ``sys.path``).
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from pathlib import Path


def time_iterations(step: Callable[[], None], warmup: int, iters: int, sync: Callable[[], None]) -> float:
    """Seconds that ``iters`` calls of ``step`` take after ``warmup`` untimed calls.

    ``sync`` waits for queued device work (``torch.cuda.synchronize`` on a GPU), so the clock starts
    after the warm-up has really finished and stops after the last measured step has.
    """
    for _ in range(warmup):
        step()
    sync()
    start = time.perf_counter()
    for _ in range(iters):
        step()
    sync()
    return time.perf_counter() - start


def timing_record(tool: str, warmup: int, iters: int, seconds: float, **setup: object) -> dict[str, object]:
    """One probe's result: the timing and derived rates, then what was trained and how (``setup``)."""
    return {
        "tool": tool,
        "warmup": warmup,
        "iters": iters,
        "seconds": seconds,
        "it_s": iters / seconds if seconds > 0 else None,
        "s_per_it": seconds / iters if iters else None,
        **setup,
    }


def report(result: dict[str, object], path: Path | None) -> None:
    """Print ``result`` as one JSON line and, when ``path`` is given, write it there too."""
    line = json.dumps(result)
    print(line, flush=True)
    if path is not None:
        path.write_text(line + "\n")
