"""The `modelpress` command: thin subcommands that parse arguments, build a config, call the library.

User mistakes (ModelpressError, an invalid config) print one line `modelpress: error: ...` and exit
with code 2, with no traceback.
"""
from __future__ import annotations

import argparse
from collections import Counter
import json
import sys
import time
from typing import Any

from .errors import ModelpressError, one_line


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> None:  # one line, exit 2 (argparse prints usage too)
        raise ModelpressError(f"{message} (see `{self.prog} --help`)")


def _group_size(text: str) -> int | str:
    if text.lower() in ("channel", "none", "per-channel"):
        return "channel"
    try:
        return int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"group size must be a whole number or 'channel', got {text!r}") from None


def _positive(text: str) -> int:
    try:
        v = int(text)
    except ValueError:
        v = 0
    if v <= 0:
        raise argparse.ArgumentTypeError(f"expected a positive whole number, got {text!r}")
    return v


def _positive_float(text: str) -> float:
    try:
        v = float(text)
    except ValueError:
        v = 0.0
    if not 0 < v < float("inf"):
        raise argparse.ArgumentTypeError(f"expected a positive number, got {text!r}")
    return v


def _load(source: str | None, device: str = "cpu", keep_blocks: bool = False) -> tuple[Any, Any, float]:
    """(model, tokenizer, load seconds), the model moved to `device`; keep_blocks: a GGUF's
    quantized layers run on their blocks."""
    import torch

    from .model.load import load

    if device != "cpu" and not (device.startswith("cuda") and torch.cuda.is_available()):
        raise ModelpressError(f"device {device!r} is not available here; use --device cpu")
    start = time.perf_counter()
    model, tok = load(source, keep_blocks=keep_blocks)
    return model.to(device), tok, time.perf_counter() - start


def _err(*lines: str) -> None:
    print(*lines, file=sys.stderr, flush=True)


# -- quantize ----------------------------------------------------------------------------------
# the options of `quantize` that set a config field: (flag, field)
_CONFIG_OPTIONS = (("--bits", "bits"), ("--group-size", "group_size"), ("--symmetric", "symmetric"),
                   ("--blocksize", "blocksize"), ("--double-quant", "double_quant"),
                   ("--compute-dtype", "compute_dtype"), ("--threshold", "threshold"),
                   ("--act-order", "act_order"), ("--static-groups", "static_groups"), ("--damp", "damp"),
                   ("--mse", "mse"), ("--target-bpw", "target_bpw"), ("--target-mix", "target_mix"),
                   ("--formats", "formats"))


def _config_from_args(a: argparse.Namespace) -> Any:
    """The method's config from the options given; an option the method does not take is an error,
    one left out takes the config's default (RTN: group 64, or per channel at 8 bits)."""
    import dataclasses

    from .config import config_types

    methods = config_types()
    if a.method not in methods:
        raise ModelpressError(f"unknown method {a.method!r}; choose one of: {', '.join(sorted(methods))}")
    cls = methods[a.method]
    fields = {f.name for f in dataclasses.fields(cls)}
    kwargs = {}
    for flag, name in _CONFIG_OPTIONS:
        value = getattr(a, name)
        if value is None:
            continue
        if name not in fields:
            takes = ", ".join(f for f, n in _CONFIG_OPTIONS if n in fields) or "none of these"
            raise ModelpressError(f"{flag} does not apply to --method {a.method} (it takes {takes})")
        kwargs[name] = None if value == "channel" else value
    if "group_size" in fields and a.group_size is None:  # RTN: per channel for 8 bits, 64 below
        kwargs["group_size"] = None if kwargs.get("bits") == 8 else 64
    try:
        return cls(**kwargs)
    except ValueError as e:
        raise ModelpressError(str(e)) from None


def _describe(config: Any) -> str:
    """One line naming the method and its settings, e.g. 'nf4 (blocksize 64, double quant)'."""
    d = config.to_dict()
    for k in ("method", "version", "targets", "ignore"):
        d.pop(k)
    settings = ", ".join(f"{k.replace('_', ' ')} {'channel' if v is None else v}" for k, v in d.items())
    return f"{config.method} ({settings})"


