"""Many LoRA adapters served at once (issue 22): the default model with three adapters (r 16:
q_proj + v_proj; all linear layers; QA-LoRA on up / down, random B as a trained adapter's) and the
base, 32 requests (8 each, interleaved) of 64 new greedy tokens through the engine; every output is
compared with the same request run alone, and the throughput with serving the base alone (the same
32 prompts, no adapters), same run. The base's sequences keep the C fused decode; the adapted ones
take the torch path with each adapter's rows gathered (nn/multi_lora.py).

    .venv/bin/python benchmarks/multi_lora.py --out benchmarks/results/multi_lora.json
Nothing here asserts a timing."""
from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")

import modelpress  # noqa: E402
from benchmarks.common import scratch, write_result  # noqa: E402
from modelpress.finetune.adapters import save_adapter  # noqa: E402
from modelpress.finetune.lora import LoraConfig, add_lora, lora_layers  # noqa: E402
from modelpress.serve.engine import Engine  # noqa: E402
from modelpress.serve.sampler import SamplingParams  # noqa: E402

CONFIGS = {"qv": LoraConfig(r=16, alpha=32, targets=("q_proj", "v_proj")),
           "all": LoraConfig(r=16, alpha=32, targets="all-linear"),
           "qa": LoraConfig(r=16, alpha=32, targets=("up_proj", "down_proj"), qa_lora_group=64)}


def make_adapters(work: Path) -> dict[str, Path]:
    folders = {}
    for i, (name, cfg) in enumerate(CONFIGS.items()):
        model, _ = modelpress.load()
        add_lora(model, cfg)
        gen = torch.Generator().manual_seed(i)
        with torch.no_grad():
            for layer in lora_layers(model).values():
                layer.lora_B.weight.copy_(torch.randn(layer.lora_B.weight.shape, generator=gen) * 0.01)
        folders[name] = save_adapter(model, cfg, work / name)
    return folders


def timed(engine: Engine, prompts: list, sp: SamplingParams, names: list) -> tuple[list, float]:
    start = time.perf_counter()
    outs = engine.generate(prompts, sp, adapters=names)
    return outs, time.perf_counter() - start


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--requests", type=int, default=32)
    p.add_argument("--tokens", type=int, default=64)
    p.add_argument("--out", default="benchmarks/results/multi_lora.json")
    a = p.parse_args()
    torch.set_num_threads(2)
    folders = make_adapters(scratch("mp-lora-"))
    model, tok = modelpress.load()
    served = Engine(model, tok, max_num_seqs=32, kv_blocks=512, adapters=folders)
    base_model, _ = modelpress.load()
    base = Engine(base_model, tok, max_num_seqs=32, kv_blocks=512)
    gen = torch.Generator().manual_seed(0)
    prompts = [torch.randint(100, 40000, (int(n),), generator=gen).tolist()
               for n in torch.randint(8, 40, (a.requests,), generator=gen)]
    names = [[None, "qv", "all", "qa"][i % 4] for i in range(a.requests)]
    sp = SamplingParams(max_tokens=a.tokens, temperature=0, ignore_eos=True)
    timed(served, prompts[:4], SamplingParams(max_tokens=4, temperature=0), names[:4])  # warm up
    timed(base, prompts[:4], SamplingParams(max_tokens=4, temperature=0), [None] * 4)
    mixed, mixed_s = timed(served, prompts, sp, names)
    plain, plain_s = timed(base, prompts, sp, [None] * len(prompts))
    alone = [served.generate([pr], sp, adapters=[n])[0] for pr, n in zip(prompts, names)]
    same = sum(m.outputs[0].token_ids == s.outputs[0].token_ids for m, s in zip(mixed, alone))
    base_same = sum(m.outputs[0].token_ids == b.outputs[0].token_ids
                    for m, b, n in zip(mixed, plain, names) if n is None)
    differs = sum(m.outputs[0].token_ids != b.outputs[0].token_ids for m, b, n in zip(mixed, plain, names) if n)
    tokens = a.requests * a.tokens
    row = {"requests": a.requests, "new_tokens_each": a.tokens, "adapters": list(CONFIGS),
           "mixed_tokens_per_s": tokens / mixed_s, "base_alone_tokens_per_s": tokens / plain_s,
           "ratio": plain_s / mixed_s, "outputs_equal_to_alone": f"{same}/{a.requests}",
           "base_requests_equal_to_base_server": f"{base_same}/{names.count(None)}",
           "adapted_requests_differing_from_base": f"{differs}/{a.requests - names.count(None)}"}
    print(row, flush=True)
    write_result(a.out, "multi-LoRA serving", [row], engine="max_num_seqs 32, kv_blocks 512, block 16")


if __name__ == "__main__":
    main()
