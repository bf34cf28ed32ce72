#!/usr/bin/env bash
# One GPU round for the MLA kernels: tile sweep (kernel only), the GPU tests, the MLA bench.
# Usage (repository root, on the GPU machine): bash scripts/gpu_round_mla.sh [sweep|tests|bench|quick ...]
# Logs and JSON go to $OUT (default ./out_mla).
set -uo pipefail
export PYTHONPATH=$PWD PYTHONUNBUFFERED=1 TRITON_DEFAULT_FP_FUSION=1
export OUT=${OUT:-$PWD/out_mla}
mkdir -p "$OUT"
steps=${*:-sweep tests bench}
nvidia-smi --query-gpu=name,memory.total,clocks.sm,clocks.mem --format=csv | tee "$OUT/gpu.txt"
python3 -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__)" | tee -a "$OUT/gpu.txt"

for step in $steps; do
case $step in
sweep)
python3 - <<'EOF' 2>&1 | tee "$OUT/sweep.txt"
import torch
from dsv3.backends.triton_kernels import mla
from dsv3.bench.common import time_op, rotation_count, measure_roofline, format_roofline

dev = torch.device("cuda")
roof = measure_roofline(dev, fp8_dtype=None)
print(format_roofline(roof))
sms = torch.cuda.get_device_properties(0).multi_processor_count
g = torch.Generator(dev).manual_seed(0)

def rand(*s):
    return torch.randn(*s, device=dev, generator=g, dtype=torch.bfloat16)

def accuracy(cfg, heads):
    """Relative error of the attention part vs fp32 torch on mixed lengths (B=3, up to 3000 tokens)."""
    cache = rand(4, 3072, 576)
    q_lat, q_pe, new = rand(3, heads, 512), rand(3, heads, 64), rand(3, 576)
    slots, pos = torch.tensor([2, 0, 3], device=dev), torch.tensor([2999, 0, 1500], device=dev)
    expected = cache.clone()
    expected[slots, pos] = new
    out = mla.mla_decode_latent(q_lat, q_pe, new[:, :512], new[:, 512:], cache, slots, pos, 0.07, config=cfg)
    assert torch.equal(cache, expected)
    kv = cache[slots].float()
    s = (torch.einsum("bhc,bsc->bhs", torch.cat((q_lat, q_pe), -1).float(), kv) * 0.07)
    s = s.masked_fill(torch.arange(3072, device=dev)[None, None] > pos[:, None, None], float("-inf"))
    r = torch.einsum("bhs,bsc->bhc", s.softmax(-1), kv[..., :512])
    return ((out.float() - r).norm() / r.norm()).item()

configs = {  # block_h, block_n, num_warps, num_stages, programs_per_sm
    16: [(16, 64, 4, 2, 2), (16, 64, 4, 2, 4), (16, 32, 4, 2, 2), (16, 64, 4, 3, 2)],
    128: [(64, 64, 8, 2, 2), (64, 64, 8, 2, 4), (64, 64, 8, 2, 8), (64, 32, 8, 2, 4)],
}
cases = [(16, 64, 4096), (16, 64, 32768), (16, 16, 8192), (16, 1, 32768), (128, 64, 8192), (128, 16, 32768),
         (128, 1, 4096)]
print(f"{'case':22s} {'cfg (bh,bn,w,st,ppsm)':22s} {'splits':>6s} {'err':>8s} {'ms':>8s} {'GB/s':>6s} {'%copy':>6s} {'TFLOPS':>7s} {'%bf16':>6s}")
for heads, batch, ctx in cases:
    nbytes = batch * ctx * 576 * 2
    sets = []
    for _ in range(rotation_count(nbytes)):
        sets.append((rand(batch, heads, 512), rand(batch, heads, 64), rand(batch, 512), rand(batch, 64),
                     rand(batch, ctx, 576), torch.arange(batch, device=dev), torch.full((batch,), ctx - 1, device=dev)))
    flops = 2 * batch * heads * ctx * 1088
    for c in configs[heads]:
        cfg = mla.DecodeConfig(*c)
        try:
            err = accuracy(cfg, heads)
        except Exception as e:
            print(f"H={heads} B={batch} S={ctx}", c, "FAILED", type(e).__name__, str(e)[:300]); continue
        splits = mla.choose_num_splits(batch, heads, ctx, cfg, sms)
        t = time_op(lambda *a: mla.mla_decode_latent(*a, 0.07, config=cfg, num_splits=splits), sets, dev,
                    target_ms=40)
        ms = t.median_ms
        print(f"{'H=%d B=%d S=%d' % (heads, batch, ctx):22s} {str(c):22s} {splits:6d} {err:8.1e} {ms:8.4f} "
              f"{nbytes / ms / 1e6:6.0f} {100 * nbytes / ms / 1e6 / roof.copy_gbps:6.1f} "
              f"{flops / ms / 1e9:7.1f} {100 * flops / ms / 1e9 / roof.bf16_tflops:6.1f}")
    del sets
    torch.cuda.empty_cache()
EOF
;;
tests)
python3 -m pytest -q -x -m gpu tests/*/test_mla_kernels.py 2>&1 | tee "$OUT/tests.txt" | tail -30
;;
bench|quick)
flag=""; [ "$step" = quick ] && flag="--quick"
python3 -m dsv3 bench mla $flag --json "$OUT/mla_bench_$step.json" 2>&1 | tee "$OUT/bench_$step.txt"
;;
esac
done
