#!/usr/bin/env bash
# OPT-175B at OPT's own scale: 124 nodes x 8 A100 80GB = 992 GPUs, Megatron tensor
# parallelism within each node (tp=8, configs/opt-175b.toml) and FSDP across the 124 nodes.
# 992 sequences of 2048 tokens per step (2,031,616 tokens; OPT's 2M-token batch rounded to
# what 124 data-parallel ranks divide): micro-batch 1 x 8 accumulation steps per rank.
#
# The warning signal comes 10 minutes before the limit, enough for a step and a
# synchronous save of the ~2.1 TB checkpoint (fp32 weights + AdamW) on a parallel file
# system. OPT-175B replaced over 100 hosts in two months, hence the generous failure
# budget; a node that fails twice is excluded from later allocations.
set -euo pipefail
PYTHON=${PYTHON:-.venv/bin/python}
exec "$PYTHON" -m opt launch slurm configs/opt-175b.toml \
  --nodes 124 --gpus-per-node 8 \
  --time-minutes 4320 \
  --train.batch_tokens 2031616 \
  --slurm.cpus_per_task 12 --slurm.mem 0 \
  --slurm.sbatch '["exclusive", "constraint=a100-80gb"]' \
  --slurm.signal_delay_s 600 \
  --slurm.max_failure_requeues 200 --slurm.exclude_after_failures 2 \
  "$@"