def cmd_quantize(a: argparse.Namespace) -> int:
    from pathlib import Path

    from .data import calibration_windows, load_text
    from .eval.size import model_size
    from .formats import check_destination, save
    from .registry import quantize

    config = _config_from_args(a)
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
        _err(_allocation(model.modelpress_plan))
    out = Path(save(model, tok, a.out, format=a.format))
    if out.is_file():  # a GGUF
        _err(f"quantized with {_describe(config)} in {quant_s:.1f} s; wrote {out} "
             f"({out.stat().st_size / 1e6:.1f} MB, {model.modelpress_plan.bits_per_weight:.3f} bits/weight)")
        return 0
    after = model_size(model)
    _err(f"quantized with {_describe(config)} in {quant_s:.1f} s; "
         f"{before.size_bytes / 1e6:.1f} MB -> {after.size_bytes / 1e6:.1f} MB "
         f"({after.bits_per_weight:.2f} bits/weight, linear layers {after.linear_bits_per_weight:.2f}); "
         f"saved to {out}")
    return 0


def _allocation(plan: Any) -> str:
    """The chosen types, one line per block (q k v o gate up down), and the totals."""
    import re

    cols = ("attn_q", "attn_k", "attn_v", "attn_output", "ffn_gate", "ffn_up", "ffn_down")
    blocks: dict[int, dict[str, str]] = {}
    for name, kind in plan.types.items():
        m = re.match(r"blk\.(\d+)\.(\w+)\.weight", name)
        if m and m.group(2) in cols:
            blocks.setdefault(int(m.group(1)), {})[m.group(2)] = kind
    lines = ["auto: chosen types (" + " ".join(cols) + ")"]
    lines += [f"  blk.{i:<3} " + " ".join(f"{row.get(c, '-'):<5}" for c in cols) for i, row in sorted(blocks.items())]
    counts = Counter(k for n, k in plan.types.items() if n in plan.costs)
    lines.append(f"auto: {', '.join(f'{n} {k}' for k, n in counts.most_common())}; "
                 f"{plan.bits_per_weight:.3f} bits/weight for a budget of {plan.budget_bits / plan.weights:.3f}; "
                 f"predicted mean KL {sum(plan.predicted.values()):.5f}")
    return "\n".join(lines)


# -- export ------------------------------------------------------------------------------------
def _gguf_out(path: str) -> Any:
    from pathlib import Path

    from .formats.gguf_writer import check_file

    return check_file(Path(path))


def _imatrix_of(model: Any, tok: Any, a: argparse.Namespace) -> Any:
    """The importance matrix of `model` on --calib (or the default text): --samples windows of --ctx."""
    from pathlib import Path

    from .data import calibration_windows
    from .model.imatrix import compute_imatrix

    start = time.perf_counter()
    wins = calibration_windows(tok, a.calib, a.ctx, a.samples)
    dataset = Path(a.calib).name if a.calib else "pydoc_data topics (modelpress default text)"
    im = compute_imatrix(model, wins, dataset=dataset)
    _err(f"imatrix: {len(im.sums)} tensors from {len(wins)} windows of {a.ctx} tokens "
         f"in {time.perf_counter() - start:.1f} s")
    return im


_FROM_METHOD_HELP = ("awq: AWQ's scales (searched for a 4-bit grid with groups of 32) folded into the norms and "
                     "weights, which stay in float; gptq: GPTQ's error-compensated 4-bit weights (groups of 32, act "
                     "order); then the GGUF mix quantizes those weights")


def cmd_export(a: argparse.Namespace) -> int:

    from .data import load_text
    from .formats.gguf_mixes import MIXES
    from .formats.imatrix import load_imatrix

    if a.type is not None and a.type not in MIXES:
        raise ModelpressError(f"unknown GGUF type {a.type!r}; choose one of: {', '.join(MIXES)}")
    out = _gguf_out(a.out)
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
        from .data import calibration_windows
        from .methods.awq import AWQConfig
        from .methods.gptq import GPTQConfig
        from .registry import quantize

        config = (AWQConfig(bits=4, group_size=32, scales_only=True) if a.from_method == "awq" else
                  GPTQConfig(bits=4, group_size=32, act_order=True, static_groups=True))
        quantize(model, config, calibration_windows(tok, a.calib, a.ctx, a.samples))
        _err(f"{_describe(config)} in {time.perf_counter() - start:.1f} s")
    if a.calib is not None:
        imatrix = _imatrix_of(model, tok, a)
    meta = {}
    if imatrix is not None:
        meta = {"quantize.imatrix.file": str(a.imatrix or "(computed by modelpress)"),
                "quantize.imatrix.entries_count": len(imatrix.sums),
                "quantize.imatrix.chunks_count": imatrix.chunk_count}
        if imatrix.datasets:
            meta["quantize.imatrix.dataset"] = imatrix.datasets[0]
    from .formats.gguf_writer import export_gguf

    types = export_gguf(model, tok, out, a.type, imatrix=None if imatrix is None else imatrix.importance(),
                        extra_metadata=meta)
    mix = a.type or getattr(getattr(model, "modelpress_config", None), "target_mix", None) or "Q4_K_M"
    counts = ", ".join(f"{n} {t}" for t, n in sorted(Counter(types.values()).items(), key=lambda kv: -kv[1]))
    _err(f"wrote {out} ({out.stat().st_size / 1e6:.1f} MB, {mix}: {counts}"
         f"{', with an imatrix' if imatrix is not None else ''}) in {time.perf_counter() - start:.1f} s")
    return 0


