"""Runtime modules: one quantized linear class per (dtype x packing), each with a fast CPU path."""
from .code4_linear import Code4Linear
from .gguf_linear import GGUFLinear
from .int8lt_linear import Int8LtLinear
from .intx_linear import IntxLinear

QUANT_LINEAR_CLASSES = {cls.__name__: cls for cls in (IntxLinear, Code4Linear, Int8LtLinear, GGUFLinear)}

__all__ = ["Code4Linear", "GGUFLinear", "Int8LtLinear", "IntxLinear", "QUANT_LINEAR_CLASSES"]
