"""compressed-tensors "pack-quantized" checkpoints (what llm-compressor writes, vLLM reads), both ways.

Per quantized linear layer P (out_features N, in_features K, G groups, b bits), integer weights
q in [-2^(b-1), 2^(b-1) - 1] stored shifted by +2^(b-1) as unsigned codes:
    P.weight_packed       int32 (N, ceil(K * b / 32))  each row's codes, little-endian bit stream
    P.weight_scale        float (N, G)
    P.weight_zero_point   int32 (ceil(N * b / 32), G)  asymmetric only: zero points, shifted and
                                                       packed the same way along N (dim 0)
    P.weight_g_idx        int32 (K,)                   only for activation order "group"
    P.weight_shape        int64 (2,) = [N, K]
W = scale * (q - zero_point).
W8A8 layers ("int-quantized", what vLLM runs as int8 W8A8) keep their W8A8Linear tensors as they are:
    P.weight int8 (N, K), P.weight_scale (N, 1), P.input_scale (1,) with static activations
config.json: "quantization_config": {"quant_method":
"compressed-tensors", "format": "pack-quantized", "config_groups": {...: {"weights": {"num_bits",
"group_size", "symmetric", "strategy", ...}}}, "ignore": [...]}. Loaded as IntxLinear with the
unsigned codes and zero points (zero + 2^(b-1)) and the scales in their stored dtype, so the
dequantized weights equal compressed-tensors' own.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any, Callable

import torch

from ..config import BaseConfig
from ..core import packing
from ..errors import ModelpressError
from ..nn import IntxLinear, W8A8Linear
from .checkpoint import check_new, layers_from, with_layers_as, write_folder
from .registry import Format, describe_transformers, register_format

QUANT_METHOD = "compressed-tensors"


def _weights_args(qc: dict[str, Any]) -> dict[str, Any]:
    if qc.get("format") not in ("pack-quantized", None):
        raise ModelpressError(f"compressed-tensors format {qc.get('format')!r} is not supported (pack-quantized, and "
                              "int-quantized int8 W8A8)")
    groups = list((qc.get("config_groups") or {}).values())
    if len(groups) != 1 or not groups[0].get("weights") or groups[0].get("input_activations"):
        raise ModelpressError("only one weight-only quantization group is supported in compressed-tensors files")
    w = groups[0]["weights"]
    if w.get("type", "int") != "int" or w.get("strategy") not in ("group", "channel"):
        raise ModelpressError(f"compressed-tensors weights of type {w.get('type')} / strategy {w.get('strategy')} "
                              "are not supported (int, group or channel)")
    return w


def layer_from_ct(t: dict[str, torch.Tensor], bits: int, group_size: int | None, symmetric: bool) -> IntxLinear:
    N, K = (int(v) for v in t["weight_shape"].tolist())
    codes = packing.unpack_int32(t["weight_packed"], bits, K)                       # (N, K) unsigned
    scale = t["weight_scale"].reshape(N, -1)
    if symmetric:
        zero = None
    else:
        zp = packing.unpack_int32(t["weight_zero_point"].t(), bits, N).t()           # (N, G) unsigned
        zero = zp.to(torch.uint8)
    gs = K if group_size is None else group_size
    perm = None
    if "weight_g_idx" in t and not torch.equal(t["weight_g_idx"].long(), torch.arange(K) // gs):
        g_idx = t["weight_g_idx"].long()
        perm = torch.argsort(g_idx, stable=True)
        if not torch.equal(g_idx[perm], torch.arange(K) // gs):
            raise ModelpressError(f"weight_g_idx does not form groups of {gs} columns; not supported")
        codes = codes[:, perm]
    m = IntxLinear(K, N, bits, group_size, symmetric, bias="bias" in t, permuted=perm is not None)
    m.set_codes(codes, scale, zero)
    m.scale = scale.contiguous()        # keep the stored dtype (fp32 from llm-compressor): exact weights
    if perm is not None:
        m.perm = perm
    if "bias" in t:
        m.bias = t["bias"].float()
    return m


def quantization_config(layers: list[IntxLinear]) -> dict[str, Any]:
    """The config block llm-compressor writes for one weight-only integer group."""
    m = layers[0]
    weights = {"actorder": None, "block_structure": None, "dynamic": False,
               "group_size": m.group_size, "num_bits": m.bits, "observer": "minmax", "observer_kwargs": {},
               "strategy": "channel" if m.group_size is None else "group", "symmetric": m.zero_point is None,
               "type": "int"}
    return {"config_groups": {"group_0": {"format": "pack-quantized", "input_activations": None,
                                          "output_activations": None, "targets": ["Linear"], "weights": weights}},
            "format": "pack-quantized", "ignore": ["lm_head"], "kv_cache_scheme": None,
            "quant_method": QUANT_METHOD, "quantization_status": "compressed", "sparsity_config": {}}


def _pack_padded(codes: torch.Tensor, bits: int) -> torch.Tensor:
    """pack_int32 of any length, as compressed-tensors packs: padded to 32 codes, then cut to
    ceil(n * bits / 32) words."""
    n = codes.shape[-1]
    return packing.pack_int32(torch.nn.functional.pad(codes, (0, -n % 32)), bits)[..., : -(-n * bits // 32)]


def layer_to_ct(m: IntxLinear) -> dict[str, torch.Tensor]:
    """weight_packed, weight_scale, weight_zero_point, weight_shape (and weight_g_idx) of a layer.
    Our unsigned codes and zero points are compressed-tensors' signed values + 2^(bits-1): the
    same bits."""
    m.check_plain()
    codes, scale = m.codes(), m.scale
    K = m.in_features
    if m.perm is not None:
        raise ModelpressError("compressed-tensors (0.19) no longer has groups in activation order (g_idx); "
                              "quantize with --static-groups, or save as --format gptq")
    out = {"weight_shape": torch.tensor([m.out_features, K], dtype=torch.int64)}
    out["weight_packed"] = _pack_padded(codes, m.bits)
    out["weight_scale"] = scale.contiguous()
    if m.zero_point is not None:
        out["weight_zero_point"] = _pack_padded(m.zero_point.t().contiguous(), m.bits).t().contiguous()
    if m.bias is not None:
        out["bias"] = m.bias
    return out


def w8a8_quantization_config(layers: list[W8A8Linear]) -> dict[str, Any]:
    """The config block llm-compressor writes for int8 W8A8 (its W8A8 scheme, int-quantized)."""
    m = layers[0]
    weights = {"actorder": None, "block_structure": None, "dynamic": False, "group_size": None, "num_bits": 8,
               "observer": "minmax", "observer_kwargs": {}, "strategy": "channel", "symmetric": True, "type": "int"}
    acts = {"actorder": None, "block_structure": None, "dynamic": not m.static, "group_size": None, "num_bits": 8,
            "observer": "minmax" if m.static else None, "observer_kwargs": {}, "strategy": m.granularity,
            "symmetric": True, "type": "int"}
    return {"config_groups": {"group_0": {"format": "int-quantized", "input_activations": acts,
                                          "output_activations": None, "targets": ["Linear"], "weights": weights}},
            "format": "int-quantized", "ignore": ["lm_head"], "kv_cache_scheme": None,
            "quant_method": QUANT_METHOD, "quantization_status": "compressed", "sparsity_config": {}}


def _w8a8_args(qc: dict[str, Any]) -> tuple[bool, str]:
    """(static, granularity) of an int-quantized W8A8 config; anything else is refused by name."""
    groups = list((qc.get("config_groups") or {}).values())
    w, a = (groups[0].get("weights") or {}, groups[0].get("input_activations") or {}) if len(groups) == 1 else ({}, {})
    if (w.get("num_bits"), w.get("type", "int"), w.get("symmetric", True), w.get("strategy")) != (8, "int", True, "channel") \
            or (a.get("num_bits"), a.get("type", "int"), a.get("symmetric", True)) != (8, "int", True) \
            or a.get("strategy") not in ("tensor", "token") or (not a.get("dynamic") and a.get("strategy") != "tensor"):
        raise ModelpressError("compressed-tensors int-quantized files are read as int8 W8A8: symmetric int8 weights "
                              "per channel, symmetric int8 activations per tensor (static or dynamic) or per token "
                              "(dynamic), one config group")
    return not a.get("dynamic"), a["strategy"]


def _w8a8_from_ct(t: dict[str, torch.Tensor], static: bool, granularity: str) -> W8A8Linear:
    n, k = t["weight"].shape
    if t["weight"].dtype != torch.int8 or static != ("input_scale" in t):
        raise ModelpressError("an int-quantized layer needs int8 weights, and an input_scale exactly when its "
                              "activations are static")
    m = W8A8Linear(k, n, static, granularity, bias="bias" in t)
    m.load_state_dict({key: v.float() if v.is_floating_point() else v for key, v in t.items()})
    return m


def save(model: torch.nn.Module, tokenizer: Any, out: str | Path) -> Path:
    """Write `model`'s integer group layers (RTN, GPTQ, AWQ), or its int8 W8A8 layers, as a
    compressed-tensors folder."""

    out = check_new(out)
    w8a8 = [m for m in model.modules() if isinstance(m, W8A8Linear)]
    if w8a8:
        if len({(m.static, m.granularity) for m in w8a8}) != 1:
            raise ModelpressError("compressed-tensors needs one activation scheme for every W8A8 layer")
        tensors = with_layers_as(model, W8A8Linear, lambda m: dict(m.state_dict()))
        return write_folder(model, tokenizer, out, tensors, w8a8_quantization_config(w8a8))
    layers = [m for m in model.modules() if isinstance(m, IntxLinear)]
    if not layers:
        raise ModelpressError("only a model quantized to integer groups can be saved as compressed-tensors")
    if len({(m.bits, m.group_size, m.zero_point is None) for m in layers}) != 1:
        raise ModelpressError("compressed-tensors needs one bit width, group size and symmetry for every layer")
    return write_folder(model, tokenizer, out, with_layers_as(model, IntxLinear, layer_to_ct), quantization_config(layers))


def from_hf(qc: dict[str, Any], state: dict[str, torch.Tensor]
            ) -> tuple[Any, dict[str, torch.Tensor], Callable[[torch.nn.Module], None]]:
    """(modelpress config, state dict for IntxLinear / W8A8Linear layers, prepare(model) that swaps
    them in)."""

    if qc.get("format") == "int-quantized":
        static, granularity = _w8a8_args(qc)
        prepare = layers_from(state, "weight_scale", lambda t: _w8a8_from_ct(t, static, granularity))
        config = BaseConfig.from_dict({"method": "w8a8", "activations": "static" if static else "dynamic",
                                       "granularity": granularity})
        return config, state, prepare
    w = _weights_args(qc)
    bits, symmetric = int(w["num_bits"]), bool(w.get("symmetric", True))
    group = int(w["group_size"]) if w.get("strategy") == "group" else None
    prepare = layers_from(state, "weight_packed", lambda t: layer_from_ct(t, bits, group, symmetric))
    # the file says how weights are stored, not how they were chosen (GPTQ, AWQ, RTN): record the grid
    config = (BaseConfig.from_dict({"method": "rtn", "bits": bits, "group_size": group, "symmetric": symmetric})
              if bits in (2, 3, 4, 8) else None)
    return config, state, prepare



register_format(Format("compressed-tensors", "llm-compressor's pack-quantized and int-quantized (W8A8) layouts (vLLM, transformers)", methods=("rtn", "gptq", "awq", "w8a8"), save=save, check=check_new,
                       quant_method=QUANT_METHOD, read=from_hf, describe=describe_transformers))
