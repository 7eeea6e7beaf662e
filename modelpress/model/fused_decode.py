"""The fast path of the decoder model (model/decoder.py): decode steps (and, for models whose every
layer multiplies with int8 activations, prefill chunks) in one C call (kernels/decode.c,
mp_llama_decode), for one sequence or many.

A decode step through the modules costs ~1500 small torch operations (norms, rotary, cache indexing,
SDPA with its mask, residuals), more on 2 cores than the weight products themselves. The decoder
hands the sequences that compute one token in a step (all of them, or those beside a prefill chunk)
to FusedDecoder instead: every block runs in C on the same weights for all of them, writing the
tokens' keys and values into the same paged cache, so the two paths mix freely within a sequence.
Each sequence's arithmetic is the same at any batch size and whatever else the step holds.
Q8_0, Q5_0, Q4_K and Q6_K layers multiply on their stored GGUF blocks with activations rounded to
int8 per 32 (per 256 for Q4_K / Q6_K; llama.cpp's own numerics for these types, and fewer bytes
read per token); other GGUF types on their affine codes (nn/gguf_linear.py) and fp32 layers on
their weights, with fp32 activations; `build(..., int8_activations=False)` keeps fp32 activations
everywhere. The other stored formats decode here too, on their own codes: RTN / GPTQ / AWQ
integers (IntxLinear; GPTQ's act-order permutation applied to the input in C) and LLM.int8 rows
(Int8LtLinear: CB + 128 as codes, SCB / 127 as scales) as codes * scale + offset per group, 4-bit
codes on their packed nibbles (AFFINE4), other widths a byte a code (AFFINE, unpacked once beside
the packed copy); with int8 activations (groups of whole 32s) x is rounded per 32 as llama.cpp
rounds it for Q4_0 / Q8_0 and the dots are integer (AFFINE4_Q8, AFFINE_Q8; LLM.int8's own outlier
split is not made: its rows are read like any int8 codes), else fp32. NF4 / FP4 (Code4Linear)
multiply their packed indices and absmax (double quantization dequantized once) with fp32
activations (CODE4: the code book's values are not integers).

Used where the kernels build and the model computes in fp32 on a CPU with block linears of those
classes or fp32 nn.Linear (biases added after the product, qwen2's); otherwise `FusedDecoder.build` returns None and the
decoder keeps its torch path.
"""
from __future__ import annotations

import ctypes

import torch

from .. import kernels
from ..core import codebook4, kquants
from ..kernels import KIND, ops
from ..nn.code4_linear import Code4Linear
from ..nn.dense_linear import DenseLinear
from ..nn.gguf_linear import (  # BLOCK_KERNELS: types multiplied on their blocks
    BLOCK_KERNELS,
    GGUFLinear,
)
from ..nn.int8lt_linear import Int8LtLinear
from ..nn.intx_linear import IntxLinear
from ..nn.multi_lora import MultiLoraLinear
from ..nn.sparse24_linear import Sparse24Linear
from .walker import UNIT_OFFSET_NORMS

# symmetric block types: offset = ZERO * scale exactly, so the decode reads no offsets (10 % fewer bytes)
_ZERO = {"Q4_0": -8.0, "Q5_0": -16.0, "Q8_0": -128.0}
# integer codes multiplied with x rounded to int8 per 32 (RTN / GPTQ / AWQ, LLM.int8's rows)
_INT8_CODES = (KIND["AFFINE4_Q8"], KIND["AFFINE_Q8"])


def _bias(mod: torch.nn.Module, keep: list) -> torch.Tensor | None:
    b = getattr(mod, "bias", None)
    if b is None:
        return None
    b = b.detach().float().contiguous()
    keep.append(b)
    return b


