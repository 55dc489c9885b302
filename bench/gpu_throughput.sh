#!/usr/bin/env bash
# The GPU throughput rows on one GPU: for each size, one call of bench/train_throughput.py
# with four rows on the same card, in bf16: ours with `train.compile` on and off, and
# transformers' OPTForCausalLM with `torch.compile` of the whole model and without (eager).
# Each side runs alone on the card; each records its peak GPU memory.
#
#     bash bench/gpu_throughput.sh OUT_DIR [SIZE ...]    # SIZE among smoke, 125m, 1.3b, 6.7b
#     bash bench/gpu_throughput.sh OUT_DIR               # 125m and 1.3b: one device call
#     bash bench/gpu_throughput.sh OUT_DIR 6.7b          # fills a device call by itself
#
# Each size has a time limit that keeps one device call under 10 minutes: 125m and 1.3b
# together, or 6.7b alone (its two builds of ours took 95 s each before, the compiled one
# 14 s more for its first step; HF is built once and compiled in place after its eager
# steps). A side that runs out of memory or fails to compile is a row saying so; a size
# that runs out of time keeps the rows measured so far (the section is rewritten after each
# side, marked incomplete). `smoke` is a 2-layer run of all four sides (about 2 minutes).
#
# Needs $PYTHON (python3 unless set) with torch (CUDA) and transformers; runs the checkout via PYTHONPATH, so
# nothing is installed. Writes OUT_DIR/BENCHMARKS.md (a copy of ours with the GPU sections
# added or replaced), one log per size and env.txt.
set -u
py=${PYTHON:-python3}
out=${1:?usage: bash bench/gpu_throughput.sh OUT_DIR [SIZE ...]}
shift
sizes=("$@")
[ ${#sizes[@]} -gt 0 ] || sizes=(125m 1.3b)
mkdir -p "$out"
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
cp BENCHMARKS.md "$out/BENCHMARKS.md"
{
    nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.max.sm --format=csv
    "$py" -c 'import sys, torch, transformers; print(sys.version.split()[0], torch.__version__, transformers.__version__)'
    nproc
} >"$out/env.txt" 2>&1
cat "$out/env.txt"

run() {  # name, time limit in seconds, then train_throughput.py's arguments
    local name=$1 limit=$2
    shift 2
    local start=$SECONDS
    timeout --kill-after=15 "$limit" "$py" bench/train_throughput.py --device cuda \
        --dtypes bf16 --ours on,off --hf eager,compile "$@" >"$out/$name.log" 2>&1
    local rc=$?
    echo "== $name: exit $rc after $((SECONDS - start)) s"
    grep -E '^\| bf16|failed|still allocated' "$out/$name.log" | tail -n 12
    return $rc
}

status=0
for size in "${sizes[@]}"; do
    case $size in
    smoke) run smoke 150 --quick || status=1 ;;
    125m)
        run opt-125m 240 --model opt-125m --seq-len 2048 --batch 8 --warmup 3 --steps 10 \
            --write "$out/BENCHMARKS.md" || status=1
        ;;
    1.3b)
        run opt-1.3b 330 --model opt-1.3b --seq-len 2048 --batch 8 --warmup 3 --steps 10 \
            --write "$out/BENCHMARKS.md" || status=1
        ;;
    6.7b)
        # 16 bytes a parameter of fp32 weights, gradients and AdamW state (107 GB) need the
        # H200's memory; full recompute leaves room for the activations of 2 sequences.
        run opt-6.7b 570 --model opt-6.7b --seq-len 2048 --batch 2 --warmup 2 --steps 5 \
            --set 'parallel.activation_checkpoint="full"' --write "$out/BENCHMARKS.md" || status=1
        ;;
    *)
        echo "unknown size $size (smoke, 125m, 1.3b, 6.7b)"
        status=2
        ;;
    esac
done
exit $status
