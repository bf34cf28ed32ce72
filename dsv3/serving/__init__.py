"""The serving engine: paged latent cache, continuous batching, chunked prefill, prefix cache.

Files by role (nano-vllm's shape): params (SamplingParams), outputs (RequestOutput), request (one
sequence's state), block_manager (cache blocks), scheduler (who runs each step), sampler, detokenizer,
model_runner (the device: inputs, graphs), engine (LLMEngine: one step), async_engine (the engine
thread and asyncio bridge), cache_sizing and args (construction from command-line flags).
"""

from dsv3.serving.outputs import CompletionOutput, RequestMetrics, RequestOutput  # noqa: F401
from dsv3.serving.params import SamplingParams  # noqa: F401
