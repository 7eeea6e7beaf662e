"""IntxLinear: weight-only 2/3/4/8-bit affine integers, grouped along the input dimension.

Storage (what `state_dict` holds and a checkpoint saves; see core/grids.py and core/packing.py):
    qdata       bits < 8: uint8 (out, ceil(in / 8) * bits), codes bit-packed little-endian per row
                bits = 8: int8 (out, in) = code - 128, so the int8 kernel reads it as it is
    scale       fp16 (out, n_groups); fp32 where a file stored fp32 (compressed-tensors), kept exact
    zero_point  uint8 (out, n_groups), asymmetric only (symmetric: 2**(bits-1) implied)
    perm        int64 (in,), only for weights stored in a permuted column order (GPTQ's act
                order without static groups, whose groups are runs of permuted columns):
                stored column j multiplies input column perm[j]
    bias        as the original layer, if it had one
    offset      fp32 (out, n_groups), only after a lossless QA-LoRA merge (finetune/merge.py): the
                adapter's update, constant within each group
W_hat = (code - zero_point) * scale (+ offset); y = x[..., perm] @ W_hat^T + bias.

Forward: the reference path dequantizes to fp32 and multiplies; it serves large inputs (prefill,
perplexity), where a dense GEMM is fastest. Small inputs (decode, <= FAST_MAX_ROWS rows) go through
torch's CPU weight-only kernels, which run with bf16 activations:
    8-bit per-channel -> aten._weight_int8pack_mm
    2..4-bit, group 32/64/128/256 -> aten._weight_int4pack_mm_for_cpu (tinygemm layout, which
    dequantizes (q - 8) * s + z: see _build_kernel for how our codes and zero points map onto it)
The kernel tensors are built on the first fast call and are not saved; for 2-4 bits they add a
second copy of the codes (4 bits each) in memory. Other shapes and devices use the reference path.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from ..core import grids, packing
from ..errors import ModelpressError
from ..kernels import ops
from .frozen import frozen_product, wants_input_grad

FAST_MAX_ROWS = 32
_INT4_KERNEL_GROUPS = (32, 64, 128, 256)
# The kernels are used only on the torch this project pins and tests (2.13): torch 2.11's
# _weight_int8pack_mm segfaulted on a tiny (96-wide) layer on a lent H200 machine's CPU.
_KERNELS_TESTED = tuple(int(p) for p in torch.__version__.split("+")[0].split(".")[:2]) >= (2, 13)


class IntxLinear(torch.nn.Module):
    def __init__(self, in_features: int, out_features: int, bits: int, group_size: int | None,
                 symmetric: bool, bias: bool = False, permuted: bool = False, offset: bool = False) -> None:
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        self.bits, self.group_size, self.symmetric = bits, group_size, symmetric
        ng = grids.n_groups(in_features, group_size)
        if bits == 8:
            qdata = torch.zeros(out_features, in_features, dtype=torch.int8)
        else:
            qdata = torch.zeros(out_features, packing.packed_len(in_features, bits), dtype=torch.uint8)
        self.register_buffer("qdata", qdata)
        self.register_buffer("scale", torch.zeros(out_features, ng, dtype=grids.SCALE_DTYPE))
        self.register_buffer("zero_point", None if symmetric else torch.zeros(out_features, ng, dtype=torch.uint8))
        self.register_buffer("bias", torch.zeros(out_features) if bias else None)
        self.register_buffer("perm", torch.arange(in_features) if permuted else None)
        self.register_buffer("offset", torch.zeros(out_features, ng) if offset else None)
        self._kernel: tuple | None = None
        self.use_fast = True

    @classmethod
    def from_linear(cls, linear: torch.nn.Linear, bits: int, group_size: int | None,
                    symmetric: bool) -> "IntxLinear":
        w = linear.weight.detach()
        m = cls(linear.in_features, linear.out_features, bits, group_size, symmetric,
                bias=linear.bias is not None)
        codes, scale, zero_point = grids.quantize_rtn(w, bits, group_size, symmetric)
        m.set_codes(codes, scale, zero_point)
        if linear.bias is not None:
            m.bias = linear.bias.detach().float().clone()
        return m

    def set_codes(self, codes: torch.Tensor, scale: torch.Tensor, zero_point: torch.Tensor | None) -> None:
        if self.bits == 8:
            self.qdata = (codes.to(torch.int16) - 128).to(torch.int8)
        else:
            self.qdata = packing.pack_bits(codes, self.bits)
        self.scale = scale.to(grids.SCALE_DTYPE)
        self.zero_point = zero_point
        self._kernel = None

    def codes(self) -> torch.Tensor:
        if self.bits == 8:
            return (self.qdata.to(torch.int16) + 128).to(torch.uint8)
        return packing.unpack_bits(self.qdata, self.bits, self.in_features)

    def dequantize(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """W_hat in the stored column order (see `perm`), computed in fp32."""
        w = grids.dequantize(self.codes(), self.scale, self.zero_point, self.bits, self.group_size)
        if self.offset is not None:
            w = w + self.offset.repeat_interleave(self.group_size or self.in_features, 1)[:, :self.in_features]
        return w.to(dtype)

    def check_plain(self) -> None:
        """Refuse a layer whose weights the other formats' layouts cannot hold (a merged offset)."""
        if self.offset is not None:
            raise ModelpressError("a layer with a merged QA-LoRA offset has no place in this layout; save it as a "
                                  "modelpress checkpoint (or merge into a float model and quantize again)")

    def add_offset(self, delta: torch.Tensor) -> None:
        """Add `delta` (out, n_groups) to every weight of each group (a QA-LoRA merge)."""
        if self.offset is None:
            self.offset = torch.zeros_like(self.scale, dtype=torch.float32)
        self.offset = self.offset + delta.float()
        self._kernel = None

    # -- forward ---------------------------------------------------------------------------
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if wants_input_grad(x):  # a frozen base under a training graph (nn/frozen.py)
            return frozen_product(self, x)
        if self.perm is not None:
            x = x.index_select(-1, self.perm)
        rows = x.numel() // x.shape[-1]
        if self.use_fast and _KERNELS_TESTED and rows <= FAST_MAX_ROWS and x.device.type == "cpu":
            kernel = self._kernel if self._kernel is not None else self._build_kernel()
            if kernel:
                return self._forward_kernel(x, kernel)
        return F.linear(x, self.dequantize(x.dtype), None if self.bias is None else self.bias.to(x.dtype))

    def _build_kernel(self) -> tuple:
        """Kernel-layout tensors, or () where no torch kernel fits this shape."""
        kernel: tuple = ()
        if self.bits == 8 and self.group_size is None:
            s = self.scale.float()[:, 0]
            # asymmetric: (q+128-zp)*s = q*s + (128-zp)*s  -> a per-output offset times sum(x)
            off = None if self.zero_point is None else (128.0 - self.zero_point.float()[:, 0]) * s
            if self.offset is not None:
                off = self.offset[:, 0] if off is None else off + self.offset[:, 0]
            # torch's AVX-512 int8pack kernel reads the weights with aligned loads: weights that a
            # checkpoint's loader left at an odd offset crashed it (seen here with torch 2.13 on Zen 5)
            w = self.qdata if ops.aligned(self.qdata, 64) else self.qdata.clone()
            kernel = ("int8", w, s.to(torch.bfloat16), off)
        elif self.bits <= 4 and self.group_size in _INT4_KERNEL_GROUPS:
            gs = self.group_size
            k_pad = grids.n_groups(self.in_features, gs) * gs
            s = self.scale.float()
            zp = torch.full_like(s, 2 ** (self.bits - 1)) if self.zero_point is None else self.zero_point.float()
            codes = self.codes().to(torch.int32)
            if k_pad != self.in_features:  # padded columns get code = zero point, i.e. weight 0
                codes = torch.cat([codes, zp[:, -1:].to(torch.int32).expand(-1, k_pad - self.in_features)], 1)
            # The kernel computes (q - 8) * s + z. Where code - zero_point fits in -8..7 (symmetric,
            # or 2-3 bits) shift the codes so that q - 8 = code - zero_point and z = 0: exact in bf16.
            # Otherwise (asymmetric 4-bit) keep the codes and fold the zero point: z = (8 - zp) * s.
            if self.zero_point is None or self.bits <= 3:
                shift = (8 - zp).to(torch.int32).repeat_interleave(gs, 1)
                codes, z = codes + shift, torch.zeros_like(s)
            else:
                z = (8.0 - zp) * s
            if self.offset is not None:
                z = z + self.offset
            packed = torch.ops.aten._convert_weight_to_int4pack_for_cpu(codes, 1)
            sz = torch.stack([s.t(), z.t()], -1).contiguous().to(torch.bfloat16)  # (n_groups, out, 2)
            kernel = ("int4", packed, sz, k_pad)
        self._kernel = kernel
        return kernel

    def _forward_kernel(self, x: torch.Tensor, kernel: tuple) -> torch.Tensor:
        shape = x.shape
        x2 = x.reshape(-1, shape[-1]).to(torch.bfloat16)
        if kernel[0] == "int8":
            _, w, s, off = kernel
            y = torch.ops.aten._weight_int8pack_mm(x2, w, s).float()
            if off is not None:
                y = y + x2.float().sum(-1, keepdim=True) * off
        else:
            _, packed, sz, k_pad = kernel
            if k_pad != shape[-1]:
                x2 = F.pad(x2, (0, k_pad - shape[-1]))
            y = torch.ops.aten._weight_int4pack_mm_for_cpu(x2, packed, self.group_size, sz).float()
        if self.bias is not None:
            y = y + self.bias
        return y.to(x.dtype).reshape(*shape[:-1], self.out_features)

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):  # noqa: ANN001
        self._kernel = None
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)

    def extra_repr(self) -> str:
        g = "channel" if self.group_size is None else self.group_size
        return (f"in={self.in_features}, out={self.out_features}, bits={self.bits}, group={g}, "
                f"{'sym' if self.symmetric else 'asym'}")

    def meta(self) -> dict:
        """What a checkpoint records to rebuild this module before loading its tensors."""
        return {"class": type(self).__name__, "in_features": self.in_features,
                "out_features": self.out_features, "bits": self.bits, "group_size": self.group_size,
                "symmetric": self.symmetric, "bias": self.bias is not None, "permuted": self.perm is not None,
                **({"offset": True} if self.offset is not None else {})}