def cmd_imatrix(a: argparse.Namespace) -> int:
    from .data import load_text
    from .formats.imatrix import save_imatrix

    out = _gguf_out(a.out)
    if a.calib is not None:
        load_text(a.calib, "calib")
    model, tok, _ = _load(a.model)
    path = save_imatrix(out, _imatrix_of(model, tok, a))
    _err(f"wrote {path} ({'GGUF' if path.suffix.lower() == '.gguf' else 'legacy'} imatrix format)")
    return 0


# -- eval --------------------------------------------------------------------------------------
def cmd_eval(a: argparse.Namespace) -> int:
    from .data import load_text
    from .eval.perplexity import perplexity
    from .eval.size import disk_bytes, model_size
    from .eval.speed import decode_tokens_per_s

    text = load_text(a.text, "eval")
    model, tok, load_s = _load(a.model, a.device, a.gguf_blocks)
    r = perplexity(model, tok, text, ctx=a.ctx, max_windows=a.max_windows, progress=not a.json)
    size = model_size(model)
    speed = (decode_tokens_per_s(model, tok, new_tokens=a.decode_tokens, progress=not a.json)
             if a.decode_tokens else None)
    result = {"ppl": r.ppl, "windows": r.windows, "ctx": r.ctx, "size_bytes": size.size_bytes,
              "bits_per_weight": size.bits_per_weight, "linear_bits_per_weight": size.linear_bits_per_weight,
              "tokens_per_s": speed, "eval_tokens_per_s": r.tokens_per_s, "load_seconds": load_s,
              "source": model.modelpress_source, "source_disk_bytes": disk_bytes(model.modelpress_source)}
    if a.json:
        print(json.dumps(result))
    else:
        print(f"ppl {r.ppl:.4f} over {r.windows} windows of {r.ctx} tokens ({r.tokens_per_s:.0f} tokens/s)\n"
              f"size {size.size_bytes / 1e6:.1f} MB, {size.bits_per_weight:.2f} bits/weight "
              f"(linear layers {size.linear_bits_per_weight:.2f})\n"
              + (f"decode {speed:.1f} tokens/s\n" if speed else "")
              + f"loaded in {load_s:.1f} s from {model.modelpress_source}")
    return 0


# -- compare -----------------------------------------------------------------------------------
def cmd_compare(a: argparse.Namespace) -> int:
    from pathlib import Path

    from .eval.compare import DEFAULT_METHODS, compare, method_names

    if a.list:
        print("\n".join(method_names()))
        return 0
    methods = [m for m in (a.methods.split(",") if a.methods else DEFAULT_METHODS) if m.strip()]
    results = compare(a.model, methods, a.out, a.text, a.calib, a.eval_windows, a.samples, a.ctx,
                      a.decode_tokens, fresh=a.fresh)
    print((Path(a.out) / "report.md").read_text(), end="")
    _err(f"modelpress: wrote {a.out}/report.md, results.json, pareto.png, report.html")
    if results["failed"]:
        _err(f"modelpress: {len(results['failed'])} method(s) failed: {', '.join(results['failed'])}; "
             "rerun the same command to retry them (finished rows are reused)")
        return 1
    return 0


