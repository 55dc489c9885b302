"""The divergence supervisor: detectors, the escalation ladder, drills and rollback planning.
Decisions only; the trainer carries them out (opt/train/interventions.py)."""
