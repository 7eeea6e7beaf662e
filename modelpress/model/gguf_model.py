"""A GGUF file (llama, qwen2, qwen3) -> its transformers causal LM (fp32) + its tokenizer."""
from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import numpy as np
import torch
from gguf import GGMLQuantizationType
from tqdm.auto import tqdm
from transformers import (
    Gemma2Config,
    Gemma3TextConfig,
    LlamaConfig,
    Phi3Config,
    Qwen2Config,
    Qwen3Config,
)

from ..core.kquants import BLOCK
from ..errors import ModelpressError
from ..formats.gguf_names import (
    ARCH,
    NORM_PLUS_ONE,
    PERMUTED,
    llama_cpp_layer_types,
    llama_cpp_query_scalar,
    to_hf,
)
from ..formats.gguf_reader import GGUFTensor, dequantize, read_gguf
from ..model.walker import replace
from ..nn.gguf_linear import GGUFLinear
from ..record import record
from .build import build_causal_lm
from .gguf_tokenizer import check_vocab, tokenizer_from_gguf

_SKIP = re.compile(r"rope_freqs\.weight$|blk\.\d+\.attn_rot_embd")


def hf_name(gguf_name: str, arch: str = "llama") -> str | None:
    if _SKIP.match(gguf_name):
        return None
    name = to_hf(gguf_name, arch)
    if name is not None:
        return name
    raise ModelpressError(f"GGUF tensor {gguf_name!r} has no place in the models modelpress loads from GGUF "
                          f"({', '.join(CONFIGS)})")


