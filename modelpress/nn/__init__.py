"""Runtime modules: one quantized linear class per (dtype x packing), each with a fast CPU path."""
from .code4_linear import Code4Linear
from .gguf_linear import GGUFLinear
from .int8lt_linear import Int8LtLinear
from .intx_linear import IntxLinear
from .sparse24_linear import Sparse24Linear
from .w8a8_linear import W8A8Linear

QUANT_LINEAR_CLASSES = {cls.__name__: cls for cls in (IntxLinear, Code4Linear, Int8LtLinear, GGUFLinear,
                                                        W8A8Linear, Sparse24Linear)}

__all__ = ["Code4Linear", "GGUFLinear", "Int8LtLinear", "IntxLinear", "QUANT_LINEAR_CLASSES", "Sparse24Linear", "W8A8Linear"]
