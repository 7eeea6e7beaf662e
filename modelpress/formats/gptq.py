"""The HF GPTQ checkpoint layout (AutoGPTQ / GPTQModel / transformers / vLLM), both ways.

Per quantized linear layer `P` (in_features = K, out_features = N, G groups, b bits):
    P.qweight  int32 (K * b / 32, N)  column n: the codes W[n, 0..K) as a little-endian bit stream
                                      in 32-bit words (eight 4-bit codes a word, lowest first)
    P.qzeros   int32 (G, N * b / 32)  row g: the zero points of group g for every output, packed
                                      the same way along N, each stored minus one ("v1";
                                      checkpoint_format "gptq_v2" stores them as they are)
    P.scales   fp16 (G, N)
    P.g_idx    int32 (K,)             group of each input column (act order: not sorted)
    P.bias     fp16 (N,), if the layer has one
W[n, k] = scales[g_idx[k], n] * (code[n, k] - zero[g_idx[k], n]).
config.json: "quantization_config": {"quant_method": "gptq", "bits", "group_size" (-1: one group
per row), "desc_act", "sym", "checkpoint_format": "gptq", ...}. modelpress keeps GPTQ weights as
IntxLinear (columns permuted so that groups are contiguous, see nn/intx_linear.py); these
functions convert. No modelpress.json is written: the folder is what the other tools write.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any, Callable

import torch

from ..config import BaseConfig
from ..core import packing
from ..errors import ModelpressError
from ..nn import IntxLinear
from ..record import record
from .checkpoint import check_new, layers_from, with_layers_as, write_folder
from .registry import Format, describe_transformers, register_format

QUANT_METHOD = "gptq"


def quantization_config(config: Any) -> dict[str, Any]:
    return {"quant_method": QUANT_METHOD, "bits": config.bits,
            "group_size": -1 if config.group_size is None else config.group_size,
            "desc_act": bool(getattr(config, "act_order", False)), "sym": bool(config.symmetric),
            "static_groups": bool(getattr(config, "static_groups", False)),
            "damp_percent": getattr(config, "damp", 0.01), "true_sequential": False,
            "checkpoint_format": "gptq", "pack_dtype": "int32", "quantizer": ["modelpress"]}


def layer_to_hf(m: IntxLinear) -> dict[str, torch.Tensor]:
    """qweight, qzeros, scales, g_idx (and bias) of one layer."""
    m.check_plain()
    b, K = m.bits, m.in_features
    maxq = 2 ** b - 1
    gs = K if m.group_size is None else m.group_size
    codes = m.codes()                                  # (N, K) in stored column order
    g_stored = torch.arange(K) // gs
    g_idx = g_stored
    if m.perm is not None:                             # back to the original column order
        inv = torch.argsort(m.perm)
        codes, g_idx = codes[:, inv], g_stored[inv]
    zero = (torch.full_like(m.scale, 2 ** (b - 1), dtype=torch.uint8) if m.zero_point is None
            else m.zero_point)                         # (N, G)
    out = {"qweight": packing.pack_int32(codes, b).t().contiguous(),
           "qzeros": packing.pack_int32(((zero.to(torch.int16) - 1) & maxq).t().to(torch.uint8), b),
           "scales": m.scale.t().contiguous().to(torch.float16),
           "g_idx": g_idx.to(torch.int32)}
    if m.bias is not None:
        out["bias"] = m.bias.to(torch.float16)
    return out


def layer_from_hf(t: dict[str, torch.Tensor], bits: int, group_size: int | None, v2: bool = False) -> IntxLinear:
    """An IntxLinear from one layer's HF GPTQ tensors."""
    maxq = 2 ** bits - 1
    K, N = t["qweight"].shape[0] * 32 // bits, t["qweight"].shape[1]
    codes = packing.unpack_int32(t["qweight"].t(), bits, K)                          # (N, K)
    zero = packing.unpack_int32(t["qzeros"], bits, N).to(torch.int16)                  # (G, N)
    zero = (zero if v2 else (zero + 1) & maxq).t().to(torch.uint8)
    gs = K if group_size is None else group_size
    g_idx = t["g_idx"].long() if "g_idx" in t else torch.arange(K) // gs
    perm = None
    if not torch.equal(g_idx, torch.arange(K) // gs):
        perm = torch.argsort(g_idx, stable=True)
        if not torch.equal(g_idx[perm], torch.arange(K) // gs):
            raise ModelpressError(f"g_idx does not form groups of {gs} columns; this GPTQ file is not supported")
        codes = codes[:, perm]
    m = IntxLinear(K, N, bits, group_size, symmetric=False, bias="bias" in t, permuted=perm is not None)
    m.set_codes(codes, t["scales"].t().contiguous().to(torch.float16), zero)
    if perm is not None:
        m.perm = perm
    if "bias" in t:
        m.bias = t["bias"].float()
    return m


def save(model: torch.nn.Module, tokenizer: Any, out: str | Path) -> Path:
    """Write `model` (GPTQ- or RTN-quantized IntxLinear layers) as an HF GPTQ folder."""

    out = check_new(out)
    config = record(model).config
    quant = [m for m in model.modules() if isinstance(m, IntxLinear)]
    if config is None or not quant:
        raise ModelpressError("only a GPTQ- or RTN-quantized model can be saved in the GPTQ layout")
    if len({(m.bits, m.group_size) for m in quant}) != 1:
        raise ModelpressError("the GPTQ layout needs one bit width and group size for every layer")
    return write_folder(model, tokenizer, out, with_layers_as(model, IntxLinear, layer_to_hf), quantization_config(config))


def from_hf(qc: dict[str, Any], state: dict[str, torch.Tensor]
            ) -> tuple[Any, dict[str, torch.Tensor], Callable[[torch.nn.Module], None]]:
    """(modelpress config, state dict for IntxLinear layers, prepare(model) that swaps them in)."""

    bits = int(qc.get("bits", 4))
    group = qc.get("group_size", 128)
    group = None if group in (-1, None) else int(group)
    v2 = qc.get("checkpoint_format", "gptq") == "gptq_v2"
    prepare = layers_from(state, "qweight", lambda t: layer_from_hf(t, bits, group, v2))
    config = BaseConfig.from_dict({"method": "gptq", "bits": bits, "group_size": group, "symmetric": bool(qc.get("sym", False)),
                                   "act_order": bool(qc.get("desc_act", False)),
                                   "static_groups": bool(qc.get("static_groups", False))})
    return config, state, prepare



register_format(Format("gptq", "the HF GPTQ layout (transformers, vLLM, GPTQModel)", methods=("gptq", "awq", "rtn"), save=save, check=check_new,
                       quant_method=QUANT_METHOD, read=from_hf, describe=describe_transformers))
