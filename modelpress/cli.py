"""The `modelpress` command: thin subcommands that parse arguments, build a config, call the library.

User mistakes (ModelpressError, an invalid config) print one line `modelpress: error: ...` and exit
with code 2, with no traceback.
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from collections import Counter
from pathlib import Path
from typing import Any

import torch

from . import flags
from .config import config_types
from .data import calibration_windows, load_text
from .errors import ModelpressError, one_line
from .eval.compare import DEFAULT_METHODS, compare, method_names
from .eval.evaluate import evaluate, summary
from .eval.perplexity import COMPUTE_DTYPES
from .eval.recommend import RUNTIMES
from .eval.report import text_table
from .eval.size import disk_bytes, model_size
from .finetune.adapters import load_adapter
from .finetune.gguf_lora import export_gguf_lora
from .finetune.lora import LoraConfig
from .finetune.merge import merge_adapters
from .finetune.train import TrainConfig, finetune
from .formats import check_destination, describe, formats, save
from .formats.gguf_mixes import MIXES
from .formats.gguf_writer import check_file, default_mix, export_gguf
from .formats.imatrix import load_imatrix, save_imatrix
from .formats.onnx_export import export_prefill_onnx
from .generate import speed_line, stream_text
from .kernels import tune
from .methods.awq import AWQConfig
from .methods.bnb4 import NF4Config
from .methods.gptq import GPTQConfig
from .methods.qat import QATTrainConfig, qat
from .model.imatrix import compute_imatrix
from .model.load import load, resolve
from .model.walker import iter_targets
from .nn.w8a8_linear import W8A8Linear
from .record import record
from .registry import quantize
from .serve.http import ServeConfig, serve
from .serve.sampler import SamplingParams


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> None:  # one line, exit 2 (argparse prints usage too)
        raise ModelpressError(f"{message} (see `{self.prog} --help`)")


def _load(source: str | None, device: str = "cpu", keep_blocks: bool = False) -> tuple[Any, Any, float]:
    """(model, tokenizer, load seconds), the model moved to `device`; keep_blocks: a GGUF's
    quantized layers run on their blocks."""
    if device != "cpu" and not (device.startswith("cuda") and torch.cuda.is_available()):
        raise ModelpressError(f"device {device!r} is not available here; use --device cpu")
    start = time.perf_counter()
    model, tok = load(source, keep_blocks=keep_blocks)
    return model.to(device), tok, time.perf_counter() - start


def _err(*lines: str) -> None:
    print(*lines, file=sys.stderr, flush=True)


# -- quantize ----------------------------------------------------------------------------------
def cmd_quantize(a: argparse.Namespace) -> int:
    config = flags.method_config(a, config_types())
    check_destination(a.format, config.method, a.out)  # bad destination or text: fail now, before the model loads
    if a.calib is not None:
        load_text(a.calib, "calib")
    model, tok, _ = _load(a.model)
    calib = None
    if config.calibrated:
        calib = calibration_windows(tok, a.calib, a.ctx, a.samples)
    elif a.calib is not None:
        _err(f"note: {config.method} does not calibrate; --calib is not used")
    before = model_size(model)
    start = time.perf_counter()
    quantize(model, config, calib)
    quant_s = time.perf_counter() - start
    if config.method == "auto":
        _err(record(model).plan.table())
    out = Path(save(model, tok, a.out, format=a.format))
    if out.is_file():  # a GGUF
        _err(f"quantized with {config.describe()} in {quant_s:.1f} s; wrote {out} "
             f"({out.stat().st_size / 1e6:.1f} MB, {record(model).plan.bits_per_weight:.3f} bits/weight)")
        return 0
    after = model_size(model)
    _err(f"quantized with {config.describe()} in {quant_s:.1f} s; "
         f"{before.size_bytes / 1e6:.1f} MB -> {after.size_bytes / 1e6:.1f} MB "
         f"({after.bits_per_weight:.2f} bits/weight, linear layers {after.linear_bits_per_weight:.2f}); "
         f"saved to {out}")
    return 0


def cmd_prune(a: argparse.Namespace) -> int:
    if a.structured is not None:
        flags.take_structured(a)
    a.method = a.method or "sparsegpt"
    return cmd_quantize(a)


# -- export ------------------------------------------------------------------------------------
def _imatrix_of(model: Any, tok: Any, a: argparse.Namespace) -> Any:
    """The importance matrix of `model` on --calib (or the default text): --samples windows of --ctx."""
    start = time.perf_counter()
    wins = calibration_windows(tok, a.calib, a.ctx, a.samples)
    dataset = Path(a.calib).name if a.calib else "pydoc topics + module docstrings (modelpress default text)"
    im = compute_imatrix(model, wins, dataset=dataset)
    _err(f"imatrix: {len(im.sums)} tensors from {len(wins)} windows of {a.ctx} tokens "
         f"in {time.perf_counter() - start:.1f} s")
    return im


_FROM_METHOD_HELP = ("awq: AWQ's scales (searched for a 4-bit grid with groups of 32) folded into the norms and "
                     "weights, which stay in float; gptq: GPTQ's error-compensated 4-bit weights (groups of 32, act "
                     "order); then the GGUF mix quantizes those weights")


def cmd_export(a: argparse.Namespace) -> int:
    if a.format == "gguf-lora":
        return _export_gguf_lora(a)
    if a.format == "onnx":
        return _export_onnx(a)
    if a.adapter:
        raise ModelpressError("--adapter goes with --format gguf-lora (llama.cpp's adapter file); to export a model "
                              "with its adapter in the weights, merge first (modelpress merge)")
    if a.type is not None and a.type not in MIXES:
        raise ModelpressError(f"unknown GGUF type {a.type!r}; choose one of: {', '.join(MIXES)}")
    out = check_file(Path(a.out))
    if a.imatrix and a.calib:
        raise ModelpressError("give --imatrix (a file) or --calib (text to compute one from), not both")
    if a.imatrix and a.from_method == "awq":
        raise ModelpressError("AWQ rescales the layers' input columns, so an imatrix of the original model no "
                              "longer fits; give --calib and the imatrix is computed after AWQ")
    imatrix = load_imatrix(a.imatrix) if a.imatrix else None  # a bad file fails before the model loads
    if a.calib is not None:
        load_text(a.calib, "calib")
    model, tok, _ = _load(a.model)
    start = time.perf_counter()
    if a.from_method:
        config = (AWQConfig(bits=4, group_size=32, scales_only=True) if a.from_method == "awq" else
                  GPTQConfig(bits=4, group_size=32, act_order=True, static_groups=True))
        quantize(model, config, calibration_windows(tok, a.calib, a.ctx, a.samples))
        _err(f"{config.describe()} in {time.perf_counter() - start:.1f} s")
    if a.calib is not None:
        imatrix = _imatrix_of(model, tok, a)
    meta = imatrix.gguf_metadata(a.imatrix) if imatrix is not None else {}
    types = export_gguf(model, tok, out, a.type, imatrix=None if imatrix is None else imatrix.importance(),
                        extra_metadata=meta)
    mix = a.type or default_mix(model)
    counts = ", ".join(f"{n} {t}" for t, n in sorted(Counter(types.values()).items(), key=lambda kv: -kv[1]))
    _err(f"wrote {out} ({out.stat().st_size / 1e6:.1f} MB, {mix}: {counts}"
         f"{', with an imatrix' if imatrix is not None else ''}) in {time.perf_counter() - start:.1f} s")
    return 0


def _export_onnx(a: argparse.Namespace) -> int:
    given = [f for f, v in (("--type", a.type), ("--imatrix", a.imatrix), ("--calib", a.calib),
                            ("--from-method", a.from_method), ("--adapter", a.adapter)) if v]
    if given:
        raise ModelpressError(f"--format onnx exports the model as it is; {', '.join(given)} go with --format gguf "
                              "(quantize first: modelpress quantize --method w8a8 --out DIR, then export DIR)")
    out = check_file(Path(a.out))
    model, _, _ = _load(a.model)
    start = time.perf_counter()
    export_prefill_onnx(model, out, max_len=a.max_len)
    _err(f"wrote {out} ({out.stat().st_size / 1e6:.1f} MB): the prefill graph, input_ids (batch, seq <= {a.max_len}) "
         f"-> logits, static W8A8 layers as QuantizeLinear / DequantizeLinear, in {time.perf_counter() - start:.1f} s")
    return 0


def _export_gguf_lora(a: argparse.Namespace) -> int:
    if not a.adapter:
        raise ModelpressError("--format gguf-lora writes an adapter: give it with --adapter DIR")
    out = check_file(Path(a.out))
    model, _, _ = _load(a.model)
    export_gguf_lora(_with_adapter(model, a.adapter), out)
    _err(f"wrote {out} ({out.stat().st_size / 1e6:.1f} MB): llama.cpp applies it with --lora {out.name} on a GGUF "
         "of the base model")
    return 0


def cmd_imatrix(a: argparse.Namespace) -> int:
    out = check_file(Path(a.out))
    if a.calib is not None:
        load_text(a.calib, "calib")
    model, tok, _ = _load(a.model)
    path = save_imatrix(out, _imatrix_of(model, tok, a))
    _err(f"wrote {path} ({'GGUF' if path.suffix.lower() == '.gguf' else 'legacy'} imatrix format)")
    return 0


# -- eval --------------------------------------------------------------------------------------
def cmd_eval(a: argparse.Namespace) -> int:
    text = load_text(a.text, "eval")
    model, tok, load_s = _load(a.model, a.device, a.gguf_blocks)
    _with_adapter(model, a.adapter)
    result = evaluate(model, tok, text, a.ctx, a.max_windows, a.decode_tokens, progress=not a.json,
                      compute_dtype=a.compute_dtype)
    result["load_seconds"] = load_s
    print(json.dumps(result) if a.json else summary(result))
    return 0


# -- compare -----------------------------------------------------------------------------------
def cmd_compare(a: argparse.Namespace) -> int:
    if a.list:
        print("\n".join(method_names()))
        return 0
    methods = [m for m in (a.methods.split(",") if a.methods else DEFAULT_METHODS) if m.strip()]
    source = _merged_source(a) if a.adapter else a.model
    windows, samples = (max(a.eval_windows, 40), max(a.samples, 128)) if a.thorough else (a.eval_windows, a.samples)
    limits = dict(max_size_mb=a.max_size, max_ppl_increase=a.max_ppl_increase, min_tokens_per_s=a.min_tokens_per_s,
                  runtime=a.runtime)
    results = compare(source, methods, a.out, a.text, a.calib, windows, samples, a.ctx, a.decode_tokens, fresh=a.fresh,
                      limits=limits, other_text=a.other_text)
    print((Path(a.out) / "report.md").read_text(), end="")
    _err(f"modelpress: wrote {a.out}/report.md, results.json, pareto.png, speed.png, report.html")
    if results["failed"]:
        _err(f"modelpress: {len(results['failed'])} method(s) failed: {', '.join(results['failed'])}; "
             "rerun the same command to retry them (finished rows are reused)")
        return 1
    return 0


def _merged_source(a: argparse.Namespace) -> str:
    """compare --adapter: the model with its adapter merged (a float checkpoint in the report's
    folder, made once), which every method then compresses."""
    merged = Path(a.out) / "model+adapter"
    if not (merged / "modelpress.json").is_file() or a.fresh:
        model, tok, _ = _load(a.model)
        merge_adapters(_with_adapter(model, a.adapter))
        Path(a.out).mkdir(parents=True, exist_ok=True)
        save(model, tok, merged)  # replaces an earlier merge only once the new checkpoint is complete
        _err(f"modelpress: merged {a.adapter} into {merged}; comparing its compressions")
    return str(merged)


# -- serve -------------------------------------------------------------------------------------
def cmd_serve(a: argparse.Namespace) -> int:
    try:
        c = flags.build(a, ServeConfig)
    except ValueError as e:
        raise ModelpressError(str(e)) from None
    adapters = flags.name_dir_pairs(a.lora, "--lora")
    model, tok, load_s = _load(a.model, keep_blocks=True)  # a GGUF runs on its blocks
    _with_adapter(model, a.adapter)  # one adapter for every request (--lora: several, chosen per request)
    engine = c.engine(model, tok, adapters)
    name = c.served_model_name or Path(record(model).source).stem
    if name in adapters:
        raise ModelpressError(f"the adapter name {name!r} is the model's own; give the adapter another name")
    _err(f"modelpress: serving {name} (loaded in {load_s:.1f} s; KV cache {c.kv_blocks} blocks of {c.block_size} "
         f"tokens, {engine.runner.bytes_per_block * c.kv_blocks / 1e6:.0f} MB) on http://{c.host}:{c.port}/v1")
    serve(engine, name, c.host, c.port, c.api_key, max_body_bytes=int(c.max_body_mb * (1 << 20)),
          template_seconds=c.template_timeout)
    return 0


# -- generate ----------------------------------------------------------------------------------
def cmd_generate(a: argparse.Namespace) -> int:
    if a.raw and not a.prompt:
        raise ModelpressError("the prompt is empty; give some text with -p (with --raw nothing else is sent)")
    try:
        params = SamplingParams(max_tokens=a.max_new_tokens, temperature=a.temperature, top_p=a.top_p, seed=a.seed)
    except ValueError as e:
        raise ModelpressError(str(e)) from None
    model, tok, _ = _load(a.model, a.device, a.gguf_blocks)
    _with_adapter(model, a.adapter)
    context = getattr(model.config, "max_position_embeddings", None)
    if context and a.max_new_tokens > context:
        _err(f"note: -n {a.max_new_tokens} is past the model's context; generating until it is full ({context} tokens)")
    stats: dict[str, float] = {}
    for piece in stream_text(model, tok, a.prompt, a.max_new_tokens, chat=not a.raw, params=params, stats=stats):
        print(piece, end="", flush=True)
    print()
    if stats:
        _err(speed_line(stats))
    return 0


# -- info --------------------------------------------------------------------------------------
def cmd_tune(a: argparse.Namespace) -> int:
    model, _, _ = _load(a.model)
    shapes = {(m.in_features, m.out_features) for _, m in iter_targets(model, (r".",), (), (torch.nn.Linear, W8A8Linear))}
    try:
        table, path = tune.tune(shapes, a.rows, force=a.force, progress=True)
    except RuntimeError as e:
        raise ModelpressError(str(e)) from None
    print(json.dumps(table) if a.json else text_table(table))
    _err(f"modelpress: {sum(r['timed_now'] for r in table)} of {len(table)} shape x rows entries timed now; the "
         f"choices are in {path} and every W8A8 layer of these shapes uses them")
    return 0


def cmd_qat(a: argparse.Namespace) -> int:
    """Train against a format's rounding (methods/qat.py), then write that format with its own quantizer."""
    if (a.type is None) == (a.method is None):
        raise ModelpressError("give --type (a GGUF mix: Q4_0, Q4_K_M, ...) or --method (rtn, nf4, fp4), not both")
    if a.type is not None and a.type.upper() not in MIXES:
        raise ModelpressError(f"unknown GGUF type {a.type!r}; choose one of: {', '.join(MIXES)}")
    target = a.type if a.type is not None else flags.method_config(a, config_types())
    gguf = Path(a.out).suffix.lower() == ".gguf"
    if a.type is None and gguf:
        raise ModelpressError("--method rtn / nf4 / fp4 writes a checkpoint folder; a .gguf goes with --type")
    out = check_file(Path(a.out)) if gguf else check_destination(a.format, getattr(target, "method", None), a.out)
    try:
        train = QATTrainConfig(a.steps, a.batch, a.ctx, a.samples, a.lr, lora_rank=a.lora_rank)
    except ValueError as e:
        raise ModelpressError(str(e)) from None
    if a.calib is not None:
        load_text(a.calib, "calib")
    model, tok, _ = _load(a.model)
    hist = qat(model, tok, target, a.calib, train)
    _err(f"qat: {train.steps} steps in {sum(h['seconds'] for h in hist):.0f} s, KL {hist[0]['kl']:.4f} -> "
         f"{hist[-1]['kl']:.4f}")
    if gguf:
        export_gguf(model, tok, out, a.type)
    elif a.type is None:
        quantize(model, target)
        save(model, tok, out, format=a.format)
    else:  # the trained float model, for export --type (with --calib: an imatrix) or a calibrated method
        save(model, tok, out, format="modelpress")
    _err(f"wrote {out}")
    return 0