def _linear(mod: torch.nn.Module, keep: list, int8: bool) -> ops.Linear | None:  # noqa: ANN001
    if isinstance(mod, GGUFLinear) and int8 and mod.kind in BLOCK_KERNELS:
        q = mod.qdata.contiguous()
        kind, lib = BLOCK_KERNELS[mod.kind], kernels.lib()
        if kind == KIND["Q8_0"] and mod.out_features % 16 == 0 and lib.mp_simd() == 2:
            # Q8_0 on AVX-512 VNNI: the blocks repacked 16 rows at a time (KIND["Q8_0x16"], as many
            # bytes; the module keeps its own): 1536 x 576 at 32 rows 0.16 -> 0.05 ms on 2 threads
            q, kind = ops.pack_q8_0x16(lib, q, mod.out_features, mod.in_features), KIND["Q8_0x16"]
        keep.append(q)
        return ops.linear(kind, mod.out_features, mod.in_features, 32, q, bias=_bias(mod, keep))
    if isinstance(mod, GGUFLinear):
        q, scale, offset = mod.affine()
        keep += [q, scale, offset]
        zero = _ZERO.get(mod.kind)
        return ops.linear(KIND["AFFINE"], mod.out_features, mod.in_features, kquants.GROUP[mod.kind], q, scale,
                          None if zero is not None else offset, zero or 0.0, bias=_bias(mod, keep))
    if isinstance(mod, IntxLinear):
        return _intx_linear(mod, keep, int8)
    if isinstance(mod, Code4Linear):  # NF4 / FP4 on the packed codes, absmax dequantized once (double quant)
        q, absmax = mod.qdata.reshape(-1), mod.absmax_f32().contiguous()
        code = codebook4.CODES[mod.quant_type].float().contiguous()
        keep += [q, absmax, code]
        return ops.linear(KIND["CODE4"], mod.out_features, mod.in_features, mod.blocksize, q, absmax, code,
                          bias=_bias(mod, keep))
    if isinstance(mod, Int8LtLinear):  # LLM.int8's rows (CB + 128 as codes), x as for the other byte codes
        q = (mod.weight.view(torch.uint8) ^ 0x80).contiguous()
        scale = (mod.SCB.float() / 127.0).reshape(-1, 1).contiguous()
        keep += [q, scale]
        return ops.linear(KIND[_byte_kind(mod.in_features, mod.in_features, int8)], mod.out_features, mod.in_features,
                          mod.in_features, q, scale, None, -128.0, bias=_bias(mod, keep))
    if isinstance(mod, Sparse24Linear) and mod.values.dtype in ops.SPARSE24_KIND:  # the packed values as they are
        keep += [mod.values, mod.indices]
        return ops.linear(ops.SPARSE24_KIND[mod.values.dtype], mod.out_features, mod.in_features, 1, mod.values, bias=_bias(mod, keep),
                          idx=mod.indices)
    if type(mod) in (torch.nn.Linear, DenseLinear) and mod.weight.dtype == torch.float32:
        w = mod.weight.detach()
        if not w.is_contiguous():
            w = w.contiguous()
        keep.append(w)
        return ops.linear(KIND["F32"], mod.out_features, mod.in_features, 1, w, bias=_bias(mod, keep))
    return None


def _byte_kind(k: int, g: int, int8: bool) -> str:
    """Byte codes: with int8 activations (groups of whole 32s) x rounded per 32 and integer dots (AFFINE_Q8),
    else fp32 activations (AFFINE)."""
    return "AFFINE_Q8" if int8 and g % 32 == 0 and k % 32 == 0 else "AFFINE"


def _intx_linear(mod: IntxLinear, keep: list, int8: bool) -> ops.Linear | None:
    """RTN / GPTQ / AWQ integers as AFFINE codes: W = (code - zero_point) * scale (+ a QA-LoRA offset)
    = code * scale + offset; 4-bit codes read from the layer's own packed bytes (AFFINE4; with int8
    activations, groups of 32s: AFFINE4_Q8, x rounded per 32 as llama.cpp rounds it for Q4_0 / Q4_1,
    integer dots), other widths one byte a code (unpacked once, beside the packed ones); the scales
    in fp32; GPTQ's act-order permutation applied to the input in C. Groups must divide the input
    (else None: the torch path)."""
    g = mod.group_size or mod.in_features
    if mod.in_features % g:
        return None
    packed = mod.bits == 4 and mod.in_features % 8 == 0  # the stored nibbles as they are (AFFINE4)
    q = mod.qdata.contiguous() if packed else mod.codes().contiguous()
    scale = mod.scale.float().contiguous()
    if mod.zero_point is None and mod.offset is None:
        offset, zero = None, -float(2 ** (mod.bits - 1))
    else:
        zp = torch.full_like(scale, 2 ** (mod.bits - 1)) if mod.zero_point is None else mod.zero_point.float()
        offset = -zp * scale + (0.0 if mod.offset is None else mod.offset.float())
        offset, zero = offset.contiguous(), 0.0
    perm = None if mod.perm is None else mod.perm.to(torch.int64).contiguous()
    keep += [t for t in (q, scale, offset, perm) if t is not None]
    kind = _byte_kind(mod.in_features, g, int8) if not packed else "AFFINE4_Q8" if int8 and g % 32 == 0 else "AFFINE4"
    return ops.linear(KIND[kind], mod.out_features, mod.in_features, g, q, scale, offset, zero, bias=_bias(mod, keep),
                      perm=perm)


