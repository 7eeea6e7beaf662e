"""Quantization-aware training (issue 25), one run: the default model trained on calib.txt against
Q4_0, Q4_K_M and RTN w4 g64, evaluated on eval.txt, beside plain quantization and the calibrated
rounding (imatrix for the GGUF types, GPTQ for the integers); llama.cpp's perplexity of the QAT GGUF
on the same windows; seconds and peak memory per training step beside torchao's QAT (prepare API,
int4 weights in groups of 64, the same distillation loop).

    LLAMA_CPP_LIB_PATH=<llama.cpp build> .venv/bin/python benchmarks/qat.py [--steps 25,75]

Every ppl here is modelpress' protocol (eval/perplexity.py) on --eval-windows windows of 512 tokens;
a GGUF is loaded back from the file the exporter wrote (its own token embedding type included).
Nothing here asserts a timing."""
from __future__ import annotations

import argparse
import copy
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")

import modelpress  # noqa: E402
from benchmarks.common import emitter, scratch  # noqa: E402
from modelpress import GPTQConfig, RTNConfig  # noqa: E402
from modelpress.data import calibration_windows, read_text, tokenize, windows  # noqa: E402
from modelpress.eval.perplexity import perplexity_of_windows  # noqa: E402
from modelpress.methods.qat import QATTrainConfig, distill_loss, prepare, qat  # noqa: E402
from modelpress.model.imatrix import compute_imatrix  # noqa: E402

DATA = ROOT.parent / "shared" / "data"
TARGETS = {"Q4_0": "Q4_0", "Q4_K_M": "Q4_K_M", "rtn w4 g64": RTNConfig(bits=4, group_size=64)}


def llama_cpp_ppl(path: Path, wins: torch.Tensor) -> float | None:
    """Our protocol's perplexity computed from llama.cpp's logits (llama-cpp-python), or None without it."""
    try:
        import llama_cpp
    except ImportError:
        return None
    ctx = wins.shape[1]
    llm = llama_cpp.Llama(model_path=str(path), n_ctx=ctx, n_batch=ctx, n_threads=2, logits_all=True, verbose=False)
    nll = 0.0
    for w in wins.tolist():
        llm.reset()
        llm.eval(w)
        logits = torch.tensor(llm.scores[:ctx - 1], dtype=torch.float64)
        nll += F.cross_entropy(logits, torch.tensor(w[1:]), reduction="sum").item()
    llm.close()
    return float(torch.exp(torch.tensor(nll / (wins.numel() - wins.shape[0]))))


def written(model: torch.nn.Module, tok, target, work: Path, name: str, calib=None):  # noqa: ANN001
    """(the model as the target's file / checkpoint holds it, the GGUF path or None)."""
    if isinstance(target, str):
        path = work / f"{name}.gguf"
        im = compute_imatrix(model, calib) if calib is not None else None
        modelpress.export_gguf(model, tok, path, target, imatrix=None if im is None else im.importance(),
                               progress=False)
        return modelpress.load(path)[0], path
    config = GPTQConfig(bits=4, group_size=64) if calib is not None else target
    return modelpress.quantize(model, config, calib), None


