"""The operator's control files in the run directory.

- ``STOP``: stop cleanly at the next step boundary, with a checkpoint (the kill switch);
  renamed ``STOP.consumed`` once obeyed, so that a restart trains on.
- ``INTERVENE.json``: an `opt intervene` request (LR scale, clip, data to skip), applied by
  every rank after the step it is seen at; renamed ``INTERVENE.applied.json``.

Only rank 0 looks at the files; what it sees reaches the other ranks in the step's agreed
vector (opt/train/agreement.py) and, for a request's contents, a broadcast.
"""

from __future__ import annotations

import json
from pathlib import Path

KILL_SWITCH_FILE = "STOP"
INTERVENE_FILE = "INTERVENE.json"


class ControlFiles:
    def __init__(self, run_dir: Path, lead: bool):
        self.run_dir = Path(run_dir)
        self.lead = lead

    def stop_requested(self) -> bool:
        return self.lead and (self.run_dir / KILL_SWITCH_FILE).exists()

    def intervention_waiting(self) -> bool:
        return self.lead and (self.run_dir / INTERVENE_FILE).exists()

    def take_intervention(self) -> dict | None:
        """The waiting request, marked applied (rank 0; None elsewhere). An unreadable one
        comes back as ``{"error": ...}``: it is logged, not obeyed."""
        if not self.lead:
            return None
        path = self.run_dir / INTERVENE_FILE
        try:
            request = json.loads(path.read_text())
        except (OSError, json.JSONDecodeError) as err:
            request = {"error": str(err)}
        path.rename(path.with_name("INTERVENE.applied.json"))
        return request

    def consume_stop(self) -> None:
        """The kill switch was obeyed: keep the file as a record, out of the way."""
        switch = self.run_dir / KILL_SWITCH_FILE
        if self.lead and switch.exists():
            switch.rename(switch.with_name("STOP.consumed"))
