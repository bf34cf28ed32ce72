#!/usr/bin/env bash
# One GPU round for the CUDA backend's GEMM/MoE work: environment, tests, a config sweep, the benchmark.
# Run from the repository root on the GPU machine: bash scripts/gpu_round_gemm.sh [tests|bench|sweep|final|all]
# (final = tests + bench).
# Logs and JSON go to $OUT (or ./gpu_out when OUT is unset).
set -uo pipefail
OUT=${OUT:-gpu_out}
mkdir -p "$OUT"
export PYTHONPATH=$PWD PYTHONUNBUFFERED=1
what=${1:-all}

python3 - <<'PY' 2>&1 | tee "$OUT/env.log"
import importlib, torch
for name in ("triton", "tqdm", "yaml", "safetensors", "tokenizers"):
    try:
        m = importlib.import_module(name); print(name, getattr(m, "__version__", "ok"))
    except Exception as e:
        print(name, "MISSING", e)
print("torch", torch.__version__, torch.cuda.get_device_name(0), torch.cuda.get_device_capability(0))
from dsv3.backends.cuda import CudaBackend
for op, impl in CudaBackend().capabilities.ops.items():
    print(f"  {op}: {impl}")
PY

if [[ $what == all || $what == final || $what == tests ]]; then
  timeout 130 python3 -m pytest -q -p no:cacheprovider tests/*/test_cuda_backend.py 2>&1 | tee "$OUT/tests.log" | tail -25
fi

if [[ $what == all || $what == final || $what == bench ]]; then
  for op in ${BENCH:-gemm moe}; do
    timeout ${BENCH_TIMEOUT:-170} python3 -m dsv3 bench $op --json "$OUT/bench_$op.json" 2>&1 | tee "$OUT/bench_$op.log"
  done
fi

if [[ $what == all || $what == sweep ]]; then
  timeout ${SWEEP_TIMEOUT:-120} python3 - <<'PY' 2>&1 | tee "$OUT/sweep.log"
# Decode-GEMM and MoE tile sweep: which tiles and splits read the weights fastest.
import torch
from dsv3.backends.cuda import CudaBackend
from dsv3.backends.triton_kernels import gemm, moe
from dsv3.backends.triton_kernels.configs import TileConfig
from dsv3.bench.common import time_op, rotation_count, measure_roofline
from dsv3.bench.moe import random_fp8_bytes, make_routing
b = CudaBackend()
dev = b.device
copy = measure_roofline(dev, None).copy_gbps
print(f"copy {copy:.0f} GB/s")
g = torch.Generator(dev).manual_seed(0)
for n, k in ((7168, 16384), (2112, 7168), (7168, 2048)):
    sets = rotation_count(n * k)
    ws = [random_fp8_bytes((n, k), dev, g) for _ in range(sets)]
    sw = torch.rand(n // 128 + (n % 128 > 0), k // 128, device=dev) * 1e-3
    for m in (1, 64):
        xs = [b.quantize_activation(torch.randn(m, k, device=dev, dtype=torch.bfloat16)) for _ in range(sets)]
        best = []
        for bn in (64, 128):
            for warps in (4, 8):
                for stages in (4, 6):
                    for waves in (2, 4):
                        tile = TileConfig(gemm.decode_tile(m, b.configs.gemm_decode), bn, 1,
                                          {"num_warps": warps, "num_stages": stages})
                        kb = -(-k // 128)
                        splits = gemm.choose_splits(-(-m // tile.block_m), -(-n // bn), kb, b.num_sms, waves)
                        try:
                            t = time_op(lambda qa, sa, w: gemm.fp8_gemm(qa, sa, w, sw, torch.bfloat16, b.configs,
                                        b.num_sms, num_splits=splits, tile=tile),
                                        [(qa, sa, w) for (qa, sa), w in zip(xs, ws)], dev, target_ms=20)
                        except Exception as e:
                            print("fail", bn, warps, stages, e); continue
                        best.append((t.median_ms, bn, warps, stages, waves, splits))
        best.sort()
        for t, bn, warps, stages, waves, splits in best[:4]:
            print(f"gemm M={m} N={n} K={k}: {t*1e3:.1f} us {n*k/t/1e6:.0f} GB/s ({n*k/t/1e6/copy*100:.0f}%) "
                  f"BN={bn} warps={warps} stages={stages} waves={waves} splits={splits}")
    del ws
E, D, I = 256, 7168, 2048
gu = random_fp8_bytes((E, 2 * I, D), dev, g); dn = random_fp8_bytes((E, D, I), dev, g)
gus = torch.rand(E, 2 * I // 128, D // 128, device=dev) * 1e-3; dns = torch.rand(E, D // 128, I // 128, device=dev) * 1e-3
for tokens in (128, 4096):
    r = [make_routing(tokens, dev, g) for _ in range(2)]
    xs = [torch.randn(tokens, D, device=dev, dtype=torch.bfloat16) for _ in r]
    res = []
    for bm in ((16, 32) if tokens <= 128 else (64, 128)):
        for bn in (64, 128):
            for warps in (4, 8):
                for stages in (3, 5):
                    tile = TileConfig(bm, bn, 1, {"num_warps": warps, "num_stages": stages})
                    try:
                        t = time_op(lambda x, w, i: moe.moe_experts(x, w, i, gu, gus, dn, dns, b.configs,
                                    quant=(448.0, False), tile=tile), [(x, w, i) for x, (w, i) in zip(xs, r)],
                                    dev, target_ms=60)
                    except Exception as e:
                        print("fail", bm, bn, warps, stages, str(e)[:100]); continue
                    res.append((t.median_ms, bm, bn, warps, stages))
    res.sort()
    for t, bm, bn, warps, stages in res[:4]:
        used = 11.27e9 if tokens >= 128 else 0
        print(f"moe tokens={tokens}: {t:.3f} ms {used/t/1e6:.0f} GB/s {6*tokens*8*D*I/t/1e9:.0f} TFLOPS "
              f"BM={bm} BN={bn} warps={warps} stages={stages}")
PY
fi
