"""Run a function over cases in worker processes with a progress bar, collecting failures.

Batch work never stops at one bad case: each item's exception is kept and returned beside the
results, and the caller reports all of them at the end.
"""

from __future__ import annotations

import multiprocessing as mp
import os
from collections.abc import Callable, Iterable, Sequence
from concurrent.futures import ProcessPoolExecutor, as_completed
from typing import TypeVar

from tqdm.auto import tqdm

T = TypeVar("T")
R = TypeVar("R")


def default_workers() -> int:
    return max(1, len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1)


def map_cases(
    fn: Callable[[T], R], items: Sequence[T], workers: int, desc: str, keys: Iterable[str] | None = None
) -> tuple[dict[str, R], dict[str, BaseException]]:
    """Apply ``fn`` to every item; return ``(results, failures)`` keyed by ``keys`` (default: index)."""
    names = [str(k) for k in keys] if keys is not None else [str(i) for i in range(len(items))]
    results: dict[str, R] = {}
    failures: dict[str, BaseException] = {}
    bar = tqdm(total=len(items), desc=desc, unit="case", dynamic_ncols=True, leave=False)
    if workers <= 1 or len(items) <= 1:
        for name, item in zip(names, items):
            try:
                results[name] = fn(item)
            except Exception as exc:  # noqa: BLE001 - reported with the case name by the caller
                failures[name] = exc
            bar.update()
    else:
        ctx = mp.get_context("fork" if "fork" in mp.get_all_start_methods() else "spawn")
        with ProcessPoolExecutor(max_workers=workers, mp_context=ctx, initializer=_limit_threads) as pool:
            futures = {pool.submit(fn, item): name for name, item in zip(names, items)}
            for fut in as_completed(futures):
                name = futures[fut]
                try:
                    results[name] = fut.result()
                except Exception as exc:  # noqa: BLE001
                    failures[name] = exc
                bar.update()
    bar.close()
    return {n: results[n] for n in names if n in results}, failures


def _limit_threads() -> None:
    # One worker per core: nested BLAS/torch threads would oversubscribe the cores.
    try:
        import torch

        torch.set_num_threads(1)
    except ImportError:
        pass
