"""The logbook's series: ``logbook/<run>/series.jsonl``, one compact line per logged step
(every ``metrics.log_every`` steps), so that the report draws the run from the public
logbook alone.

Each line is a typed ``Point``: the step, the tokens trained on, the training loss, the LR
the optimizer used, the supervisor's LR scale and clip threshold, the fp16 loss scale, and
the validation loss when one was computed at that step. Written by rank 0 through the run
recorder, with the events' durability (one locked ``write`` + fsync per line; a torn last
line is skipped on read and cut off by the next append) and their redaction.

The file is append-only and never rewritten: a resumed or rolled-back run appends the steps
it trains again, so the series is what the run actually did. A step number that is not
above the one before it starts a new segment (see ``chart.history``).
"""

from __future__ import annotations

import json
import math
from pathlib import Path

from pydantic import ValidationError

from opt.errors import OptError
from opt.run.logbook.events import Record
from opt.run.logbook.redact import redact
from opt.run.logbook.store import append_line, whole_lines

SERIES = "series.jsonl"
SERIES_VERSION = 1


class Point(Record):
    """One logged step."""

    v: int = SERIES_VERSION
    step: int
    tokens: int
    loss: float
    """Training loss of the step (mean over its micro-batches and ranks)."""
    lr: float
    """The learning rate the optimizer used for the step (schedule × LR scale × re-warmup)."""
    lr_scale: float
    """The supervisor's factor on the schedule."""
    grad_clip: float
    """The clipping threshold in force."""
    loss_scale: float
    """The fp16 loss scale (1 outside fp16)."""
    val_loss: float | None = None
    """The validation loss, when one was computed at this step."""


class Series:
    """Append points to one run's series (rank 0 of a training job only)."""

    def __init__(self, root: str | Path, run: str):
        self.path = Path(root) / run / SERIES

    def append(self, point: Point) -> None:
        fields = redact(to_json(point))
        append_line(self.path, (json.dumps(fields, allow_nan=False) + "\n").encode())

    def points(self) -> list[Point]:
        return read_series(self.path)


def to_json(point: Point) -> dict:
    """The object of a point's line: None left out, NaN and infinities as strings."""
    return {
        k: str(v) if isinstance(v, float) and not math.isfinite(v) else v
        for k, v in point.model_dump(exclude_none=True).items()
    }


def read_series(path: str | Path) -> list[Point]:
    """Every point of a series file in the order written; none when there is no file (a
    logbook written before series existed). A torn final line is skipped; any other bad
    line is an error naming the file and the line."""
    path = Path(path)
    if not path.is_file():
        return []
    points = []
    for number, raw in whole_lines(path):
        try:
            obj = json.loads(raw.decode(errors="replace"))
            if not isinstance(obj, dict) or obj.get("v") != SERIES_VERSION:
                found = obj.get("v") if isinstance(obj, dict) else type(obj).__name__
                raise OptError(
                    f"{path}:{number}: series version {found!r}: this opt reads {SERIES_VERSION}"
                )
            points.append(Point.model_validate(obj))
        except json.JSONDecodeError as err:
            raise OptError(f"{path}:{number}: not a JSON line ({err.msg})") from None
        except ValidationError as err:
            first = err.errors()[0]
            where = ".".join(str(part) for part in first["loc"])
            raise OptError(f"{path}:{number}: field {where!r}: {first['msg']}") from None
    return points