def _split_rows(mod: torch.nn.Module, sizes: list[int]) -> list[torch.nn.Module] | None:
    """A fused product (phi3's qkv_proj, gate_up_proj) as one module per block of output rows: GGUF
    rows are independent blocks, fp32 rows slices of the weight (views: no copy)."""
    cuts = [sum(sizes[:i]) for i in range(len(sizes) + 1)]
    if isinstance(mod, GGUFLinear):
        return [GGUFLinear.from_blocks(mod.qdata[a:b], mod.kind, mod.in_features,
                                       None if mod.bias is None else mod.bias.detach()[a:b])
                for a, b in zip(cuts, cuts[1:])]
    if type(mod) in (torch.nn.Linear, DenseLinear) and mod.bias is None:
        parts = []
        for a, b in zip(cuts, cuts[1:]):
            part = torch.nn.Linear(mod.in_features, b - a, bias=False, device="meta")
            part.weight = torch.nn.Parameter(mod.weight.detach()[a:b], requires_grad=False)
            parts.append(part)
        return parts
    return None


def _base(mod: torch.nn.Module) -> torch.nn.Module:
    """A layer serving many adapters computes its base here (the engine sends adapted sequences to
    the torch path)."""
    return mod.base_layer if isinstance(mod, MultiLoraLinear) else mod


def _projections(layer, d_ff: int) -> list[torch.nn.Module] | None:  # noqa: ANN001
    """q, k, v, o, gate, up, down of a decoder layer; phi3's fused qkv and gate_up split by rows."""
    attn, mlp = layer.self_attn, layer.mlp
    if attn.qkv_proj is None:
        qkv = [_base(attn.q_proj), _base(attn.k_proj), _base(attn.v_proj)]
    else:
        nq, nk = attn.n_heads * attn.head_dim, attn.n_kv * attn.head_dim
        qkv = _split_rows(_base(attn.qkv_proj), [nq, nk, nk])
    gate_up = ([_base(mlp.gate_proj), _base(mlp.up_proj)] if hasattr(mlp, "gate_proj")
               else _split_rows(_base(mlp.gate_up_proj), [d_ff, d_ff]))
    if qkv is None or gate_up is None:
        return None
    return [*qkv, _base(attn.o_proj), *gate_up, _base(mlp.down_proj)]


