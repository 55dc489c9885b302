"""Carrying out the supervisor's decisions, and writing each one to the logbook.

The supervisor (opt/supervisor/) decides; this class acts, through the pieces it is handed:
the checkpoint manager, the data loader, the optimizers, the factors the supervisor lowers
and the run's recorder. Every rank runs it with the same decision; only rank 0 writes.

A rollback happens in-process: model, optimizer, data position and RNG are reloaded on
every rank from the newest healthy checkpoint, while the supervisor's own state and the
lowered factors carry over (the schedule is scaled, not reset). It is logged before it is
carried out: a job killed half-way resumes from the same checkpoint and ``reconcile``
finishes it from the logbook.

With a held-out set, every event carries the last validation loss before the intervention
and, for a rollback or an operator's change, one evaluated right after it: the rolled-back
weights are loaded (in memory only) before the untrusted checkpoints are hidden and the
event is written, so a job killed anywhere in between resumes exactly as before.
"""

from __future__ import annotations

from dataclasses import asdict
from pathlib import Path

import torch

from opt import dist
from opt.checkpoint.manager import CheckpointManager, step_of
from opt.config import SupervisorConfig
from opt.data.loader import BatchLoader
from opt.faults import maybe_inject_fault
from opt.run.control import ControlFiles
from opt.run.logbook.events import (
    Hyperparameters,
    Intervention,
    InterventionCompletedAfterRestart,
    ManualIntervention,
    Outcome,
    StopForHuman,
    ValidLoss,
)
from opt.run.recorder import RunRecorder
from opt.run.recovery import pending_rollback
from opt.run.status import FINISHED, STOPPED_FOR_HUMAN, Stop
from opt.supervisor.detectors import Anomaly
from opt.supervisor.rollback import Factors, plan_rollback, protected_step
from opt.supervisor.supervisor import KILL_SWITCH_REASON, Decision, Supervisor
from opt.train.evaluate import Evaluation, Evaluator


