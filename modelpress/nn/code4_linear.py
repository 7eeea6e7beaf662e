"""Code4Linear: NF4 / FP4 weights (bitsandbytes' Linear4bit), optionally with double quantization.

State dict, key for key what transformers writes for a bitsandbytes 4-bit layer (so that a
modelpress checkpoint loads in transformers + bitsandbytes, and theirs loads here):
    weight                                 uint8 (ceil(out * in / 2), 1): codes, high nibble first
    weight.absmax                          fp32 (n_blocks,), or uint8 (n_blocks,) double-quantized
    weight.quant_map                       fp32 (16,) the code book
    weight.nested_absmax                   fp32 (ceil(n_blocks / 256),)   double quant only
    weight.nested_quant_map                fp32 (256,) the dynamic map    double quant only
    weight.quant_state.bitsandbytes__nf4   uint8: JSON {quant_type, blocksize, dtype, shape,
                                           [nested_blocksize, nested_dtype, nested_offset]}
    bias                                   as the original layer
(core/codebook4.py and core/dynamic8.py define the numbers.)

Forward: inputs of up to 8 rows (decode; nn.dense_linear.kernel_allowed) go through the hand-written kernel
(kernels/gemv.c), which reads the packed codes directly; larger inputs (prefill,
perplexity) dequantize the layer to the compute dtype and multiply, exactly as bitsandbytes'
CPU path does, so the two give the same numbers.
"""
from __future__ import annotations

import json

import torch
import torch.nn.functional as F

from .. import kernels
from ..core import codebook4, dynamic8
from ..errors import ModelpressError
from ..kernels import ops
from .dense_linear import kernel_allowed
from .frozen import frozen_product, wants_input_grad

COMPUTE_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}


def quant_state_key(quant_type: str) -> str:
    return f"weight.quant_state.bitsandbytes__{quant_type}"


def read_quant_state(blob: torch.Tensor) -> dict:
    """bitsandbytes' quant_state tensor (uint8 bytes of a JSON object) as a dict."""
    return json.loads(bytes(blob.to(torch.uint8).tolist()).decode())


