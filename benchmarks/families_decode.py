"""Batch-1 decode of other model families beside llama.cpp, on the same Q4_K_M file (issue 21):
Qwen2-, Qwen3-, Gemma-2-, Gemma-3- and Phi-3-shaped models of the default model's size (576 wide, 30 blocks, 9 heads,
3 key/value heads, 1536 MLP, its 49152-token vocabulary), random weights, written by modelpress'
GGUF export; the default Llama beside them. The tools alternate --repeats times; each row has the
medians. modelpress runs the serving engine at batch 1 (benchmarks/serve.py's decode_ours: the
C fused decode, which takes qwen2's biases, qwen3's q / k norms, gemma's norms, GELU, soft-caps,
windows and two rotary tables, and phi3's fused products too).

    .venv/bin/python benchmarks/families_decode.py --out benchmarks/results/families_decode.json
Nothing here asserts a timing."""
from __future__ import annotations

import argparse
import os
import statistics
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")

import modelpress  # noqa: E402
from benchmarks.common import scratch, write_result  # noqa: E402
from benchmarks.serve import decode_llamacpp, decode_ours  # noqa: E402

SHAPE = dict(hidden_size=576, intermediate_size=1536, num_hidden_layers=30, num_attention_heads=9,
             num_key_value_heads=3, max_position_embeddings=2048, tie_word_embeddings=True)


def family_model(family: str, vocab: int) -> torch.nn.Module:
    from transformers import (
        AutoModelForCausalLM,
        Gemma2Config,
        Gemma3TextConfig,
        Phi3Config,
        Qwen2Config,
        Qwen3Config,
    )

    from modelpress.formats.gguf_names import llama_cpp_layer_types

    if family == "qwen2":
        cfg = Qwen2Config(**SHAPE, vocab_size=vocab)
    elif family == "qwen3":
        cfg = Qwen3Config(**SHAPE, vocab_size=vocab, head_dim=64)
    elif family == "phi3":  # untied, as Phi-3; its window (llama.cpp ignores it) past these lengths
        cfg = Phi3Config(**{**SHAPE, "tie_word_embeddings": False}, vocab_size=vocab, sliding_window=2047,
                         pad_token_id=0, bos_token_id=1, eos_token_id=2)
    elif family == "gemma3_text":  # five sliding layers to one global, as llama.cpp derives it
        cfg = Gemma3TextConfig(**SHAPE, vocab_size=vocab, head_dim=64, query_pre_attn_scalar=64, sliding_window=512,
                               layer_types=llama_cpp_layer_types("gemma3", SHAPE["num_hidden_layers"]))
    else:  # gemma2 as llama.cpp derives it: every other layer slides, the query scaled by the head size
        cfg = Gemma2Config(**SHAPE, vocab_size=vocab, head_dim=64, query_pre_attn_scalar=64, sliding_window=512,
                           layer_types=llama_cpp_layer_types("gemma2", SHAPE["num_hidden_layers"]))
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(cfg).eval()
    with torch.no_grad():  # weights of a trained model's scale, biases and norms not at their init values
        for name, p in model.named_parameters():
            p.copy_(torch.randn_like(p) * (0.3 if "norm" in name or name.endswith("bias") else 0.02)
                    + (1.0 if "norm" in name and "gemma" not in family else 0.0))
    return model


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--tokens", type=int, default=128)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--families", nargs="+", default=["qwen2", "qwen3", "gemma2", "gemma3_text", "phi3"])
    p.add_argument("--out", default="benchmarks/results/families_decode.json")
    a = p.parse_args()
    torch.set_num_threads(2)
    work = scratch("mp-families-")
    default, tok = modelpress.load()
    files = {"llama (the default model)": work / "llama.gguf"}
    modelpress.export_gguf(default, tok, files["llama (the default model)"], "Q4_K_M", progress=False)
    del default
    for family in a.families:
        files[family] = work / f"{family}.gguf"
        modelpress.export_gguf(family_model(family, len(tok)), tok, files[family], "Q4_K_M", progress=False)
    rows = []
    for family, path in files.items():
        runs: dict[str, list[float]] = {"modelpress": [], "llama.cpp": []}
        for _ in range(a.repeats):
            runs["modelpress"].append(decode_ours(path, a.tokens))
            runs["llama.cpp"].append(decode_llamacpp(path, a.tokens))
        ours, theirs = statistics.median(runs["modelpress"]), statistics.median(runs["llama.cpp"])
        rows.append({"family": family, "mix": "Q4_K_M", "file_bytes": path.stat().st_size,
                     "modelpress_tokens_per_s": ours, "llama_cpp_tokens_per_s": theirs, "ratio": ours / theirs,
                     "modelpress_runs": runs["modelpress"], "llama_cpp_runs": runs["llama.cpp"]})
        print(rows[-1], flush=True)
        path.unlink()
    write_result(a.out, "families decode", rows, threads_both=2, tokens=a.tokens,
                 reference="llama-cpp-python 0.3.36 (Llama.eval, 2 threads)")


if __name__ == "__main__":
    main()
