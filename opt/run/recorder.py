"""What a run tells the world, from rank 0: the public logbook (its events, the series of
logged steps and a redacted copy of the resolved config), ``status.json``, the resolved
config in the run directory, and the compute it used.

Every method may be called on every rank; only rank 0 writes.
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

import tomli_w
import tomllib
import torch

from opt.checkpoint import checkpointer as ckpt
from opt.checkpoint import manifest
from opt.config import JobConfig, to_toml
from opt.fsutil import atomic_write
from opt.run import status
from opt.run.energy import EnergyMeter
from opt.run.logbook.events import (
    CheckpointSkipped,
    ConfigChange,
    DataEpoch,
    DownstreamEval,
    Event,
    InterventionCompletedAfterRestart,
    RunStart,
    RunStop,
    StragglerDetected,
)
from opt.run.logbook.redact import redact
from opt.run.logbook.series import Point, Series
from opt.run.logbook.store import Logbook

CONFIG_FILE = "config.toml"  # the resolved config, in the run directory and the logbook
STRAGGLERS_FILE = "stragglers.jsonl"  # every straggler window's figures, in the run directory


class RunRecorder:
    def __init__(self, cfg: JobConfig, rank: int, device: torch.device, world_size: int):
        self.cfg = cfg
        self.lead = rank == 0
        self.run_dir = cfg.run_dir
        self.logbook = Logbook(cfg.logbook.dir, cfg.run.name) if self.lead else None
        self.series = Series(cfg.logbook.dir, cfg.run.name) if self.lead else None
        self.energy = EnergyMeter(device, world_size, cfg.logbook.pue, cfg.logbook.carbon_intensity)
        self.last_validation: tuple[int, float] | None = None  # (step, held-out loss)
        self.last_downstream: DownstreamEval | None = None

    def log(self, event: Event) -> None:
        if self.logbook is not None:
            self.logbook.append(event)

    def logged(
        self,
        *,
        step: int,
        tokens: int,
        loss: float,
        lr: float,
        lr_scale: float,
        grad_clip: float,
        loss_scale: float,
        val_loss: float | None = None,
    ) -> None:
        """A logged step, into the logbook's series (``val_loss``: when one was computed)."""
        if self.series is not None:
            self.series.append(Point(step=step, tokens=tokens, loss=loss, lr=lr,
                                     lr_scale=lr_scale, grad_clip=grad_clip,
                                     loss_scale=loss_scale, val_loss=val_loss))  # fmt: skip

    def checkpoint_skipped(self, path: Path, problem: str) -> None:
        """Resume set a checkpoint aside (it failed its manifest): say so, and log it."""
        print(f"warning: skipping {path}: {problem}", flush=True)
        self.log(CheckpointSkipped(checkpoint=str(path), problem=problem,
                                   set_aside_as=path.name + ".corrupt"))  # fmt: skip

    def straggler(self, event: StragglerDetected) -> None:
        """A rank persistently slower than the others: into the logbook, and one line."""
        if self.lead:
            print(f"straggler: step {event.step}: rank {event.rank} on {event.host}, "
                  f"{event.ratio:.2f}x the median seconds per block forward for "
                  f"{event.windows} windows", flush=True)  # fmt: skip
        self.log(event)

    def straggler_window(
        self, step: int, figures: list[float], median: float, slow: list[int]
    ) -> None:
        """One straggler window's agreed figures (seconds per block forward, by rank) as a
        line of ``<run dir>/stragglers.jsonl``: what a slow node's story is read from."""
        if not self.lead:
            return
        self.run_dir.mkdir(parents=True, exist_ok=True)
        line = {"step": step, "seconds_per_block": figures, "median": median, "slow": slow}
        with open(self.run_dir / STRAGGLERS_FILE, "a") as f:
            f.write(json.dumps(line) + "\n")

    def events(self) -> list[Event]:
        """The run's logbook so far (rank 0; empty elsewhere or before the first event)."""
        if self.logbook is None or not self.logbook.events_path.is_file():
            return []
        return self.logbook.events()

    # ----- start and end ---------------------------------------------------------------------
    def started(
        self,
        *,
        step: int,
        tokens: int,
        source: Path | None,
        layout: dict,
        reconciled: InterventionCompletedAfterRestart | None,
        max_steps: int,
        load_s: float | None = None,
    ) -> None:
        """run_start (after config_change against the previous start of this run), the
        resolved config and the first status. Called once the inputs have proven loadable:
        a failed start leaves no run directory."""
        if not self.lead:
            return
        text = to_toml(self.cfg)
        previous = self.run_dir / CONFIG_FILE
        if previous.is_file():
            changes = config_changes(previous.read_text(), text)
            if changes:
                self.log(ConfigChange(step=step, changes=changes))
        self.log(
            RunStart(
                step=step,
                tokens=tokens,
                reason="resumed" if source is not None else "fresh",
                checkpoint=str(source) if source else None,
                world_size=layout["world_size"],
                layout=layout,
                model=self.cfg.model.name,
                run_dir=str(self.run_dir),
                **self._work_lost(step, tokens, source),
                startup_s=_process_age_s(),
                load_s=round(load_s, 2) if load_s is not None else None,
            )
        )
        if reconciled is not None:
            self.log(reconciled)
        self.run_dir.mkdir(parents=True, exist_ok=True)
        atomic_write(previous, text)
        # The public copy shows the layout the run had, not the "whatever is left" sentinel.
        atomic_write(
            self.logbook.dir / CONFIG_FILE,
            public_config(text, {"parallel": {"dp_shard": layout["dp_shard"]}}),
        )
        self.status(status.RUNNING, step, tokens, max_steps, source=str(source) if source else None)

    def stopped(self, outcome: status.Stop, step: int, tokens: int, max_steps: int) -> None:
        self.log(RunStop(step=step, tokens=tokens, reason=outcome.reason, **self.energy.usage()))
        self.status(outcome.state, step, tokens, max_steps, **outcome.fields())

    def failed(self, err: BaseException, step: int, tokens: int, max_steps: int) -> None:
        error = f"{type(err).__name__}: {str(err).splitlines()[0] if str(err) else ''}"
        self.log(RunStop(step=step, tokens=tokens, reason=f"error: {error}", **self.energy.usage()))
        self.status(status.FAILED, step, tokens, max_steps, error=error)

    def data_epoch(self, source: str, epochs: int, samples: int, step: int, tokens: int) -> None:
        """A mixture source drawn ``epochs`` times over: into the logbook."""
        self.log(DataEpoch(source=source, epochs=epochs, samples=samples, step=step,
                           tokens=tokens))  # fmt: skip

    def validated(self, step: int, loss: float) -> None:
        """The newest validation loss: status.json carries it from its next write on."""
        self.last_validation = (step, loss)

    def downstream(self, event: DownstreamEval) -> None:
        """A downstream evaluation: into the logbook, and status.json from its next write."""
        self.last_downstream = event
        self.log(event)

    def status(self, state: str, step: int, tokens: int, max_steps: int, **fields) -> None:
        """Rewrite status.json (every step, while running), with the last validation loss
        and its step once there is one."""
        if not self.lead:
            return
        if self.last_validation is not None:
            fields = {"valid_step": self.last_validation[0],
                      "valid_loss": self.last_validation[1], **fields}  # fmt: skip
        if self.last_downstream is not None:
            event = self.last_downstream
            tasks = {name: t.model_dump() for name, t in event.tasks.items()}
            fields = {"downstream": {"step": event.step, "split": event.split,
                                     "shots": event.shots, "tasks": tasks}, **fields}  # fmt: skip
        newest = ckpt.latest_checkpoint(self.cfg.checkpoint_dir)
        status.write_status(
            self.run_dir,
            state=state,
            step=step,
            tokens=tokens,
            max_steps=max_steps,
            last_checkpoint=str(newest) if newest else None,
            **fields,
        )

    def _work_lost(self, step: int, tokens: int, source: Path | None) -> dict:
        """What the interruption before this resume cost: the steps (and tokens) trained
        past the checkpoint and, after a crash or a stop on a signal, the wall-clock time
        since training first reached it (compute thrown away, queueing, restart). Empty
        when nothing was lost (e.g. a finished run extended)."""
        previous = status.read_status(self.run_dir)
        interrupted = previous.get("state") in (status.RUNNING, status.STOPPED_ON_SIGNAL,
                                                status.STOPPED_STRAGGLER, status.FAILED)  # fmt: skip
        lost_steps = max(0, int(previous.get("step", 0)) - step)
        if source is None or not (interrupted or lost_steps):
            return {}
        saved_at = manifest.read_manifest(source).get("saved_at")
        return {
            "previous_state": previous["state"],
            "previous_step": previous.get("step"),
            "lost_steps": lost_steps,
            "lost_tokens": max(0, int(previous.get("tokens", 0)) - tokens),
            "lost_s": round(time.time() - saved_at, 1) if saved_at and interrupted else None,
        }


