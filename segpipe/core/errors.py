"""Errors that a stage reports to the user: every problem at once, each naming its file."""

from __future__ import annotations

from collections.abc import Mapping


class StageFailed(RuntimeError):
    """A stage finished what it could but some inputs failed; ``problems`` maps item -> message."""

    def __init__(self, stage: str, problems: Mapping[str, str]):
        self.stage = stage
        self.problems = dict(problems)
        lines = "\n".join(f"  - {k}: {v}" for k, v in self.problems.items())
        super().__init__(f"{stage}: {len(self.problems)} problem(s):\n{lines}")

    def __reduce__(self) -> tuple:
        # Picklable with both arguments (the default would call __init__ with the message only).
        return (self.__class__, (self.stage, self.problems))


class DeviceFailed(RuntimeError):
    """A CUDA error that leaves the process's device unusable (a device-side assert, an illegal memory
    access): every later case would fail the same way, so the stage stops at once."""

    def __init__(self, item: str, cause: BaseException):
        self.item = item
        super().__init__(
            f"{item}: the device failed ({type(cause).__name__}: {cause}); no later case can run in this process. "
            "Finished outputs are kept: rerun the same command to go on, with CUDA_LAUNCH_BLOCKING=1 and "
            "--verbose to see the failing operation, or with --device cpu"
        )


# Phrases of CUDA errors after which the CUDA context is unusable (torch raises them as RuntimeError or,
# in recent versions, torch.AcceleratorError); out-of-memory is not one of them: it is recoverable.
_POISONING = ("device-side assert", "illegal memory access", "CUDA error", "unspecified launch failure")


def poisons_device(exc: BaseException) -> bool:
    """Whether ``exc`` is a CUDA error that leaves the device unusable for this process."""
    if type(exc).__name__ == "OutOfMemoryError":
        return False
    return type(exc).__name__ == "AcceleratorError" or any(p in str(exc) for p in _POISONING)


def is_out_of_memory(exc: BaseException) -> bool:
    return type(exc).__name__ == "OutOfMemoryError" or "out of memory" in str(exc).lower()


PREDICT_MEMORY_REMEDY = (
    "try --batch-windows 1, a --device-memory-limit MB (keeps each case's accumulators on the CPU) or --device cpu"
)
TRAIN_MEMORY_REMEDY = (
    "try a preset with a smaller patch or batch (segpipe plan --preset cpu, or batch_size in plans.json for a new "
    "run), --no-compile, or --device cpu"
)


def with_remedy(exc: BaseException, remedy: str) -> str:
    """The one-line message of ``exc``, with what to try when it is an out-of-memory error."""
    message = str(exc)
    return f"{message} ({remedy})" if is_out_of_memory(exc) and remedy not in message else message
