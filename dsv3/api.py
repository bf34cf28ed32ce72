"""The Python API: `load_model` and the `Model` it returns."""

from __future__ import annotations

from pathlib import Path

from dsv3.config import ModelConfig
from dsv3.engine_args import TINY_CHECKPOINT, EngineArgs
from dsv3.llm import Model

__all__ = ["TINY_CHECKPOINT", "EngineArgs", "Model", "load_model"]


def load_model(model: str | Path | ModelConfig | None = None, **settings) -> Model:
    """Load a DeepSeek model and start its engine.

    Args:
        model: a Hugging Face checkpoint directory; or a config (ModelConfig, a YAML/JSON path or a built-in
            config name) for synthetic weights; None for the built-in tiny checkpoint (TINY_CHECKPOINT).
        settings: any field of dsv3.engine_args.EngineArgs as a keyword (backend, precision, device, tp, ep,
            max_model_len, max_num_seqs, block_size, kv_cache_dtype, gpu_memory_utilization, cache_tokens, ...;
            its help says what each does); max_seq_len and max_batch_size are older names of max_model_len
            and max_num_seqs.
    Returns:
        A Model.
    Raises:
        UsageError naming the setting (TypeError for an unknown one or a wrong kind of object) before anything
        loads; ConfigError, CheckpointError, BackendSetupError or OutOfMemoryError while it loads.
    """
    return EngineArgs.from_keywords(model=model, **settings).build()
