#!/usr/bin/env bash
# One command for a GPU machine lent for a few minutes: the GPU tests, then the attention,
# decode, quantized-linear and elementwise benchmarks, each under its own time limit (about
# 7 minutes in all on one H100), and one markdown summary.
#
#   bash benchmarks/gpu_suite.sh [OUT_DIR]        (default: $OUT if set, else gpu_suite_out)
#
# Runs from the repository root with the machine's own python3 and packages (PYTHONPATH=.,
# nothing installed; the GPU image has torch 2.11 and triton 3.6). SmolLM2's GGUF is not
# needed: decode uses a random-weight model of SmolLM2's shapes (speed does not depend on
# the weights' values). A step that fails or runs out of time is recorded and the suite
# goes on. Steps: FXFORGE_GPU_STEPS="tests attention decode decode_fp32 quant_linear elementwise launches serving".
set -uo pipefail
cd "$(dirname "$0")/.."
OUT_DIR=${1:-${OUT:-gpu_suite_out}}
mkdir -p "$OUT_DIR"
PY=${PYTHON:-python3}
export PYTHONPATH=.${PYTHONPATH:+:$PYTHONPATH} PYTHONUNBUFFERED=1
STEPS=${FXFORGE_GPU_STEPS:-"tests attention decode decode_fp32 quant_linear elementwise launches serving"}
STATUS="$OUT_DIR/steps.tsv"
: > "$STATUS"

run_step() {  # name, time limit (s), command...
    local name=$1 limit=$2
    shift 2
    case " $STEPS " in *" $name "*) ;; *) return ;; esac
    echo "== $name (limit ${limit}s): $*"
    local t0=$(date +%s)
    timeout "$limit" "$@" > "$OUT_DIR/$name.log" 2>&1
    local rc=$? t1=$(date +%s)
    tail -n 25 "$OUT_DIR/$name.log"
    printf '%s\t%s\t%s\t%s\n' "$name" "$rc" "$((t1 - t0))" "$*" >> "$STATUS"
}

$PY - <<'PY' > "$OUT_DIR/device.txt" 2>&1
import torch, triton, platform
print(f"device: {torch.cuda.get_device_name() if torch.cuda.is_available() else 'NO CUDA GPU'}")
print(f"torch {torch.__version__}, triton {triton.__version__}, python {platform.python_version()}")
PY
cat "$OUT_DIR/device.txt"

# the GPU machine has 16 cores: compile the kernel tests' specializations in parallel where
# pytest-xdist is installed; no -x, so one run lists every failure
PARALLEL=$($PY -c "import xdist" 2>/dev/null && echo "-n ${FXFORGE_GPU_TEST_WORKERS:-16}")
TIMEOUT=$($PY -c "import pytest_timeout" 2>/dev/null && echo "--timeout 120")
# FXFORGE_GPU_TESTS narrows the test step (e.g. to rerun what failed); default: all GPU tests.
# -v prints each test's result as it ends, so a run cut short by its limit still names its failures.
run_step tests "${FXFORGE_GPU_TESTS_LIMIT:-170}" env FXFORGE_TEST_DEVICE=cuda $PY -m pytest -v -rfE --tb=short \
    -p no:cacheprovider $PARALLEL $TIMEOUT ${FXFORGE_GPU_TESTS:-tests/kernels tests/test_gpu_e2e.py}
if [ -f "$OUT_DIR/tests.log" ]; then
    grep -oE "(PASSED|FAILED|ERROR|SKIPPED) tests/[^ ]*" "$OUT_DIR/tests.log" | sort | uniq > "$OUT_DIR/test_results.txt"
    echo "tests: $(grep -c ^PASSED "$OUT_DIR/test_results.txt") passed, $(grep -cE '^(FAILED|ERROR)' "$OUT_DIR/test_results.txt") failed"
    grep -E "^(FAILED|ERROR)" "$OUT_DIR/test_results.txt"
fi
run_step attention 80 $PY benchmarks/attention.py --quick --out "$OUT_DIR/attention.json"
# FXFORGE_GPU_DECODE_ARGS / FXFORGE_GPU_QUANT_ARGS / FXFORGE_GPU_SERVING_ARGS / FXFORGE_GPU_STEP_LIMIT_<STEP>: shorter runs for a
# short device budget (defaults: the full figures)
run_step decode "${FXFORGE_GPU_STEP_LIMIT_DECODE:-170}" $PY benchmarks/decode.py --model smollm2-random --dtype bfloat16 \
    ${FXFORGE_GPU_DECODE_ARGS:---tokens 64 --contexts 32,1024 --compile} --out "$OUT_DIR/decode.json"
run_step decode_fp32 60 $PY benchmarks/decode.py --model smollm2-random --dtype float32 --tokens 32 --contexts 32 --repeat 2 --out "$OUT_DIR/decode_fp32.json"
run_step quant_linear "${FXFORGE_GPU_STEP_LIMIT_QUANT_LINEAR:-70}" $PY benchmarks/quant_linear.py --no-torchao \
    ${FXFORGE_GPU_QUANT_ARGS:---rep 25 --shapes 2048x2048,2048x5632} --out "$OUT_DIR/quant_linear.json"
run_step elementwise 45 $PY benchmarks/elementwise.py --quick --out "$OUT_DIR/elementwise.json"
run_step launches 40 $PY benchmarks/decode_launches.py
run_step serving "${FXFORGE_GPU_STEP_LIMIT_SERVING:-120}" $PY benchmarks/serving.py --model smollm2-random --device auto \
    --dtype bfloat16 ${FXFORGE_GPU_SERVING_ARGS:---requests 16 --skip-alone} --out "$OUT_DIR/serving.json"

$PY benchmarks/gpu_suite_report.py "$OUT_DIR" > "$OUT_DIR/summary.md"
echo "== summary: $OUT_DIR/summary.md"
cat "$OUT_DIR/summary.md"
