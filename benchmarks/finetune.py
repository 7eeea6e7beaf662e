"""LoRA / QLoRA fine-tuning beside transformers + PEFT (+ bitsandbytes for QLoRA), one run:
the default model, ../shared/data/calib.txt packed into windows of --ctx tokens, the same rows in
the same order for both (modelpress' data order), r 16, alpha 32, q_proj + v_proj, batch 4, AdamW
2e-4 with modelpress' warmup + cosine schedule, seed 0, and the same initial adapter (PEFT's A is
set to modelpress' A). The peer runs in a plain training loop (no Trainer overhead), fp32 as PEFT
runs on a CPU by default and also under bf16 autocast (the Trainer's bf16=True on a CPU).

Each configuration runs in its own process: seconds per step (median of the steps after the first),
peak resident memory of the training loop (VmHWM, reset after loading; the process's torch runtime,
~310 MB, included), the model's own resident memory (after loading and quantizing, less what the
process held before), the loss of every step. The
QLoRA / LoRA memory pair is also measured with gradient checkpointing, as QLoRA's recipe trains.
Then modelpress' perplexity on ../shared/data/eval.txt before and after its LoRA run, and the
loss curves overlaid in benchmarks/results/finetune_loss.png.

    .venv/bin/python benchmarks/finetune.py --out benchmarks/results/finetune.json
Nothing here asserts a timing."""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")

DATA = ROOT.parent / "shared" / "data"
R, ALPHA, TARGETS, LR = 16, 32.0, ("q_proj", "v_proj"), 2e-4


def _reset_peak() -> None:
    Path("/proc/self/clear_refs").write_text("5")  # VmHWM := current RSS


def _status_mb(field: str) -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) / 1024
    return float("nan")


def _peak_mb() -> float:
    return _status_mb("VmHWM")


def _resident_mb() -> float:
    """Resident memory now, after glibc hands back the freed heap it can."""
    import ctypes

    ctypes.CDLL("libc.so.6").malloc_trim(0)
    return _status_mb("VmRSS")


def _rows(tok, ctx: int, steps: int, batch: int):  # noqa: ANN001
    """The batches modelpress' trainer takes for these settings (its split and order)."""
    from modelpress.finetune.data import batch as make_batch
    from modelpress.finetune.data import examples
    from modelpress.finetune.train import TrainConfig, _Order, _split

    cfg = TrainConfig(steps=steps, batch=batch, ctx=ctx)
    rows, _ = _split(examples(tok, DATA / "calib.txt", ctx), cfg)
    order = _Order(len(rows), cfg.seed)
    return [make_batch([rows[order[s * batch + i]] for i in range(batch)])[0] for s in range(steps)]


def run_ours(kind: str, steps: int, ctx: int, batch: int, checkpointing: bool) -> dict:
    import modelpress
    from modelpress.finetune.lora import LoraConfig
    from modelpress.finetune.train import TrainConfig, finetune

    before = _resident_mb()
    model, tok = modelpress.load()
    if kind == "qlora":
        modelpress.quantize(model, modelpress.NF4Config(double_quant=True, compute_dtype="bfloat16"))
    model_mb = _resident_mb() - before
    _reset_peak()
    result = finetune(model, tok, DATA / "calib.txt", LoraConfig(r=R, alpha=ALPHA, targets=TARGETS),
                      TrainConfig(steps=steps, batch=batch, ctx=ctx, lr=LR, eval_fraction=0.05, eval_every=10 ** 6,
                                  gradient_checkpointing=checkpointing), progress=False)
    peak = _peak_mb()
    out = {"losses": [h["loss"] for h in result.history], "seconds": [h["seconds"] for h in result.history],
           "peak_mb": peak, "model_mb": model_mb}
    if kind == "lora" and not checkpointing:  # perplexity on eval.txt with and without the adapter
        from modelpress.data import read_text
        from modelpress.eval.perplexity import perplexity
        from modelpress.finetune.lora import lora_layers

        text = read_text(DATA / "eval.txt")
        out["eval_ppl_after"] = perplexity(model, tok, text, ctx, max_windows=24, progress=False).ppl
        for layer in lora_layers(model).values():
            layer.lora_B.weight.data.zero_()
        out["eval_ppl_before"] = perplexity(model, tok, text, ctx, max_windows=24, progress=False).ppl
    return out


class _Shape(torch.nn.Module):
    """A stand-in base layer (sizes only): building modelpress' adapter draws the same random numbers."""

    def __init__(self, in_features: int, out_features: int) -> None:
        super().__init__()
        self.in_features, self.out_features = in_features, out_features


def run_peft(kind: str, steps: int, ctx: int, batch: int, bf16: bool, checkpointing: bool) -> dict:
    import peft
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    import modelpress
    from benchmarks.common import scratch
    from modelpress.finetune.lora import LoraConfig, LoraLinear
    from modelpress.finetune.train import _schedule

    ours, tok = modelpress.load()  # the reference model, written as a transformers folder for the peer
    batches = _rows(tok, ctx, steps, batch)
    folder = scratch("mp-peft-")
    ours.save_pretrained(folder)
    del ours
    quant = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                               bnb_4bit_compute_dtype=torch.bfloat16) if kind == "qlora" else None
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32, quantization_config=quant,
                                                 device_map="cpu")
    if checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    model = peft.get_peft_model(model, peft.LoraConfig(r=R, lora_alpha=ALPHA, target_modules=list(TARGETS),
                                                       lora_dropout=0.0, task_type="CAUSAL_LM"))
    torch.manual_seed(0)  # modelpress' initial A (its trainer seeds, then adds the adapters in module order)
    with torch.no_grad():
        for name, mod in model.named_modules():
            if isinstance(mod, peft.tuners.lora.Linear):
                mod.lora_A["default"].weight.copy_(LoraLinear(_Shape(mod.in_features, mod.out_features),
                                                              LoraConfig(r=R, alpha=ALPHA)).lora_A.weight)
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=LR, weight_decay=0.0)
    warmup = int(0.03 * steps)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: _schedule(s, steps, warmup))
    model.train()
    _reset_peak()
    losses, seconds = [], []
    for ids in batches:
        t0 = time.perf_counter()
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
            loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        sched.step()
        opt.zero_grad(set_to_none=True)
        seconds.append(time.perf_counter() - t0)
        losses.append(float(loss))
    return {"losses": losses, "seconds": seconds, "peak_mb": _peak_mb()}


