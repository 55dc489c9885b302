"""The divergence supervisor: detectors, an escalation ladder, fault drills, and the
bookkeeping of each incident from first anomaly to outcome. Decisions only: no I/O, no
collectives, no tensors.

The trainer asks ``inspect`` once per step, after backward and before the optimizer
update, and carries out the moves of the returned decision (opt/train/interventions.py).
Every rank computes the same decision because every input is agreed before it is asked:
the loss and the gradient norm are reduced across ranks (every rank holds the same bits),
and the operator's files are read on rank 0 and shared in the same per-step vector.
"""

from __future__ import annotations

import dataclasses
import math
from collections import deque
from dataclasses import dataclass, field

from opt.config import SupervisorConfig
from opt.supervisor.detectors import Anomaly, Detectors
from opt.supervisor.drills import Drill
from opt.supervisor.rollback import rollback_limit

KILL_SWITCH_REASON = "kill switch"


@dataclass
class Decision:
    moves: tuple[str, ...] = ()
    anomaly: Anomaly | None = None
    rung: str = ""
    reason: str = ""
    manual: bool = False  # an operator's request is waiting (applied after this step)

    @property
    def healthy(self) -> bool:
        return not self.moves

    @property
    def drops_update(self) -> bool:
        """Every intervention drops the step's update, except the operator's clean stop."""
        return bool(self.moves) and self.reason != KILL_SWITCH_REASON


@dataclass(frozen=True)
class IncidentOutcome:
    """An incident judged ``recovery_steps`` healthy steps after its last intervention."""

    intervention_step: int
    incident_start: int
    rungs: list[str]
    pre_incident_loss: float
    result: str
    recovered: bool
    recovered_at_step: int | None
    judged_at_step: int
    verdict: str  # recovered, not_recovered, or no_harm_done (only skipped updates)
    judged_by: str  # validation loss, or training loss where the run has no held-out set
    drill: bool  # the incident was started by a fault drill


@dataclass
class Incident:
    start: int  # first anomalous step
    pre_level: float  # median healthy loss before it
    rollback_before: int = 0  # the newest step a rollback target may have
    pre_valid: float | None = None  # the last validation loss before it
    touched: bool = False  # a rung changed the weights (rollback, optimizer reset)
    last_intervention: int = 0
    healthy_steps: int = 0
    recovered_at: int | None = None
    rungs: list[str] = field(default_factory=list)
    drill: bool = False  # started by a fault drill the run injected into itself


