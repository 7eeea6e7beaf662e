"""Pruning (issue 26), one run on the default model, calibrated on calib.txt, evaluated on eval.txt.

    LLAMA_CPP_LIB_PATH=<llama.cpp build> .venv/bin/python benchmarks/prune.py [--peer <llm-compressor venv>/bin/python]

Parts (--parts, all by default):
    criteria    50 % and 2:4 for magnitude, Wanda, SparseGPT; SparseGPT 2:4 + int4 in one sweep
    reference   llm-compressor's SparseGPT and Wanda (--peer: its venv's python) on the same model and
                calibration windows, right after modelpress' (the authors' repositories are not on PyPI;
                llm-compressor's modifiers carry their implementations on)
    recover     SparseGPT 2:4 and Wanda 50 %, then --recover distillation steps with the masks kept
    structured  MLP 25 %, attention heads (1 of 3 kv groups), depth (2 blocks), each before and after
                recovery: size, ppl, and the recovered model's Q4_K_M GGUF decode in llama.cpp and in the
                engine against the unpruned model's
    speed       the Q4_K_M GGUFs of the unpruned model and of the structured cuts (no recovery: the speed
                depends on the shapes only), decoded in the engine and in llama.cpp in alternation (--repeats
                rounds), so that the machine's drift reaches every file alike
    storage     2:4 packed (values + 2-bit positions): bytes on disk, each layer shape's CPU kernel time
                against the dense fp32 kernel on the same layer (every kernel build the CPU runs), and
                the engine's decode of the packed model against the same weights dense
Nothing here asserts a timing."""
from __future__ import annotations

import argparse
import copy
import os
import sys
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")

import modelpress  # noqa: E402
from benchmarks.common import emitter, scratch  # noqa: E402
from benchmarks.gguf_decode import PROMPT, llama_greedy  # noqa: E402
from modelpress import MagnitudeConfig, SparseGPTConfig, StructuredConfig, WandaConfig  # noqa: E402
from modelpress.data import calibration_windows, read_text, tokenize, windows  # noqa: E402
from modelpress.eval.perplexity import perplexity_of_windows  # noqa: E402
from modelpress.eval.size import model_size  # noqa: E402
from modelpress.eval.speed import decode_ids_per_s  # noqa: E402
from modelpress.generate import encode_prompt  # noqa: E402
from modelpress.methods.prune import weight_sparsity  # noqa: E402
from modelpress.record import record  # noqa: E402

DATA = ROOT.parent / "shared" / "data"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--eval-windows", type=int, default=16)
    p.add_argument("--calib-windows", type=int, default=32)
    p.add_argument("--recover", type=int, default=40, help="distillation steps after pruning")
    p.add_argument("--decode-tokens", type=int, default=64)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--parts", default="criteria,reference,recover,structured,storage")
    p.add_argument("--peer", help="python of llm-compressor's venv (../shared/PEERS.md); omitted: no reference rows")
    p.add_argument("--out", default="benchmarks/results/prune.json")
    a = p.parse_args()
    torch.set_num_threads(2)
    base, tok = modelpress.load()
    wins = windows(tokenize(tok, read_text(DATA / "eval.txt")), 512, a.eval_windows)
    calib = calibration_windows(tok, DATA / "calib.txt", 512, a.calib_windows)
    work = scratch("mp-prune-")
    _, emit = emitter(a.out, "prune", eval_windows=a.eval_windows, calib_windows=a.calib_windows,
                      train_text="calib.txt", eval_text="eval.txt", parts=a.parts)

    def ppl(m: torch.nn.Module) -> float:
        return perplexity_of_windows(m, wins, progress=False).ppl

    parts = a.parts.split(",")
    base_ppl = ppl(base)
    emit({"method": "fp32", "ppl": base_ppl, "size_bytes": model_size(base).size_bytes})
    if "criteria" in parts:
        criteria(base, calib, ppl, emit)
    if "reference" in parts and a.peer:
        reference(a.peer, base, tok, calib, wins, work, base_ppl, ppl, emit)
    if "recover" in parts:
        for cfg in (SparseGPTConfig(pattern="2:4", recover=a.recover), WandaConfig(recover=a.recover)):
            t0 = time.perf_counter()
            m = modelpress.quantize(copy.deepcopy(base), cfg, calib)
            rec = record(m).recovery
            emit({"method": cfg.method, "pattern": cfg.pattern or "50 % unstructured", "recover_steps": a.recover,
                  "ppl": ppl(m), "sparsity": weight_sparsity(m), "seconds": time.perf_counter() - t0,
                  "kl_first": rec[0]["kl"], "kl_last": rec[-1]["kl"]})
    if "structured" in parts:
        structured(base, tok, calib, ppl, emit, work, a)
    if "speed" in parts:
        speed(base, tok, calib, emit, work, a)
    if "storage" in parts:
        storage(base, tok, calib, emit, work, a)
    print(f"wrote {a.out}")


