"""Launchers that start `opt train` on many processes: locally, and (later) on Slurm."""
