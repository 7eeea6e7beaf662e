"""modelpress: compress neural networks and run what was compressed.

    import modelpress
    model, tokenizer = modelpress.load()                       # the embedded default model
    modelpress.quantize(model, modelpress.RTNConfig(bits=4, group_size=64))
    modelpress.save(model, tokenizer, "out/smollm2-int4")      # format="gptq", "awq", "gguf", ...
    print(modelpress.perplexity(model, tokenizer).ppl)
    engine = modelpress.Engine(model, tokenizer)               # continuous batching, paged KV cache
    modelpress.compare(methods=["fp32", "nf4", "q4_k_m"])      # table, plot and report
"""
from .config import BaseConfig
from .errors import ModelpressError
from .eval.compare import compare
from .eval.perplexity import perplexity
from .formats import save
from .formats.gguf_writer import export_gguf
from .methods import (
    AutoConfig,
    AWQConfig,
    FP4Config,
    GPTQConfig,
    LLMInt8Config,
    MagnitudeConfig,
    NF4Config,
    RTNConfig,
    SparseGPTConfig,
    StructuredConfig,
    W8A8Config,
    WandaConfig,
)
from .model.load import load
from .registry import quantize
from .serve.engine import Engine
from .serve.sampler import SamplingParams
from .version import __version__

__all__ = ["AWQConfig", "AutoConfig", "BaseConfig", "Engine", "FP4Config", "GPTQConfig", "LLMInt8Config",
           "MagnitudeConfig", "ModelpressError", "NF4Config", "RTNConfig", "SparseGPTConfig", "StructuredConfig", "W8A8Config",
           "WandaConfig", "SamplingParams", "__version__", "compare", "export_gguf",
           "load", "perplexity", "quantize", "save"]