def criteria(base, calib, ppl, emit) -> None:  # noqa: ANN001
    for pattern in (None, "2:4"):
        for cfg in (MagnitudeConfig(pattern=pattern), WandaConfig(pattern=pattern), SparseGPTConfig(pattern=pattern)):
            t0 = time.perf_counter()
            m = modelpress.quantize(copy.deepcopy(base), cfg, calib)
            emit({"method": cfg.method, "pattern": pattern or "50 % unstructured", "ppl": ppl(m),
                  "seconds": time.perf_counter() - t0, "sparsity": weight_sparsity(m)})
    cfg = SparseGPTConfig(pattern="2:4", bits=4, group_size=64)
    t0 = time.perf_counter()
    m = modelpress.quantize(copy.deepcopy(base), cfg, calib)
    emit({"method": "sparsegpt + int4 g64 (one sweep)", "pattern": "2:4", "ppl": ppl(m),
          "seconds": time.perf_counter() - t0, "sparsity": weight_sparsity(m), "size_bytes": model_size(m).size_bytes})


def reference(python, base, tok, calib, wins, work, base_ppl, ppl, emit) -> None:  # noqa: ANN001
    """llm-compressor's SparseGPT / Wanda right after modelpress' on the same windows (timings side by side)."""
    from benchmarks.gptq_awq import peer

    fp32_dir = modelpress.save(base, tok, work / "fp32")
    torch.save(torch.stack(calib).clone(), work / "calib.pt")
    torch.save(wins.clone(), work / "eval.pt")
    for structure in ("0:0", "2:4"):
        pattern = None if structure == "0:0" else structure
        for cfg in (WandaConfig(pattern=pattern), SparseGPTConfig(pattern=pattern)):
            t0 = time.perf_counter()
            m = modelpress.quantize(copy.deepcopy(base), cfg, calib)
            emit({"method": cfg.method, "tool": "modelpress", "pattern": pattern or "50 % unstructured",
                  "ppl": ppl(m), "seconds": time.perf_counter() - t0, "sparsity": weight_sparsity(m)})
            row, theirs = peer(python, cfg.method, None, 64, fp32_dir, work, wins, base_ppl,
                               ("--sparsity", "0.5", "--mask-structure", structure))
            if theirs is not None:
                row["sparsity_loaded"] = weight_sparsity(theirs)
                same = total = 0  # the masks: where both zeroed the same weights
                for f, mod in m.named_modules():
                    if f.startswith("model.layers.") and isinstance(mod, torch.nn.Linear):
                        same += int(((mod.weight == 0) == (theirs.get_submodule(f).weight == 0)).sum())
                        total += mod.weight.numel()
                row["mask_agreement_with_modelpress"] = same / total
            emit({**row, "pattern": pattern or "50 % unstructured"})


def gguf_speed(model, tok, work, a, prompt) -> dict:  # noqa: ANN001
    """The Q4_K_M GGUF of `model`: its bytes and decode tokens/s in the engine and in llama.cpp."""
    path = work / "q4km.gguf"
    modelpress.export_gguf(model, tok, path, "Q4_K_M", progress=False)
    return _decode_speeds({"it": path}, prompt, a)["it"]