def unpermute_rope(w: np.ndarray, n_head: int) -> np.ndarray:
    """Undo llama.cpp's q/k row permutation (its converter interleaves each head's rotary halves).

    convert_hf_to_gguf: w.reshape(n_head, 2, d/2, ...).swapaxes(1, 2); this is the inverse.
    """
    rows = w.shape[0]
    return w.reshape(n_head, rows // n_head // 2, 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def _number(meta: dict[str, Any], key: str, default: Any, kind: type, lo: float, hi: float) -> Any:
    """meta[key] (or the default) as `kind`, refused unless a number within [lo, hi]."""
    v = meta.get(key, default)
    ok = isinstance(v, (int, float)) and not isinstance(v, bool) and (kind is float or float(v).is_integer())
    if not ok or not lo <= v <= hi:
        raise ModelpressError(f"GGUF metadata {key} = {v!r} is not a {kind.__name__} from {lo:g} to {hi:g}; "
                              "the file is corrupt or not a model modelpress loads")
    return kind(v)


# GGUF architecture -> transformers config class (the reverse of formats/gguf_names.ARCH)
CONFIGS = {"llama": LlamaConfig, "qwen2": Qwen2Config, "qwen3": Qwen3Config, "gemma2": Gemma2Config,
           "gemma3": Gemma3TextConfig, "phi3": Phi3Config}


def llama_config(meta: dict[str, Any], tied: bool, layers: int | None = None):  # noqa: ANN201
    """The transformers config a GGUF's metadata describes (CONFIGS: its architecture), every size
    checked before anything is allocated: within sane bounds, consistent with each other and
    (`layers`: the blk.N indices its tensors hold) with the tensors the file has."""
    arch = meta.get("general.architecture")
    if arch not in CONFIGS:
        raise ModelpressError(f"GGUF architecture {arch!r} is not supported yet; modelpress loads "
                              f"{', '.join(CONFIGS)} files")
    a = f"{arch}."
    tokens = meta.get("tokenizer.ggml.tokens")
    heads = _number(meta, a + "attention.head_count", None, int, 1, 1024)
    hidden = _number(meta, a + "embedding_length", None, int, 1, 1 << 17)
    kv = _number(meta, a + "attention.head_count_kv", heads, int, 1, heads)
    head_dim = _number(meta, a + ("rope.dimension_count" if arch == "llama" else "attention.key_length"),
                       hidden // heads or 1, int, 1, 1 << 12) if arch != "phi3" else hidden // heads
    vocab = _number(meta, a + "vocab_size", len(tokens) if isinstance(tokens, list) else None, int, 1, 1 << 22)
    blocks = _number(meta, a + "block_count", None, int, 1, 1024)
    if heads % kv or head_dim % 2 or hidden % heads:
        raise ModelpressError(f"GGUF metadata: {heads} attention heads, {kv} key/value heads, a head of {head_dim} "
                              f"and a width of {hidden} do not fit together; the file is corrupt")
    if layers is not None and layers != blocks:
        raise ModelpressError(f"GGUF metadata says {blocks} blocks but the file's tensors hold {layers}; "
                              "the file is corrupt")
    return CONFIGS[arch](
        **_arch_fields(meta, arch, blocks, hidden, heads, head_dim),
        vocab_size=vocab, hidden_size=hidden,
        intermediate_size=_number(meta, a + "feed_forward_length", None, int, 1, 1 << 20),
        num_hidden_layers=blocks, num_attention_heads=heads, num_key_value_heads=kv, head_dim=head_dim,
        rms_norm_eps=_number(meta, a + "attention.layer_norm_rms_epsilon", 1e-5, float, 1e-12, 1.0),
        max_position_embeddings=_number(meta, a + "context_length", 2048, int, 1, 1 << 24),
        tie_word_embeddings=tied,
        bos_token_id=meta.get("tokenizer.ggml.bos_token_id"),
        eos_token_id=meta.get("tokenizer.ggml.eos_token_id"),
        pad_token_id=meta.get("tokenizer.ggml.padding_token_id"),
    )


def _arch_fields(meta: dict[str, Any], arch: str, blocks: int, hidden: int, heads: int, head_dim: int
                 ) -> dict[str, Any]:
    """The config fields one architecture's keys give: the rotary base; for gemma the window, the
    soft-capping and what llama.cpp derives (the sliding layers, the query scale)."""
    a = f"{arch}."
    theta = _number(meta, a + "rope.freq_base", 10000.0 if arch != "gemma3" else 1e6, float, 1.0, 1e12)
    if arch == "phi3":
        rot = _number(meta, a + "rope.dimension_count", head_dim, int, 2, head_dim)
        window = _number(meta, a + "attention.sliding_window", 0, int, 0, 1 << 24)
        return {"rope_theta": theta, "partial_rotary_factor": rot / head_dim, "sliding_window": window or None,
                "original_max_position_embeddings": _number(meta, a + "rope.scaling.original_context_length",
                                                            2048, int, 1, 1 << 24)}
    if arch not in NORM_PLUS_ONE:
        return {"rope_theta": theta}
    out = {"sliding_window": _number(meta, a + "attention.sliding_window", 4096, int, 1, 1 << 24),
           "layer_types": llama_cpp_layer_types(arch, blocks),
           "query_pre_attn_scalar": llama_cpp_query_scalar(arch, blocks, hidden, heads, head_dim)}
    cap = meta.get(a + "final_logit_softcapping")
    out["final_logit_softcapping"] = None if cap is None else _number(meta, a + "final_logit_softcapping", 30.0, float, 1e-3, 1e6)
    if arch == "gemma2":
        out["attn_logit_softcapping"] = _number(meta, a + "attn_logit_softcapping", 50.0, float, 1e-3, 1e6)
        out["rope_theta"] = theta
    else:
        local = _number(meta, a + "rope.freq_base_swa", 10000.0, float, 1.0, 1e12)
        out["rope_parameters"] = {"full_attention": {"rope_type": "default", "rope_theta": theta},
                                  "sliding_attention": {"rope_type": "default", "rope_theta": local}}
    return out


def _block_type(t: GGUFTensor, name: str) -> str | None:
    """The kquants type of a linear layer's tensor that can stay in blocks, else None."""
    kind = GGMLQuantizationType(t.ggml_type).name
    linear = name.endswith("_proj.weight") or name == "lm_head.weight"
    return kind if linear and kind in BLOCK else None


def _state_dict(tensors: list[GGUFTensor], config, keep_blocks: bool = False  # noqa: ANN001
                ) -> tuple[dict[str, torch.Tensor], dict[str, tuple[str, int]]]:
    """(state dict, {module name: (GGUF type, in_features)} of the layers kept in blocks)."""
    sd, kept = {}, {}
    arch = ARCH[config.model_type]  # the file's architecture
    for t in tqdm(tensors, desc="load" if keep_blocks else "dequantize", unit="tensor", leave=False, mininterval=1.0):
        name = hf_name(t.name, arch)
        if name is None:
            continue
        kind = _block_type(t, name) if keep_blocks else None
        # a kept tensor's raw rows (blocks never cross a row) take the same row order as its values
        w = np.asarray(t.data) if kind is not None else dequantize(t)
        if arch in NORM_PLUS_ONE and name.endswith("norm.weight"):  # stored as 1 + w
            w = w - np.float32(1)
        elif arch in PERMUTED and ".q_proj." in name:  # weights and biases
            w = unpermute_rope(w, config.num_attention_heads)
        elif arch in PERMUTED and ".k_proj." in name:
            w = unpermute_rope(w, config.num_key_value_heads)
        if kind is not None:
            kept[name[: -len(".weight")]] = (kind, t.shape[-1])
            name = name[: -len(".weight")] + ".qdata"
        if not w.flags.writeable or not w.flags.c_contiguous:  # an F32 tensor is a view of the map
            w = np.array(w, copy=True, order="C")
        sd[name] = torch.from_numpy(w)
    return sd, kept


def load_gguf(path: str | Path, keep_blocks: bool = False) -> tuple[torch.nn.Module, Any]:
    """(model, tokenizer) from a Llama GGUF file, weights dequantized to fp32; with keep_blocks,
    the linear layers of a block type stay in their blocks (nn/gguf_linear.GGUFLinear) and only
    embeddings, norms and F16/F32 tensors become fp32; a head tied to a block-type embedding also
    keeps those blocks as `record(model).head` (a GGUFLinear outside the module tree with the
    same values as the fp32 tied weight, for the decode kernels)."""

    path = Path(path)
    meta, tensors = read_gguf(path)
    tied = not any(t.name == "output.weight" for t in tensors)
    layers = {m.group(1) for t in tensors if (m := re.match(r"blk\.(\d+)\.", t.name))}
    config = llama_config(meta, tied, len(layers))
    check_vocab(meta, path)
    sd, kept = _state_dict(tensors, config, keep_blocks)

    def prepare(model: torch.nn.Module) -> None:
        for module, (kind, cols) in kept.items():
            replace(model, module, GGUFLinear.from_blocks(sd[module + ".qdata"], kind, cols, sd.get(module + ".bias")))

    model = build_causal_lm(config, sd, prepare)
    if keep_blocks and tied:  # the tied head's own blocks, for decode kernels (model/fused_decode.py)
        emb = next(t for t in tensors if t.name == "token_embd.weight")
        kind = GGMLQuantizationType(emb.ggml_type).name
        if kind in BLOCK:
            head = GGUFLinear.from_blocks(torch.from_numpy(np.array(emb.data, copy=True)), kind, emb.shape[-1])
            record(model).head = head  # not a submodule: not in the state dict
    tokenizer = tokenizer_from_gguf(meta, path)
    return model, tokenizer
