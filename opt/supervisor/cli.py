"""Compatibility shim: `opt logbook` moved to ``opt.run.logbook.cli`` and `opt intervene` to
``opt.run.intervene``. Only ``INTERVENE_FILE`` is left here, for the trainer's imports until
they point at ``opt.run.intervene``; delete this file then."""

from opt.run.intervene import INTERVENE_FILE

__all__ = ["INTERVENE_FILE"]
