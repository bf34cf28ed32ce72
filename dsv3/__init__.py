"""dsv3: DeepSeek-V3/R1/V2 inference on NVIDIA, AMD and Ascend from one codebase."""

import importlib

__version__ = "0.1.0"

#: the public names, each imported on first use: `import dsv3` stays light, so the `dsv3` command is running
#: (and answers Ctrl-C with one line) before torch is imported
_EXPORTS = {"Model": "dsv3.api", "load_model": "dsv3.api", "ModelConfig": "dsv3.config",
            "load_config": "dsv3.config", "Dsv3Error": "dsv3.errors", "RequestOutput": "dsv3.serving.outputs",
            "SamplingParams": "dsv3.serving.params"}
__all__ = list(_EXPORTS)


def __getattr__(name: str):
    if name in _EXPORTS:
        return getattr(importlib.import_module(_EXPORTS[name]), name)
    raise AttributeError(f"module 'dsv3' has no attribute {name!r}")
