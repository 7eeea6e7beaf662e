"""The AutoAWQ "GEMM" checkpoint layout (AutoAWQ, transformers, vLLM's awq kernels), both ways.

Per quantized linear layer P (in_features K, out_features N, G groups, 4 bits only):
    P.qweight  int32 (K, N / 8)  row k: the codes W[0..N, k] packed along the OUTPUT dimension,
                                 eight a word in AWQ's interleaved order: bits [4i, 4i + 4) of word
                                 c hold output column 8c + AWQ_ORDER[i], AWQ_ORDER = 0 2 4 6 1 3 5 7
    P.qzeros   int32 (G, N / 8)  zero points, packed the same way (not minus one)
    P.scales   fp16 (G, N)
    P.bias     fp16 (N,), if the layer has one
W[n, k] = scales[k // group, n] * (code[n, k] - zero[k // group, n]).
config.json: "quantization_config": {"quant_method": "awq", "bits": 4, "group_size",
"zero_point": true, "version": "gemm", "modules_to_not_convert": null}.
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

QUANT_METHOD = "awq"
AWQ_ORDER = (0, 2, 4, 6, 1, 3, 5, 7)


def _interleave(cols: torch.Tensor) -> torch.Tensor:
    """(..., N) -> (..., N) with each run of 8 columns in AWQ's packing order."""
    *lead, n = cols.shape
    return cols.reshape(*lead, n // 8, 8)[..., list(AWQ_ORDER)].reshape(*lead, n)


def _deinterleave(cols: torch.Tensor) -> torch.Tensor:
    *lead, n = cols.shape
    inverse = [AWQ_ORDER.index(i) for i in range(8)]
    return cols.reshape(*lead, n // 8, 8)[..., inverse].reshape(*lead, n)


def quantization_config(config: Any) -> dict[str, Any]:
    return {"quant_method": QUANT_METHOD, "bits": config.bits, "group_size": config.group_size,
            "zero_point": not config.symmetric, "version": "gemm", "modules_to_not_convert": None}


def layer_to_hf(m: IntxLinear) -> dict[str, torch.Tensor]:
    if m.bits != 4 or m.group_size is None or m.perm is not None or m.out_features % 8:
        raise ModelpressError("the AWQ GEMM layout holds 4-bit grouped weights in column order, "
                              "with output sizes that are multiples of 8")
    m.check_plain()
    zero = (torch.full_like(m.scale, 8, dtype=torch.uint8) if m.zero_point is None else m.zero_point)
    out = {"qweight": packing.pack_int32(_interleave(m.codes().t().contiguous()), 4),
           "qzeros": packing.pack_int32(_interleave(zero.t().contiguous()), 4),
           "scales": m.scale.t().contiguous().to(torch.float16)}
    if m.bias is not None:
        out["bias"] = m.bias.to(torch.float16)
    return out


def layer_from_hf(t: dict[str, torch.Tensor], group_size: int) -> IntxLinear:
    K, N = t["qweight"].shape[0], t["qweight"].shape[1] * 8
    codes = _deinterleave(packing.unpack_int32(t["qweight"], 4, N)).t().contiguous()     # (N, K)
    zero = _deinterleave(packing.unpack_int32(t["qzeros"], 4, N)).t().contiguous()       # (N, G)
    m = IntxLinear(K, N, 4, group_size, symmetric=False, bias="bias" in t)
    m.set_codes(codes, t["scales"].t().contiguous().to(torch.float16), zero)
    if "bias" in t:
        m.bias = t["bias"].float()
    return m


def save(model: torch.nn.Module, tokenizer: Any, out: str | Path) -> Path:
    """Write `model` (4-bit grouped IntxLinear layers: AWQ, GPTQ without act order, RTN) as an
    AutoAWQ GEMM folder."""
    out = check_new(out)
    config = record(model).config
    if config is None or not any(isinstance(m, IntxLinear) for m in model.modules()):
        raise ModelpressError("only a model quantized to 4-bit integer groups can be saved in the AWQ layout")
    return write_folder(model, tokenizer, out, with_layers_as(model, IntxLinear, layer_to_hf), quantization_config(config))


def from_hf(qc: dict[str, Any], state: dict[str, torch.Tensor]
            ) -> tuple[Any, dict[str, torch.Tensor], Callable[[torch.nn.Module], None]]:

    if int(qc.get("bits", 4)) != 4 or str(qc.get("version", "gemm")).lower() != "gemm":
        raise ModelpressError(f"AWQ {qc.get('version')} at {qc.get('bits')} bits is not supported (GEMM, 4 bits)")
    group = int(qc.get("group_size", 128))
    prepare = layers_from(state, "qweight", lambda t: layer_from_hf(t, group))
    config = BaseConfig.from_dict({"method": "awq", "bits": 4, "group_size": group,
                                   "symmetric": not qc.get("zero_point", True)})
    return config, state, prepare



register_format(Format("awq", "AutoAWQ's GEMM layout (transformers, vLLM)", methods=("awq", "gptq", "rtn"), save=save, check=check_new,
                       quant_method=QUANT_METHOD, read=from_hf, describe=describe_transformers))