class FusedDecoder:
    """The C fast path of a model/decoder.py Decoder: its layers' weights as the kernels' Layer
    structs, bound to the decoder's caches."""

    def __init__(self, lib: ctypes.CDLL, layers: ctypes.Array, keep: list, eps: float, d_ff: int,
                 all_int8: bool, fused_head: tuple | None, embed_scale: torch.Tensor | None = None,
                 rope_types: list | None = None) -> None:
        self.lib, self.layers, self.keep, self.eps, self.d_ff = lib, layers, keep, eps, d_ff
        self.all_int8 = all_int8  # every layer multiplies with int8 activations: prefill chunks come here too
        self.fused_head = fused_head    # (head, norm weight, eps) run in C after the last layer, or None
        self.embed_scale = embed_scale  # gemma: the embedding rows times sqrt(hidden), as its module
        self.rope_types = rope_types or [None]  # the rotary tables the layers read (gemma3: two)
        self.kv_f16 = False

    @classmethod
    def build(cls, decoder, int8_activations: bool = True) -> "FusedDecoder | None":  # noqa: ANN001
        """The fused path for `decoder`'s layers, or None where it does not apply.
        int8_activations: Q8_0 / Q5_0 / Q4_K / Q6_K layers (and such a tied head) multiply on their
        stored blocks with activations rounded to int8 (per 32, per 256 for the K types), as llama.cpp
        does; False: every GGUF layer on its affine codes with fp32 activations (the torch path's
        numbers up to the order of sums). Takes Llama's blocks and what qwen2 / qwen3 / gemma2 /
        gemma3 / phi3 add to them (biases, q / k norms, gemma's norms, GELU, scale, soft-cap, windows,
        phi3's fused products split by rows); not a partial rotary (Phi-4-mini's)."""
        lib = kernels.lib()
        emb = decoder.embed_tokens
        if lib is None or decoder.device.type != "cpu" or decoder.dtype != torch.float32:
            return None
        if type(emb) is not torch.nn.Embedding and not isinstance(getattr(emb, "embed_scale", None), torch.Tensor):
            return None
        types = sorted({ly.rope_key for ly in decoder.layers}, key=str)
        if decoder.rotary(torch.tensor([1]), types[0])[0].shape[-1] != decoder.head_dim:
            return None  # partial rotary (Phi-4-mini's 0.75)
        keep: list = []
        all_int8 = True
        layers = (ops.Layer * len(decoder.layers))()
        eps = _eps(decoder.layers[0].input_layernorm)
        d_ff = decoder.layers[0].mlp.down_proj.in_features
        for i, layer in enumerate(decoder.layers):
            attn, mlp = layer.self_attn, layer.mlp
            act = type(getattr(mlp, "act_fn", getattr(mlp, "activation_fn", None))).__name__  # phi3: activation_fn
            projections = _projections(layer, d_ff)
            if eps is None or projections is None or act not in ("SiLU", "SiLUActivation", "GELUTanh"):
                return None
            sandwich = layer.pre_feedforward_layernorm is not None  # gemma: four norms
            norms = ((layer.input_layernorm, layer.pre_feedforward_layernorm, layer.post_attention_layernorm,
                      layer.post_feedforward_layernorm) if sandwich else (layer.input_layernorm, layer.post_attention_layernorm))
            head_norms = (attn.q_norm, attn.k_norm) if attn.q_norm is not None else ()  # qwen3, gemma3: per head
            w = [_norm_weight(n, eps) for n in (*norms, *head_norms)]
            lins = [_linear(m, keep, int8_activations) for m in projections]
            if any(x is None for x in (*w, *lins)):
                return None
            keep += w
            all_int8 = all_int8 and all(KIND["Q8_0"] <= x.kind <= KIND["Q8_0x16"] or x.kind in _INT8_CODES for x in lins)
            qk = dict(q_norm=w[-2], k_norm=w[-1]) if head_norms else {}
            gemma = dict(post_attn_norm=w[2], post_ffw_norm=w[3]) if sandwich else {}
            scale = 0.0 if attn.sdpa_scale is None else attn.sdpa_scale  # 0: 1 / sqrt(head_dim), as before
            layers[i] = ops.layer(w[0], w[1], lins, **qk, **gemma, gelu=act == "GELUTanh", window=attn.window or 0,
                                  rope=types.index(layer.rope_key),
                                  attn_scale=scale, softcap=attn.softcap or 0.0)  # caches: bind()
        scale = getattr(emb, "embed_scale", None)
        return cls(lib, layers, keep, float(eps), d_ff, all_int8, _fused_head(decoder.head, decoder.norm, keep, int8_activations),
                   None if scale is None else scale.float(), types)

    def bind(self, k_cache: list[torch.Tensor], v_cache: list[torch.Tensor]) -> None:
        """Decode into these caches (one per layer, fp32 or fp16: `kv_f16`)."""
        self.kv_f16 = k_cache[0].dtype == torch.float16
        for ly, kc, vc in zip(self.layers, k_cache, v_cache):
            if kc.dtype not in (torch.float32, torch.float16) or vc.dtype != kc.dtype:
                raise ValueError(f"the fused decode takes fp32 or fp16 caches, not {kc.dtype}")
            ops.bind_caches(ly, kc, vc)

    @torch.inference_mode()
    def step(self, batch, decoder) -> torch.Tensor:  # noqa: ANN001 (model/decoder.py's Batch, Decoder)
        """(sequences, vocab) fp32 logits after each sequence's last token. Sequence i computes the
        tokens batch.chunks[i] (one token: a decode step; more: a prefill chunk, each token a row that
        attends to the cache up to itself, so it computes what decoding the chunk token by token
        would); their keys and values go to the cache."""
        chunks, starts, block_size = batch.chunks, batch.starts, batch.block_size
        n = [len(c) for c in chunks]
        B, lmax = sum(n), max(st + k for st, k in zip(starts, n))
        tokens = [t for c in chunks for t in c]
        positions = torch.tensor([st + j for st, k in zip(starts, n) for j in range(k)], dtype=torch.int64)
        x = decoder.embed_tokens.weight[torch.tensor(tokens)].float()                        # (B, d)
        if self.embed_scale is not None:
            x = x * self.embed_scale
        x = x.contiguous()
        tables = [decoder.rotary(positions, t) for t in self.rope_types]
        cos, sin = torch.stack([c for c, _ in tables]), torch.stack([s for _, s in tables])   # (tables, B, hd)
        lens = positions + 1
        # row r's slots: its sequence's positions 0 .. lmax - 1 (those past lens[r] are never read)
        nb = -(-lmax // block_size)
        tables = torch.tensor([t[:nb] + [0] * (nb - len(t[:nb])) for t in batch.block_tables], dtype=torch.int64)
        seq_slots = (tables[:, :, None] * block_size + torch.arange(block_size)).view(len(chunks), -1)[:, :lmax]
        slots = (seq_slots if B == len(chunks) else seq_slots.repeat_interleave(torch.tensor(n), dim=0)).contiguous()
        ops.llama_decode(self.lib, self.layers, x, self.d_ff, decoder.n_heads, decoder.n_kv, decoder.head_dim,
                         self.eps, cos, sin, slots, lens, self.kv_f16)
        last = torch.tensor(n).cumsum(0) - 1
        if self.fused_head is not None:
            head, w, eps = self.fused_head
            return ops.llama_logits(self.lib, head, w, eps, x, last)
        return decoder.head(decoder.norm(x[last])).float()


def _eps(norm: torch.nn.Module) -> float | None:
    eps = getattr(norm, "variance_epsilon", getattr(norm, "eps", None))
    return float(eps) if isinstance(eps, (int, float)) else None


def _norm_weight(norm: torch.nn.Module, eps: float) -> torch.Tensor | None:
    """The weight the C norm multiplies by (x * rsqrt(mean(x^2) + eps) * w): the module's own, or for
    gemma's (1 + w) norms 1 + w in fp32, as they compute it; None for another norm or eps."""
    w = getattr(norm, "weight", None)
    if w is None or w.dtype != torch.float32 or _eps(norm) != eps:
        return None
    if type(norm).__name__ in UNIT_OFFSET_NORMS:
        return (1.0 + w.detach().float()).contiguous()
    return w.detach().contiguous() if hasattr(norm, "variance_epsilon") else None


def _fused_head(head: torch.nn.Module, norm: torch.nn.Module, keep: list, int8: bool) -> tuple | None:
    """A head on GGUF blocks (an untied one, or the decoder's choice for a tied one with int8
    activations) runs with the final norm in C (mp_llama_logits) where activations are int8:
    batch-1 decode of the Q4_K_M file ~0.4 ms a token faster than torch's norm and the module call.
    Without int8 activations the decoder's head module computes (an untied GGUF head got int8
    activations here regardless before; phi3's test found it)."""
    w = getattr(norm, "weight", None)
    if not (int8 and isinstance(head, GGUFLinear) and head.kind in BLOCK_KERNELS and w is not None
            and w.dtype == torch.float32 and hasattr(norm, "variance_epsilon")):
        return None
    w = w.detach().contiguous()
    keep.append(w)
    return _linear(head, keep, True), w, float(norm.variance_epsilon)