class Supervisor:
    def __init__(self, cfg: SupervisorConfig, reference_loss: float | None = None):
        """``reference_loss``: the loss of predicting uniformly, ln(vocab size)."""
        self.cfg = cfg
        self.detectors = Detectors(cfg, reference_loss)
        self.drill = Drill.parse(cfg.drill)
        self.incident: Incident | None = None
        self.rung = 0
        self.interventions: deque[int] = deque()
        self.furthest_step = 0  # a non-repeating drill fires only the first time through
        self.rewarmup_start: int | None = None
        self.last_valid: float | None = None  # the newest held-out loss, once there is one
        self.valid_best, self.valid_best_step = math.inf, 0
        self.last_outcome: IncidentOutcome | None = None  # just judged, for the logbook
        # An incident over (recovery_steps healthy steps) whose verdict waits for the next
        # evaluation: judged on the validation loss, it needs one after the repair.
        self.pending: Incident | None = None
        self.drilled_step: int | None = None  # the last step a drill was injected into

    # ----- drills --------------------------------------------------------------------------
    def drill_at(self, step: int) -> str | None:
        """The drill to inject at ``step``, if any (deterministic on every rank)."""
        first_time = step > self.furthest_step
        self.furthest_step = max(self.furthest_step, step)
        if self.drill is None or not self.drill.covers(step):
            return None
        kind = self.drill.kind if first_time or self.drill.repeat else None
        if kind is not None:
            self.drilled_step = step  # an incident that starts here is a drill's
        return kind

    # ----- the per-step decision -----------------------------------------------------------
    def inspect(
        self, step: int, loss: float, grad_norm: float, overflow: bool, scale: float,
        at_floor: bool, stop_file: bool = False, manual_file: bool = False,
        activation_rms: float = math.nan,
    ) -> Decision:  # fmt: skip
        """The decision for ``step``: its agreed loss and gradient norm, whether its fp16
        gradients overflowed, the loss scale, whether the operator's STOP file or an
        `opt intervene` request was there, and the last block's activation RMS."""
        flags = self.detectors.flags(step, loss, grad_norm, overflow, at_floor, activation_rms)
        if stop_file:
            return Decision(("stop",), reason=KILL_SWITCH_REASON, manual=manual_file)
        if not any(flags):
            if not overflow:
                self.detectors.observe(step, loss, grad_norm, activation_rms)
            self._track_recovery(step, loss)
            return Decision(manual=manual_file)
        anomaly = self.detectors.describe(flags, loss, grad_norm, scale, activation_rms)
        return self._escalate(step, anomaly)

    def _escalate(self, step: int, anomaly: Anomaly) -> Decision:
        """The next rung of the incident ``anomaly`` starts or continues."""
        if self.incident is None and self.pending is not None:
            # A new incident before the last one's evaluation: the verdict is what is known.
            self.last_outcome, self.pending = self.outcome(step, self.pending), None
        if self.incident is None:
            level, valid = self.detectors.pre_incident_level(), self.last_valid
            before = rollback_limit(step, self.cfg)
            if anomaly.gradual:
                # A gradual divergence began where the curve was last at its best, and the
                # level to come back under is that best, not the already-risen latest value.
                before = anomaly.since
                level = min(level, self.detectors.trend_best)
                valid = self.valid_best if math.isfinite(self.valid_best) else valid
            self.incident = Incident(step, level, before, pre_valid=valid,
                                     drill=step == self.drilled_step)  # fmt: skip
        while self.interventions and self.interventions[0] <= step - self.cfg.intervention_window:
            self.interventions.popleft()
        self.interventions.append(step)
        if len(self.interventions) > self.cfg.max_interventions:
            return Decision(
                ("stop",), anomaly, "stop",
                f"more than {self.cfg.max_interventions} interventions within "
                f"{self.cfg.intervention_window} steps",
            )  # fmt: skip
        if anomaly.gradual:  # skipping one step cannot help: go to the first rollback rung
            self.rung = max(self.rung, self._first_rollback_rung())
        rung = self.cfg.ladder[min(self.rung, len(self.cfg.ladder) - 1)]
        self.rung += 1
        if "rollback" in rung:
            self.detectors.restart()
        self.incident.last_intervention = step
        self.incident.healthy_steps = 0
        self.incident.recovered_at = None
        self.incident.rungs.append(rung)
        self.incident.touched |= "rollback" in rung or "reset_optimizer" in rung
        reason = "the escalation ladder is exhausted" if rung == "stop" else ""
        return Decision(tuple(rung.split("+")), anomaly, rung, reason)

    def _track_recovery(self, step: int, loss: float) -> None:
        incident = self.incident
        if incident is None:
            return
        incident.healthy_steps += 1
        # Without a held-out set, the training loss is the only measure there is.
        by_training = incident.pre_valid is None
        if by_training and incident.recovered_at is None and loss <= incident.pre_level:
            incident.recovered_at = step
        self.last_outcome = None
        if incident.healthy_steps >= self.cfg.recovery_steps:
            # The ladder starts again at its first rung for the next incident; the verdict
            # is given now, or at the next evaluation where validation judges and the
            # repair has not yet been seen to work.
            self.incident, self.rung = None, 0
            if by_training or incident.recovered_at is not None or not incident.touched:
                self.last_outcome = self.outcome(step, incident)
            else:
                self.pending = incident

    def outcome(self, step: int, incident: Incident) -> IncidentOutcome:
        """The incident's verdict. Only an intervention that changed the weights can have
        repaired anything: skipped updates that never touched them are "no harm done"."""
        by_valid = incident.pre_valid is not None
        level = incident.pre_valid if by_valid else incident.pre_level
        judged_by = "validation loss" if by_valid else "training loss (no held-out set)"
        recovered = incident.touched and incident.recovered_at is not None
        if not incident.touched:
            verdict = "no_harm_done"
            result = (
                "no harm done: the anomalous updates were skipped before they touched the "
                f"weights, and {incident.healthy_steps} healthy steps followed"
            )
        elif recovered:
            verdict = "recovered"
            result = (
                f"recovered: the {judged_by} came back under its pre-incident level "
                f"{level:.4f} at step {incident.recovered_at}, after the rollback"
            )
        else:
            verdict = "not_recovered"
            result = (
                f"not recovered: the {judged_by} is still above its pre-incident level "
                f"{level:.4f} after {incident.healthy_steps} healthy steps"
            )
        return IncidentOutcome(
            intervention_step=incident.last_intervention,
            incident_start=incident.start,
            rungs=list(incident.rungs),
            pre_incident_loss=level,
            result=result,
            recovered=recovered,
            recovered_at_step=incident.recovered_at if recovered else None,
            judged_at_step=step,
            verdict=verdict,
            judged_by=judged_by,
            drill=incident.drill,
        )

    # ----- validation ----------------------------------------------------------------------
    def validated(self, step: int, val_loss: float) -> Decision:
        """The held-out loss of an evaluation after ``step``: judges an incident's recovery,
        and is itself a detector (a regression from its best by ``valid_rise``)."""
        for incident in (self.incident, self.pending):
            judging = incident is not None and incident.touched and incident.recovered_at is None
            if judging and incident.pre_valid is not None and val_loss <= incident.pre_valid:
                incident.recovered_at = step
        if self.pending is not None:  # its verdict, on the first evaluation after it ended
            self.last_outcome, self.pending = self.outcome(step, self.pending), None
        rise = self.cfg.valid_rise
        regressed = rise > 0 and math.isfinite(self.valid_best) and (
            not math.isfinite(val_loss) or val_loss > self.valid_best * (1 + rise)
        )  # fmt: skip
        if regressed:
            numbers = {"val_loss": val_loss, "val_best": self.valid_best,
                       "val_best_step": self.valid_best_step}  # fmt: skip
            return self._escalate(step, Anomaly("validation_regression", numbers,
                                                since=self.valid_best_step))  # fmt: skip
        self.last_valid = val_loss
        if val_loss < self.valid_best:
            self.valid_best, self.valid_best_step = val_loss, step
        return Decision()

    def best_steps(self) -> set[int]:
        """Where the training curve's trend and the validation loss were last at their best:
        a gradual divergence rolls back to these, so retention keeps a checkpoint for each."""
        steps = {self.valid_best_step} if math.isfinite(self.valid_best) else set()
        if math.isfinite(self.detectors.trend_best):
            steps.add(self.detectors.trend_best_step)
        return steps

    def pop_outcome(self) -> IncidentOutcome | None:
        outcome, self.last_outcome = self.last_outcome, None
        return outcome

    def _first_rollback_rung(self) -> int:
        ladder = self.cfg.ladder
        return next((i for i, rung in enumerate(ladder) if "rollback" in rung), len(ladder) - 1)

    def rollback_limit(self) -> int:
        """Newest step a rollback target may have: before the incident, with a margin (or,
        for a gradual divergence, where the curve was last at its best)."""
        return self.incident.rollback_before if self.incident else 0

    def lr_multiplier(self, step: int) -> float:
        """Linear re-warmup after an optimizer reset."""
        if self.rewarmup_start is None:
            return 1.0
        progress = (step - self.rewarmup_start) / self.cfg.rewarmup_steps
        if progress >= 1.0:
            self.rewarmup_start = None
            return 1.0
        return max(progress, 0.0)

    # ----- state (checkpointed with the trainer's) ------------------------------------------
    def state_dict(self) -> dict:
        # Plain dicts, lists and None: all that torch.load(weights_only=True) reads back.
        return {
            "detectors": self.detectors.state_dict(),
            "incident": dataclasses.asdict(self.incident) if self.incident else None,
            "rung": self.rung,
            "interventions": list(self.interventions),
            "furthest_step": self.furthest_step,
            "rewarmup_start": self.rewarmup_start,
            "last_valid": self.last_valid,
            "valid_best": self.valid_best,
            "valid_best_step": self.valid_best_step,
            "pending": dataclasses.asdict(self.pending) if self.pending else None,
        }

    def load_state_dict(self, state: dict) -> None:
        self.detectors.load_state_dict(state["detectors"])
        incident = state["incident"]
        if incident is not None and "rollback_before" not in incident:  # an older checkpoint
            incident = {**incident, "rollback_before": rollback_limit(incident["start"], self.cfg)}
        if incident is not None and "touched" not in incident:
            incident = {**incident, "touched": any("rollback" in r for r in incident["rungs"])}
        self.incident = Incident(**incident) if incident else None
        self.rung = int(state["rung"])
        self.interventions = deque(state["interventions"])
        self.furthest_step = int(state["furthest_step"])
        self.rewarmup_start = state["rewarmup_start"]
        # Checkpoints from before validation was in the loop have none of it.
        self.last_valid = state.get("last_valid")
        self.valid_best = float(state.get("valid_best", math.inf))
        self.valid_best_step = int(state.get("valid_best_step", 0))
        pending = state.get("pending")
        self.pending = Incident(**pending) if pending else None