def _decode_speeds(files: dict[str, Path], prompt: torch.Tensor, a) -> dict[str, dict]:  # noqa: ANN001
    """{name: the GGUF's bytes and decode tokens/s in the engine and in llama.cpp (medians, and the runs)},
    the files taken in turn in each of --repeats rounds."""
    engines = {name: modelpress.load(path, keep_blocks=True)[0] for name, path in files.items()}
    ours = {name: [] for name in files}
    theirs = {name: [] for name in files}
    for _ in range(a.repeats):
        for name, path in files.items():
            ours[name].append(decode_ids_per_s(engines[name], prompt, a.decode_tokens))
            theirs[name].append(llama_greedy(path, prompt[0].tolist(), a.decode_tokens)[1])
    return {name: {"gguf": "Q4_K_M", "gguf_bytes": path.stat().st_size,
                   "modelpress engine tokens_per_s": float(np.median(ours[name])),
                   "llama.cpp tokens_per_s": float(np.median(theirs[name])),
                   "modelpress runs": ours[name], "llama.cpp runs": theirs[name]} for name, path in files.items()}


def structured(base, tok, calib, ppl, emit, work, a) -> None:  # noqa: ANN001
    prompt = encode_prompt(tok, PROMPT, True)
    emit({"method": "unpruned", **gguf_speed(base, tok, work, a, prompt)})
    for name, kw in (("structured mlp 25 %", {"mlp": 0.25}), ("structured heads: 1 of 3 kv groups",
                                                              {"mlp": 0, "heads": 0.25}),
                     ("structured depth: 2 of 30 blocks", {"mlp": 0, "layers": 2})):
        for steps in (0, a.recover):
            cfg = StructuredConfig(**kw, recover=steps)
            t0 = time.perf_counter()
            m = modelpress.quantize(copy.deepcopy(base), cfg, calib)
            seconds = time.perf_counter() - t0
            rec, c = record(m).recovery, m.config
            emit({"method": name, "recover_steps": steps, "ppl": ppl(m), "size_bytes": model_size(m).size_bytes,
                  "seconds": seconds, "config": {"intermediate_size": c.intermediate_size,
                                                 "heads": c.num_attention_heads, "kv_heads": c.num_key_value_heads,
                                                 "layers": c.num_hidden_layers},
                  **({"dropped": record(m).dropped} if cfg.layers else {}),
                  **({"kl_first": rec[0]["kl"], "kl_last": rec[-1]["kl"]} if rec else {}),
                  **(gguf_speed(m, tok, work, a, prompt) if steps else {})})


def speed(base, tok, calib, emit, work, a) -> None:  # noqa: ANN001
    """Decode tokens/s of each structured cut's Q4_K_M against the unpruned one's, engine and llama.cpp,
    the files taken in turn in every round."""
    prompt = encode_prompt(tok, PROMPT, True)
    cuts = {"unpruned": None, "mlp 25 %": {"mlp": 0.25}, "heads 1 of 3 kv groups": {"mlp": 0, "heads": 0.25},
            "depth 2 of 30": {"mlp": 0, "layers": 2}, "mlp 25 % + heads 1 of 3": {"mlp": 0.25, "heads": 0.25}}
    files = {}
    for name, kw in cuts.items():
        m = base if kw is None else modelpress.quantize(copy.deepcopy(base), StructuredConfig(**kw), calib)
        files[name] = work / f"speed-{len(files)}.gguf"
        modelpress.export_gguf(m, tok, files[name], "Q4_K_M", progress=False)
    speeds = _decode_speeds(files, prompt, a)
    e0, l0 = (speeds["unpruned"][k] for k in ("modelpress engine tokens_per_s", "llama.cpp tokens_per_s"))
    for name, s in speeds.items():
        emit({"part": "speed", "method": name, **s, "engine speedup": s["modelpress engine tokens_per_s"] / e0,
              "llama.cpp speedup": s["llama.cpp tokens_per_s"] / l0})


def _kernel_times(lib, n: int, k: int) -> dict[str, float]:  # noqa: ANN001
    """Median microseconds of one row through the dense fp32 kernel and the 2:4 one (fp32, bf16 and fp16
    values), on the same weights."""
    from modelpress.core import sparsity
    from modelpress.kernels import ops

    w = torch.randn(n, k)
    w[sparsity.magnitude_mask(w, 0, 2, 4)] = 0
    values, idx = sparsity.pack_24(w)
    x = torch.randn(1, k)
    times = {}
    bf16, fp16 = values.to(torch.bfloat16), values.to(torch.float16)
    for name, fn in (("dense", lambda: ops.f32_gemv(lib, x, w)), ("2:4", lambda: ops.sparse24_gemv(lib, x, values, idx)),
                     ("2:4 bf16", lambda: ops.sparse24_gemv(lib, x, bf16, idx)),
                     ("2:4 fp16", lambda: ops.sparse24_gemv(lib, x, fp16, idx))):
        for _ in range(20):
            fn()
        runs = []
        for _ in range(5):
            t0 = time.perf_counter()
            for _ in range(100):
                fn()
            runs.append((time.perf_counter() - t0) / 100 * 1e6)
        times[name] = float(np.median(runs))
    return times


