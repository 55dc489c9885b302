"""The divergence supervisor: detectors agreed across ranks, an escalation ladder, fault
drills, and the bookkeeping of each incident from first anomaly to outcome.

The trainer asks ``inspect`` once per step, after backward and before the optimizer
update, and carries out the moves of the returned decision (see Trainer.intervene). Every
rank computes the same decision: the inputs (loss, grad norm) are already global, and the
detector flags are agreed by one all-reduce (MAX) per step anyway, so a value that rounds
differently on one rank cannot split the job.
"""

from __future__ import annotations

import dataclasses
from collections import deque
from dataclasses import dataclass, field

import torch
import torch.distributed as dist

from opt.config import DRILL, SupervisorConfig
from opt.supervisor.detectors import NAMES, Anomaly, Detectors

KILL_SWITCH = len(NAMES)  # index of the operator's stop flag in the agreed vector
MANUAL = KILL_SWITCH + 1  # index of "an `opt intervene` request is waiting"
KILL_SWITCH_REASON = "kill switch"
KILL_SWITCH_FILE = "STOP"  # in the run directory: stop cleanly at the next step


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
class Drill:
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


@dataclass
class Incident:
    start: int  # first anomalous step
    pre_level: float  # median healthy loss before it
    last_intervention: int = 0
    healthy_steps: int = 0
    recovered_at: int | None = None
    rungs: list[str] = field(default_factory=list)


class Supervisor:
    def __init__(self, cfg: SupervisorConfig, device: torch.device | None = None):
        self.cfg = cfg
        self.device = device or torch.device("cpu")
        self.detectors = Detectors(cfg)
        self.drill = Drill.parse(cfg.drill)
        self.incident: Incident | None = None
        self.rung = 0
        self.interventions: deque[int] = deque()
        self.furthest_step = 0  # a non-repeating drill fires only the first time through
        self.rewarmup_start: int | None = None
        self.last_outcome: dict | None = None  # an incident just judged, for the logbook

    # ----- drills --------------------------------------------------------------------------
    def drill_at(self, step: int) -> str | None:
        """The drill to inject at ``step``, if any (deterministic on every rank)."""
        first_time = step > self.furthest_step
        self.furthest_step = max(self.furthest_step, step)
        d = self.drill
        if d is None or not d.step <= step < d.step + d.length:
            return None
        return d.kind if first_time or d.repeat else None

    # ----- the per-step decision -----------------------------------------------------------
    def inspect(
        self, step: int, loss: float, grad_norm: float, overflow: bool, scale: float,
        at_floor: bool, stop_file: bool = False, manual_file: bool = False,
    ) -> Decision:  # fmt: skip
        flags = self.detectors.flags(step, loss, grad_norm, overflow, at_floor)
        flags = _agree([*flags, float(stop_file), float(manual_file)], self.device)
        manual = flags[MANUAL] > 0
        if flags[KILL_SWITCH] > 0:
            return Decision(("stop",), reason=KILL_SWITCH_REASON, manual=manual)
        if not any(flags[:KILL_SWITCH]):
            if not overflow:
                self.detectors.observe(loss, grad_norm)
            self._track_recovery(step, loss)
            return Decision(manual=manual)
        anomaly = self.detectors.describe(flags[:KILL_SWITCH], loss, grad_norm, scale)
        if self.incident is None:
            self.incident = Incident(step, self.detectors.pre_incident_level())
        while self.interventions and self.interventions[0] <= step - self.cfg.intervention_window:
            self.interventions.popleft()
        self.interventions.append(step)
        if len(self.interventions) > self.cfg.max_interventions:
            return Decision(
                ("stop",), anomaly, "stop",
                f"more than {self.cfg.max_interventions} interventions within "
                f"{self.cfg.intervention_window} steps",
            )  # fmt: skip
        rung = self.cfg.ladder[min(self.rung, len(self.cfg.ladder) - 1)]
        self.rung += 1
        self.incident.last_intervention = step
        self.incident.healthy_steps = 0
        self.incident.recovered_at = None
        self.incident.rungs.append(rung)
        reason = "the escalation ladder is exhausted" if rung == "stop" else ""
        return Decision(tuple(rung.split("+")), anomaly, rung, reason)

    def _track_recovery(self, step: int, loss: float) -> None:
        incident = self.incident
        if incident is None:
            return
        incident.healthy_steps += 1
        if incident.recovered_at is None and loss <= incident.pre_level:
            incident.recovered_at = step
        self.last_outcome = None
        if incident.healthy_steps >= self.cfg.recovery_steps:
            self.last_outcome = self.outcome(step)
            self.incident, self.rung = None, 0

    def outcome(self, step: int) -> dict:
        incident = self.incident
        recovered = incident.recovered_at is not None
        return {
            "intervention_step": incident.last_intervention,
            "incident_start": incident.start,
            "rungs": incident.rungs,
            "pre_incident_loss": incident.pre_level,
            "result": (
                f"recovered: loss back under the pre-incident level {incident.pre_level:.4f} "
                f"at step {incident.recovered_at}"
                if recovered
                else f"not recovered: loss still above {incident.pre_level:.4f} after "
                f"{incident.healthy_steps} healthy steps"
            ),
            "recovered": recovered,
            "recovered_at_step": incident.recovered_at,
            "judged_at_step": step,
        }

    def pop_outcome(self) -> dict | None:
        outcome, self.last_outcome = self.last_outcome, None
        return outcome

    def rollback_limit(self) -> int:
        """Newest step a rollback target may have: before the incident, with a margin."""
        start = self.incident.start if self.incident else 0
        return start - self.cfg.healthy_margin

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
        }

    def load_state_dict(self, state: dict) -> None:
        self.detectors.load_state_dict(state["detectors"])
        self.incident = Incident(**state["incident"]) if state["incident"] else None
        self.rung = int(state["rung"])
        self.interventions = deque(state["interventions"])
        self.furthest_step = int(state["furthest_step"])
        self.rewarmup_start = state["rewarmup_start"]


def _agree(flags: list[float], device: torch.device) -> list[float]:
    """One all-reduce (MAX) of the step's flags: a detector that fires anywhere fires everywhere."""
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return flags
    tensor = torch.tensor(flags, dtype=torch.float32, device=device)
    dist.all_reduce(tensor, op=dist.ReduceOp.MAX)
    return [float(x) for x in tensor]
