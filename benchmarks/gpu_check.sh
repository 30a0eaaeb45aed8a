#!/usr/bin/env bash
# The GPU check in one command, for one CUDA GPU (about 6 minutes on an H100/H200-class card):
#   1. the paper authors' gradients with model and data on the GPU (unstreamed and streamed spike pass);
#   2. the end-to-end ResNet-18 step (batch 128): rate-based vs our BPTT vs SpikingJelly's BPTT, T 4/8/16/32,
#      time and allocator peak (benchmarks/bench_gpu_step.py);
#   3. the Triton kernels' tests against their reference, on the GPU;
#   4. the kernel benchmark: bytes moved / time against the device's bandwidth, against SpikingJelly's
#      multi-step LIF (benchmarks/bench_kernels.py).
# Writes one JSON, gpu_check.json, into the folder given (default gpu-check/), with each part's log beside
# it. A part that fails or runs out of its time is recorded as such; the others still run.
#
#   benchmarks/gpu_check.sh [out_dir]           # PYTHON=... to choose the interpreter
set -uo pipefail
cd "$(dirname "$0")/.."
OUT_DIR=${1:-gpu-check}
PY=${PYTHON:-python3}
mkdir -p "$OUT_DIR"
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
unset TRITON_INTERPRET

part() {      # part NAME SECONDS COMMAND...: run, log, record the exit status
    local name=$1 limit=$2
    shift 2
    local start=$SECONDS
    echo "== $name (limit ${limit}s)"
    timeout --kill-after=10 "$limit" "$@" >"$OUT_DIR/$name.log" 2>&1
    local rc=$?
    echo "{\"rc\": $rc, \"seconds\": $((SECONDS - start))}" >"$OUT_DIR/$name.status"
    tail -n 25 "$OUT_DIR/$name.log"
    echo "== $name: exit $rc after $((SECONDS - start))s"
}

"$PY" -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 'gpu_check.sh: no CUDA GPU visible')" || exit 1
PARALLEL=()      # pytest-xdist, when installed: the kernel tests compile many Triton variants
"$PY" -c "import xdist" 2>/dev/null && PARALLEL=(-n 8)
PYTEST=("$PY" -m pytest -q -p no:cacheprovider --maxfail=20 "${PARALLEL[@]}")
part fixture_tests 90 "${PYTEST[@]}" --junitxml="$OUT_DIR/fixture_tests.xml" tests/test_reference_fixtures.py -k cuda
part step 200 "$PY" benchmarks/bench_gpu_step.py --T 4 8 16 32 --batch-size 128 --width 64 \
    --json "$OUT_DIR/step.json"
part kernel_tests 120 "${PYTEST[@]}" --junitxml="$OUT_DIR/kernel_tests.xml" tests/kernels
part kernels 80 "$PY" benchmarks/bench_kernels.py --T 8 16 32 64 --N 20 24 --dtype float32 float16 --reps 10 \
    --json "$OUT_DIR/kernels.json"
"$PY" benchmarks/gpu_check_report.py "$OUT_DIR"
