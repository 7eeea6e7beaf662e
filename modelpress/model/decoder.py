"""The one decoder model modelpress runs: the serving engine, `modelpress generate` and the decode
speed measurements all compute through `Decoder` (the nano-vllm shape: the model owns its layers,
attention reads and writes the paged KV cache, the caller only prepares a `Batch`).

    decoder = Decoder(model)                  # a transformers Llama-family causal LM, any layer class
    decoder.allocate(num_blocks=64, block_size=16)
    logits = decoder(Batch([[5, 6, 7]], [0], [[0]], 16))   # (sequences, vocab) fp32, last tokens

The paged cache, per layer (`PagedAttention.k_cache`, `.v_cache`):

    (num_blocks, block_size, n_kv_heads, head_dim); position p of a sequence lives in slot
    block_table[p // block_size] * block_size + p % block_size

The layers are the model's own modules (embedding, norms, the q/k/v/o and MLP linears, whatever
compressed class they are, the output head), so every format modelpress loads runs on its own
kernels; the decoder does the rotary embedding (one table, from the model's rotary module) and
attention against the cache. A batch is flattened to its N tokens: the linears run once on
(N, hidden). Every sequence that decodes one token joins one paged attention call (the kernels'
mp_paged_attention on a CPU, else one masked SDPA over its gathered keys); each prefill chunk runs
its own causal SDPA against its cached prefix plus itself.

Fast path (model/fused_decode.py): on a CPU with the kernels built, where every block linear is fp32,
GGUF or another stored format (and the blocks are Llama's or what qwen2, qwen3, mistral and gemma add
to them), whole decode steps run in one C call (mp_llama_decode) on the same weights and the same
cache. Sequences that decode one token go there; where every layer multiplies with int8 activations
(GGUF blocks, integer codes: `fused.all_int8`) prefill chunks too, each token a row, so a prefill, a decode and the recompute
of a preempted sequence give the cache the same bits. With `int8_activations` (the default) GGUF
Q8_0 / Q5_0 / Q4_K / Q6_K layers multiply on their blocks with activations rounded to int8 in both
paths (llama.cpp's numerics; nn/gguf_linear.py's scoped `int8_activations()`), and a tied head kept
in blocks (`record(model).head`) replaces its fp32 copy.

Model families: FAMILIES lists the `model_type`s whose blocks this decoder computes (Llama's:
pre-norm RMSNorm, rotary q/k, SiLU-gated MLP); any other model is refused with a clear error.
"""
from __future__ import annotations

import dataclasses
import inspect

import torch
import torch.nn.functional as F

from .. import kernels
from ..errors import ModelpressError
from ..kernels import ops
from ..nn import gguf_linear
from ..nn.multi_lora import row_adapters
from ..record import record
from .fused_decode import FusedDecoder

# transformers model_type values this decoder computes: pre-norm blocks of rotary attention and a
# gated MLP, with each family's differences read from its modules (q/k norms: qwen3, gemma3_text;
# fused qkv: phi3; sandwich norms, scaled embeddings, soft-capping, sliding windows: gemma2,
# gemma3_text; sliding windows: mistral). The model's own modules compute norms, MLPs and embeddings.
FAMILIES = ("llama", "mistral", "qwen2", "qwen3", "gemma2", "gemma3_text", "phi3")
CONFIG_WINDOW = ("mistral", "phi3")  # families whose attention reads config.sliding_window in every layer


def supports(model: torch.nn.Module) -> bool:
    """Whether `Decoder` computes this model."""
    cfg = getattr(model, "config", None)
    return getattr(cfg, "model_type", None) in FAMILIES and hasattr(getattr(model, "model", None), "layers")


def check_family(model: torch.nn.Module) -> None:
    if not supports(model):
        kind = getattr(getattr(model, "config", None), "model_type", None) or type(model).__name__
        raise ModelpressError(f"modelpress runs decoders of the model types {', '.join(FAMILIES)}; this model is "
                              f"{kind!r}, which it can compress and evaluate but not yet generate with or serve")


