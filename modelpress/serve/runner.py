"""ModelRunner: one forward pass for a scheduled batch, over a paged KV cache.

It drives a Llama-family transformers model through its own modules (embeddings, norms, the
q/k/v/o and MLP linears, whatever compressed class they are, rotary embedding, output head), so
every format modelpress loads runs through its own kernels; only attention is done here, against
the cache:

    k_cache[layer], v_cache[layer]: (num_blocks, block_size, n_kv_heads, head_dim)
    a token at position p of a sequence lives in slot block_table[p // block_size] * block_size
    + p % block_size

The batch is flattened to N tokens (each sequence's next `num_tokens`): the linear layers run once
on (N, hidden). Attention: every sequence that decodes one token joins one padded, masked
scaled_dot_product_attention call (its keys gathered from its blocks); each prefill chunk runs its
own causal call against its cached prefix plus itself. Where the model allows it, the sequences
that compute one token go to serve/fused_decode.py instead (every block in one C call for all of
them) and only prefill chunks take the torch path; where every layer multiplies on GGUF blocks
(`FusedDecoder.all_blocks`), the prefill chunks go there too, each token a row, so that a prefill,
or the recompute of a preempted sequence, gives the cache bit for bit what decoding gave it (with
int8 activations any other order of sums would show as a jump of one rounding step). With
`int8_activations` (the default) GGUF Q8_0 / Q5_0 / Q4_K / Q6_K layers multiply on their blocks
with int8 activations in the torch path too (nn/gguf_linear.py's `int8_activations()`, around
every forward here), and a tied head kept in blocks (`record(model).head`) replaces its fp32 copy.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from .. import kernels
from ..kernels import ops
from ..nn import gguf_linear
from ..record import record
from .fused_decode import FusedDecoder
from .sequence import Sequence


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    h = x.shape[-1] // 2
    return torch.cat((-x[..., h:], x[..., :h]), dim=-1)


class ModelRunner:
    def __init__(self, model: torch.nn.Module, num_blocks: int, block_size: int = 16,
                 fused_decode: bool = True, int8_activations: bool = True, kv_dtype: str = "auto") -> None:
        cfg = model.config
        self.model = model
        self.block_size = block_size
        self.num_blocks = num_blocks
        self.n_heads = cfg.num_attention_heads
        self.n_kv = cfg.num_key_value_heads
        self.head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
        self.layers = list(model.model.layers)
        p = next(model.parameters())
        self.device, self.dtype = p.device, (p.dtype if p.dtype in (torch.float32, torch.bfloat16, torch.float16)
                                             else torch.float32)
        self.int8_activations = int8_activations
        head = record(model).head  # a tied head kept in GGUF blocks (fused_decode.py)
        self.head = (head if isinstance(head, gguf_linear.GGUFLinear) and int8_activations and head.qdata.device == self.device
                     else model.lm_head)
        # the torch path computes as the fused one: GGUF layers with int8 activations (nn/gguf_linear.py)
        self._int8_rows = 1 << 62 if int8_activations and self.device.type == "cpu" else 0

        # decode attention in place over the paged cache (kernels' mp_paged_attention) on a CPU
        self._attn = kernels.lib() if self.device.type == "cpu" and self.dtype == torch.float32 else None
        self.k_cache = self.v_cache = None
        self._fused: object = False   # the fused decoder, or False where it does not apply
        if fused_decode:

            self._fused = FusedDecoder.build(self, int8_activations) or False
        self.kv_dtype = self._kv_dtype(kv_dtype)
        shape = (num_blocks, block_size, self.n_kv, self.head_dim)
        self.k_cache = [torch.zeros(shape, dtype=self.kv_dtype, device=self.device) for _ in self.layers]
        self.v_cache = [torch.zeros(shape, dtype=self.kv_dtype, device=self.device) for _ in self.layers]
        if self._fused:
            self._fused.bind(self.k_cache, self.v_cache)

    def _kv_dtype(self, name: str) -> torch.dtype:
        """The cache's type. "auto": fp16 where every step runs fused on GGUF blocks with int8
        activations (llama.cpp's default cache type for its CPU path; half the bytes attention
        reads: 32 sequences decoding on the Q8_0 file, 143 -> 119-125 ms a step here), else the
        model's own type; "float32", "float16": that (fp16 only on the fused path)."""
        fused = self._fused
        on_blocks = bool(fused) and fused.all_blocks and self.int8_activations
        if name == "auto":
            return torch.float16 if on_blocks else self.dtype
        if name == "float16":
            if not fused:
                raise ValueError("an fp16 KV cache needs the fused CPU decode (a Llama-family fp32 model on a CPU "
                                 "whose layers it can take); leave the KV type to auto")
            if not fused.all_blocks:
                raise ValueError("an fp16 KV cache needs every layer on GGUF blocks (the prefill runs fused too); "
                                 "leave the KV type to auto")
            return torch.float16
        if name == "float32":
            if self.dtype != torch.float32:
                raise ValueError(f"the model computes in {self.dtype}: leave the KV type to auto")
            return torch.float32
        raise ValueError(f"kv_dtype must be 'auto', 'float32' or 'float16', not {name!r}")

    def fused(self):  # noqa: ANN201
        """The fused decoder; None where the model does not allow it."""
        return self._fused or None

    @property
    def bytes_per_block(self) -> int:
        return 2 * len(self.layers) * self.block_size * self.n_kv * self.head_dim * self.k_cache[0].element_size()

    def grow(self, num_blocks: int) -> None:
        """Room for `num_blocks` blocks, the ones there kept (generate's cache grows as tokens come)."""
        extra = num_blocks - self.num_blocks
        if extra <= 0:
            return
        shape = (extra, self.block_size, self.n_kv, self.head_dim)
        self.k_cache = [torch.cat([c, c.new_zeros(shape)]) for c in self.k_cache]
        self.v_cache = [torch.cat([c, c.new_zeros(shape)]) for c in self.v_cache]
        self.num_blocks = num_blocks
        if self._fused:
            self._fused.bind(self.k_cache, self.v_cache)

    def copy_blocks(self, pairs: list[tuple[int, int]]) -> None:
        """Copy-on-write for forks: block dst takes src's keys and values in every layer."""
        for src, dst in pairs:
            for kc, vc in zip(self.k_cache, self.v_cache):
                kc[dst] = kc[src]
                vc[dst] = vc[src]

    def _slots(self, seq: Sequence, start: int, end: int) -> torch.Tensor:
        pos = torch.arange(start, end)
        table = torch.tensor(seq.block_table, dtype=torch.long)
        return table[pos // self.block_size] * self.block_size + pos % self.block_size

    @torch.inference_mode()
    def run(self, seqs: list[Sequence], num_tokens: list[int]) -> torch.Tensor:
        """Compute the scheduled tokens into the cache; returns (len(seqs), vocab) fp32 logits of
        each sequence's last scheduled token (callers use those of sequences now complete).
        With the fused decoder, the sequences with one token go through it in one C call (also in
        a step that prefills others: a sequence's decode never depends on what else is scheduled)
        and the rest through the torch path; where every layer multiplies on GGUF blocks
        (`all_blocks`), the prefill chunks too, each token as its own row: then prefill, decode
        and the recompute of a preempted sequence all compute the same numbers."""
        with gguf_linear.int8_activations(self._int8_rows):
            return self._step(seqs, num_tokens)

    def _step(self, seqs: list[Sequence], num_tokens: list[int]) -> torch.Tensor:
        fused = self.fused()
        if fused is None:
            return self._run(seqs, num_tokens)
        one = [i for i, n in enumerate(num_tokens) if n == 1 or fused.all_blocks]
        if not one:
            return self._run(seqs, num_tokens)
        st = [seqs[i].num_computed for i in one]
        logits = fused.step([seqs[i].token_ids[p:p + num_tokens[i]] for i, p in zip(one, st)], st,
                            [seqs[i].block_table for i in one], self.block_size)
        if len(one) == len(seqs):
            return logits
        taken = set(one)
        rest = [i for i in range(len(seqs)) if i not in taken]
        out = torch.empty(len(seqs), logits.shape[1])
        out[one] = logits
        out[rest] = self._run([seqs[i] for i in rest], [num_tokens[i] for i in rest])
        return out

    def _run(self, seqs: list[Sequence], num_tokens: list[int]) -> torch.Tensor:
        """The torch path: every sequence's tokens through the model's modules at once."""
        ids, pos, slots, spans = [], [], [], []
        for seq, n in zip(seqs, num_tokens):
            start = seq.num_computed
            ids += seq.token_ids[start:start + n]
            pos.append(torch.arange(start, start + n))
            slots.append(self._slots(seq, start, start + n))
            spans.append((start, n))
        dev = self.device
        input_ids = torch.tensor(ids, device=dev)
        positions = torch.cat(pos).to(dev)
        slot = torch.cat(slots).to(dev)
        key_slots = [self._slots(s, 0, st + n).to(dev) for s, (st, n) in zip(seqs, spans)]
        decode = [i for i, (_, n) in enumerate(spans) if n == 1]
        dec_index = dec_mask = None
        if decode:  # (B, Lmax) slot ids, padded with slot 0 and masked out
            lens = [key_slots[i].numel() for i in decode]
            lmax = max(lens)
            dec_index = torch.zeros(len(decode), lmax, dtype=torch.long, device=dev)
            dec_mask = torch.zeros(len(decode), 1, 1, lmax, dtype=torch.bool, device=dev)
            for r, (i, L) in enumerate(zip(decode, lens)):
                dec_index[r, :L] = key_slots[i]
                dec_mask[r, ..., :L] = True
            dec_lens = torch.tensor(lens, dtype=torch.long)
        offsets = torch.tensor([0] + [n for _, n in spans]).cumsum(0).tolist()
        m = self.model.model
        x = m.embed_tokens(input_ids[None])[0].to(self.dtype)
        cos, sin = m.rotary_emb(x[None], positions[None])
        cos, sin = cos[0][:, None, :].to(self.dtype), sin[0][:, None, :].to(self.dtype)
        for li, layer in enumerate(self.layers):
            attn = layer.self_attn
            h = layer.input_layernorm(x)
            q = attn.q_proj(h).view(-1, self.n_heads, self.head_dim)
            k = attn.k_proj(h).view(-1, self.n_kv, self.head_dim)
            v = attn.v_proj(h).view(-1, self.n_kv, self.head_dim)
            q = q * cos + _rotate_half(q) * sin
            k = k * cos + _rotate_half(k) * sin
            kc = self.k_cache[li].view(-1, self.n_kv, self.head_dim)
            vc = self.v_cache[li].view(-1, self.n_kv, self.head_dim)
            kc[slot] = k.to(self.dtype)
            vc[slot] = v.to(self.dtype)
            out = torch.empty_like(q)
            if decode:
                rows = torch.tensor([offsets[i] for i in decode], device=dev)
                if self._attn is not None and q.dtype == torch.float32:
                    qd = q[rows].contiguous()                                 # (B, H, D)
                    out[rows] = ops.paged_attention(self._attn, qd, self.n_kv, kc, vc, dec_index, dec_lens)
                else:
                    qd = q[rows][:, :, None, :]                               # (B, H, 1, D)
                    kd = kc[dec_index].transpose(1, 2)                        # (B, Hkv, L, D)
                    vd = vc[dec_index].transpose(1, 2)
                    od = F.scaled_dot_product_attention(qd, kd, vd, attn_mask=dec_mask, enable_gqa=True)
                    out[rows] = od[:, :, 0, :]
            for i, (start, n) in enumerate(spans):
                if n == 1:
                    continue
                a, b = offsets[i], offsets[i + 1]
                ks, L = key_slots[i], key_slots[i].numel()
                qp = q[a:b].transpose(0, 1)[None]                             # (1, H, n, D)
                kp = kc[ks].transpose(0, 1)[None]                             # (1, Hkv, L, D)
                vp = vc[ks].transpose(0, 1)[None]
                # query j (position start + j) sees keys 0 .. start + j
                mask = torch.arange(L, device=dev)[None, :] <= (start + torch.arange(n, device=dev))[:, None]
                out[a:b] = F.scaled_dot_product_attention(qp, kp, vp, attn_mask=mask, enable_gqa=True)[0].transpose(0, 1)
            x = x + attn.o_proj(out.reshape(-1, self.n_heads * self.head_dim))
            x = x + layer.mlp(layer.post_attention_layernorm(x))
        last = torch.tensor([offsets[i + 1] - 1 for i in range(len(spans))], device=dev)
        return self.head(m.norm(x[last])).float()
