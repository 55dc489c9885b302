#!/usr/bin/env bash
# Issue 7's GPU rows on one GPU, in one call: opt-1.3b, opt-125m and opt-6.7b in bf16, each
# side by side with transformers' OPTForCausalLM (bench/train_throughput.py --device cuda).
#
#     bash bench/gpu_throughput.sh OUT_DIR
#
# Needs python3 with torch (CUDA) and transformers; runs the checkout via PYTHONPATH, so
# nothing is installed. Writes OUT_DIR/BENCHMARKS.md (a copy of ours with the GPU sections
# added or replaced), one log per run and env.txt. A 2-layer smoke run goes first: if it
# fails with torch.compile and passes without, the sizes run without it and say so.
set -u
out=${1:?usage: bash bench/gpu_throughput.sh OUT_DIR}
mkdir -p "$out"
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
cp BENCHMARKS.md "$out/BENCHMARKS.md"
{
    nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.max.sm --format=csv
    python3 -c 'import sys, torch, transformers; print(sys.version.split()[0], torch.__version__, transformers.__version__)'
    nproc
} >"$out/env.txt" 2>&1
cat "$out/env.txt"

extra=()
run() {  # name, time limit in seconds, then train_throughput.py's arguments
    local name=$1 limit=$2
    shift 2
    local start=$SECONDS
    timeout "$limit" python3 bench/train_throughput.py --device cuda --dtypes bf16 "$@" \
        "${extra[@]}" >"$out/$name.log" 2>&1
    local rc=$?
    echo "== $name: exit $rc after $((SECONDS - start)) s"
    tail -n 6 "$out/$name.log"
    return $rc
}

if ! run smoke 150 --quick; then
    extra=(--set 'train.compile="off"')
    run smoke-nocompile 120 --quick || exit 1
    echo "== torch.compile failed in the smoke run: the sizes below run with compile off"
fi
run opt-1.3b 240 --model opt-1.3b --seq-len 2048 --batch 8 --warmup 3 --steps 10 --write "$out/BENCHMARKS.md"
run opt-125m 150 --model opt-125m --seq-len 2048 --batch 8 --warmup 3 --steps 10 --write "$out/BENCHMARKS.md"
# 16 bytes a parameter of fp32 weights, gradients and AdamW state (107 GB) need the
# H200's memory; full recompute leaves room for the activations of 2 sequences.
run opt-6.7b 420 --model opt-6.7b --seq-len 2048 --batch 2 --warmup 2 --steps 5 \
    --set 'parallel.activation_checkpoint="full"' --write "$out/BENCHMARKS.md"