class Interventions:
    def __init__(
        self,
        supervisor: Supervisor,
        checkpoints: CheckpointManager,
        loader: BatchLoader,
        optimizers: list[torch.optim.Optimizer],
        factors: Factors,
        recorder: RunRecorder,
        control: ControlFiles,
        *,
        grad_accum: int,
        batch_tokens: int,
        evaluator: Evaluator | None = None,
    ):
        self.supervisor = supervisor
        self.cfg: SupervisorConfig = supervisor.cfg
        self.checkpoints = checkpoints
        self.loader = loader
        self.optimizers = optimizers
        self.factors = factors
        self.recorder = recorder
        self.control = control
        self.grad_accum = grad_accum
        self.batch_tokens = batch_tokens
        self.evaluator = evaluator  # None: no held-out set, no validation in the events

    def hyperparameters(self) -> Hyperparameters:
        group = self.optimizers[0].param_groups[0]
        return Hyperparameters(
            lr_scale=self.factors.lr_scale,
            grad_clip=self.factors.grad_clip,
            adam_eps=group["eps"],
            adam_beta2=group["betas"][1],
        )

    def protected(self, checkpoints: list[Path], step: int) -> set[Path]:
        """For retention at ``step``: the newest checkpoint old enough to be a rollback
        target stays until a newer one is; so do those a gradual divergence would roll back
        to, the newest at or before each step where the curve was at its best."""
        steps = [step_of(p) for p in checkpoints]
        keep = {protected_step(steps, step, self.cfg)}
        for best in self.supervisor.best_steps():
            keep.add(max((s for s in steps if s <= best), default=None))
        return {p for p in checkpoints if step_of(p) in keep}

    # ----- automatic decisions ---------------------------------------------------------------
    def carry_out(
        self, decision: Decision, step: int, tokens: int, drill: bool = False
    ) -> Stop | None:
        """Act on an unhealthy decision for ``step`` (``drill``: its anomaly was a fault
        drill); a Stop when the run must end."""
        anomaly = decision.anomaly
        event = {
            "step": step,
            "tokens": tokens,
            "detector": anomaly.detector if anomaly else decision.reason,
            "numbers": anomaly.numbers if anomaly else {},
            "action": decision.rung or "+".join(decision.moves),
            "before": self.hyperparameters(),
            "detail": _detail(anomaly),
            "drill": drill,
            "valid_before": self._last_validation(),
        }
        if "stop" in decision.moves:
            return self._stop(decision.reason, event)
        if "rollback" not in decision.moves:
            self.recorder.log(Intervention(**event, after=self.hyperparameters()))
            return None
        target = self.checkpoints.newest_at_or_before(self.supervisor.rollback_limit())
        if target is None:
            reason = (
                f"no healthy checkpoint saved by step {self.supervisor.rollback_limit()} "
                "to roll back to"
            )
            return self._stop(reason, event)
        self._rollback(target, step, decision.moves, event)
        return None

    def _rollback(self, target: Path, step: int, moves: tuple[str, ...], event: dict) -> None:
        """Hide the untrusted checkpoints, log the plan, then carry it out in-process."""
        self.checkpoints.finish()
        saved = self.checkpoints.read_states(target)
        target_step, target_pos = int(saved["progress"]["step"]), int(saved["data"]["pos"])
        skips = self.loader.stream.state_dict()["skips"]
        plan = plan_rollback(
            self.cfg, moves, step, target_step, self.factors, self.batch_tokens,
            step_range=lambda first, last: self.loader.step_positions(
                target_pos, target_step, first, last, self.grad_accum),
        )  # fmt: skip
        after = self.hyperparameters().model_copy(
            update={"lr_scale": plan.lr_scale, "grad_clip": plan.grad_clip}
        )
        # The supervisor remembers the incident across the rollback; the rest goes back.
        # Loaded before anything is hidden or logged: until then a job killed here resumes
        # as if no decision had been taken (nothing on disk has changed).
        self.checkpoints.load(target, keep={"supervisor"})
        self.supervisor.detectors.forget_after(plan.target_step)
        valid_after = self._validate(plan.target_step)  # of the weights rolled back to
        # Saved while the divergence was brewing: never resumed from again.
        hidden = self.checkpoints.hide_newer_than(target)
        self.recorder.log(
            Intervention(
                **event,
                after=after,
                valid_after=valid_after,
                checkpoint=str(target),
                rolled_back_to_step=plan.target_step,
                tokens_lost=plan.tokens_lost,
                discarded_checkpoints=[p.name for p in hidden],
                skipped_data=plan.skipped_data,
                skipped_steps=plan.skipped_steps,
            )
        )
        maybe_inject_fault(dist.rank_and_world()[0], "rollback")
        self.factors.lr_scale, self.factors.grad_clip = plan.lr_scale, plan.grad_clip
        for start, end in [*skips, *([plan.skipped_data] if plan.skipped_data else [])]:
            self.loader.stream.skip(start, end)  # skips decided after the target still hold
        if plan.reset_optimizer:
            for optimizer in self.optimizers:
                optimizer.state.clear()
            self.supervisor.rewarmup_start = plan.target_step
        self.checkpoints.delete_hidden()

    def _stop(self, reason: str, event: dict) -> Stop:
        if reason == KILL_SWITCH_REASON:
            stop = Stop(FINISHED, "kill switch: stopped at a step boundary by the operator")
            self.checkpoints.save(event["step"], sync=True)  # resume continues from it
            self.control.consume_stop()  # so that a restart trains on
            event["detail"] = reason
            self.recorder.log(Intervention(**event, after=self.hyperparameters()))
            return stop
        newest = self.checkpoints.latest()
        why = f"{event['detector']} at step {event['step']}: {reason}; the run is resumable from {newest}"
        self.recorder.log(StopForHuman(**event, reason=why))
        return Stop(STOPPED_FOR_HUMAN, f"stopped for a human after {why}")

    def judged(self, step: int, tokens: int) -> None:
        """Log the outcome of an incident the supervisor has just judged, if any."""
        outcome = self.supervisor.pop_outcome()
        if outcome is not None:
            self.recorder.log(Outcome(step=step, tokens=tokens, **asdict(outcome)))

    # ----- the operator's requests -----------------------------------------------------------
    def apply_manual(self, step: int, tokens: int) -> None:
        """An `opt intervene` request: rank 0 reads it, every rank applies the same values."""
        request = dist.broadcast_object(self.control.take_intervention())
        event = {"step": step, "tokens": tokens, "reason": request.get("reason", ""),
                 "before": self.hyperparameters(),
                 "valid_before": self._last_validation()}  # fmt: skip
        if "error" in request:
            detail = f"unreadable request: {request['error']}"
            self.recorder.log(ManualIntervention(**event, detail=detail))
            return
        if "lr_scale" in request:
            self.factors.lr_scale = float(request["lr_scale"])
        if "grad_clip" in request:
            self.factors.grad_clip = float(request["grad_clip"])
        if "skip_steps" in request:
            first, last = request["skip_steps"]
            first = max(first, step + 1)
            if first <= last:
                pos = self.loader.state_dict()["pos"]
                start, end = self.loader.step_positions(pos, step, first, last, self.grad_accum)
                self.loader.stream.skip(start, end)
                event["skipped_data"] = (start, end)
                event["skipped_steps"] = (first, last)
        event["valid_after"] = self._validate(step)
        self.recorder.log(ManualIntervention(**event, after=self.hyperparameters()))

    # ----- after a crash -------------------------------------------------------------------
    def reconcile(self, resumed_step: int, tokens: int) -> InterventionCompletedAfterRestart | None:
        """After resuming at ``resumed_step``: if the logbook's last rollback went to this
        very step, the job died between that rollback and its next checkpoint; its lowered
        factors and data skips (logged, not yet saved) are applied again. Returns the event
        that says so (for the run_start record), or None."""
        found = dist.broadcast_object(pending_rollback(self.recorder.events(), resumed_step))
        if found is None:
            return None
        before = self.hyperparameters()
        self.factors.lr_scale, self.factors.grad_clip = found.after.lr_scale, found.after.grad_clip
        for start, end in found.skipped_data:
            self.loader.stream.skip(start, end)
        # A drill fires only the first time through its step: the dead job had got that far.
        sup = self.supervisor
        sup.furthest_step = max(sup.furthest_step, found.furthest_step)
        return InterventionCompletedAfterRestart(
            step=resumed_step,
            tokens=tokens,
            from_step=found.from_step,
            before=before,
            after=self.hyperparameters(),
            skipped_data=found.skipped_data,
        )

    # ----- validation ----------------------------------------------------------------------
    def _last_validation(self) -> ValidLoss | None:
        last = self.evaluator.last if self.evaluator is not None else None
        return _valid_loss(last)

    def _validate(self, step: int) -> ValidLoss | None:
        """An evaluation of the weights as they are now, those of ``step`` (collective);
        None without a held-out set."""
        if self.evaluator is None:
            return None
        return _valid_loss(self.evaluator.evaluate(step))


def _valid_loss(evaluation: Evaluation | None) -> ValidLoss | None:
    if evaluation is None:
        return None
    return ValidLoss(step=evaluation.step, loss=evaluation.loss)


def _detail(anomaly: Anomaly | None) -> str:
    return anomaly.detail if anomaly is not None else ""