def cmd_info(a: argparse.Namespace) -> int:
    path = resolve(a.model)
    info: dict[str, Any] = {"path": str(path), "disk_bytes": disk_bytes(path), **describe(path)}
    tuned = tune.describe_cache()
    info["kernel_tuning"] = (f"{len(tuned)} shape x rows choices in {tune.cache_path()}" + ("" if a.tuning else
                             " (--tuning lists them)") if tuned else "none on this machine (`modelpress tune`)")
    if a.json:
        print(json.dumps({**info, **({"kernel_choices": tuned} if a.tuning else {})}))
    else:
        width = max(map(len, info))
        print("\n".join(f"{k:<{width}}  {v}" for k, v in info.items()))
        if a.tuning and tuned:
            print(text_table([{k: v for k, v in r.items() if k != "timed_now"} for r in tuned]))
    return 0


# -- finetune / merge --------------------------------------------------------------------------
def _with_adapter(model: Any, adapter: str | None) -> Any:
    if adapter:
        load_adapter(model, adapter)
    return model


def cmd_finetune(a: argparse.Namespace) -> int:
    try:
        targets = "all-linear" if a.targets == "all-linear" else tuple(t for t in a.targets.split(",") if t.strip())
        lora = LoraConfig(r=a.r, alpha=a.alpha, dropout=a.dropout, targets=targets, rslora=a.rslora, dora=a.dora,
                          init=a.init, qa_lora_group=a.qa_lora_group)
        train = TrainConfig(steps=a.steps, epochs=a.epochs, batch=a.batch, grad_accum=a.grad_accum, ctx=a.ctx, lr=a.lr,
                            weight_decay=a.weight_decay, warmup=a.warmup, eval_every=a.eval_every,
                            save_every=a.save_every, seed=a.seed, gradient_checkpointing=a.gradient_checkpointing,
                            compute=a.compute)
    except ValueError as e:
        raise ModelpressError(str(e)) from None
    model, tok, _ = _load(a.model, a.device, a.gguf_blocks and not a.qlora)  # --qlora: NF4 from the fp32 weights
    if a.qlora:  # QLoRA's recipe: NF4 with double quantization, bf16 compute
        quantize(model, NF4Config(double_quant=True, compute_dtype="bfloat16"))
    result = finetune(model, tok, a.data, lora, train, out=a.out, resume=a.resume, progress=True)
    last = result.history[-1] if result.history else {}
    evals = [h["eval_loss"] for h in result.history if "eval_loss" in h]
    _err(f"modelpress: {len(result.history)} steps, last loss {last.get('loss', float('nan')):.4f}"
         + (f", held-out loss {evals[-1]:.4f}" if evals else "") + f"; adapter in {a.out}")
    return 0


