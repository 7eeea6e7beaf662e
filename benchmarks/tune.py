"""The W8A8 auto-tuner's table and its end-to-end gain, one run: `modelpress tune`'s timing of every
kernel variant (tiles, loop orders, thread counts, torch._int_mm) for the default model's linear
shapes at each row bucket (forced: timed afresh), then the default model as W8A8 (dynamic per
token: no calibration needed; the static layers run the same products) timed with the cache's
choices and without them (the untuned call): prefill of 512 tokens (next token's logits) and greedy
decode tokens/s.

    .venv/bin/python benchmarks/tune.py --out benchmarks/results/tune.json
Nothing here asserts a timing; untuned and tuned calls alternate; prefill: the median
of --repeats runs after a warm-up, decode: of 3 runs."""
from __future__ import annotations

import argparse
import os
import statistics
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")

import modelpress  # noqa: E402
from benchmarks.common import median_seconds, write_result  # noqa: E402
from modelpress import W8A8Config  # noqa: E402
from modelpress.data import calibration_windows  # noqa: E402
from modelpress.eval.speed import decode_tokens_per_s  # noqa: E402
from modelpress.kernels import tune  # noqa: E402
from modelpress.nn.w8a8_linear import W8A8Linear  # noqa: E402

DATA = ROOT.parent / "shared" / "data"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--repeats", type=int, default=7)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--out", default="benchmarks/results/tune.json")
    a = p.parse_args()
    torch.set_num_threads(a.threads)
    base, tok = modelpress.load()
    model = modelpress.quantize(base, W8A8Config(activations="dynamic"))
    shapes = {(m.in_features, m.out_features) for m in model.modules() if isinstance(m, W8A8Linear)}
    table, cache = tune.tune(shapes, force=True, progress=True)
    for r in table:
        print(r, flush=True)
    ids = calibration_windows(tok, DATA / "calib.txt", 512, 1)[0][None, :512]
    # untuned and tuned alternate, call by call, so that drift in the machine's speed hits both alike
    times: dict[str, dict[str, list[float]]] = {"untuned": {"prefill": [], "decode": []}, "tuned": {"prefill": [], "decode": []}}
    for i in range(a.repeats + 1):
        for label, on in (("untuned", False), ("tuned", True)):
            tune.set_enabled(on)
            with torch.no_grad():
                times[label]["prefill"].append(median_seconds(lambda: model(ids, logits_to_keep=1), 1))
            if i < 3:
                times[label]["decode"].append(decode_tokens_per_s(model, tok, progress=False))
    end_to_end = {label: {"prefill_512_s": statistics.median(t["prefill"][1:]),
                          "decode_tokens_per_s": statistics.median(t["decode"])} for label, t in times.items()}
    print(end_to_end, flush=True)
    gain = {"prefill": end_to_end["untuned"]["prefill_512_s"] / end_to_end["tuned"]["prefill_512_s"],
            "decode": end_to_end["tuned"]["decode_tokens_per_s"] / end_to_end["untuned"]["decode_tokens_per_s"]}
    print("gain", gain, flush=True)
    write_result(Path(a.out), "tune", table, end_to_end=end_to_end, gain=gain, model_config="w8a8 dynamic per token",
                 variants=tune.variants(), cache_file=str(cache), row_buckets=list(tune.ROW_BUCKETS))


if __name__ == "__main__":
    main()
