"""Everything about a run that is not training: its status file, the operator's control
files, the scheduler's stop signal, energy, and the public logbook."""
