"""Deliberate failures, for testing that failures are handled (never set in production).

``OPT_INJECT_FAULT="RANK:WHEN:ACTION"`` makes rank RANK, just before training step WHEN (a
number), in the middle of the supervisor's next rollback (WHEN = ``rollback``: after the
intervention is logged and before the checkpoint is loaded), or in the middle of a
checkpoint save (WHEN = ``save``, or ``save@STEP`` for the checkpoint of that step only:
every shard written, the manifest that commits them not yet):
- ``raise``: raise an exception (its traceback must reach the launcher's report);
- ``hang``: stop responding, so its peers' next collective must time out;
- ``die``: SIGKILL itself, as the OOM killer or a lost node would.

With ``OPT_INJECT_FAULT_ONCE=PATH`` the fault fires only while PATH does not exist, and
creates it: once per run, not again in the allocation that resumes it.

``OPT_STEP_DELAY_S=SECONDS`` makes every step that much slower, so that a test can signal
or kill a run while it is surely in the middle of training.
"""

from __future__ import annotations

import os
import signal
import time

from opt.errors import OptError

ENV = "OPT_INJECT_FAULT"
ONCE_ENV = "OPT_INJECT_FAULT_ONCE"
DELAY_ENV = "OPT_STEP_DELAY_S"
ACTIONS = ("raise", "hang", "die")
NAMED_POINTS = ("rollback", "save")


class InjectedFault(RuntimeError):
    pass


def parse_fault(text: str) -> tuple[int, int | str, str]:
    try:
        rank, when, action = text.split(":")
        point, _, at = when.partition("@")
        if at:
            int(at)  # save@STEP names a step
        parsed = int(rank), (when if point in NAMED_POINTS else int(when)), action
    except ValueError:
        raise OptError(
            f"{ENV}={text!r}: expected RANK:STEP:ACTION, RANK:rollback:ACTION or "
            "RANK:save[@STEP]:ACTION"
        ) from None
    if action not in ACTIONS:
        raise OptError(f"{ENV}={text!r}: ACTION must be one of {', '.join(ACTIONS)}")
    return parsed


def maybe_inject_fault(rank: int, step: int | str, at_step: int | None = None) -> None:
    """Called at each fault point: before training step ``step`` (a number), or at the named
    point ``step`` (of the checkpoint of ``at_step``, for ``save``)."""
    if isinstance(step, int) and (delay := os.environ.get(DELAY_ENV)):
        time.sleep(float(delay))
    text = os.environ.get(ENV)
    if not text:
        return
    fault_rank, fault_step, action = parse_fault(text)
    if rank != fault_rank or fault_step not in (step, f"{step}@{at_step}"):
        return
    if once := os.environ.get(ONCE_ENV):
        try:
            os.close(os.open(once, os.O_CREAT | os.O_EXCL | os.O_WRONLY))
        except FileExistsError:
            return  # fired before
    if action == "raise":
        raise InjectedFault(f"injected fault on rank {rank} before step {step}")
    if action == "hang":
        while True:
            time.sleep(3600)
    os.kill(os.getpid(), signal.SIGKILL)
