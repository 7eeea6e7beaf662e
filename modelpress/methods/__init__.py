"""One file per method: its Config and its registered handler. Importing this package registers them all."""
from .auto import AutoConfig
from .awq import AWQConfig
from .bnb4 import FP4Config, NF4Config
from .gptq import GPTQConfig
from .llm_int8 import LLMInt8Config
from .prune import MagnitudeConfig, SparseGPTConfig, StructuredConfig, WandaConfig
from .rtn import RTNConfig
from .w8a8 import W8A8Config

__all__ = ["AWQConfig", "AutoConfig", "FP4Config", "GPTQConfig", "LLMInt8Config", "MagnitudeConfig", "NF4Config",
           "RTNConfig", "SparseGPTConfig", "StructuredConfig", "W8A8Config", "WandaConfig"]
