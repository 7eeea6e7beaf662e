"""compare's recommendation: the row that meets the user's limits best, in one sentence, with the command
that makes it (issue 27).

Limits: size on disk (MB), ppl increase over the original (%), batch-1 decode tokens/s, and the
runtime the model will be served on (the rows that runtime loads: llama.cpp the GGUF files; vLLM the
GPTQ / AWQ / int8 / W8A8 checkpoints (compressed-tensors) and float; transformers float, bitsandbytes
NF4 / FP4 / LLM.int8, GPTQ and AWQ; modelpress every row). Among the rows within them: the smallest,
then the fastest, then the most accurate. Without limits: each runtime's pick within a 10 % ppl
increase (DEFAULT_PPL_INCREASE).
"""
from __future__ import annotations

import dataclasses
from typing import Any

from ..config import BaseConfig

DEFAULT_PPL_INCREASE = 10.0
RUNTIMES = ("llama.cpp", "vllm", "transformers", "modelpress")
_VLLM = {"gptq", "awq", "w8a8", "rtn", "sparsegpt"}   # rtn, sparsegpt + bits: compressed-tensors / GPTQ layout
_TRANSFORMERS = {"nf4", "fp4", "int8", "gptq", "awq", "rtn", "sparsegpt"}  # int8: LLM.int8 (bitsandbytes)
_FLOAT = {"magnitude", "wanda", "structured"}             # pruned, still float: every runtime


def runtimes_of(row: dict[str, Any]) -> set[str]:
    """The runtimes that load what this row writes."""
    recipe = row.get("recipe") or {}
    kind, args = recipe.get("kind"), recipe.get("args") or {}
    if kind in ("gguf", "auto") or (kind == "qat" and isinstance(args.get("target"), str)):
        return {"llama.cpp", "modelpress"}
    if kind == "float":
        return set(RUNTIMES)
    method = args.get("method") if kind == "config" else (args.get("target") or {}).get("method")
    if args.get("pack"):  # 2:4 packed values and positions: modelpress' own layer
        return {"modelpress"}
    if method in _FLOAT or (method == "sparsegpt" and args.get("bits") is None):
        return set(RUNTIMES)
    out = {"modelpress"}
    if method in _VLLM:
        out.add("vllm")
    if method in _TRANSFORMERS:
        out.add("transformers")
    return out


def config_flags(args: dict[str, Any]) -> str:
    """The command-line flags of a method config's to_dict(): bits, group size and sparsity, and the other
    options that differ from the defaults (None as the option's own word: channel, none, unstructured;
    booleans as --x / --no-x)."""
    cfg = BaseConfig.from_dict(args)
    default = type(cfg)()
    out = []
    for f in dataclasses.fields(cfg):
        v = getattr(cfg, f.name)
        if f.name in ("targets", "ignore", "batch_size", "search_samples") or (
                v == getattr(default, f.name) and f.name not in ("bits", "group_size", "sparsity")):
            continue
        flag = "--" + f.name.replace("_", "-")
        if isinstance(v, bool):
            out.append(flag if v else "--no-" + f.name.replace("_", "-"))
        else:
            out.append(f"{flag} {f.metadata.get('none', 'none') if v is None else v}")
    return " ".join(out)


def command(row: dict[str, Any], model: str | None) -> str:
    """The modelpress command that makes this row's file."""
    name, recipe = row["method"], row.get("recipe") or {}
    kind, args = recipe.get("kind"), recipe.get("args") or {}
    src = f"{model} " if model else ""
    if kind == "gguf":
        calib = " --calib my.txt" if args.get("imatrix") else ""
        return f"modelpress export {src}--type {args['mix']}{calib} --out {name}.gguf"
    if kind == "qat":
        target = args["target"]
        how = f"--type {target}" if isinstance(target, str) else f"--method {target['method']} --bits {target['bits']}"
        out = f"{name}.gguf" if isinstance(target, str) else name
        return f"modelpress qat {src}{how} --calib my.txt --steps {args['steps']} --out {out}"
    if kind == "auto":
        target = f"--target-mix {args['target_mix']}" if args.get("target_mix") else f"--target-bpw {args['target_bpw']}"
        return f"modelpress quantize {src}--method auto {target} --format gguf --calib my.txt --out {name}.gguf"
    if kind == "config":
        flags = config_flags(args)
        verb = "prune" if args.get("method") in ("magnitude", "wanda", "sparsegpt", "structured") else "quantize"
        return f"modelpress {verb} {src}--method {args.get('method')} {flags} --out {name}".replace("  ", " ")
    return f"modelpress eval {src}(the original, {name})"


def _pick(rows: list[dict[str, Any]]) -> dict[str, Any] | None:
    return min(rows, key=lambda r: (r["size_bytes"], -(r.get("decode_tokens_per_s") or 0), r["ppl"]), default=None)


def recommend(rows: list[dict[str, Any]], model: str | None = None, max_size_mb: float | None = None,
              max_ppl_increase: float | None = None, min_tokens_per_s: float | None = None,
              runtime: str | None = None) -> list[str]:
    """One sentence per recommendation (the limits given: one; none: one per runtime)."""
    if runtime is not None and runtime not in RUNTIMES:
        raise ValueError(f"runtime must be one of {', '.join(RUNTIMES)}, not {runtime!r}")
    given = any(v is not None for v in (max_size_mb, max_ppl_increase, min_tokens_per_s, runtime))
    limit = DEFAULT_PPL_INCREASE if max_ppl_increase is None else max_ppl_increase

    def fits(r: dict[str, Any], rt: str | None) -> bool:
        return ((max_size_mb is None or r["size_bytes"] / 1e6 <= max_size_mb)
                and r.get("ppl_change_pct", 0.0) <= limit
                and (min_tokens_per_s is None or (r.get("decode_tokens_per_s") or 0) >= min_tokens_per_s)
                and (rt is None or rt in runtimes_of(r)))

    limits = ", ".join(x for x in (f"at most {max_size_mb:g} MB" if max_size_mb is not None else "",
                                   f"ppl at most {limit:g} % above the original",
                                   f"at least {min_tokens_per_s:g} tokens/s" if min_tokens_per_s is not None else "")
                       if x)
    out = []
    for rt in ([runtime] if given else RUNTIMES):
        best = _pick([r for r in rows if fits(r, rt)])
        where = f" that {rt} runs" if rt else ""
        if best is None:
            out.append(f"No row meets the limits ({limits}){where}: relax one of them.")
            continue
        out.append(f"**{best['method']}**{' for ' + rt if rt and not given else ''}: {best['size_bytes'] / 1e6:.1f} MB, "
                   f"ppl {best['ppl']:.2f} ({best.get('ppl_change_pct', 0.0):+.1f} %), "
                   f"{best.get('decode_tokens_per_s') or 0:.0f} tokens/s: the smallest row{where} within {limits} "
                   f"(then the fastest, then the most accurate). Make it: `{command(best, model)}`")
    return out
