"""`load(source)`: one entry for every way a model comes in."""
from __future__ import annotations

import struct
from pathlib import Path
from typing import Any

import torch
from huggingface_hub.errors import StrictDataclassError
from transformers import AutoConfig, AutoTokenizer

from ..default_model import (  # noqa: F401 (re-exported)
    DEFAULT_FILE,
    DEFAULT_NAME,
    DEFAULT_PACKAGE,
    default_model_path,
)
from ..errors import ModelpressError, one_line
from ..formats import checkpoint, registry
from ..record import record
from . import torch_prune
from .build import build_causal_lm
from .gguf_model import load_gguf

# what reading a damaged or foreign file raises where no check of ours caught it first
_FILE_ERRORS = (OSError, ValueError, TypeError, KeyError, IndexError, AttributeError, RuntimeError, OverflowError,
                RecursionError, ArithmeticError, struct.error)

def resolve(source: str | Path | None) -> Path:
    path = default_model_path() if source is None else Path(source)
    if not path.exists():
        raise ModelpressError(f"{path} does not exist; give a GGUF file, a transformers folder or a "
                              "modelpress checkpoint (or nothing for the default model)")
    return path


def load(source: str | Path | None = None, keep_blocks: bool = False) -> tuple[torch.nn.Module, Any]:
    """(model, tokenizer) from a GGUF file, a transformers folder, a modelpress checkpoint, or,
    with no source, the embedded default SmolLM2-135M-Instruct. The model is in eval mode, fp32;
    with keep_blocks, a GGUF's quantized linear layers run on their blocks (nn/gguf_linear.py).
    A file that cannot be loaded raises ModelpressError, one line naming it: the checks before
    allocation (formats/gguf_reader.py, model/build.py check_config, the checkpoint's manifest)
    name the field; anything else a damaged file makes the libraries raise is reported the same way."""
    path = resolve(source)
    try:
        return _load(path, keep_blocks)
    except ModelpressError:
        raise
    except _FILE_ERRORS + _hub_errors() as e:
        raise ModelpressError(f"{path} cannot be loaded ({type(e).__name__}: {one_line(e)[:300]}); the file is "
                              "damaged or of a kind modelpress does not load") from None


def _hub_errors() -> tuple[type[Exception], ...]:
    """huggingface_hub's validation errors (transformers' configs check themselves on construction);
    they derive from Exception alone."""
    return (StrictDataclassError,)


def _load(path: Path, keep_blocks: bool) -> tuple[torch.nn.Module, Any]:
    kind = registry.detect(path)
    if kind == "gguf":
        model, tok = load_gguf(path, keep_blocks)
        if path.resolve() == default_model_path().resolve():
            # SmolLM2-135M-Instruct is published in bf16: what a method leaves unquantized is kept in bf16
            # (registry.round_plain_tensors), as the peers keep a bf16 model's embeddings and norms
            model.config.dtype = torch.bfloat16
    elif kind == "modelpress":
        model, tok = checkpoint.load(path)
    else:  # a transformers folder, plain or in a quantized layout a registered format reads
        model, tok = _load_transformers(path)
    record(model).source = str(path)
    return model, tok


def _load_transformers(path: Path) -> tuple[torch.nn.Module, Any]:
    """A transformers folder; safetensors weights only (never unpickles)."""
    files = sorted(path.glob("*.safetensors"))
    if not files:
        raise ModelpressError(f"{path} has no .safetensors weights (pickled .bin files are not loaded); "
                              "convert them with transformers' save_pretrained(safe_serialization=True)")
    try:
        config = AutoConfig.from_pretrained(path)
    except (OSError, ValueError) as e:
        raise ModelpressError(f"{path}/config.json is not a valid transformers config ({e})") from None
    state: dict[str, torch.Tensor] = {}
    for f in files:
        state.update(checkpoint.read_safetensors(f))
    state = torch_prune.fold_state({k: v.float() if v.is_floating_point() else v for k, v in state.items()})
    qc = getattr(config, "quantization_config", None)
    if qc is not None and not isinstance(qc, dict) and not hasattr(qc, "to_dict"):
        raise ModelpressError(f"{path}/config.json: quantization_config is a {type(qc).__name__}, not an object")
    if qc:  # a quantized transformers folder: swap in quantized layers, then fill them
        qc = qc if isinstance(qc, dict) else qc.to_dict()
        qconfig, state, prepare = registry.for_quant_method(qc.get("quant_method")).read(qc, state)
        model = build_causal_lm(config, state, prepare=prepare)
        record(model).config = qconfig
    else:
        model = build_causal_lm(config, state)
    try:
        tok = AutoTokenizer.from_pretrained(path)
    except (OSError, ValueError) as e:
        raise ModelpressError(f"{path} has no usable tokenizer files ({e}); save the tokenizer beside the model") from None
    return model, tok
