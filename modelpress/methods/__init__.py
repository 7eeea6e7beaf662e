"""One file per method: its Config and its registered handler. Importing this package registers them all."""
from .bnb4 import FP4Config, NF4Config
from .llm_int8 import LLMInt8Config
from .rtn import RTNConfig

__all__ = ["FP4Config", "LLMInt8Config", "NF4Config", "RTNConfig"]