def storage(base, tok, calib, emit, work, a) -> None:  # noqa: ANN001
    """2:4 packed against dense: the checkpoint's bytes, each layer shape's kernel, the engine's decode."""
    from modelpress import kernels

    dense = modelpress.quantize(copy.deepcopy(base), SparseGPTConfig(pattern="2:4"), calib)
    packed = {"bf16": modelpress.quantize(copy.deepcopy(base), SparseGPTConfig(pattern="2:4", pack=True), calib),
              "fp32": modelpress.quantize(copy.deepcopy(base), SparseGPTConfig(pattern="2:4", pack=True,
                                                                              float_dtype="float32"), calib)}
    models = {"dense": dense, "packed": packed["bf16"], "packed fp32": packed["fp32"]}
    sizes = {name: (modelpress.save(m, tok, work / f"ckpt-{i}") / "model.safetensors").stat().st_size
             for i, (name, m) in enumerate(models.items())}
    linears = [mod for f, mod in dense.named_modules() if f.startswith("model.layers.") and isinstance(mod, torch.nn.Linear)]
    emit({"part": "storage", "what": "model.safetensors bytes of SparseGPT 2:4: dense (bf16, the model's dtype), packed "
                                     "with bf16 values (the default for a bf16 model), packed with float_dtype=float32 "
                                     "(fp32 values, fp32 embedding)",
          "dense_bytes": sizes["dense"], "packed_bytes": sizes["packed"], "packed_fp32_bytes": sizes["packed fp32"],
          "decoder_linears_dense_bf16_bytes": sum(mod.weight.numel() * 2 for mod in linears),
          **{f"decoder_linears_packed_{k}_bytes": sum(mod.values.numel() * mod.values.element_size() + mod.indices.numel()
                                                      for mod in m.modules() if hasattr(mod, "indices"))
             for k, m in packed.items()}})
    builds = [b for b in (True, "avx2", False) if kernels.lib(b) is not None]
    if kernels.lib().mp_simd() < 2:  # no AVX-512: the best build is the AVX2 one
        builds = [b for b in builds if b != "avx2"]
    shapes = sorted({(mod.out_features, mod.in_features) for mod in linears}) + [(4096, 4096)]  # one beyond the caches
    for build in builds:
        lib = kernels.lib(build)
        label = {True: f"best (mp_simd={lib.mp_simd()})", "avx2": "avx2", False: "plain C"}[build]
        for n, k in shapes:
            t = _kernel_times(lib, n, k)
            emit({"part": "kernel", "build": label, "shape": [n, k], "rows": 1, "dense_us": t["dense"],
                  "sparse24_us": t["2:4"], "speedup": t["dense"] / t["2:4"], "sparse24_bf16_us": t["2:4 bf16"],
                  "speedup_bf16": t["dense"] / t["2:4 bf16"], "sparse24_fp16_us": t["2:4 fp16"],
                  "speedup_fp16": t["dense"] / t["2:4 fp16"]})
    prompt = encode_prompt(tok, PROMPT, True)
    runs = {name: [] for name in models}
    for _ in range(a.repeats):  # alternated, so that all see the machine's same moods
        for name, m in models.items():
            runs[name].append(decode_ids_per_s(m, prompt, a.decode_tokens))
    emit({"part": "engine decode", "what": "SparseGPT 2:4: F32 rows (the dense model's bf16-rounded weights, fp32 in "
                                           "memory) against SPARSE24_BF16 and SPARSE24 in the fused decode",
          **{f"{name} tokens_per_s": float(np.median(r)) for name, r in runs.items()},
          **{f"{name} runs": r for name, r in runs.items()}})


if __name__ == "__main__":
    main()
