"""The GPU paths on a SmolLM2-135M-shaped model with random weights (the real model's 98 MB file
does not travel to a lent GPU machine): perplexity tokens/s beside the plain transformers loop,
fp32 and RTN int4 / int8 (reference path: dequantize, then cuBLAS), and decode tokens/s; GPTQ
and AWQ wall time on the GPU with 128 x 512 calibration tokens.

    python benchmarks/gpu.py --out results/gpu.json     # needs a CUDA device

Random weights make the perplexity itself meaningless; its agreement with transformers is not.
"""
from __future__ import annotations

import argparse
import copy
import json
import os
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")

import modelpress  # noqa: E402
from modelpress.eval.perplexity import perplexity_of_windows, transformers_perplexity  # noqa: E402
from modelpress.eval.speed import decode_ids_per_s  # noqa: E402


def smollm2_shaped():
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=49152, hidden_size=576, intermediate_size=1536, num_hidden_layers=30,
                      num_attention_heads=9, num_key_value_heads=3, head_dim=64, rms_norm_eps=1e-5,
                      rope_theta=100000.0, max_position_embeddings=8192, tie_word_embeddings=True)
    return LlamaForCausalLM(cfg).eval()


def decode_tps(model) -> float:
    return decode_ids_per_s(model, torch.tensor([[1, 2, 3, 4, 5, 6, 7, 8]]))


def engine_throughput(model, clients: int = 32, prompt: int = 128, new: int = 128) -> dict:
    """The engine (paged cache, continuous batching) against transformers' batched generate on the
    same fp32 model: 32 prompts of 128 tokens, 128 new tokens each (equal lengths: no padding)."""
    import time

    from modelpress.serve.engine import Engine
    from modelpress.serve.sampler import SamplingParams
    from tests.conftest import byte_tokenizer

    prompts = torch.randint(1, 49152, (clients, prompt), generator=torch.Generator().manual_seed(3))
    eng = Engine(model, byte_tokenizer(), max_num_seqs=clients, kv_blocks=clients * (prompt + new) // 16 + clients)
    params = SamplingParams(max_tokens=new, temperature=0, ignore_eos=True)
    eng.generate(prompts[:2].tolist(), SamplingParams(max_tokens=4, temperature=0, ignore_eos=True))  # warm-up
    torch.cuda.synchronize()
    start = time.perf_counter()
    outs = eng.generate(prompts.tolist(), params)
    torch.cuda.synchronize()
    ours = time.perf_counter() - start
    ids = prompts.cuda()
    start = time.perf_counter()
    ref = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=new, min_new_tokens=new,
                         do_sample=False)
    torch.cuda.synchronize()
    theirs = time.perf_counter() - start
    same = sum(o.outputs[0].token_ids == r[prompt:].tolist() for o, r in zip(outs, ref))
    return {"method": "engine fp32", "clients": clients, "prompt_tokens": prompt, "new_tokens": new,
            "engine_tokens_per_s": clients * new / ours, "transformers_generate_tokens_per_s": clients * new / theirs,
            "greedy_identical_to_transformers": same}


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--windows", type=int, default=64)
    p.add_argument("--only", choices=("all", "engine"), default="all",
                   help="engine: only the engine's throughput beside transformers' generate")
    p.add_argument("--out", default="benchmarks/results/gpu.json")
    a = p.parse_args()
    if not torch.cuda.is_available():
        sys.exit("no CUDA device")
    base = smollm2_shaped()
    if a.only == "engine":
        rows = [engine_throughput(base.to("cuda"))]
        print(json.dumps(rows[0]), flush=True)
        Path(a.out).parent.mkdir(parents=True, exist_ok=True)
        Path(a.out).write_text(json.dumps({"benchmark": "gpu-engine", "device": torch.cuda.get_device_name(),
                                           "torch": torch.__version__, "rows": rows}, indent=2) + "\n")
        return
    wins = torch.randint(0, 49152, (a.windows, 512), generator=torch.Generator().manual_seed(1))
    rows = []
    fp32 = base.to("cuda")
    perplexity_of_windows(fp32, wins[:8], progress=False)  # warm-up
    ours = perplexity_of_windows(fp32, wins, batch_size=16, progress=False)
    ref = transformers_perplexity(fp32, wins, progress=False)
    rows.append({"method": "fp32", "ppl": ours.ppl, "transformers_ppl": ref.ppl,
                 "agreement_pct": 100 * abs(ours.ppl / ref.ppl - 1), "eval_tokens_per_s": ours.tokens_per_s,
                 "transformers_eval_tokens_per_s": ref.tokens_per_s, "decode_tokens_per_s": decode_tps(fp32)})
    print(json.dumps(rows[-1]), flush=True)
    for name, cfg in [("rtn int8", modelpress.RTNConfig(bits=8, group_size=None, symmetric=True)),
                      ("rtn int4-g64", modelpress.RTNConfig(bits=4, group_size=64))]:
        q = modelpress.quantize(copy.deepcopy(fp32).cpu(), cfg).to("cuda")
        r = perplexity_of_windows(q, wins, batch_size=16, progress=False)
        rows.append({"method": name, "ppl_change_pct": 100 * (r.ppl / ours.ppl - 1),
                     "eval_tokens_per_s": r.tokens_per_s, "decode_tokens_per_s": decode_tps(q)})
        print(json.dumps(rows[-1]), flush=True)
        del q
    import time

    calib = list(torch.randint(0, 49152, (128, 512), generator=torch.Generator().manual_seed(2)).cuda())
    for name, cfg in [("gptq w4 g64 act-order static", modelpress.GPTQConfig(bits=4, group_size=64, act_order=True,
                                                                             static_groups=True)),
                      ("awq w4 g64", modelpress.AWQConfig(bits=4, group_size=64))]:
        q = copy.deepcopy(fp32)
        torch.cuda.synchronize()
        start = time.perf_counter()
        modelpress.quantize(q, cfg, calib)
        torch.cuda.synchronize()
        sec = time.perf_counter() - start
        r = perplexity_of_windows(q, wins, batch_size=16, progress=False)
        rows.append({"method": name, "calibration": "128 x 512 random tokens", "quantize_seconds": sec,
                     "ppl_change_pct": 100 * (r.ppl / ours.ppl - 1)})
        print(json.dumps(rows[-1]), flush=True)
        del q
    out = {"benchmark": "gpu", "device": torch.cuda.get_device_name(), "torch": torch.__version__,
           "windows": a.windows, "ctx": 512, "model": "SmolLM2-135M shape, random weights", "rows": rows}
    Path(a.out).parent.mkdir(parents=True, exist_ok=True)
    Path(a.out).write_text(json.dumps(out, indent=2) + "\n")
    print(f"wrote {a.out}")


if __name__ == "__main__":
    main()
