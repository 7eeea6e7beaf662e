"""Write a decoder model (formats/gguf_names.ARCH: Llama, Mistral, Qwen2, Qwen3) as a GGUF file that llama.cpp runs: architecture metadata, the tokenizer
and chat template (copied from the GGUF the model came from), and every tensor in the type a
mix picks (formats/gguf_mixes.py), quantized by core/kquants.py.

    write_gguf("out.gguf", model, "Q4_K_M", source_gguf=path, imatrix={gguf name: (cols,)})

The architecture, its metadata keys, tensor names and (for `llama` files) the q/k row order follow
llama.cpp's convert_hf_to_gguf.py (its rotary permutation); any other model type is refused. The file is written with the `gguf` package to a temporary name, then renamed.
"""
from __future__ import annotations

import os
import re
import struct
import warnings
from collections import Counter
from pathlib import Path
from typing import Any

import gguf
import numpy as np
import torch
from gguf import GGMLQuantizationType, GGUFValueType
from tqdm.auto import tqdm

from ..core import kquants
from ..errors import ModelpressError
from ..model.walker import dense_weight
from ..record import check_no_adapter, record
from .checkpoint import check_writable
from .gguf_mixes import MIXES, tensor_types
from .gguf_names import (
    ARCH,
    NORM_PLUS_ONE,
    PERMUTED,
    llama_cpp_layer_types,
    llama_cpp_query_scalar,
    to_gguf,
)
from .gguf_reader import metadata_fields, read_gguf
from .gguf_vocab import tokenizer_fields
from .registry import Format, register_format

# metadata that describes the weights, rewritten here rather than copied
_OWN_KEYS = ("general.file_type", "general.quantization_version", "general.alignment", "general.architecture")


def gguf_name(hf: str, arch: str = "llama") -> str:
    name = to_gguf(hf, arch)
    if name is not None:
        return name
    raise ModelpressError(f"{hf} has no GGUF name; the model holds a tensor the GGUF export does not know")


def gguf_arch(config) -> str:  # noqa: ANN001 (a transformers config)
    """The GGUF architecture `config`'s model is written as; a ModelpressError for the others."""
    arch = ARCH.get(getattr(config, "model_type", None))
    if arch is None:
        raise ModelpressError(f"GGUF export writes the model types {', '.join(ARCH)}; this model is "
                              f"{getattr(config, 'model_type', None)!r}. Save it as a checkpoint instead "
                              "(modelpress save / quantize --format modelpress)")
    return arch


def _permuted(hf: str, t: torch.Tensor, cfg) -> torch.Tensor:  # noqa: ANN001
    """t as the file holds it: q / k rows permuted for `llama` files (weights and biases alike),
    gemma's norms as 1 + w."""
    arch = gguf_arch(cfg)
    if arch in NORM_PLUS_ONE and hf.endswith("norm.weight"):
        return t + 1
    if arch not in PERMUTED:
        return t
    if ".q_proj." in hf:
        return permute_rope(t, cfg.num_attention_heads)
    if ".k_proj." in hf:
        return permute_rope(t, cfg.num_key_value_heads)
    return t


