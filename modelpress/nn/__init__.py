"""Runtime modules: one quantized linear class per (dtype x packing), each with a fast CPU path."""
from .intx_linear import IntxLinear

QUANT_LINEAR_CLASSES = {cls.__name__: cls for cls in (IntxLinear,)}

__all__ = ["IntxLinear", "QUANT_LINEAR_CLASSES"]
