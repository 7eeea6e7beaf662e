"""`modelpress generate` beside the serving engine at batch 1, in one run (issue 20: generate decodes
as fast as serve). The default model's Q4_K_M GGUF (written by modelpress), a chat prompt, 128 new
tokens at most, greedy; the two alternate --repeats times and each reports its median decode
tokens/s (generate: what it prints on stderr; the engine: its steps after the first token).

    .venv/bin/python benchmarks/generate_speed.py --out benchmarks/results/generate_speed.json
Nothing here asserts a timing."""
from __future__ import annotations

import argparse
import os
import re
import statistics
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")

import modelpress  # noqa: E402
from benchmarks.common import scratch, write_result  # noqa: E402
from modelpress.default_model import default_model_path  # noqa: E402

PROMPT = "Write a short story about a robot who learns to paint."


def generate_cli(path: Path, new: int) -> tuple[float, int]:
    """(decode tokens/s, decode tokens) as `modelpress generate` prints them."""
    r = subprocess.run([sys.executable, "-m", "modelpress.cli", "generate", str(path), "-p", PROMPT, "-n", str(new)],
                       capture_output=True, text=True, check=True)
    m = re.search(r"decode: (\d+) tokens in (\d+) ms \(([\d.]+) tokens/s\)", r.stderr)
    return float(m.group(3)), int(m.group(1))


def engine_batch1(model, tok, new: int, decode: int) -> float:  # noqa: ANN001
    """The engine alone, one request: decode tokens/s over the steps after the first token (as many
    tokens as generate decoded, no stop at eos)."""
    from modelpress.generate import encode_prompt
    from modelpress.serve.sampler import SamplingParams

    eng = modelpress.Engine(model, tok, max_num_seqs=1, kv_blocks=64)
    ids = encode_prompt(tok, PROMPT, chat=True)[0].tolist()
    eng.add_request(ids, SamplingParams(max_tokens=decode + 1, temperature=0, ignore_eos=True))
    eng.step()  # the prompt and the first token
    start, steps = time.perf_counter(), 0
    while eng.has_work:
        eng.step()
        steps += 1
    return steps / (time.perf_counter() - start)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--new-tokens", type=int, default=128)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--out", default="benchmarks/results/generate_speed.json")
    a = p.parse_args()
    path = scratch("mp-gen-") / "q4_k_m.gguf"
    model, tok = modelpress.load()
    modelpress.export_gguf(model, tok, path, "Q4_K_M", progress=False)
    model, tok = modelpress.load(path, keep_blocks=True)
    runs: dict[str, list[float]] = {"modelpress generate": [], "engine batch 1": []}
    decoded = 0
    for _ in range(a.repeats):
        tps, decoded = generate_cli(path, a.new_tokens)
        runs["modelpress generate"].append(tps)
        runs["engine batch 1"].append(engine_batch1(model, tok, a.new_tokens, decoded))
    rows = [{"tool": tool, "mix": "Q4_K_M", "decode_tokens": decoded, "tokens_per_s": statistics.median(v), "runs": v}
            for tool, v in runs.items()]
    ratio = rows[0]["tokens_per_s"] / rows[1]["tokens_per_s"]
    write_result(a.out, "generate beside the engine", rows, generate_over_engine=ratio, source=str(default_model_path()))
    for r in rows:
        print(f"{r['tool']}: {r['tokens_per_s']:.1f} tokens/s (runs {', '.join(f'{x:.1f}' for x in r['runs'])})")
    print(f"generate / engine: {ratio:.3f}; wrote {a.out}")


if __name__ == "__main__":
    main()