def step_cost(which: str, steps: int, batch: int, ctx: int) -> None:
    """One process, one QAT setup: seconds per step (median after the first) and the peak resident memory."""
    base, tok = modelpress.load()
    teacher = copy.deepcopy(base).eval()
    model = base
    if which == "torchao":
        from torchao.quantization import quantize_
        from torchao.quantization.qat import IntxFakeQuantizeConfig, QATConfig

        for p in model.parameters():
            p.requires_grad_(False)
        quantize_(model.model.layers, QATConfig(weight_config=IntxFakeQuantizeConfig(torch.int4, group_size=64,
                                                                                    is_symmetric=False),
                                                step="prepare"))
        for m in model.model.layers.modules():
            if hasattr(m, "weight") and m.weight is not None and m.weight.dim() == 2:
                m.weight.requires_grad_(True)
    else:
        prepare(model, RTNConfig(bits=4, group_size=64))
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=1e-5)
    wins = calibration_windows(tok, DATA / "calib.txt", ctx, batch)
    ids = torch.stack(wins)
    times = []
    for _ in range(steps):
        t0 = time.perf_counter()
        loss = distill_loss(model, teacher, ids)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        times.append(time.perf_counter() - t0)
    # VmHWM: this process's own peak (ru_maxrss survives exec, so a child started from a big parent reports its peak)
    hwm = next(int(ln.split()[1]) for ln in Path("/proc/self/status").read_text().splitlines() if ln.startswith("VmHWM"))
    print(json.dumps({"tool": which, "seconds_per_step": sorted(times[1:])[len(times[1:]) // 2],
                      "peak_rss_mb": hwm / 1024,
                      "trained_params": sum(p.numel() for p in params)}))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--steps", default="25,75", help="QAT step counts (comma-separated)")
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--ctx", type=int, default=256)
    p.add_argument("--lr", type=float, default=5e-5)
    p.add_argument("--eval-windows", type=int, default=16)
    p.add_argument("--calib-windows", type=int, default=32)
    p.add_argument("--targets", default=",".join(TARGETS), help="comma-separated, of: " + ", ".join(TARGETS))
    p.add_argument("--lora-rank", type=int, default=0, help="> 0: QAT + LoRA rows (the weights frozen)")
    p.add_argument("--no-baselines", action="store_true", help="only the QAT rows (and no step cost)")
    p.add_argument("--step-cost-only", action="store_true", help="only the step cost beside torchao")
    p.add_argument("--step-cost", choices=("modelpress", "torchao"), help=argparse.SUPPRESS)
    p.add_argument("--out", default="benchmarks/results/qat.json")
    a = p.parse_args()
    torch.set_num_threads(2)
    if a.step_cost:
        return step_cost(a.step_cost, 4, a.batch, a.ctx)
    base, tok = modelpress.load()
    wins = windows(tokenize(tok, read_text(DATA / "eval.txt")), 512, a.eval_windows)
    calib = calibration_windows(tok, DATA / "calib.txt", 512, a.calib_windows)
    work = scratch("mp-qat-")
    _, emit = emitter(a.out, "qat", batch=a.batch, ctx=a.ctx, lr=a.lr, eval_windows=a.eval_windows,
                      train_text="calib.txt", eval_text="eval.txt")

    def ppl(m: torch.nn.Module) -> float:
        return perplexity_of_windows(m, wins, progress=False).ppl

    if not a.step_cost_only:
        emit({"target": "fp32", "how": "float", "ppl": ppl(base)})
    for name in [] if a.step_cost_only else a.targets.split(","):
        target = TARGETS[name]
        for how, cal in () if a.no_baselines else (("plain", None), ("imatrix" if isinstance(target, str) else "gptq",
                                                                                        calib)):
            t0 = time.process_time()
            m, path = written(copy.deepcopy(base), tok, target, work, f"{name}-{how}", cal)
            emit({"target": name, "how": how, "ppl": ppl(m), "cpu_s": time.process_time() - t0})
        for steps in [int(s) for s in a.steps.split(",")]:
            model = copy.deepcopy(base)
            t0, w0 = time.process_time(), time.perf_counter()
            hist = qat(model, tok, target, DATA / "calib.txt",
                       QATTrainConfig(steps=steps, batch=a.batch, ctx=a.ctx, lr=a.lr, windows=max(64, a.batch * steps),
                                      lora_rank=a.lora_rank), progress=False)
            cpu, wall = time.process_time() - t0, time.perf_counter() - w0
            m, path = written(model, tok, target, work, f"{name}-qat{steps}")
            how = f"qat + LoRA r{a.lora_rank} {steps} steps" if a.lora_rank else f"qat {steps} steps (full)"
            row = {"target": name, "how": how, "ppl": ppl(m), "cpu_s": cpu, "wall_s": wall,
                   "kl_first": hist[0]["kl"], "kl_last": hist[-1]["kl"]}
            if path is not None:
                row["llama.cpp ppl (same windows)"] = llama_cpp_ppl(path, wins)
            emit(row)
    for tool in () if a.no_baselines else ("modelpress", "torchao"):
        out = subprocess.run([sys.executable, __file__, "--step-cost", tool, "--batch", str(a.batch), "--ctx",
                              str(a.ctx)], capture_output=True, text=True)
        line = out.stdout.strip().splitlines()[-1] if out.returncode == 0 else None
        emit({"target": "rtn w4 g64 (torchao: IntxFakeQuantizeConfig int4 g64 asym)", "how": "step cost",
              **(json.loads(line) if line else {"tool": tool, "error": out.stderr.strip().splitlines()[-1:]})})
    print(f"wrote {a.out}")


if __name__ == "__main__":
    main()