def _child(args: argparse.Namespace) -> None:
    torch.set_num_threads(args.threads)
    tool, kind = args.child.split(":")[:2]
    bf16 = args.child.endswith(":bf16")
    if tool == "modelpress":
        out = run_ours(kind, args.steps, args.ctx, args.batch, args.checkpointing)
    else:
        out = run_peft(kind, args.steps, args.ctx, args.batch, bf16, args.checkpointing)
    print("RESULT " + json.dumps(out), flush=True)


def _run(config: str, steps: int, a: argparse.Namespace, checkpointing: bool = False) -> dict:
    cmd = [sys.executable, __file__, "--child", config, "--steps", str(steps), "--ctx", str(a.ctx),
           "--batch", str(a.batch), "--threads", str(a.threads)] + (["--checkpointing"] if checkpointing else [])
    p = subprocess.run(cmd, capture_output=True, text=True)
    line = [x for x in p.stdout.splitlines() if x.startswith("RESULT ")]
    if p.returncode or not line:
        return {"config": config, "error": p.stderr[-1500:]}
    out = json.loads(line[-1][7:])
    out.update(config=config, steps=steps, gradient_checkpointing=checkpointing,
               seconds_per_step=statistics.median(out["seconds"][1:] or out["seconds"]))
    print({k: v for k, v in out.items() if k not in ("losses", "seconds")}, flush=True)
    return out


def _plot(rows: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4))
    for r in rows:
        if "losses" in r and len(r["losses"]) > 10:
            ax.plot(range(1, len(r["losses"]) + 1), r["losses"], label=r["config"])
    ax.set_xlabel("step")
    ax.set_ylabel("training loss")
    ax.set_title("LoRA r16 q_proj+v_proj, SmolLM2-135M, calib.txt, batch 4 x 512")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--steps", type=int, default=50, help="steps of the loss-curve runs")
    p.add_argument("--timing-steps", type=int, default=8, help="steps of the other runs")
    p.add_argument("--ctx", type=int, default=512)
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--out", default="benchmarks/results/finetune.json")
    p.add_argument("--child", help=argparse.SUPPRESS)
    p.add_argument("--checkpointing", action="store_true", help=argparse.SUPPRESS)
    a = p.parse_args()
    if a.child:
        return _child(a)
    rows = [_run("modelpress:lora", a.steps, a), _run("peft:lora", a.steps, a),
            _run("peft:lora:bf16", a.timing_steps, a),
            _run("modelpress:qlora", a.timing_steps, a), _run("peft:qlora", a.timing_steps, a),
            _run("modelpress:lora", a.timing_steps, a, checkpointing=True),
            _run("modelpress:qlora", a.timing_steps, a, checkpointing=True),
            _run("peft:lora", a.timing_steps, a, checkpointing=True),
            _run("peft:qlora", a.timing_steps, a, checkpointing=True)]
    by = {(r["config"], r.get("gradient_checkpointing")): r for r in rows if "error" not in r}
    summary = {}
    ours, theirs = by.get(("modelpress:lora", False)), by.get(("peft:lora", False))
    if ours and theirs:
        n = min(len(ours["losses"]), len(theirs["losses"]))
        summary["lora_speedup_vs_peft_fp32"] = theirs["seconds_per_step"] / ours["seconds_per_step"]
        summary["loss_curve_max_abs_diff"] = max(abs(x - y) for x, y in zip(ours["losses"][:n], theirs["losses"][:n]))
        summary["eval_ppl_before"], summary["eval_ppl_after"] = ours.get("eval_ppl_before"), ours.get("eval_ppl_after")
    if ours and by.get(("peft:lora:bf16", False)):
        summary["lora_speedup_vs_peft_bf16"] = by[("peft:lora:bf16", False)]["seconds_per_step"] / ours["seconds_per_step"]
    if by.get(("modelpress:qlora", False)) and by.get(("peft:qlora", False)):
        summary["qlora_speedup_vs_peft_bnb"] = (by[("peft:qlora", False)]["seconds_per_step"]
                                                / by[("modelpress:qlora", False)]["seconds_per_step"])
    for gc in (False, True):
        q, f = by.get(("modelpress:qlora", gc)), by.get(("modelpress:lora", gc))
        if q and f:
            summary[f"qlora_over_lora_peak_memory{'_checkpointing' if gc else ''}"] = q["peak_mb"] / f["peak_mb"]
            summary["qlora_over_lora_model_memory"] = q["model_mb"] / f["model_mb"]
    print(summary)
    from benchmarks.common import write_result

    out = Path(a.out)
    _plot([r for r in rows if not r.get("gradient_checkpointing")], out.with_name("finetune_loss.png"))
    write_result(out, "finetune", rows, summary=summary, data="../shared/data/calib.txt", r=R, alpha=ALPHA,
                 targets=list(TARGETS), batch=a.batch, ctx=a.ctx, lr=LR,
                 peer="transformers + peft (+ bitsandbytes 4-bit for QLoRA), plain training loop")


if __name__ == "__main__":
    main()
