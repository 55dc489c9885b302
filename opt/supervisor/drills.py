"""Fault drills: deterministic faults a run injects into itself, so that the supervisor and
the public logbook can be exercised on purpose (``supervisor.drill``)."""

from __future__ import annotations

from dataclasses import dataclass

from opt.config import DRILL


@dataclass(frozen=True)
class Drill:
    """KIND@STEP[xN][!]: ``kind`` (spike, nan or scale_collapse) at ``step`` for ``length``
    steps; ``repeat`` fires it again whenever the run passes that step again (after a
    rollback), a divergence that does not go away."""

    kind: str
    step: int
    length: int
    repeat: bool

    @classmethod
    def parse(cls, text: str | None) -> Drill | None:
        match = DRILL.match(text) if text else None
        if match is None:
            return None
        kind, step, length, bang = match.groups()
        return cls(kind, int(step), int(length or 1), bang == "!")

    def covers(self, step: int) -> bool:
        return self.step <= step < self.step + self.length
