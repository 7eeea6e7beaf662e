"""Tensor names of a decoder model in GGUF and in transformers, one table for both directions
(llama.cpp's convert_hf_to_gguf.py mapping; weights and biases alike); `{}` stands for the block
number. ARCH: the GGUF architecture each transformers model_type is written as (llama.cpp's
converter writes Mistral as `llama`); only `llama` files hold q/k rows in its rotary order.

    to_hf("blk.3.attn_q.weight") == "model.layers.3.self_attn.q_proj.weight"
    to_gguf("model.layers.3.self_attn.q_proj.weight") == "blk.3.attn_q.weight"
"""
from __future__ import annotations

import re

PAIRS = (
    ("token_embd", "model.embed_tokens"),
    ("output_norm", "model.norm"),
    ("output", "lm_head"),
    ("blk.{}.attn_norm", "model.layers.{}.input_layernorm"),
    ("blk.{}.ffn_norm", "model.layers.{}.post_attention_layernorm"),
    ("blk.{}.attn_q", "model.layers.{}.self_attn.q_proj"),
    ("blk.{}.attn_k", "model.layers.{}.self_attn.k_proj"),
    ("blk.{}.attn_v", "model.layers.{}.self_attn.v_proj"),
    ("blk.{}.attn_output", "model.layers.{}.self_attn.o_proj"),
    ("blk.{}.ffn_gate", "model.layers.{}.mlp.gate_proj"),
    ("blk.{}.ffn_up", "model.layers.{}.mlp.up_proj"),
    ("blk.{}.ffn_down", "model.layers.{}.mlp.down_proj"),
    ("blk.{}.attn_q_norm", "model.layers.{}.self_attn.q_norm"),    # qwen3
    ("blk.{}.attn_k_norm", "model.layers.{}.self_attn.k_norm"),
)
# gemma's four norms a block: post_attention_layernorm norms the attention's output there
GEMMA = (
    ("blk.{}.post_attention_norm", "model.layers.{}.post_attention_layernorm"),
    ("blk.{}.ffn_norm", "model.layers.{}.pre_feedforward_layernorm"),
    ("blk.{}.post_ffw_norm", "model.layers.{}.post_feedforward_layernorm"),
)
# phi3's fused layers: q, k, v in one tensor; gate and up in one (gate first), named ffn_up
PHI3 = (
    ("blk.{}.attn_qkv", "model.layers.{}.self_attn.qkv_proj"),
    ("blk.{}.ffn_up", "model.layers.{}.mlp.gate_up_proj"),
)
ARCH = {"llama": "llama", "mistral": "llama", "qwen2": "qwen2", "qwen3": "qwen3", "gemma2": "gemma2",
        "gemma3_text": "gemma3", "phi3": "phi3"}
PERMUTED = ("llama",)  # architectures whose q / k rows llama.cpp's converter permutes
NORM_PLUS_ONE = ("gemma2", "gemma3")  # files that store gemma's (1 + w) norms as 1 + w (its converter adds 1)


def llama_cpp_layer_types(arch: str, n: int) -> list[str]:
    """The sliding / full pattern llama.cpp applies (gemma2: even layers slide; gemma3: five of six)."""
    slides = (lambda i: i % 2 == 0) if arch == "gemma2" else (lambda i: (i + 1) % 6 != 0)
    return ["sliding_attention" if slides(i) else "full_attention" for i in range(n)]


def llama_cpp_query_scalar(arch: str, layers: int, hidden: int, heads: int, head_dim: int) -> int:
    """The query_pre_attn_scalar llama.cpp assumes: hidden / heads for the 27B models (46 layers of
    gemma2, 62 of gemma3), else the head size."""
    return hidden // heads if layers == (46 if arch == "gemma2" else 62) else head_dim


def _rules(pairs: tuple, frm: int) -> list[tuple[re.Pattern, str]]:
    return [(re.compile(re.escape(p[frm]).replace(r"\{\}", r"(?P<b>\d+)") + r"\.(?P<s>weight|bias)$"),
             p[1 - frm].replace("{}", r"\g<b>") + r".\g<s>") for p in pairs]


def _pairs(arch: str) -> tuple:
    """The table for one architecture: its own pairs first (the first match wins)."""
    own = GEMMA if arch in NORM_PLUS_ONE else PHI3 if arch == "phi3" else ()
    names = {hf for _, hf in own}
    return own + tuple(p for p in PAIRS if p[1] not in names)


_RULES = {arch: (_rules(_pairs(arch), 0), _rules(_pairs(arch), 1)) for arch in set(ARCH.values())}


def _map(name: str, rules: list[tuple[re.Pattern, str]]) -> str | None:
    for pat, rep in rules:
        if pat.match(name):
            return pat.sub(rep, name)
    return None


def to_hf(gguf_name: str, arch: str = "llama") -> str | None:
    return _map(gguf_name, _RULES[arch][0])


def to_gguf(hf_name: str, arch: str = "llama") -> str | None:
    return _map(hf_name, _RULES[arch][1])