def cmd_merge(a: argparse.Namespace) -> int:
    check_destination("modelpress", None, a.out)
    model, tok, _ = _load(a.model)
    merge_adapters(_with_adapter(model, a.adapter))
    save(model, tok, a.out)
    _err(f"modelpress: merged {a.adapter} into a float model: {a.out}")
    return 0


# -- entry point -------------------------------------------------------------------------------
def _model(p: argparse.ArgumentParser) -> None:
    p.add_argument("model", nargs="?", help="GGUF file, transformers folder or modelpress checkpoint "
                   "(default: SmolLM2-135M-Instruct)")


def _calibration(p: argparse.ArgumentParser, what: str, samples: int = 128) -> None:
    p.add_argument("--calib", help=f".txt or .jsonl text {what} (default: Python's pydoc topics and module docstrings)")
    p.add_argument("--samples", type=flags.positive, default=samples, help=f"calibration windows (default: {samples})")
    p.add_argument("--ctx", type=flags.positive, default=512, help="window length in tokens (default: 512)")


def _runtime(p: argparse.ArgumentParser, blocks: bool) -> None:
    p.add_argument("--adapter", help="a LoRA adapter folder (PEFT's format) to run with the model")
    p.add_argument("--device", default="cpu", help="cpu (default) or cuda")
    p.add_argument("--gguf-blocks", action=argparse.BooleanOptionalAction, default=blocks,
                   help=f"GGUF: run the quantized layers on their blocks, not on an fp32 copy (default: {blocks})")


