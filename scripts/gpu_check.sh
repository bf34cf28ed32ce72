#!/usr/bin/env bash
# The GPU check: everything CPU CI cannot run, on one NVIDIA GPU, within one 10-minute call.
#
# Usage, from the repository root on the GPU machine:
#     bash scripts/gpu_check.sh                 # or: OUT=/tmp/out BUDGET=560 bash scripts/gpu_check.sh
#
# Steps, each with its own time limit (cut to what is left of BUDGET seconds, 560 by default so that
# installing and the summary fit in 10 minutes); a failing step does not stop the next:
#   0. install the package over the machine's torch (pip install --no-deps --no-build-isolation -e .:
#      backends/ and configs/ import as dsv3.backends and dsv3.configs only once installed)
#   1. the GPU tests: python -m pytest -m gpu
#   2. dsv3 conformance --backend cuda --quick (every op x precision against the reference backend)
#   3. dsv3 bench gemm --quick, then dsv3 bench decode and dsv3 bench prefill (DeepSeek-V3 layer
#      dimensions, as many layers as fit)
#   4. a summary: the GPU, each step's exit status and time, and the lines that matter
# Logs and JSON go to $OUT (default ./out_gpu_check); docs/results and ci/results take the JSON.
set -uo pipefail
export PYTHONUNBUFFERED=1
export OUT=${OUT:-$PWD/out_gpu_check}
BUDGET=${BUDGET:-560}
mkdir -p "$OUT"
: > "$OUT/steps.txt"

# step NAME LIMIT_SECONDS COMMAND...: run COMMAND with a time limit, output in $OUT/NAME.log, its tail shown.
step() {
  local name=$1 limit=$2
  shift 2
  local left=$((BUDGET - SECONDS))
  if ((limit > left)); then limit=$left; fi
  if ((limit < 10)); then
    echo "$name: skipped (budget spent)" | tee -a "$OUT/steps.txt"
    return
  fi
  echo "== $name (limit ${limit}s): $*"
  local start=$SECONDS
  timeout -k 5 "$limit" "$@" > "$OUT/$name.log" 2>&1
  local rc=$?
  local why=""
  if ((rc == 124 || rc == 137)); then why=" (time limit)"; fi
  echo "$name: exit $rc$why after $((SECONDS - start))s" | tee -a "$OUT/steps.txt"
  tail -n 12 "$OUT/$name.log"
}

step install 60 python3 -m pip install -q --no-deps --no-build-isolation -e .
nvidia-smi --query-gpu=name,memory.total,memory.used,clocks.max.sm --format=csv > "$OUT/gpu.txt" 2>&1
python3 -c "import torch, triton; print('torch', torch.__version__, 'cuda', torch.version.cuda, 'triton', triton.__version__)" \
  >> "$OUT/gpu.txt" 2>&1
python3 -m dsv3 doctor >> "$OUT/gpu.txt" 2>&1

step tests 180 python3 -m pytest -q -p no:cacheprovider -m gpu
step conformance 150 python3 -m dsv3 conformance --backend cuda --quick --quiet --json "$OUT/conformance_cuda.json"
step bench_gemm 50 python3 -m dsv3 bench gemm --quick --json "$OUT/bench_gemm.json"
step bench_decode 160 python3 -m dsv3 bench decode --json "$OUT/bench_decode.json"
step bench_prefill 50 python3 -m dsv3 bench prefill --json "$OUT/bench_prefill.json"

echo
echo "================ summary ($SECONDS s) ================"
cat "$OUT/gpu.txt"
cat "$OUT/steps.txt"
echo "tests:       $(grep -E ' in [0-9.]+s' "$OUT/tests.log" 2>/dev/null | tail -n 1)"
echo "conformance: $(grep -E '^summary:' "$OUT/conformance.log" 2>/dev/null | tail -n 1)"
echo "gemm:        $(grep -E 'copy .* GB/s' "$OUT/bench_gemm.log" 2>/dev/null | head -n 1)"
echo "decode:      $(grep -iE 'floor|target' "$OUT/bench_decode.log" 2>/dev/null | tail -n 3)"
echo "prefill:     $(grep -iE 'floor|target' "$OUT/bench_prefill.log" 2>/dev/null | tail -n 2)"