class Code4Linear(torch.nn.Module):
    def __init__(self, in_features: int, out_features: int, quant_type: str = "nf4", blocksize: int = 64,
                 double_quant: bool = False, compute_dtype: str = "float32", bias: bool = False) -> None:
        super().__init__()
        if compute_dtype not in COMPUTE_DTYPES:
            raise ValueError(f"compute dtype must be one of {sorted(COMPUTE_DTYPES)}, got {compute_dtype!r}")
        self.in_features, self.out_features = in_features, out_features
        self.quant_type, self.blocksize, self.double_quant = quant_type, blocksize, double_quant
        self.compute_dtype = compute_dtype
        n = in_features * out_features
        n_blocks = -(-n // blocksize)
        self.register_buffer("qdata", torch.zeros((n + 1) // 2, 1, dtype=torch.uint8))
        self.register_buffer("absmax", torch.zeros(n_blocks, dtype=torch.uint8 if double_quant else torch.float32))
        self.register_buffer("nested_absmax", torch.zeros(-(-n_blocks // dynamic8.NESTED_BLOCKSIZE))
                             if double_quant else None)
        self.register_buffer("nested_offset", torch.zeros(()) if double_quant else None)
        self.register_buffer("bias", torch.zeros(out_features) if bias else None)
        self._absmax_f32: torch.Tensor | None = None

    @classmethod
    def from_linear(cls, linear: torch.nn.Linear, quant_type: str = "nf4", blocksize: int = 64,
                    double_quant: bool = False, compute_dtype: str = "float32") -> "Code4Linear":
        m = cls(linear.in_features, linear.out_features, quant_type, blocksize, double_quant, compute_dtype,
                bias=linear.bias is not None)
        packed, absmax = codebook4.quantize_4bit(linear.weight.detach(), blocksize, quant_type)
        m.qdata = packed.reshape(-1, 1)
        if double_quant:
            m.absmax, m.nested_absmax, m.nested_offset = dynamic8.double_quantize(absmax)
        else:
            m.absmax = absmax
        if linear.bias is not None:
            m.bias = linear.bias.detach().float().clone()
        return m

    # -- numbers ---------------------------------------------------------------------------
    def absmax_f32(self) -> torch.Tensor:
        """Per-block fp32 scales (double quantization undone); cached, not saved."""
        if self._absmax_f32 is None or self._absmax_f32.device != self.qdata.device:
            if self.double_quant:
                self._absmax_f32 = dynamic8.double_dequantize(self.absmax, self.nested_absmax,
                                                              self.nested_offset)
            else:
                self._absmax_f32 = self.absmax.float()
        return self._absmax_f32

    def dequantize(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """The (out, in) weight in `dtype` (fp32 values, rounded once to bf16 for bf16)."""
        shape = (self.out_features, self.in_features)
        lib = kernels.lib() if self.qdata.device.type == "cpu" and dtype in (torch.float32, torch.bfloat16) else None
        if lib is not None and self.blocksize % 2 == 0:  # the same values without the index temporaries
            return ops.code4_dequant(lib, self.qdata.reshape(-1), self.absmax_f32(), codebook4.CODES[self.quant_type],
                                     shape, self.blocksize, dtype)
        return codebook4.dequantize_4bit(self.qdata.reshape(-1), self.absmax_f32(), shape, self.blocksize,
                                         self.quant_type).to(dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if wants_input_grad(x):  # a frozen base under a training graph (nn/frozen.py)
            return frozen_product(self, x)
        cd = COMPUTE_DTYPES[self.compute_dtype]
        xc = x.to(cd)
        bias = None if self.bias is None else self.bias.to(cd)
        rows = x.numel() // self.in_features
        lib = kernels.lib() if kernel_allowed(x, rows) else None
        if lib is not None and self.in_features % 32 == 0 and self.blocksize % 32 == 0:
            x2 = xc.reshape(rows, self.in_features).float().contiguous()
            y = ops.code4_gemv(lib, x2, self.qdata, self.absmax_f32(), codebook4.CODES[self.quant_type],
                               self.out_features, self.blocksize)
            y = y.to(cd).reshape(*x.shape[:-1], self.out_features)
            out = y if bias is None else y + bias
        else:
            out = F.linear(xc, self.dequantize(cd), bias)
        return out.to(x.dtype)

    # -- bitsandbytes' serialized layout ---------------------------------------------------
    def quant_state(self) -> dict:
        state = {"quant_type": self.quant_type, "blocksize": self.blocksize, "dtype": "float32",
                 "shape": [self.out_features, self.in_features]}
        if self.double_quant:
            state.update(nested_blocksize=dynamic8.NESTED_BLOCKSIZE, nested_dtype="float32",
                         nested_offset=float(self.nested_offset))
        return state

    def _save_to_state_dict(self, destination, prefix, keep_vars):  # noqa: ANN001
        destination[prefix + "weight"] = self.qdata
        destination[prefix + "weight.absmax"] = self.absmax
        destination[prefix + "weight.quant_map"] = codebook4.CODES[self.quant_type].clone()
        if self.double_quant:
            destination[prefix + "weight.nested_absmax"] = self.nested_absmax
            destination[prefix + "weight.nested_quant_map"] = dynamic8.dynamic_map()
        blob = json.dumps(self.quant_state()).encode()
        destination[prefix + quant_state_key(self.quant_type)] = torch.frombuffer(bytearray(blob), dtype=torch.uint8)
        if self.bias is not None:
            destination[prefix + "bias"] = self.bias

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys,  # noqa: ANN001
                              unexpected_keys, error_msgs):
        own = {k[len(prefix):]: v for k, v in state_dict.items() if k.startswith(prefix)}  # no submodules
        qs_key = next((k for k in own if k.startswith("weight.quant_state.")), None)
        needed = ["weight", "weight.absmax"] + (["bias"] if self.bias is not None else [])
        if qs_key is None:
            needed.append(quant_state_key(self.quant_type))
        missing = [k for k in needed if k not in own]
        if missing:
            missing_keys.extend(prefix + k for k in missing)
            return
        state = read_quant_state(own[qs_key])
        expect = self.quant_state()
        for field in ("quant_type", "blocksize", "shape"):
            if state.get(field) != expect[field]:
                raise ModelpressError(f"{prefix}weight: stored {field} {state.get(field)!r} differs from the "
                                      f"config's {expect[field]!r}; the checkpoint is inconsistent")
        if ("nested_offset" in state) != self.double_quant:
            raise ModelpressError(f"{prefix}weight: double quantization stored and configured differ")
        quant_map = own.get("weight.quant_map")
        if quant_map is not None and not torch.equal(quant_map.float(), codebook4.CODES[self.quant_type]):
            raise ModelpressError(f"{prefix}weight.quant_map is not the standard {self.quant_type} code book")
        nested_map = own.get("weight.nested_quant_map")
        if nested_map is not None and not torch.equal(nested_map.float(), dynamic8.dynamic_map()):
            raise ModelpressError(f"{prefix}weight.nested_quant_map is not bitsandbytes' dynamic map")
        self.qdata = own["weight"].reshape(-1, 1)
        self.absmax = own["weight.absmax"]
        if self.double_quant:
            self.nested_absmax = own["weight.nested_absmax"].float()
            self.nested_offset = torch.tensor(state["nested_offset"], dtype=torch.float32)
        if self.bias is not None:
            self.bias = own["bias"].float()
        self._absmax_f32 = None
        known = {"weight", "weight.absmax", "weight.quant_map", "weight.nested_absmax",
                 "weight.nested_quant_map", qs_key, "bias"}
        unexpected_keys.extend(prefix + k for k in own if k not in known)

    # -- bookkeeping -----------------------------------------------------------------------
    def extra_repr(self) -> str:
        return (f"in={self.in_features}, out={self.out_features}, {self.quant_type}, block={self.blocksize}"
                f"{', double quant' if self.double_quant else ''}, compute={self.compute_dtype}")

    def meta(self) -> dict:
        """What a checkpoint records to rebuild this module before loading its tensors."""
        return {"class": type(self).__name__, "in_features": self.in_features,
                "out_features": self.out_features, "quant_type": self.quant_type,
                "blocksize": self.blocksize, "double_quant": self.double_quant,
                "compute_dtype": self.compute_dtype, "bias": self.bias is not None}