PRUNERS = ("magnitude", "wanda", "sparsegpt", "structured")


def build_parser() -> argparse.ArgumentParser:
    p = _Parser(prog="modelpress", description="Compress models and run what was compressed.")
    sub = p.add_subparsers(dest="command", required=True, parser_class=_Parser)

    def command(name: str, fn: Any, help: str) -> argparse.ArgumentParser:  # noqa: A002
        c = sub.add_parser(name, help=help)
        _model(c)
        c.set_defaults(fn=fn)
        return c

    q = command("quantize", cmd_quantize, "compress a model and save it (a modelpress checkpoint by default)")
    q.add_argument("--method", default="rtn",
                   help="rtn (integers, round to nearest), gptq / awq (calibrated), nf4 / fp4 (bitsandbytes "
                        "4-bit), int8 (LLM.int8), w8a8 (int8 weights and activations, SmoothQuant), auto (a GGUF type per "
                        "layer within --target-bpw); default: rtn")
    flags.add(q, config_types().values())
    _calibration(q, "for methods that calibrate")
    q.add_argument("--format", choices=[n for n, f in formats().items() if f.save], default="modelpress",
                   help="modelpress (default); gptq: the HF GPTQ layout, awq: AutoAWQ's GEMM layout, "
                        "compressed-tensors: llm-compressor's pack-quantized (what transformers, vLLM, "
                        "GPTQModel, AutoAWQ and llm-compressor read); gguf (auto only): a .gguf file")
    q.add_argument("--out", required=True, help="folder to write (--format gguf: the .gguf file)")

    x = command("export", cmd_export, "write a model as a GGUF file llama.cpp runs, or as ONNX")
    x.add_argument("--format", choices=("gguf", "gguf-lora", "onnx"), default="gguf",
                   help="gguf (default); gguf-lora: the --adapter as llama.cpp's LoRA adapter file; onnx: the prefill "
                        "graph (input_ids -> logits) of a float or static W8A8 model, its W8A8 layers as Q/DQ nodes "
                        "(ONNX Runtime, TensorRT)")
    x.add_argument("--max-len", type=flags.positive, default=2048,
                   help="onnx: the longest sequence the graph takes (its rotary table; default: 2048)")
    x.add_argument("--adapter", help="adapter folder (PEFT's format), for --format gguf-lora")
    x.add_argument("--type",
                   help="llama.cpp's mix: Q2_K, Q3_K_S/M/L, Q4_0, Q4_1, Q4_K_S/M, Q5_0, Q5_1, Q5_K_S/M, Q6_K, "
                        "Q8_0, F16, BF16, F32 (default: Q4_K_M; a model whose layers hold GGUF blocks, such as "
                        "an `auto` checkpoint, keeps their types)")
    x.add_argument("--imatrix", help="llama.cpp importance-matrix file (.gguf or legacy .dat) to weigh the rounding")
    _calibration(x, "to compute the importance matrix from (and to calibrate --from-method)")
    x.add_argument("--from-method", choices=("awq", "gptq"), help=_FROM_METHOD_HELP + " (default: neither)")
    x.add_argument("--out", required=True, help="the .gguf file to write")

    m = command("imatrix", cmd_imatrix, "compute llama.cpp's importance matrix from calibration text")
    _calibration(m, "to compute it from")
    m.add_argument("--out", required=True, help="file to write: .gguf (llama.cpp's format), else the legacy .dat")

    e = command("eval", cmd_eval, "perplexity, size, bits per weight, decode speed")
    e.add_argument("--text", help=".txt or .jsonl evaluation text (default: Python's pydoc topics)")
    e.add_argument("--ctx", type=flags.positive, default=512, help="window length in tokens (default: 512)")
    e.add_argument("--max-windows", type=flags.positive, help="score at most N windows")
    e.add_argument("--decode-tokens", type=int, default=64, help="tokens for the decode-speed run (0: skip)")
    e.add_argument("--compute-dtype", choices=COMPUTE_DTYPES, default="float32",
                   help="the perplexity's products: float32 (the model's own numbers, default) or bfloat16 "
                        "(autocast: AMX / AVX512-BF16 tiles where the CPU has them, ~1.5x; ppl moves ~0.1 %%)")
    e.add_argument("--json", action="store_true", help="print one JSON object")
    _runtime(e, blocks=False)

    c = command("compare", cmd_compare, "measure many compressions of one model side by side: table, plot, report")
    c.add_argument("--methods", help="comma-separated names (default: " + ",".join(DEFAULT_METHODS)
                   + "); --list shows every name")
    c.add_argument("--list", action="store_true", help="print every method name compare accepts")
    c.add_argument("--text", help=".txt or .jsonl evaluation text (default: Python's pydoc topics)")
    c.add_argument("--other-text", help="a text unlike the calibration, every row's ppl on it too (out of domain)")
    _calibration(c, "for gptq, awq, imatrix and auto", samples=16)
    c.add_argument("--eval-windows", type=flags.positive, default=8, help="evaluation windows (default: 8)")
    c.add_argument("--decode-tokens", type=flags.positive, default=32, help="tokens timed for decode speed (default: 32)")
    c.add_argument("--fresh", action="store_true", help="recompute every row (default: reuse finished rows)")
    c.add_argument("--thorough", action="store_true", help="for decisions: 40 evaluation and 128 calibration windows")
    c.add_argument("--max-size", type=float, help="recommend: at most this many MB on disk")
    c.add_argument("--max-ppl-increase", type=float, help="recommend: ppl at most this %% above the original (10)")
    c.add_argument("--min-tokens-per-s", type=float, help="recommend: at least this batch-1 decode speed")
    c.add_argument("--runtime", choices=RUNTIMES, help="recommend: a row this runtime loads")
    c.add_argument("--adapter", help="a LoRA adapter folder: compare the compressions of the model with it merged")
    c.add_argument("--out", default="results/compare", help="folder for the report (default: results/compare)")

    s = command("serve", cmd_serve, "serve a model over an OpenAI-compatible HTTP API")
    flags.add(s, [ServeConfig], label=False)
    s.add_argument("--adapter", help="a LoRA adapter folder (PEFT's format) every request runs with")
    s.add_argument("--lora", action="append", metavar="NAME=DIR",
                   help="a LoRA adapter (PEFT's format) served beside the model; requests pick it by `model`: NAME "
                        "(repeat the flag for more)")

    g = command("generate", cmd_generate, "stream a completion")
    g.add_argument("-p", "--prompt", required=True)
    g.add_argument("-n", "--max-new-tokens", type=flags.positive, default=128)
    g.add_argument("--raw", action="store_true", help="no chat template")
    g.add_argument("--temperature", type=float, default=0.0, help="0 = greedy (default)")
    g.add_argument("--top-p", type=float, default=1.0)
    g.add_argument("--seed", type=int)
    _runtime(g, blocks=True)  # as llama.cpp runs a GGUF

    f = command("finetune", cmd_finetune, "train LoRA / QLoRA adapters (PEFT's format) on a text or chat file")
    f.add_argument("--data", help=".txt (packed windows) or .jsonl of {\"text\"} or chat {\"messages\"} lines "
                   "(default: Python's pydoc topics and module docstrings)")
    f.add_argument("--out", required=True, help="folder for the adapter (and its checkpoint while training)")
    f.add_argument("--r", "--rank", dest="r", type=flags.positive, default=16,
                   help="adapter rank (default: 16; under torchrun write --rank, which its options do not shadow)")
    f.add_argument("--alpha", type=float, default=32.0, help="scaling numerator: alpha / r (default: 32)")
    f.add_argument("--dropout", type=float, default=0.0, help="dropout on the adapters' input (default: 0)")
    f.add_argument("--targets", default="q_proj,v_proj", help="comma-separated layer names or all-linear "
                   "(default: q_proj,v_proj)")
    f.add_argument("--rslora", action="store_true", help="scaling alpha / sqrt(r)")
    f.add_argument("--dora", action="store_true", help="DoRA: a trained magnitude per output row")
    f.add_argument("--init", choices=("kaiming", "gaussian", "pissa"), default="kaiming",
                   help="adapter init (default: kaiming; pissa: the top singular directions of the float base, saved "
                   "as a rank-2r adapter for the original base)")
    f.add_argument("--qa-lora-group", type=flags.positive, help="QA-LoRA: pool the adapters' input over groups of "
                   "this many columns (the int base's quantization group), so that merge is lossless")
    f.add_argument("--qlora", action="store_true", help="quantize the base to NF4 with double quantization and bf16 "
                   "compute first (QLoRA)")
    f.add_argument("--steps", type=flags.positive, help="optimizer steps (default: one epoch)")
    f.add_argument("--epochs", type=float, default=1.0, help="passes over the data when --steps is not given")
    f.add_argument("--batch", type=flags.positive, default=4, help="rows per step, over all processes (default: 4)")
    f.add_argument("--grad-accum", type=flags.positive, default=1, help="batches per optimizer step (default: 1)")
    f.add_argument("--ctx", type=flags.positive, default=512, help="tokens per row (default: 512)")
    f.add_argument("--lr", type=float, default=2e-4, help="peak learning rate (default: 2e-4)")
    f.add_argument("--weight-decay", type=float, default=0.0)
    f.add_argument("--warmup", type=float, default=0.03, help="warmup as a fraction of the steps (default: 0.03)")
    f.add_argument("--eval-every", type=flags.positive, default=50, help="held-out loss every N steps (default: 50)")
    f.add_argument("--save-every", type=flags.positive, default=100, help="checkpoint every N steps (default: 100)")
    f.add_argument("--seed", type=int, default=0)
    f.add_argument("--gradient-checkpointing", action="store_true", help="recompute activations in the backward")
    f.add_argument("--compute", choices=("auto", "float32", "bfloat16"), default="auto",
                   help="the frozen base's matmul dtype (auto: bf16 where the CPU has it natively)")
    f.add_argument("--resume", action="store_true", help="go on from the checkpoint in --out")
    f.add_argument("--device", default="cpu", help="cpu (default) or cuda")
    f.add_argument("--gguf-blocks", action=argparse.BooleanOptionalAction, default=True,
                   help="GGUF: train on the file's blocks as they are (LoRA on a GGUF base), not an fp32 copy "
                        "(default: true)")

    mg = command("merge", cmd_merge, "merge an adapter into its base: a float model, saved as a checkpoint")
    mg.add_argument("--adapter", required=True, help="adapter folder (PEFT's format)")
    mg.add_argument("--out", required=True, help="folder to write")

    i = command("info", cmd_info, "what a model file or checkpoint holds")
    i.add_argument("--json", action="store_true")
    i.add_argument("--tuning", action="store_true", help="also list the kernel choices `modelpress tune` made here")

    a = command("qat", cmd_qat, "quantization-aware training against a format's exact rounding, then that format")
    a.add_argument("--type", help="a GGUF mix to train for (Q4_0, Q4_K_M, ...): --out x.gguf writes it, a folder the "
                                  "trained float model")
    a.add_argument("--method", choices=("rtn", "nf4", "fp4"), help="train for these codes instead (with --bits, "
                                                                   "--group-size, --symmetric; --blocksize, --double-quant)")
    flags.add(a, [config_types()[m] for m in ("rtn", "nf4", "fp4")])
    _calibration(a, "to train on (distillation from the model as it was)")
    a.add_argument("--steps", type=flags.positive, default=100, help="optimizer steps (default: 100)")
    a.add_argument("--batch", type=flags.positive, default=4, help="windows a step (default: 4)")
    a.add_argument("--lr", type=float, default=1e-5, help="AdamW learning rate (default: 1e-5)")
    a.add_argument("--lora-rank", type=int, default=0, help="> 0: QAT + LoRA, a low-rank update of each weight trains")
    a.add_argument("--format", choices=("modelpress", "gptq", "compressed-tensors"), default="modelpress",
                   help="--method's checkpoint layout (rtn: gptq is the HF GPTQ layout vLLM reads)")
    a.add_argument("--out", required=True, help="a .gguf file (--type) or a folder")

    r = command("prune", cmd_prune, "zero weights by magnitude, Wanda or SparseGPT (a sparsity or N:M) and save")
    r.add_argument("--method", choices=PRUNERS, help="the criterion (default: sparsegpt); "
                   "sparsegpt --bits 4: pruned and quantized in one sweep; structured --mlp 0.25: narrower MLPs")
    r.add_argument("--structured", type=flags.structured_spec, metavar="mlp=F,heads=F",
                   help="structured pruning of these fractions (a part left out: none), as --method structured")
    flags.add(r, [config_types()[m] for m in PRUNERS])
    _calibration(r, "for wanda / sparsegpt")
    r.add_argument("--format", choices=("modelpress", "gptq"), default="modelpress", help="checkpoint layout")
    r.add_argument("--out", required=True, help="folder to write")

    t = command("tune", cmd_tune, "time the W8A8 kernel variants for the model's layer shapes and keep the fastest")
    t.add_argument("--rows", type=lambda text: [flags.positive(r) for r in text.split(",")], default=tune.ROW_BUCKETS,
                   help="row counts to tune for (rounded up to the buckets %s; default: all)" % (tune.ROW_BUCKETS,))
    t.add_argument("--force", action="store_true", help="time again the shapes the cache already holds")
    t.add_argument("--json", action="store_true", help="print the table as JSON")
    return p


def main(argv: list[str] | None = None) -> int:
    try:
        args = build_parser().parse_args(argv)
        return args.fn(args)
    except ModelpressError as e:
        _err(f"modelpress: error: {one_line(e)}")
        return 2
    except KeyboardInterrupt:
        _err("modelpress: interrupted")
        return 130


if __name__ == "__main__":
    sys.exit(main())
