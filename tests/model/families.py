"""Tiny random models of every family the decoder computes (model/decoder.py FAMILIES), built from
transformers' config classes, with random norm weights and biases (not their init values), so that
a dropped or misapplied tensor shows."""
import io
from pathlib import Path
from pydoc_data.topics import topics

import torch

SMALL = dict(vocab_size=261, hidden_size=64, intermediate_size=96, num_hidden_layers=3, num_attention_heads=4,
             num_key_value_heads=2, max_position_embeddings=256, tie_word_embeddings=True)


def configs() -> dict:
    from transformers import (
        Gemma2Config,
        Gemma3TextConfig,
        LlamaConfig,
        MistralConfig,
        Phi3Config,
        Qwen2Config,
        Qwen3Config,
    )

    sliding = ["sliding_attention", "full_attention", "sliding_attention"]
    return {
        "llama": LlamaConfig(**SMALL),
        "mistral": MistralConfig(**SMALL, sliding_window=12),
        "qwen2": Qwen2Config(**SMALL),                                  # q/k/v biases
        "qwen3": Qwen3Config(**SMALL, head_dim=16),                     # q/k norms
        "gemma2": Gemma2Config(**SMALL, head_dim=16, query_pre_attn_scalar=24, sliding_window=12,
                               attn_logit_softcapping=5.0, final_logit_softcapping=3.0, layer_types=sliding),
        "gemma3_text": Gemma3TextConfig(**SMALL, head_dim=16, query_pre_attn_scalar=24, sliding_window=12,
                                        layer_types=sliding),
        "phi3": Phi3Config(**{**SMALL, "tie_word_embeddings": False}, pad_token_id=0, bos_token_id=1,
                           eos_token_id=2, sliding_window=12),           # fused qkv and gate_up; a window
    }


def tiny(family: str, seed: int = 0, config=None) -> torch.nn.Module:
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config or configs()[family]).eval()
    gen = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name or name.endswith(".bias"):
                p.copy_(torch.randn(p.shape, generator=gen) * 0.3 + (1.0 if "norm" in name and "gemma" not in family else 0))
    return model


def spm_vocabulary(folder: Path):
    """A SentencePiece vocabulary (640 pieces) trained on the standard library's pydoc topics, written
    to `folder` (tokenizer.model) and returned as transformers' tokenizer of it: llama.cpp's converter
    reads Gemma's and Phi-3's vocabulary only from a tokenizer.model, and refuses the default model's
    BPE pre-tokenizer for Qwen2, so the families are compared with the converter on this one. Needs
    sentencepiece, and protobuf for transformers to read it."""
    import sentencepiece
    from transformers import AutoTokenizer

    text = [line for topic in topics.values() for line in topic.splitlines() if line.strip()][:4000]
    model = io.BytesIO()
    sentencepiece.SentencePieceTrainer.train(sentence_iterator=iter(text), model_writer=model, vocab_size=640,
                                             model_type="bpe", byte_fallback=True, character_coverage=0.9995,
                                             unk_id=0, bos_id=1, eos_id=2, pad_id=-1, minloglevel=2)
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "tokenizer.model").write_bytes(model.getvalue())
    (folder / "tokenizer_config.json").write_text('{"tokenizer_class": "LlamaTokenizer"}')
    return AutoTokenizer.from_pretrained(folder)
