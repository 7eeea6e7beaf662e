"""modelpress: compress neural networks and run what was compressed.

    import modelpress
    model, tokenizer = modelpress.load()                       # the embedded default model
    modelpress.quantize(model, modelpress.RTNConfig(bits=4, group_size=64))
    modelpress.save(model, tokenizer, "out/smollm2-int4")
    print(modelpress.perplexity(model, tokenizer).ppl)
"""
from .config import BaseConfig
from .errors import ModelpressError
from .eval.perplexity import perplexity
from .formats.checkpoint import save
from .methods import AutoConfig, AWQConfig, FP4Config, GPTQConfig, LLMInt8Config, NF4Config, RTNConfig
from .model.load import load
from .registry import quantize
from .version import __version__

__all__ = ["AWQConfig", "AutoConfig", "BaseConfig", "FP4Config", "GPTQConfig", "LLMInt8Config", "ModelpressError", "NF4Config", "RTNConfig", "load", "perplexity", "quantize", "save",
           "__version__"]
