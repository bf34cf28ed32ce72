"""Cache sizing: what the device has left after weights, activations and logits; one line; clear errors."""

from __future__ import annotations

import pytest
from dsv3.backends.interface import MemoryInfo
from dsv3.backends.reference import ReferenceBackend

import dsv3
from dsv3.errors import Dsv3Error
from dsv3.serving.cache_sizing import DEFAULT_CPU_CACHE_TOKENS

MiB = 1 << 20


class DeviceLike(ReferenceBackend):
    """The reference backend reporting an accelerator's memory: `total`, `used` by others and weights, and an
    activation peak of `activations` above what is allocated."""

    def __init__(self, total: int, used: int, activations: int):
        super().__init__("cpu")
        self.total, self.used, self.activations = total, used, activations

    def memory_info(self, reset_peak: bool = False) -> MemoryInfo:
        return MemoryInfo(total=self.total, free=self.total - self.used, allocated=10 * MiB,
                          peak=10 * MiB + self.activations, accelerator=True)


def load(backend, **options):
    settings = dict(backend=backend, precision="fp32", max_model_len=256, block_size=16, max_num_seqs=8,
                    max_num_batched_tokens=64)
    return dsv3.load_model(**{**settings, **options})


def test_accelerator_cache_gets_what_is_left_and_says_so(capsys):
    total, used, activations = 1024 * MiB, 600 * MiB, 100 * MiB
    model = load(DeviceLike(total, used, activations), gpu_memory_utilization=0.9)
    per_block = model.transformer.cache_bytes_per_block(16)
    sampler = 4 * 8 * model.config.vocab_size * 4
    expected = (int(0.9 * total) - used - activations - sampler) // per_block
    assert model.engine.config.num_blocks == expected
    err = capsys.readouterr().err
    line = [x for x in err.splitlines() if "cache:" in x]
    assert line == [f"dsv3: cache: {expected - 1} blocks = {(expected - 1) * 16} tokens "
                    f"({expected * per_block / (1 << 30):.2f} GiB)"]
    assert model.generate([5, 6, 7], dsv3.SamplingParams(max_tokens=3, temperature=0.0))[0].outputs[0].token_ids
    model.shutdown()


def test_a_device_too_full_for_one_request_names_the_setting():
    with pytest.raises(Dsv3Error, match="raise gpu_memory_utilization or lower max_model_len") as error:
        load(DeviceLike(1024 * MiB, 915 * MiB, 10 * MiB), gpu_memory_utilization=0.9, quiet=True)
    assert "max_model_len=256" in str(error.value) and "\n" not in str(error.value)


def test_cache_tokens_overrides_and_the_cpu_default():
    model = load(DeviceLike(1024 * MiB, 600 * MiB, 0), cache_tokens=1000, quiet=True)
    assert model.engine.config.num_blocks == 1 + 63  # 1000 tokens in blocks of 16, and the scratch block
    cpu = load("reference", quiet=True)
    assert (cpu.engine.config.num_blocks - 1) * 16 == DEFAULT_CPU_CACHE_TOKENS
