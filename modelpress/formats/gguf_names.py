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
ARCH = {"llama": "llama", "mistral": "llama", "qwen2": "qwen2", "qwen3": "qwen3"}
PERMUTED = ("llama",)  # architectures whose q / k rows llama.cpp's converter permutes


def _rules(frm: int) -> list[tuple[re.Pattern, str]]:
    return [(re.compile(re.escape(p[frm]).replace(r"\{\}", r"(?P<b>\d+)") + r"\.(?P<s>weight|bias)$"),
             p[1 - frm].replace("{}", r"\g<b>") + r".\g<s>") for p in PAIRS]


_TO_HF, _TO_GGUF = _rules(0), _rules(1)


def _map(name: str, rules: list[tuple[re.Pattern, str]]) -> str | None:
    for pat, rep in rules:
        if pat.match(name):
            return pat.sub(rep, name)
    return None


def to_hf(gguf_name: str) -> str | None:
    return _map(gguf_name, _TO_HF)


def to_gguf(hf_name: str) -> str | None:
    return _map(hf_name, _TO_GGUF)
