#!/usr/bin/env bash
# The final GPU round on one H100, in one call of at most 10 minutes:
#   1. the CUDA tests (backend, MLA kernels, decode graphs, end-to-end bench smoke), marker gpu
#   2. dsv3 conformance --backend cuda --quick
#   3. dsv3 bench gemm --quick
#   4. dsv3 bench decode and dsv3 bench prefill (DeepSeek-V3 layer dimensions, as many layers as fit)
#   5. a short summary of all of it
# Usage (repository root, on the GPU machine): bash scripts/gpu_round_final.sh
# Logs and JSON go to $OUT (default ./out_final). Every step has its own time limit (cut to what is
# left of BUDGET seconds, 560 by default) and a failing step does not stop the next.
set -uo pipefail
export PYTHONPATH=$PWD PYTHONUNBUFFERED=1
export OUT=${OUT:-$PWD/out_final}
BUDGET=${BUDGET:-560}
mkdir -p "$OUT"
: > "$OUT/steps.txt"

nvidia-smi --query-gpu=name,memory.total,memory.used,clocks.max.sm --format=csv 2>&1 | tee "$OUT/gpu.txt"
python3 -c "import torch, triton; print('torch', torch.__version__, 'cuda', torch.version.cuda, 'triton', triton.__version__)" \
  2>&1 | tee -a "$OUT/gpu.txt"

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

step tests 180 python3 -m pytest -q -p no:cacheprovider -m gpu tests/*/test_cuda_backend.py tests/*/test_routing_kernel.py \
  tests/*/test_mla_kernels.py tests/*/test_decode_graphs.py tests/test_e2e_bench.py
step conformance 150 python3 -m dsv3 conformance --backend cuda --quick --quiet --json "$OUT/conformance_cuda.json"
step bench_gemm 50 python3 -m dsv3 bench gemm --quick --json "$OUT/bench_gemm.json"
step bench_decode 160 python3 -m dsv3 bench decode --json "$OUT/bench_decode.json"
step bench_prefill 50 python3 -m dsv3 bench prefill --json "$OUT/bench_prefill.json"

echo
echo "================ summary ($(date -u '+%Y-%m-%d %H:%M UTC'), $SECONDS s) ================"
cat "$OUT/gpu.txt"
cat "$OUT/steps.txt"
echo "tests:       $(grep -E ' in [0-9.]+s' "$OUT/tests.log" 2>/dev/null | tail -n 1)"
echo "conformance: $(grep -E '^summary:' "$OUT/conformance.log" 2>/dev/null | tail -n 1)"
echo "gemm:        $(grep -E 'copy .* GB/s' "$OUT/bench_gemm.log" 2>/dev/null | head -n 1)"
timeout 30 python3 -m dsv3.bench.e2e "$OUT/bench_decode.json" "$OUT/bench_prefill.json"
