#!/usr/bin/env bash
# The GPU path checked in one call on a lent GPU machine: the card and the versions, the
# `gpu` tests (tests/test_gpu.py), then the GPU benchmarks (bench/gpu_throughput.sh), each
# part logged under OUT_DIR, all within GPU_CHECK_BUDGET_S seconds (540 unless set: a
# device call may run 600).
#
#     bash bench/gpu_check.sh OUT_DIR [SIZE ...]  # on the GPU machine, in a copy of the repo
#
# SIZE: what bench/gpu_throughput.sh measures after the tests (125m unless given: the tests
# and 125m fit one 10-minute device call; run `bash bench/gpu_throughput.sh OUT 1.3b` and
# `... 6.7b` as calls of their own).
#     PYTHON=.venv/bin/python bash bench/gpu_check.sh --wheels [DIR]   # beforehand, here
#
# Python: $PYTHON, else python3, running the checkout through PYTHONPATH; nothing is
# installed from the repository and no venv is needed. A bare GPU machine's python3 has
# torch with CUDA, pytest, tokenizers, safetensors, tensorboard and transformers, but not
# pydantic or tomli-w, and it cannot reach a package index. `--wheels` downloads those
# (CPython 3.12, x86-64 Linux, the versions installed where it runs) into DIR (.whl unless
# given, which git ignores); carry that folder with the call and this script installs the
# wheels into a temporary folder put on PYTHONPATH (OPT_WHEELS names another folder).
#
# Writes to OUT_DIR: card.txt (date, commit, nvidia-smi's name, memory and driver, Python,
# torch, CUDA, nvidia-ml-py), tests.log (pytest's report), tests.jsonl (what each GPU test
# measured: the differences it compared), throughput.log and throughput/ (the benchmark's
# output and files), summary.txt (one line per part). A failing part does not stop the
# next one; the exit status is 0 only if every part passed.
set -u
cd "$(dirname "$0")/.." || exit 1
py=${PYTHON:-python3}

if [ "${1:-}" = --wheels ]; then
    dir=${2:-.whl}
    mkdir -p "$dir"
    # The versions installed here, so that the GPU runs what the tests run with here.
    mapfile -t wanted < <("$py" - <<'EOF'
from importlib.metadata import PackageNotFoundError, version

for name in ("pydantic", "pydantic-core", "annotated-types", "typing-inspection",
             "typing-extensions", "tomli-w"):
    try:
        print(f"{name}=={version(name)}")
    except PackageNotFoundError:
        print(name)
EOF
    )
    exec "$py" -m pip download -q --no-deps --only-binary=:all: --implementation cp \
        --python-version "${GPU_PYTHON_VERSION:-3.12}" --platform manylinux_2_28_x86_64 \
        --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 -d "$dir" "${wanted[@]}"
fi