@dataclasses.dataclass
class Batch:
    """One step's work, as the runner prepares it: sequence i computes the tokens chunks[i] at
    positions starts[i] onwards (one token: a decode step; more: a prefill chunk), its keys and
    values going to the blocks of block_tables[i]."""
    chunks: list[list[int]]
    starts: list[int]
    block_tables: list[list[int]]
    block_size: int
    adapters: list[int] | None = None  # sequence i's adapter (nn/multi_lora.py), -1: the base; None: all base

    def select(self, rows: list[int]) -> "Batch":
        return Batch([self.chunks[i] for i in rows], [self.starts[i] for i in rows],
                     [self.block_tables[i] for i in rows], self.block_size,
                     None if self.adapters is None else [self.adapters[i] for i in rows])

    def adapted(self, i: int) -> bool:
        return self.adapters is not None and self.adapters[i] >= 0

    def row_adapters(self) -> torch.Tensor | None:
        """Each token's adapter, in the order the torch path lays the tokens out (None: none adapted)."""
        if self.adapters is None or all(a < 0 for a in self.adapters):
            return None
        return torch.tensor([a for a, c in zip(self.adapters, self.chunks) for _ in c], dtype=torch.long)

    def slots(self, i: int, start: int, end: int) -> torch.Tensor:
        """Cache slots of sequence i's positions start .. end - 1."""
        pos = torch.arange(start, end)
        table = torch.tensor(self.block_tables[i], dtype=torch.long)
        return table[pos // self.block_size] * self.block_size + pos % self.block_size


@dataclasses.dataclass
class _Flat:
    """A batch's tensors for the torch path: its N tokens in a row."""
    input_ids: torch.Tensor          # (N,)
    positions: torch.Tensor          # (N,)
    slot: torch.Tensor               # (N,) where each token's key and value go
    offsets: list[int]               # sequence i's tokens are rows offsets[i] .. offsets[i + 1] - 1
    key_slots: list[torch.Tensor]    # sequence i's cached positions 0 .. its last, as slots
    decode: list[int]                # the sequences computing one token
    dec_rows: torch.Tensor | None    # their rows
    dec_index: torch.Tensor | None   # (B, Lmax) their keys' slots, padded with slot 0 ...
    dec_mask: torch.Tensor | None    # (B, 1, 1, Lmax) ... and masked out
    dec_lens: torch.Tensor | None    # (B,)

    @classmethod
    def of(cls, batch: Batch, device: torch.device) -> "_Flat":
        n = [len(c) for c in batch.chunks]
        ids = [t for c in batch.chunks for t in c]
        pos = torch.cat([torch.arange(st, st + k) for st, k in zip(batch.starts, n)])
        slot = torch.cat([batch.slots(i, st, st + k) for i, (st, k) in enumerate(zip(batch.starts, n))])
        key_slots = [batch.slots(i, 0, st + k).to(device) for i, (st, k) in enumerate(zip(batch.starts, n))]
        offsets = torch.tensor([0] + n).cumsum(0).tolist()
        decode = [i for i, k in enumerate(n) if k == 1]
        rows = index = mask = lens = None
        if decode:
            ls = [key_slots[i].numel() for i in decode]
            index = torch.zeros(len(decode), max(ls), dtype=torch.long, device=device)
            mask = torch.zeros(len(decode), 1, 1, max(ls), dtype=torch.bool, device=device)
            for r, (i, L) in enumerate(zip(decode, ls)):
                index[r, :L] = key_slots[i]
                mask[r, ..., :L] = True
            lens = torch.tensor(ls, dtype=torch.long)
            rows = torch.tensor([offsets[i] for i in decode], device=device)
        return cls(torch.tensor(ids, device=device), pos.to(device), slot.to(device), offsets, key_slots, decode,
                   rows, index, mask, lens)

    @property
    def last(self) -> list[int]:
        return [b - 1 for b in self.offsets[1:]]


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    h = x.shape[-1] // 2
    return torch.cat((-x[..., h:], x[..., :h]), dim=-1)


class PagedAttention(torch.nn.Module):
    """The attention of one layer (the model's projections and q/k norms), rotary, and attention that
    writes this step's keys and values to the paged cache and reads the sequence's from it."""

    def __init__(self, attn: torch.nn.Module, cfg, n_heads: int, n_kv: int, head_dim: int,  # noqa: ANN001
                 native: bool) -> None:
        super().__init__()
        self.qkv_proj = getattr(attn, "qkv_proj", None)      # phi3: one product, split below
        if self.qkv_proj is None:
            self.q_proj, self.k_proj, self.v_proj = attn.q_proj, attn.k_proj, attn.v_proj
        self.o_proj = attn.o_proj
        self.q_norm, self.k_norm = getattr(attn, "q_norm", None), getattr(attn, "k_norm", None)  # per head
        self.n_heads, self.n_kv, self.head_dim = n_heads, n_kv, head_dim
        self.scaling = float(getattr(attn, "scaling", head_dim ** -0.5))
        self.softcap = getattr(attn, "attn_logit_softcapping", None)
        # keys within `window` positions of the query (transformers: kv_idx > q_idx - window); mistral and
        # phi3 read it from their config for every layer, the others set it on the sliding layers' attention
        self.window = (getattr(attn, "sliding_window", None) if hasattr(attn, "sliding_window")
                       else getattr(cfg, "sliding_window", None) if cfg.model_type in CONFIG_WINDOW else None)
        self.layer_type = getattr(attn, "layer_type", None)
        default_scale = abs(self.scaling * head_dim ** 0.5 - 1) < 1e-12
        self.sdpa_scale = None if default_scale else self.scaling  # None: SDPA's own 1 / sqrt(D)
        plain = self.softcap is None and self.window is None and default_scale
        self.lib = kernels.lib() if native and plain else None  # fp32 on a CPU: decode rows in mp_paged_attention
        self.k_cache = self.v_cache = torch.empty(0)

    def _qkv(self, h: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        if self.qkv_proj is not None:
            qkv = self.qkv_proj(h)
            nq, nk = self.n_heads * self.head_dim, self.n_kv * self.head_dim
            q, k, v = qkv[..., :nq], qkv[..., nq:nq + nk], qkv[..., nq + nk:]
        else:
            q, k, v = self.q_proj(h), self.k_proj(h), self.v_proj(h)
        q = q.reshape(-1, self.n_heads, self.head_dim)
        k = k.reshape(-1, self.n_kv, self.head_dim)
        v = v.reshape(-1, self.n_kv, self.head_dim)
        if self.q_norm is not None:
            q, k = self.q_norm(q), self.k_norm(k)
        return q, k, v

    def _mask(self, q_pos: torch.Tensor, k_len: int) -> torch.Tensor:
        """(n, k_len) which keys (positions 0 .. k_len - 1) each query position sees."""
        kpos = torch.arange(k_len, device=q_pos.device)[None, :]
        seen = kpos <= q_pos[:, None]
        return seen & (kpos > q_pos[:, None] - self.window) if self.window is not None else seen

    def _attend(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """q (B, H, n, D), k / v (B, Hkv, L, D), mask broadcastable to (B, H, n, L) -> (B, H, n, D)."""
        if self.softcap is None:
            return F.scaled_dot_product_attention(q, k.to(q.dtype), v.to(q.dtype), attn_mask=mask,
                                                  scale=self.sdpa_scale, enable_gqa=True)
        rep = self.n_heads // self.n_kv  # as transformers' eager attention: scale, cap, mask, fp32 softmax
        k, v = k.to(q.dtype).repeat_interleave(rep, 1), v.to(q.dtype).repeat_interleave(rep, 1)
        w = torch.matmul(q, k.transpose(2, 3)) * self.scaling
        w = torch.tanh(w / self.softcap) * self.softcap
        w = w.masked_fill(~mask, float("-inf"))
        return torch.matmul(torch.softmax(w, dim=-1, dtype=torch.float32).to(q.dtype), v)

    def forward(self, h: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, flat: _Flat) -> torch.Tensor:
        q, k, v = self._qkv(h)
        q, k = _rotary(q, cos, sin), _rotary(k, cos, sin)
        kc = self.k_cache.view(-1, self.n_kv, self.head_dim)
        vc = self.v_cache.view(-1, self.n_kv, self.head_dim)
        kc[flat.slot] = k.to(kc.dtype)
        vc[flat.slot] = v.to(vc.dtype)
        out = torch.empty_like(q)
        if flat.decode:
            rows = flat.dec_rows
            if self.lib is not None and q.dtype == torch.float32:
                out[rows] = ops.paged_attention(self.lib, q[rows].contiguous(), self.n_kv, kc, vc,
                                                flat.dec_index, flat.dec_lens)
            else:
                mask = flat.dec_mask
                if self.window is not None:  # the last `window` positions of each sequence
                    L = flat.dec_index.shape[1]
                    lens = flat.dec_lens.to(q.device)[:, None]
                    kpos = torch.arange(L, device=q.device)[None, :]
                    mask = mask & (kpos > lens - 1 - self.window)[:, None, None, :]
                qd = q[rows][:, :, None, :]                                  # (B, H, 1, D)
                kd = kc[flat.dec_index].transpose(1, 2)                      # (B, Hkv, L, D)
                vd = vc[flat.dec_index].transpose(1, 2)
                out[rows] = self._attend(qd, kd, vd, mask)[:, :, 0, :]
        for i, (a, b) in enumerate(zip(flat.offsets, flat.offsets[1:])):
            if b - a == 1:
                continue
            ks = flat.key_slots[i]
            qp = q[a:b].transpose(0, 1)[None]                                 # (1, H, n, D)
            kp = kc[ks].transpose(0, 1)[None]                                 # (1, Hkv, L, D)
            vp = vc[ks].transpose(0, 1)[None]
            out[a:b] = self._attend(qp, kp, vp, self._mask(flat.positions[a:b], ks.numel()))[0].transpose(0, 1)
        return self.o_proj(out.reshape(-1, self.n_heads * self.head_dim))


class DecoderLayer(torch.nn.Module):
    """Pre-norm block: x + attention(norm(x)), then x + mlp(norm(x)); with gemma's sandwich norms
    (pre_ / post_feedforward_layernorm) each branch's output is normed too."""

    def __init__(self, layer: torch.nn.Module, attention: PagedAttention) -> None:
        super().__init__()
        self.input_layernorm, self.post_attention_layernorm = layer.input_layernorm, layer.post_attention_layernorm
        self.pre_feedforward_layernorm = getattr(layer, "pre_feedforward_layernorm", None)
        self.post_feedforward_layernorm = getattr(layer, "post_feedforward_layernorm", None)
        self.self_attn, self.mlp = attention, layer.mlp
        self.rope_key: str | None = None  # set by Decoder

    def forward(self, x: torch.Tensor, rope: dict, flat: _Flat) -> torch.Tensor:
        cos, sin = rope[self.rope_key]
        a = self.self_attn(self.input_layernorm(x), cos, sin, flat)
        if self.pre_feedforward_layernorm is None:
            x = x + a
            return x + self.mlp(self.post_attention_layernorm(x))
        x = x + self.post_attention_layernorm(a)
        return x + self.post_feedforward_layernorm(self.mlp(self.pre_feedforward_layernorm(x)))


def _rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x (N, heads, D) rotated by cos / sin (N, 1, R): the first R of D dimensions (phi3's partial
    rotary; R = D elsewhere)."""
    r = cos.shape[-1]
    if r == x.shape[-1]:
        return x * cos + _rotate_half(x) * sin
    xr = x[..., :r]
    return torch.cat([xr * cos + _rotate_half(xr) * sin, x[..., r:]], dim=-1)


class Decoder(torch.nn.Module):
    """`model` (a transformers causal LM of a family in FAMILIES) as a paged-cache decoder. It shares
    the model's modules and weights. fused: take the C fast path where it applies; int8_activations:
    GGUF block types multiply with int8 activations (llama.cpp's numerics, the default)."""

    def __init__(self, model: torch.nn.Module, fused: bool = True, int8_activations: bool = True) -> None:
        super().__init__()
        check_family(model)
        cfg = model.config
        self.config = cfg
        self.n_heads, self.n_kv = cfg.num_attention_heads, cfg.num_key_value_heads or cfg.num_attention_heads
        self.head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
        p = next(model.parameters())
        self.device = p.device
        self.dtype = p.dtype if p.dtype in (torch.float32, torch.bfloat16, torch.float16) else torch.float32
        native = self.device.type == "cpu" and self.dtype == torch.float32 and kernels.lib() is not None
        self.embed_tokens, self.norm, self.rotary_emb = model.model.embed_tokens, model.model.norm, model.model.rotary_emb
        self.layers = torch.nn.ModuleList(
            DecoderLayer(ly, PagedAttention(ly.self_attn, cfg, self.n_heads, self.n_kv, self.head_dim, native))
            for ly in model.model.layers)
        self.softcap = getattr(cfg, "final_logit_softcapping", None)  # gemma2: logits = c * tanh(logits / c)
        # gemma3's rotary module takes the layer type (local and global bases); the others one table
        self._typed_rope = "layer_type" in inspect.signature(self.rotary_emb.forward).parameters
        for ly in self.layers:  # the rotary table each layer reads (None: the model's one table)
            ly.rope_key = ly.self_attn.layer_type if self._typed_rope else None
        self.int8_activations = int8_activations
        head = record(model).head  # a tied head kept in GGUF blocks
        self.head = (head if isinstance(head, gguf_linear.GGUFLinear) and int8_activations
                     and head.qdata.device == self.device else model.lm_head)
        # the torch path computes as the fused one: GGUF layers with int8 activations (nn/gguf_linear.py)
        self._int8_rows = 1 << 62 if int8_activations and self.device.type == "cpu" else 0
        self._rope: dict[str | None, tuple[torch.Tensor, torch.Tensor]] = {}
        self.fused = FusedDecoder.build(self, int8_activations) if fused else None
        self.block_size = 0

    # -- the cache -------------------------------------------------------------------------------------
    def kv_dtype(self, name: str = "auto") -> torch.dtype:
        """The cache's type. "auto": fp16 where every step runs fused with int8 activations
        (GGUF blocks, integer codes) (llama.cpp's default cache type for its CPU path; half the bytes attention
        reads), else the model's own type; "float32", "float16": that (fp16 only on the fused path)."""
        fused = self.fused
        if name == "auto":
            return torch.float16 if fused is not None and fused.all_int8 and self.int8_activations else self.dtype
        if name == "float16":
            if fused is None:
                raise ValueError("an fp16 KV cache needs the fused CPU decode (a Llama-family fp32 model on a CPU "
                                 "whose layers it can take); leave the KV type to auto")
            if not fused.all_int8:
                raise ValueError("an fp16 KV cache needs every layer multiplying with int8 activations (GGUF blocks, "
                                 "integer codes: the prefill runs fused too); "
                                 "leave the KV type to auto")
            return torch.float16
        if name == "float32":
            if self.dtype != torch.float32:
                raise ValueError(f"the model computes in {self.dtype}: leave the KV type to auto")
            return torch.float32
        raise ValueError(f"kv_dtype must be 'auto', 'float32' or 'float16', not {name!r}")

    def allocate(self, num_blocks: int, block_size: int, kv_dtype: str = "auto") -> None:
        """A zeroed paged cache of `num_blocks` blocks of `block_size` tokens in every layer."""
        dtype = self.kv_dtype(kv_dtype)
        shape = (num_blocks, block_size, self.n_kv, self.head_dim)
        self.block_size = block_size
        for ly in self.layers:
            ly.self_attn.k_cache = torch.zeros(shape, dtype=dtype, device=self.device)
            ly.self_attn.v_cache = torch.zeros(shape, dtype=dtype, device=self.device)
        self._bind()

    def _bind(self) -> None:
        if self.fused is not None:
            self.fused.bind(self.k_cache, self.v_cache)

    @property
    def k_cache(self) -> list[torch.Tensor]:
        return [ly.self_attn.k_cache for ly in self.layers]

    @property
    def v_cache(self) -> list[torch.Tensor]:
        return [ly.self_attn.v_cache for ly in self.layers]

    @property
    def num_blocks(self) -> int:
        return self.layers[0].self_attn.k_cache.shape[0]

    @property
    def bytes_per_block(self) -> int:
        c = self.layers[0].self_attn.k_cache
        return 2 * len(self.layers) * c[0].numel() * c.element_size()

    def grow(self, num_blocks: int) -> None:
        """Room for `num_blocks` blocks, the ones there kept."""
        extra = num_blocks - self.num_blocks
        if extra <= 0:
            return
        for ly in self.layers:
            a = ly.self_attn
            a.k_cache = torch.cat([a.k_cache, a.k_cache.new_zeros((extra, *a.k_cache.shape[1:]))])
            a.v_cache = torch.cat([a.v_cache, a.v_cache.new_zeros((extra, *a.v_cache.shape[1:]))])
        self._bind()

    def copy_blocks(self, pairs: list[tuple[int, int]]) -> None:
        """Copy-on-write for forks: block dst takes src's keys and values in every layer."""
        for src, dst in pairs:
            for ly in self.layers:
                ly.self_attn.k_cache[dst] = ly.self_attn.k_cache[src]
                ly.self_attn.v_cache[dst] = ly.self_attn.v_cache[src]

    # -- the forward -------------------------------------------------------------------------------------
    def rotary(self, positions: torch.Tensor, layer_type: str | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """cos, sin (N, rotary dims) fp32 of `positions`, from a table the model's rotary module filled
        (each entry is inv_freq * position alone, so the table holds what a per-position call gives)."""
        top = int(positions.max())
        table = self._rope.get(layer_type)
        if table is None or top >= table[0].shape[0]:
            n = max(256, 2 * (top + 1))
            x = torch.zeros(1, 1, self.config.hidden_size, device=self.device)
            pos = torch.arange(n, device=self.device)[None]
            cos, sin = self.rotary_emb(x, pos, layer_type) if self._typed_rope else self.rotary_emb(x, pos)
            self._rope[layer_type] = table = (cos[0].float().contiguous(), sin[0].float().contiguous())
        idx = positions.to(table[0].device)
        return table[0][idx].contiguous(), table[1][idx].contiguous()

    @torch.inference_mode()
    def forward(self, batch: Batch) -> torch.Tensor:
        """(sequences, vocab) fp32 logits of each sequence's last token, its tokens' keys and values
        written to the cache. Sequences the fast path takes go through it in one C call (also in a
        step that prefills others: a sequence's numbers never depend on what else the step holds)."""
        with gguf_linear.int8_activations(self._int8_rows):
            fused = self.fused
            rows = ([] if fused is None else  # the C path computes the base: adapted sequences take the torch path
                    [i for i, c in enumerate(batch.chunks) if (len(c) == 1 or fused.all_int8)
                     and not batch.adapted(i)])
            if not rows:
                logits = self.forward_torch(batch)
            elif len(rows) == len(batch.chunks):
                logits = fused.step(batch, self)
            else:
                rest = [i for i in range(len(batch.chunks)) if i not in set(rows)]
                part = fused.step(batch.select(rows), self)
                logits = torch.empty(len(batch.chunks), part.shape[1])
                logits[rows] = part
                logits[rest] = self.forward_torch(batch.select(rest))
        if self.softcap is not None:
            logits = torch.tanh(logits / self.softcap) * self.softcap
        return logits

    def forward_torch(self, batch: Batch) -> torch.Tensor:
        """The batch through the model's modules, every token at once (logits before any final soft-cap)."""
        flat = _Flat.of(batch, self.device)
        x = self.embed_tokens(flat.input_ids[None])[0].to(self.dtype)
        rope = {}
        for key in {ly.rope_key for ly in self.layers}:
            cos, sin = self.rotary(flat.positions, key)
            rope[key] = cos[:, None, :].to(self.dtype), sin[:, None, :].to(self.dtype)
        adapters = batch.row_adapters()
        with row_adapters(None if adapters is None else adapters.to(self.device)):
            for layer in self.layers:
                x = layer(x, rope, flat)
        last = torch.tensor(flat.last, device=self.device)
        return self.head(self.norm(x[last])).float()
