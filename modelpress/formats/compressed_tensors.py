"""compressed-tensors "pack-quantized" checkpoints (what llm-compressor writes, vLLM reads), both ways.

Per quantized linear layer P (out_features N, in_features K, G groups, b bits), integer weights
q in [-2^(b-1), 2^(b-1) - 1] stored shifted by +2^(b-1) as unsigned codes:
    P.weight_packed       int32 (N, ceil(K * b / 32))  each row's codes, little-endian bit stream
    P.weight_scale        float (N, G)
    P.weight_zero_point   int32 (ceil(N * b / 32), G)  asymmetric only: zero points, shifted and
                                                       packed the same way along N (dim 0)
    P.weight_g_idx        int32 (K,)                   only for activation order "group"
    P.weight_shape        int64 (2,) = [N, K]
W = scale * (q - zero_point). config.json: "quantization_config": {"quant_method":
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
from ..nn import IntxLinear
from .checkpoint import check_new, layers_from, with_layers_as, write_folder
from .registry import Format, describe_transformers, register_format

QUANT_METHOD = "compressed-tensors"


def _weights_args(qc: dict[str, Any]) -> dict[str, Any]:
    if qc.get("format") not in ("pack-quantized", None):
        raise ModelpressError(f"compressed-tensors format {qc.get('format')!r} is not supported (only pack-quantized)")
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


def save(model: torch.nn.Module, tokenizer: Any, out: str | Path) -> Path:
    """Write `model`'s integer group layers (RTN, GPTQ, AWQ) as a compressed-tensors folder."""

    out = check_new(out)
    layers = [m for m in model.modules() if isinstance(m, IntxLinear)]
    if not layers:
        raise ModelpressError("only a model quantized to integer groups can be saved as compressed-tensors")
    if len({(m.bits, m.group_size, m.zero_point is None) for m in layers}) != 1:
        raise ModelpressError("compressed-tensors needs one bit width, group size and symmetry for every layer")
    return write_folder(model, tokenizer, out, with_layers_as(model, IntxLinear, layer_to_ct), quantization_config(layers))


def from_hf(qc: dict[str, Any], state: dict[str, torch.Tensor]
            ) -> tuple[Any, dict[str, torch.Tensor], Callable[[torch.nn.Module], None]]:
    """(modelpress config, state dict for IntxLinear layers, prepare(model) that swaps them in)."""

    w = _weights_args(qc)
    bits, symmetric = int(w["num_bits"]), bool(w.get("symmetric", True))
    group = int(w["group_size"]) if w.get("strategy") == "group" else None
    prepare = layers_from(state, "weight_packed", lambda t: layer_from_ct(t, bits, group, symmetric))
    # the file says how weights are stored, not how they were chosen (GPTQ, AWQ, RTN): record the grid
    config = (BaseConfig.from_dict({"method": "rtn", "bits": bits, "group_size": group, "symmetric": symmetric})
              if bits in (2, 3, 4, 8) else None)
    return config, state, prepare



register_format(Format("compressed-tensors", "llm-compressor's pack-quantized layout (vLLM, transformers)", methods=("rtn", "gptq", "awq"), save=save, check=check_new,
                       quant_method=QUANT_METHOD, read=from_hf, describe=describe_transformers))