def permute_rope(w: torch.Tensor, n_head: int) -> torch.Tensor:
    """convert_hf_to_gguf's q/k row order: each head's rotary halves interleaved."""
    rows = w.shape[0]
    return w.reshape(n_head, 2, rows // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def gguf_tensors(model: torch.nn.Module) -> list[tuple[str, torch.Tensor]]:
    """(GGUF name, fp32 tensor) in convert_hf_to_gguf's order: embeddings, blocks, output.
    Quantized layers contribute their dequantized weight (what they compute with)."""

    cfg = model.config
    arch = gguf_arch(cfg)
    found: dict[str, torch.Tensor] = {}
    for hf, t in model.state_dict().items():
        if to_gguf(hf, arch) is not None:
            found[hf] = t
    for name, mod in model.named_modules():  # quantized linear layers: their effective weight
        if hasattr(mod, "dequantize") and not list(mod.children()) and f"{name}.weight" not in found:
            found[f"{name}.weight"] = dense_weight(mod)
    if getattr(cfg, "tie_word_embeddings", False):
        found.pop("lm_head.weight", None)
    out = []
    for hf, t in found.items():
        out.append((gguf_name(hf, arch), _permuted(hf, t.detach().float(), cfg).contiguous()))

    def order(item: tuple[str, torch.Tensor]) -> tuple:
        n = item[0]
        m = re.match(r"blk\.(\d+)\.(.*)", n)
        sub = ("attn_norm", "attn_qkv", "attn_q", "attn_q_norm", "attn_k", "attn_k_norm", "attn_v", "attn_output",
               "post_attention_norm", "ffn_norm", "ffn_gate", "ffn_up", "ffn_down", "post_ffw_norm")
        if m:
            part, kind = m.group(2).split(".")
            return (1, int(m.group(1)), sub.index(part), kind)
        return ({"token_embd.weight": 0, "output_norm.weight": 2, "output.weight": 3}[n], 0, 0, "")

    return sorted(out, key=order)


def held_blocks(model: torch.nn.Module) -> dict[str, tuple[str, torch.Tensor]]:
    """GGUF name -> (type, bytes in the file's row order) of the layers that hold GGUF blocks."""
    cfg = model.config
    out = {}
    for fqn, m in model.named_modules():
        if hasattr(m, "qdata") and hasattr(m, "kind"):
            data = _permuted(f"{fqn}.weight", m.qdata.cpu(), cfg)  # rows move whole: bytes permute alike
            out[gguf_name(f"{fqn}.weight", gguf_arch(cfg))] = (m.kind, data.contiguous())
    return out


def _hparams(writer: Any, cfg, arch: str) -> None:  # noqa: ANN001
    """The architecture's keys as convert_hf_to_gguf writes them: LlamaModel adds the vocabulary
    size and the rotary dimensions; every model the key / value length where its config names a
    head_dim (transformers writes one into every config.json it saves)."""
    writer.add_context_length(cfg.max_position_embeddings)
    writer.add_embedding_length(cfg.hidden_size)
    writer.add_block_count(cfg.num_hidden_layers)
    writer.add_feed_forward_length(cfg.intermediate_size)
    writer.add_head_count(cfg.num_attention_heads)
    writer.add_head_count_kv(cfg.num_key_value_heads)
    writer.add_layer_norm_rms_eps(cfg.rms_norm_eps)
    head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
    if arch in NORM_PLUS_ONE:
        _gemma_hparams(writer, cfg, arch, head_dim)
        return
    if arch == "phi3":
        _phi3_hparams(writer, cfg)
        return
    writer.add_rope_freq_base(float(getattr(cfg, "rope_theta", None) or cfg.rope_parameters["rope_theta"]))
    if arch == "llama":
        writer.add_rope_dimension_count(head_dim)
        writer.add_vocab_size(cfg.vocab_size)
    if cfg.to_dict().get("head_dim") is not None:
        writer.add_key_length(head_dim)
        writer.add_value_length(head_dim)


def _phi3_hparams(writer: Any, cfg) -> None:  # noqa: ANN001
    """phi3's keys as convert_hf_to_gguf's Phi3MiniModel writes them; the long-context variants (their
    rope factors) are refused for now."""
    rope = getattr(cfg, "rope_parameters", None) or {}
    if rope.get("rope_type", "default") != "default" or rope.get("long_factor"):
        raise ModelpressError("GGUF export writes phi3 models with plain rotary embeddings; this one scales them "
                              "(a long-context variant)")
    rot = float(rope.get("partial_rotary_factor", getattr(cfg, "partial_rotary_factor", 1.0)) or 1.0)
    writer.add_rope_scaling_orig_ctx_len(int(getattr(cfg, "original_max_position_embeddings", None)
                                             or cfg.max_position_embeddings))
    writer.add_rope_dimension_count(int(rot * cfg.hidden_size) // cfg.num_attention_heads)
    writer.add_rope_freq_base(float(rope.get("rope_theta", getattr(cfg, "rope_theta", 10000.0))))
    writer.add_sliding_window(cfg.sliding_window or 0)


def _gemma_hparams(writer: Any, cfg, arch: str, head_dim: int) -> None:  # noqa: ANN001
    """gemma2 / gemma3 keys as convert_hf_to_gguf writes them. llama.cpp's file has no place for the
    layers' sliding pattern or the query scale (it derives them): a model that differs is refused."""
    if list(cfg.layer_types) != llama_cpp_layer_types(arch, cfg.num_hidden_layers) or \
            cfg.query_pre_attn_scalar != llama_cpp_query_scalar(arch, cfg.num_hidden_layers, cfg.hidden_size,
                                                                 cfg.num_attention_heads, cfg.head_dim):
        raise ModelpressError(f"this {arch} model's sliding-window layers or query scale differ from those llama.cpp "
                              "derives for the architecture; a GGUF file would compute another model")
    writer.add_key_length(head_dim)
    writer.add_value_length(head_dim)
    writer.add_sliding_window(cfg.sliding_window)
    if arch == "gemma2":
        writer.add_attn_logit_softcapping(cfg.attn_logit_softcapping)
        writer.add_final_logit_softcapping(cfg.final_logit_softcapping)
        return
    rope = cfg.rope_parameters
    if any(r.get("rope_type", "default") != "default" for r in rope.values()):
        raise ModelpressError("GGUF export writes gemma3 models with plain rotary embeddings; this one scales them")
    writer.add_rope_freq_base(float(rope["full_attention"]["rope_theta"]))
    writer.add_rope_freq_base_swa(float(rope["sliding_attention"]["rope_theta"]))
    if cfg.final_logit_softcapping:
        writer.add_final_logit_softcapping(cfg.final_logit_softcapping)


def _source_fields(source_gguf: str | Path) -> list[tuple[str, Any, Any, Any]]:
    """(key, value, type, sub type) of the source file's metadata, for copying."""
    return [(k, v, GGUFValueType(t), None if sub is None else GGUFValueType(sub))
            for k, v, t, sub in metadata_fields(source_gguf) if k not in _OWN_KEYS]


def _writer(path: Path, arch: str) -> Any:
    """gguf.GGUFWriter whose arrays of strings or numbers pack in one go: the same bytes (little
    endian), where packing the 49k tokens and merges of a vocabulary item by item takes ~1 s."""

    class Writer(gguf.GGUFWriter):
        def _pack_val(self, val: Any, vtype: Any, add_vtype: bool, sub_type: Any = None) -> bytes:
            fast = (vtype == gguf.GGUFValueType.ARRAY and sub_type is not None and len(val) > 0
                    and self.endianess == gguf.GGUFEndian.LITTLE)
            if not fast or (sub_type != gguf.GGUFValueType.STRING and sub_type not in self._simple_value_packing):
                return super()._pack_val(val, vtype, add_vtype, sub_type)
            head = struct.pack("<I", vtype) if add_vtype else b""
            head += struct.pack("<IQ", sub_type, len(val))
            if sub_type == gguf.GGUFValueType.STRING:
                enc = [v.encode("utf-8") if isinstance(v, str) else v for v in val]
                return head + b"".join(struct.pack("<Q", len(e)) + e for e in enc)
            fmt = self._simple_value_packing[sub_type]
            return head + struct.pack(f"<{len(val)}{fmt}", *val)

    return Writer(str(path), arch)


def write_gguf(path: str | Path, model: torch.nn.Module, mix: str, source_gguf: str | Path | None = None,
               imatrix: dict[str, torch.Tensor] | None = None, progress: bool = True,
               extra_metadata: dict[str, str | int] | None = None, tokenizer: Any = None,
               types: dict[str, str] | None = None) -> dict[str, str]:
    """Write `model` as GGUF `mix`; returns {tensor name: type}. `source_gguf` gives the tokenizer
    and descriptive metadata; without one, `tokenizer` (a transformers tokenizer) gives the
    tokenizer's (formats/gguf_vocab.py). `imatrix` maps GGUF tensor names to importance vectors;
    `extra_metadata` adds string / integer keys (llama-quantize's quantize.imatrix.*). `types`
    overrides the mix's type per tensor (methods/auto.py); a layer that already holds GGUF blocks
    of its tensor's type (nn/gguf_linear.py) is written as those bytes, not rounded again."""
    cfg = model.config
    tensors = gguf_tensors(model)
    types = {**tensor_types([(n, tuple(t.shape)) for n, t in tensors], mix, cfg.num_attention_heads,
                            cfg.num_key_value_heads, imatrix=bool(imatrix)), **(types or {})}
    blocks = held_blocks(model)
    path = Path(path)
    tmp = path.with_name(path.name + ".part")
    arch = gguf_arch(cfg)
    window = getattr(cfg, "sliding_window", None) if cfg.model_type == "mistral" else None
    if window is not None and window < cfg.max_position_embeddings:
        warnings.warn(f"the GGUF file computes full attention: llama.cpp's `llama` architecture has no sliding "
                      f"window, so past {window} tokens llama.cpp's output differs from transformers' (its own "
                      "converter writes Mistral the same way)", stacklevel=2)
    writer = _writer(tmp, arch)
    if source_gguf is not None:
        fields = _source_fields(source_gguf)
    elif tokenizer is not None:
        fields = [(k, v, GGUFValueType(t), None if sub is None else GGUFValueType(sub))
                  for k, v, t, sub in tokenizer_fields(tokenizer, cfg.vocab_size)]
    else:
        raise ModelpressError("GGUF export needs the tokenizer: a source GGUF file or a transformers tokenizer")
    for key, value, vtype, sub in fields:
        if not key.startswith(f"{arch}."):
            writer.add_key_value(key, value, vtype, sub)
    _hparams(writer, cfg, arch)
    writer.add_file_type(MIXES[mix][0])
    writer.add_quantization_version(gguf.GGML_QUANT_VERSION)
    for key, value in (extra_metadata or {}).items():
        writer.add_string(key, value) if isinstance(value, str) else writer.add_uint32(key, value)  # as llama-quantize
    for name, t in tqdm(tensors, desc=f"gguf {mix}", unit="tensor", disable=not progress, leave=False):
        kind = types[name]
        if kind in kquants.BLOCK:
            imat = None if not imatrix else imatrix.get(name)
            held = blocks.get(name)
            data = (held[1] if held is not None and held[0] == kind else kquants.quantize(t, kind, imat)).numpy()
            writer.add_tensor(name, data, raw_dtype=getattr(gguf.GGMLQuantizationType, kind))  # byte shape
        elif kind == "F16":
            writer.add_tensor(name, t.to(torch.float16).numpy())
        elif kind == "BF16":
            raw = t.to(torch.bfloat16).contiguous().view(torch.uint8).numpy()
            writer.add_tensor(name, raw, raw_dtype=gguf.GGMLQuantizationType.BF16)
        else:
            writer.add_tensor(name, t.numpy().astype(np.float32))
    try:
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_tensors_to_file()
        writer.close()
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()
    return types


def default_mix(model: torch.nn.Module) -> str:
    """The mix a model is exported in when none is named: its config's target_mix, else Q4_K_M."""
    return getattr(record(model).config, "target_mix", None) or "Q4_K_M"


def export_gguf(model: torch.nn.Module, tokenizer: Any, path: str | Path, mix: str | None = None,
                imatrix: dict[str, torch.Tensor] | None = None, types: dict[str, str] | None = None,
                extra_metadata: dict[str, str | int] | None = None, progress: bool = True) -> dict[str, str]:
    """Write `model` as a GGUF file llama.cpp runs; returns {tensor name: type}. The one entry for
    every GGUF the library writes (`export`, `quantize --format gguf`, `compare`).

    mix: llama.cpp's mix (Q4_K_M, ...). Left out, the model's own choice: the plan of `auto`
    (its per-tensor types), else the types of layers already on GGUF blocks (an `auto` checkpoint),
    else its config's target_mix, else Q4_K_M. The tokenizer and descriptive metadata come from
    the GGUF the model was loaded from, where it was one."""
    check_no_adapter(model, "GGUF export (for the adapter itself: export --format gguf-lora)")
    source = Path(record(model).source or "")
    plan = record(model).plan
    if mix is None and types is None:
        if plan is not None:
            mix, types = plan.file_type, plan.types
        else:
            types = {n: k for n, (k, _) in held_blocks(model).items()} or None
    return write_gguf(path, model, mix or default_mix(model), source if source.suffix.lower() == ".gguf" else None,
                      imatrix=imatrix, progress=progress, extra_metadata=extra_metadata, tokenizer=tokenizer,
                      types=types)


def _save(model: torch.nn.Module, tokenizer: Any, path: str | Path) -> Path:
    export_gguf(model, tokenizer, path)
    return Path(path)


def check_file(path: Path) -> Path:
    """A GGUF destination: a file path in an existing folder that takes new files."""

    if path.is_dir() or not path.parent.is_dir():
        raise ModelpressError(f"--out must be a file path in an existing folder; got {path}")
    return check_writable(path)


def describe_gguf(path: Path) -> dict[str, Any]:
    meta, tensors = read_gguf(path)
    return {"architecture": meta.get("general.architecture"), "name": meta.get("general.name"),
            "tensors": len(tensors),
            "tensor_types": dict(Counter(GGMLQuantizationType(t.ggml_type).name for t in tensors))}


# `quantize --format gguf` saves an `auto` model with its per-tensor types; any model goes through `export`
register_format(Format("gguf", "a GGUF file llama.cpp runs (quantize: --method auto; any model: `export`)",
                       methods=("auto",), save=_save, check=check_file, describe=describe_gguf))
