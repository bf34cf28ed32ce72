"""dsv3: DeepSeek-V3/R1/V2 inference on NVIDIA, AMD and Ascend from one codebase."""

from dsv3.api import EngineArgs, Model, load_model  # noqa: F401
from dsv3.config import ModelConfig, load_config  # noqa: F401
from dsv3.errors import Dsv3Error  # noqa: F401
from dsv3.serving.outputs import RequestOutput  # noqa: F401
from dsv3.serving.params import SamplingParams  # noqa: F401

__version__ = "0.1.0"
