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