out=${1:?usage: bash bench/gpu_check.sh OUT_DIR [SIZE ...] (or --wheels [DIR])}
shift
sizes=("$@")
[ ${#sizes[@]} -gt 0 ] || sizes=(125m)
mkdir -p "$out" && out=$(cd "$out" && pwd) || exit 1
start=$SECONDS
budget=${GPU_CHECK_BUDGET_S:-540}
tests_limit=${GPU_CHECK_TESTS_S:-240}
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 PYTHON="$py"
summary=()
failed=0
part() {  # name, exit status, what to say
    summary+=("$1: $([ "$2" -eq 0 ] && echo ok || echo "FAILED (exit $2)") - $3")
    [ "$2" -eq 0 ] || failed=1
}
cut_at() {  # exit status of `timeout`, its limit: says so when it stopped the command
    if [ "$1" -eq 124 ] || [ "$1" -eq 137 ]; then echo "stopped at $2 s: "; fi
}

# ----- Python: what the checkout imports, from the carried wheels where missing ---------------
missing() {
    "$py" -c 'import importlib.util as u, sys
print(" ".join(m for m in sys.argv[1:] if u.find_spec(m) is None))' \
        torch pydantic tomli_w tokenizers safetensors numpy tensorboard pytest 2>&1
}
lacking=$(missing)
wheels=${OPT_WHEELS:-.whl}
if [ -n "$lacking" ] && compgen -G "$wheels/*.whl" >/dev/null; then
    site=$(mktemp -d /tmp/opt-gpu-site.XXXXXX)
    "$py" -m pip install -q --no-index --no-deps --no-compile --target "$site" "$wheels"/*.whl
    export PYTHONPATH="$PYTHONPATH:$site"
    echo "installed from $wheels into $site: $(cd "$wheels" && echo *.whl)"
    lacking=$(missing)
fi
if [ -n "$lacking" ]; then
    part python 1 "$py lacks: $lacking (pydantic and tomli-w: carry the --wheels folder, see the top of this script)"
else
    part python 0 "$("$py" -c 'import sys; print(sys.executable, sys.version.split()[0])')"
fi

# ----- the card and the versions -------------------------------------------------------------
{
    echo "date: $(date -u '+%Y-%m-%d %H:%M UTC')"
    echo "commit: $(git rev-parse HEAD 2>/dev/null || echo 'unknown (no .git in this copy)')"
    nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv
    "$py" - <<'EOF'
import sys
from importlib.metadata import PackageNotFoundError, version

import torch

print("python", sys.version.split()[0], "| torch", torch.__version__, "| CUDA", torch.version.cuda,
      "| cuDNN", torch.backends.cudnn.version())
for i in range(torch.cuda.device_count()):
    print(f"cuda:{i}", torch.cuda.get_device_name(i), torch.cuda.get_device_capability(i))
try:
    print("nvidia-ml-py", version("nvidia-ml-py"))
except PackageNotFoundError:
    print("nvidia-ml-py not installed (run_stop falls back to the TDP; its test skips)")
sys.exit(0 if torch.cuda.is_available() else 3)
EOF
} >"$out/card.txt" 2>&1
card=$?
cat "$out/card.txt"
gpu=$(nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader 2>&1 | head -n 1)
part card "$card" "${gpu:-no nvidia-smi}; torch sees $(grep -c '^cuda:' "$out/card.txt") CUDA device(s)"

# ----- the gpu tests -------------------------------------------------------------------------
: >"$out/tests.jsonl"
echo "== gpu tests (at most $tests_limit s)"
OPT_GPU_RECORD="$out/tests.jsonl" timeout -k 15 "$tests_limit" \
    "$py" -m pytest -m gpu -q -rs -p no:cacheprovider tests/test_gpu.py >"$out/tests.log" 2>&1
tests=$?
tail -n 25 "$out/tests.log"
if [ "$tests" -eq 0 ] && ! tail -n 1 "$out/tests.log" | grep -q passed; then
    tests=5  # pytest's "no tests ran": all skipped is no check of the GPU path
fi
part tests "$tests" "$(cut_at "$tests" "$tests_limit")$(tail -n 1 "$out/tests.log")"

# ----- the GPU benchmarks, in what is left of the budget --------------------------------------
left=$((budget - (SECONDS - start) - 10))
if [ "$left" -lt 60 ]; then
    part throughput 1 "not run: $left s of the ${budget} s budget left"
else
    echo "== bench/gpu_throughput.sh (at most $left s)"
    timeout -k 15 "$left" bash bench/gpu_throughput.sh "$out/throughput" "${sizes[@]}" \
        >"$out/throughput.log" 2>&1
    bench=$?
    tail -n 30 "$out/throughput.log"
    part throughput "$bench" "$(cut_at "$bench" "$left")see throughput.log and throughput/"
fi

summary+=("total: $((SECONDS - start)) s of a ${budget} s budget")
echo "== summary"
printf '%s\n' "${summary[@]}" | tee "$out/summary.txt"
exit "$failed"
