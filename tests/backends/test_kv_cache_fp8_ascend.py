"""--kv-cache-dtype fp8 on the Ascend backend (emulated torch_npu): 910B/910C have no FP8, so the latent cache
stays BF16, and loading the model says so in one line naming the setting as the caller named it."""

from __future__ import annotations

import torch


def test_ascend_keeps_bf16_and_says_so(npu, capsys):
    from dsv3.backends.ascend import AscendBackend

    from dsv3 import load_model
    from tests.backends.test_ascend_backend import ASCEND_910B

    backend = AscendBackend(device="cpu", chip=ASCEND_910B)
    spec = backend.mla_cache_spec(6, 128, 512, 64, torch.bfloat16, "fp8")
    dense = backend.mla_cache_spec(6, 128, 512, 64, torch.bfloat16)
    assert (spec.shape, spec.dtype, spec.bytes_per_token) == (dense.shape, dense.dtype, dense.bytes_per_token)
    assert spec.kind == "dense" and spec.dtype == torch.bfloat16 and spec.bytes_per_token == 1152
    assert "no FP8 latent cache on Ascend" in spec.layout
    model = load_model(backend=backend, precision="bf16", max_model_len=64, cache_tokens=256, quiet=True,
                       kv_cache_dtype="fp8")
    try:
        assert all(cache.dtype == torch.bfloat16 for cache in model.transformer.caches)
        warnings = [line for line in capsys.readouterr().err.splitlines() if "warning" in line]
        assert warnings == ["dsv3: warning: kv_cache_dtype fp8: the ascend backend has no FP8 latent cache; "
                            "the cache stays bfloat16"]
    finally:
        model.shutdown()