def public_config(toml_text: str, resolved: dict | None = None) -> str:
    """The resolved config for the public logbook: as written, with the ``resolved``
    values ({section: {key: value}}, e.g. the data-parallel degree a -1 stood for) put in,
    and any value that is a secret (by its key's name, an environment secret's value, or a
    credential's shape) redacted."""
    tree = tomllib.loads(toml_text)
    filled = {s: {**t, **(resolved or {}).get(s, {})} for s, t in tree.items()}
    public = redact(filled)
    return toml_text if public == tree else tomli_w.dumps(public)


def config_changes(old_toml: str, new_toml: str) -> dict[str, tuple]:
    """Keys whose value differs between two resolved configs: {key: (old, new)}."""

    def flat(text: str) -> dict:
        return {f"{s}.{k}": v for s, table in tomllib.loads(text).items() for k, v in table.items()}

    old, new = flat(old_toml), flat(new_toml)
    return {
        k: (old.get(k), new.get(k))
        for k in sorted(old.keys() | new.keys())
        if old.get(k) != new.get(k)
    }


def _process_age_s() -> float | None:
    """Seconds since this process started (the kernel's record, so the interpreter's own
    start and every import count), or None where /proc does not say."""
    try:
        started = int(Path("/proc/self/stat").read_text().rsplit(")", 1)[1].split()[19])
        return round(
            time.clock_gettime(time.CLOCK_BOOTTIME) - started / os.sysconf("SC_CLK_TCK"), 2
        )
    except (OSError, ValueError, IndexError, AttributeError):
        return None
