#!/usr/bin/env bash
# OPT-125M on one node of 8 GPUs (FSDP over the 8 ranks: dp_shard takes the whole world).
# 0.5M tokens per step = 8 ranks x micro-batch 8 x 2048 tokens x 4 accumulation steps.
# Run from the repository root; extra arguments are passed on (e.g. --dry-run, or
# --slurm.partition/--slurm.account for your cluster).
set -euo pipefail
PYTHON=${PYTHON:-.venv/bin/python}
exec "$PYTHON" -m opt launch slurm configs/opt-125m.toml \
  --nodes 1 --gpus-per-node 8 \
  --time-minutes 1440 \
  --slurm.cpus_per_task 8 --slurm.mem 0 \
  --slurm.signal_delay_s 180 \
  "$@"