# -- serve -------------------------------------------------------------------------------------
def cmd_serve(a: argparse.Namespace) -> int:
    from pathlib import Path

    from .serve.engine import Engine
    from .serve.http import serve

    model, tok, load_s = _load(a.model, keep_blocks=True)  # a GGUF runs on its blocks
    try:
        engine = Engine(model, tok, max_num_seqs=a.max_num_seqs, kv_blocks=a.kv_blocks, block_size=a.block_size,
                        max_tokens_per_step=a.max_step_tokens, kv_dtype=a.kv_dtype)
    except ValueError as e:  # a --kv-dtype this model cannot take
        raise ModelpressError(f"--kv-dtype {a.kv_dtype}: {e}") from None
    name = a.served_model_name or Path(model.modelpress_source).stem
    _err(f"modelpress: serving {name} (loaded in {load_s:.1f} s; KV cache {a.kv_blocks} blocks of {a.block_size} "
         f"tokens, {engine.runner.bytes_per_block * a.kv_blocks / 1e6:.0f} MB) on http://{a.host}:{a.port}/v1")
    serve(engine, name, a.host, a.port, a.api_key, max_body_bytes=int(a.max_body_mb * (1 << 20)),
          template_seconds=a.template_timeout)
    return 0


# -- generate ----------------------------------------------------------------------------------
def cmd_generate(a: argparse.Namespace) -> int:
    from .generate import stream_text

    if a.raw and not a.prompt:
        raise ModelpressError("the prompt is empty; give some text with -p (with --raw nothing else is sent)")
    model, tok, _ = _load(a.model, a.device, a.gguf_blocks)
    context = getattr(model.config, "max_position_embeddings", None)
    if context and a.max_new_tokens > context:
        _err(f"note: -n {a.max_new_tokens} is past the model's context; generating until it is full ({context} tokens)")
    for piece in stream_text(model, tok, a.prompt, a.max_new_tokens, chat=not a.raw,
                             temperature=a.temperature, top_p=a.top_p, seed=a.seed):
        print(piece, end="", flush=True)
    print()
    return 0


# -- info --------------------------------------------------------------------------------------
def cmd_info(a: argparse.Namespace) -> int:
    from .eval.size import disk_bytes
    from .formats import describe
    from .model.load import resolve

    path = resolve(a.model)
    info: dict[str, Any] = {"path": str(path), "disk_bytes": disk_bytes(path), **describe(path)}
    if a.json:
        print(json.dumps(info))
    else:
        width = max(map(len, info))
        print("\n".join(f"{k:<{width}}  {v}" for k, v in info.items()))
    return 0


def _save_formats() -> list[str]:
    from .formats import formats

    return [name for name, f in formats().items() if f.save is not None]


def _default_methods() -> tuple[str, ...]:
    from .eval.compare import DEFAULT_METHODS

    return DEFAULT_METHODS


