"""tpserve: tensor-parallel inference for GPTQ-quantized LLMs."""

from tpserve.errors import CheckpointError, ConfigError, TpserveError
from tpserve.llm import LLM, load

__version__ = "0.1.0"
__all__ = ["load", "LLM", "TpserveError", "ConfigError", "CheckpointError", "__version__"]