# -- entry point -------------------------------------------------------------------------------
def build_parser() -> argparse.ArgumentParser:
    p = _Parser(prog="modelpress", description="Compress models and run what was compressed.")
    sub = p.add_subparsers(dest="command", required=True, parser_class=_Parser)
    model_help = "GGUF file, transformers folder or modelpress checkpoint (default: SmolLM2-135M-Instruct)"

    q = sub.add_parser("quantize", help="compress a model and save a modelpress checkpoint")
    q.add_argument("model", nargs="?", help=model_help)
    q.add_argument("--method", default="rtn",
                   help="rtn (integers, round to nearest), gptq / awq (calibrated), nf4 / fp4 (bitsandbytes "
                        "4-bit), int8 (LLM.int8), auto (a GGUF type per layer within --target-bpw); default: rtn")
    q.add_argument("--bits", type=int, help="rtn, gptq, awq: 2, 3, 4 or 8 (default: 4)")
    q.add_argument("--group-size", type=_group_size,
                   help="rtn, gptq, awq: input columns per scale, or 'channel' (default: 64; channel for 8 bits)")
    q.add_argument("--symmetric", action="store_true", default=None,
                   help="rtn, gptq, awq: symmetric grid, no stored zero point")
    q.add_argument("--act-order", action="store_true", default=None,
                   help="gptq: quantize columns by decreasing activation energy (desc_act)")
    q.add_argument("--static-groups", action="store_true", default=None,
                   help="gptq: group parameters fixed before the sweep, in column order")
    q.add_argument("--damp", type=float, help="gptq: Hessian damping, fraction of its mean diagonal (default: 0.01)")
    q.add_argument("--mse", action="store_true", default=None, help="gptq: search each group's clipping range")
    q.add_argument("--blocksize", type=int, help="nf4/fp4: weights per absmax, 32 to 4096 (default: 64)")
    q.add_argument("--double-quant", action="store_true", default=None,
                   help="nf4/fp4: quantize the absmax constants too (8-bit, blocks of 256)")
    q.add_argument("--compute-dtype", choices=("float32", "bfloat16"),
                   help="nf4/fp4: the dtype the layers multiply in (default: float32)")
    q.add_argument("--threshold", type=float,
                   help="int8: input magnitude from which a column runs in fp32 (default: 6.0; 0: none)")
    q.add_argument("--target-bpw", type=float, help="auto: bits per weight of the whole model (GGUF file), e.g. 4.5")
    q.add_argument("--target-mix", help="auto: the size of this llama.cpp mix instead, e.g. Q4_K_M")
    q.add_argument("--formats", type=lambda t: tuple(x.strip().upper() for x in t.split(",") if x.strip()),
                   help="auto: the GGUF types to choose from (default: Q2_K,Q3_K,Q4_0,Q4_1,Q4_K,Q5_0,Q5_1,Q5_K,"
                        "Q6_K,Q8_0)")
    q.add_argument("--calib", help=".txt or .jsonl calibration text, for methods that calibrate "
                   "(default: Python's pydoc topics)")
    q.add_argument("--samples", type=_positive, default=128, help="calibration windows (default: 128)")
    q.add_argument("--ctx", type=_positive, default=512, help="calibration window length (default: 512)")
    q.add_argument("--format", choices=_save_formats(), default="modelpress",
                   help="modelpress (default); gptq: the HF GPTQ layout, awq: AutoAWQ's GEMM layout, "
                        "compressed-tensors: llm-compressor's pack-quantized (what transformers, vLLM, "
                        "GPTQModel, AutoAWQ and llm-compressor read); gguf (auto only): a .gguf file")
    q.add_argument("--out", required=True, help="folder to write (--format gguf: the .gguf file)")
    q.set_defaults(fn=cmd_quantize)

    x = sub.add_parser("export", help="write a model as a GGUF file llama.cpp runs")
    x.add_argument("model", nargs="?", help=model_help)
    x.add_argument("--format", choices=("gguf",), default="gguf", help="gguf (default)")
    x.add_argument("--type",
                   help="llama.cpp's mix: Q2_K, Q3_K_S/M/L, Q4_0, Q4_1, Q4_K_S/M, Q5_0, Q5_1, Q5_K_S/M, Q6_K, "
                        "Q8_0, F16, BF16, F32 (default: Q4_K_M; a model whose layers hold GGUF blocks, such as "
                        "an `auto` checkpoint, keeps their types)")
    x.add_argument("--imatrix", help="llama.cpp importance-matrix file (.gguf or legacy .dat) to weigh the rounding")
    x.add_argument("--calib", help=".txt or .jsonl text to compute the importance matrix from (and to calibrate "
                   "--from-method)")
    x.add_argument("--from-method", choices=("awq", "gptq"), help=_FROM_METHOD_HELP + " (default: neither)")
    x.add_argument("--samples", type=_positive, default=128, help="calibration windows (default: 128)")
    x.add_argument("--ctx", type=_positive, default=512, help="calibration window length (default: 512)")
    x.add_argument("--out", required=True, help="the .gguf file to write")
    x.set_defaults(fn=cmd_export)

    m = sub.add_parser("imatrix", help="compute llama.cpp's importance matrix from calibration text")
    m.add_argument("model", nargs="?", help=model_help)
    m.add_argument("--calib", help=".txt or .jsonl calibration text (default: Python's pydoc topics)")
    m.add_argument("--samples", type=_positive, default=128, help="windows of text (default: 128)")
    m.add_argument("--ctx", type=_positive, default=512, help="window length (default: 512, llama-imatrix's)")
    m.add_argument("--out", required=True, help="file to write: .gguf (llama.cpp's format), else the legacy .dat")
    m.set_defaults(fn=cmd_imatrix)

    e = sub.add_parser("eval", help="perplexity, size, bits per weight, decode speed")
    e.add_argument("model", nargs="?", help=model_help)
    e.add_argument("--text", help=".txt or .jsonl evaluation text (default: Python's pydoc topics)")
    e.add_argument("--ctx", type=_positive, default=512, help="window length in tokens (default: 512)")
    e.add_argument("--max-windows", type=_positive, help="score at most N windows")
    e.add_argument("--decode-tokens", type=int, default=64, help="tokens for the decode-speed run (0: skip)")
    e.add_argument("--json", action="store_true", help="print one JSON object")
    e.add_argument("--device", default="cpu", help="cpu (default) or cuda")
    e.add_argument("--gguf-blocks", action="store_true",
                   help="GGUF: run the quantized layers on their blocks, not on an fp32 copy")
    e.set_defaults(fn=cmd_eval)

    c = sub.add_parser("compare", help="measure many compressions of one model side by side: table, plot, report")
    c.add_argument("model", nargs="?", help=model_help)
    c.add_argument("--methods", help="comma-separated names (default: " + ",".join(_default_methods())
                   + "); --list shows every name")
    c.add_argument("--list", action="store_true", help="print every method name compare accepts")
    c.add_argument("--text", help=".txt or .jsonl evaluation text (default: Python's pydoc topics)")
    c.add_argument("--calib", help=".txt or .jsonl calibration text for gptq, awq, imatrix and auto "
                   "(default: Python's pydoc topics)")
    c.add_argument("--eval-windows", type=_positive, default=8, help="evaluation windows (default: 8)")
    c.add_argument("--samples", type=_positive, default=16, help="calibration windows (default: 16)")
    c.add_argument("--ctx", type=_positive, default=512, help="window length in tokens (default: 512)")
    c.add_argument("--decode-tokens", type=_positive, default=32, help="tokens timed for decode speed (default: 32)")
    c.add_argument("--fresh", action="store_true", help="recompute every row (default: reuse finished rows)")
    c.add_argument("--out", default="results/compare", help="folder for the report (default: results/compare)")
    c.set_defaults(fn=cmd_compare)

    s = sub.add_parser("serve", help="serve a model over an OpenAI-compatible HTTP API")
    s.add_argument("model", nargs="?", help=model_help)
    s.add_argument("--host", default="127.0.0.1", help="address to listen on (default: 127.0.0.1)")
    s.add_argument("--port", type=_positive, default=8000, help="port (default: 8000)")
    s.add_argument("--api-key", help="require 'Authorization: Bearer KEY' on /v1/ routes")
    s.add_argument("--max-num-seqs", type=_positive, default=32, help="sequences running at once (default: 32)")
    s.add_argument("--kv-blocks", type=_positive, default=1024, help="KV-cache blocks (default: 1024)")
    s.add_argument("--block-size", type=_positive, default=16, help="tokens per KV-cache block (default: 16)")
    s.add_argument("--kv-dtype", choices=["auto", "float32", "float16"], default="auto",
                   help="KV-cache type (default: auto, fp16 for a model all on GGUF blocks as llama.cpp, "
                        "else the model's own)")
    s.add_argument("--max-step-tokens", type=_positive, default=512,
                   help="tokens computed per engine step, prefill chunks included (default: 512)")
    s.add_argument("--served-model-name", help="the model id clients send (default: the model file's name)")
    s.add_argument("--max-body-mb", type=_positive_float, default=4.0,
                   help="largest request body accepted, in MiB; larger ones get 413 (default: 4)")
    s.add_argument("--template-timeout", type=_positive_float, default=5.0,
                   help="seconds a chat template may take to render a request's messages (default: 5)")
    s.set_defaults(fn=cmd_serve)

    g = sub.add_parser("generate", help="stream a completion")
    g.add_argument("model", nargs="?", help=model_help)
    g.add_argument("-p", "--prompt", required=True)
    g.add_argument("-n", "--max-new-tokens", type=_positive, default=128)
    g.add_argument("--raw", action="store_true", help="no chat template")
    g.add_argument("--temperature", type=float, default=0.0, help="0 = greedy (default)")
    g.add_argument("--top-p", type=float, default=1.0)
    g.add_argument("--seed", type=int)
    g.add_argument("--device", default="cpu", help="cpu (default) or cuda")
    g.add_argument("--gguf-blocks", action="store_true",
                   help="GGUF: run the quantized layers on their blocks, not on an fp32 copy")
    g.set_defaults(fn=cmd_generate)

    i = sub.add_parser("info", help="what a model file or checkpoint holds")
    i.add_argument("model", nargs="?", help=model_help)
    i.add_argument("--json", action="store_true")
    i.set_defaults(fn=cmd_info)
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
