"""`modelpress compare`: every compression of one model, measured the same way, side by side.

    rows = compare(None, ["fp32", "nf4", "gptq-w4", "q4_k_m"], out="compare")   # the default model

Each method is a recipe (`recipe(name)`): a float dtype, a method config (modelpress.quantize), a
GGUF mix (written with formats/gguf_writer.py and run on its blocks), or the automatic per-tensor
mix (methods/auto.py). For each, one row: size on disk, bits per weight (all weights; linear
layers alone), ppl and its change against the original model, mean KL divergence of the
next-token distribution and top-1 agreement against the original (eval/divergence.py), decode
tokens/s, quantize seconds and peak memory.

Rows run one at a time, each in its own process, so that peak memory is the row's own and a crash
loses one row: forked from a server process that imported torch and transformers once (saving
each row ~5 s of imports) and has run no torch operation (so no thread pool is forked); `python -m
modelpress.eval.compare JOB` runs one row's job file by hand; a finished row is written to
OUT/rows/<method>-<key>.json, the key hashing the model file, the recipe, the texts and the
settings, so a rerun reuses it and computes only what is missing (`fresh=True`: everything).
"""
from __future__ import annotations

import dataclasses
import functools
import hashlib
import json
import multiprocessing
import os
import resource
import shutil
import sys
import time
import traceback
from pathlib import Path
from typing import Any

import torch
from gguf import GGUFReader
from safetensors.torch import load_file, save_file

from ..config import BaseConfig
from ..core.metrics import perplexity
from ..data import calibration_windows, load_text, read_text, tokenize, windows
from ..errors import ModelpressError
from ..formats.checkpoint import save
from ..formats.gguf_mixes import MIXES
from ..formats.gguf_writer import export_gguf
from ..methods import (
    AWQConfig,
    FP4Config,
    GPTQConfig,
    LLMInt8Config,
    MagnitudeConfig,
    NF4Config,
    RTNConfig,
    SparseGPTConfig,
    StructuredConfig,
    W8A8Config,
    WandaConfig,
)
from ..methods.auto import AutoConfig, allocate_for
from ..methods.qat import QATTrainConfig, qat_windows
from ..model.imatrix import compute_imatrix
from ..model.load import load, resolve
from ..model.walker import use_dense_kernels
from ..registry import quantize
from .divergence import Reference, divergence, reference
from .perplexity import perplexity_of_windows
from .recommend import recommend
from .report import write_reports
from .sensitivity import layer_sensitivity
from .size import disk_bytes, model_size
from .speed import decode_tokens_per_s

DEFAULT_METHODS = ("fp32", "bf16", "int8", "llm-int8", "w8a8-dyn", "nf4", "nf4-dq", "gptq-w4", "awq-w4",
                   "q4_k_m", "q5_k_m", "q8_0")
ROW_FORMAT = 6  # bump when a row's meaning changes: old cached rows no longer match


@dataclasses.dataclass(frozen=True)
class Recipe:
    """How one row's model is made: kind 'float' (dtype), 'config' (a method config's dict),
    'gguf' (mix, imatrix) or 'auto' (auto config dict)."""
    name: str
    kind: str
    args: dict[str, Any]

    @property
    def calibrated(self) -> bool:
        if self.kind == "qat":  # trains on the calibration windows
            return True
        if self.kind == "config":
            return BaseConfig.from_dict(self.args).calibrated
        return (self.kind == "gguf" and self.args["imatrix"]) or self.kind == "auto"


def _config_recipes() -> dict[str, Any]:
    table: dict[str, Any] = {
        "int8": RTNConfig(bits=8, group_size=None, symmetric=True),
        "llm-int8": LLMInt8Config(), "nf4": NF4Config(), "nf4-dq": NF4Config(double_quant=True),
        "fp4": FP4Config(), "fp4-dq": FP4Config(double_quant=True),
        # W8A8: static per-tensor activation scales, dynamic per-token ones, SmoothQuant's searched alpha
        "w8a8": W8A8Config(), "w8a8-dyn": W8A8Config(activations="dynamic"),
        "w8a8-sq": W8A8Config(smoothquant="search"),
    }
    # pruning (methods/prune.py): 50 % unstructured, 2:4 (packed: the values in the model's dtype and 2-bit
    # positions, the sparse kernel's speed), 2:4 with int4 codes in the same sweep; structured widths (with recovery) and depth
    table.update({"magnitude-50": MagnitudeConfig(), "wanda-50": WandaConfig(), "sparsegpt-50": SparseGPTConfig(),
                  "wanda-2:4": WandaConfig(pattern="2:4"), "sparsegpt-2:4": SparseGPTConfig(pattern="2:4"),
                  "sparsegpt-2:4-packed": SparseGPTConfig(pattern="2:4", pack=True),
                  "sparsegpt-2:4-w4": SparseGPTConfig(pattern="2:4", bits=4, group_size=64),
                  "prune-mlp25": StructuredConfig(mlp=0.25), "prune-mlp25-r30": StructuredConfig(mlp=0.25, recover=30),
                  "prune-heads33": StructuredConfig(mlp=0, heads=0.25), "prune-depth2": StructuredConfig(mlp=0, layers=2)})
    for bits in (2, 3, 4, 8):
        table[f"rtn-w{bits}"] = RTNConfig(bits=bits, group_size=64)
    for bits in (2, 3, 4, 8):  # GPTQ as llm-compressor runs it by default: act order, static groups
        table[f"gptq-w{bits}"] = GPTQConfig(bits=bits, group_size=64, act_order=True, static_groups=True)
        table[f"gptq-w{bits}-mse"] = GPTQConfig(bits=bits, group_size=64, act_order=True, static_groups=True,
                                                mse=True)
    for bits in (3, 4):  # the scale search replays 2 windows (quantize's default: 8): the slowest
        # default row in a quarter of the time; activation statistics and clip search use every window
        table[f"awq-w{bits}"] = AWQConfig(bits=bits, group_size=64, search_samples=2, batch_size=2)
    return table


# QAT rows: 25 steps of 2 calibration windows against the target's rounding (~7 s a step on the default
# model, 2 cores), then the target's own quantizer
QAT_ROWS: dict[str, Any] = {"qat-q4_0": "Q4_0", "qat-q4_k_m": "Q4_K_M", "qat-w4": RTNConfig(bits=4, group_size=64)}


def method_names() -> list[str]:
    """Every name `recipe` accepts (GGUF mixes also with '-imat': an imatrix from the calibration text)."""

    mixes = [m.lower() for m in MIXES if m not in ("F32",)]
    return (["fp32"] + list(_config_recipes()) + mixes + [f"{m}-imat" for m in mixes if m[0] == "q"]
            + list(QAT_ROWS)
            + ["auto-<bpw>", "auto-<gguf mix>", "auto-<bpw or mix>@<type>+<type>+..."])


def recipe(name: str) -> Recipe:
    """The recipe a method name stands for; an unknown name is a ModelpressError listing the known ones."""

    name = name.strip().lower()
    if name in ("fp32", "f32"):
        return Recipe("fp32", "float", {"dtype": "float32"})
    if name in ("bf16", "fp16", "f16"):
        return Recipe(name, "float", {"dtype": {"bf16": "bfloat16"}.get(name, "float16")})
    configs = _config_recipes()
    if name in configs:
        return Recipe(name, "config", configs[name].to_dict())
    if name in QAT_ROWS:  # QAT (methods/qat.py) on the calibration windows, then the target's quantizer
        target = QAT_ROWS[name]
        return Recipe(name, "qat", {"target": target if isinstance(target, str) else target.to_dict(),
                                    "steps": 25, "batch": 2, "lr": 5e-5})
    mix, _, imat = name.partition("-imat")
    if mix.upper() in MIXES and imat == "":
        return Recipe(name, "gguf", {"mix": mix.upper(), "imatrix": name.endswith("-imat")})
    if name.startswith("auto-"):
        target, _, formats = name[5:].partition("@")
        extra = {"formats": tuple(f.upper() for f in formats.split("+"))} if formats else {}
        try:
            try:
                cfg = AutoConfig(target_bpw=float(target), **extra)
            except ValueError as e:
                if target.upper() not in MIXES:
                    raise ValueError(str(e) if "formats" in str(e) else
                                     "give a bits-per-weight number or a GGUF mix after 'auto-' (auto-4.5, "
                                     "auto-q4_k_m; '@q4_0+q5_0+...' limits the formats)") from None
                cfg = AutoConfig(target_mix=target.upper(), **extra)
        except ValueError as e:
            raise ModelpressError(f"{name}: {e}") from None
        return Recipe(name, "auto", cfg.to_dict())
    raise ModelpressError(f"unknown method {name!r}; choose from: {', '.join(method_names())}")


# -- the data every row shares -----------------------------------------------------------------
@dataclasses.dataclass
class Setup:
    model: str | None          # None: the default model
    eval_text: str | None      # None: the default text (pydoc topics), else a file
    calib_text: str | None
    eval_windows: int = 8
    samples: int = 16          # calibration windows (GPTQ, AWQ, imatrix, auto)
    ctx: int = 512
    decode_tokens: int = 32
    other_text: str | None = None  # a file: every row's ppl on it too (out of domain: unlike the calibration)

    def key_fields(self) -> dict[str, Any]:
        def digest(text: str) -> str:
            return hashlib.sha256(text.encode()).hexdigest()[:16]

        return {"model": _file_identity(resolve(self.model)), "eval": digest(load_text(self.eval_text, "eval")),
                "calib": digest(load_text(self.calib_text, "calib")), "eval_windows": self.eval_windows,
                "samples": self.samples, "ctx": self.ctx, "decode_tokens": self.decode_tokens,
                **({"other": digest(read_text(self.other_text))} if self.other_text else {})}


def _file_identity(path: Path) -> str:
    """Path, sizes and modification times of the model's files: a changed model is a new key."""
    files = [path] if path.is_file() else sorted(p for p in path.rglob("*") if p.is_file())
    h = hashlib.sha256(str(path.resolve()).encode())
    for p in files:
        st = p.stat()
        h.update(f"{p.name}:{st.st_size}:{st.st_mtime_ns}".encode())
    return h.hexdigest()[:16]


def row_key(setup_key: dict[str, Any], r: Recipe) -> str:
    blob = json.dumps({"setup": setup_key, "recipe": dataclasses.asdict(r), "row_format": ROW_FORMAT},
                      sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()[:12]


def _write_json(path: Path, data: Any) -> None:
    tmp = path.with_name(path.name + ".part")
    tmp.write_text(json.dumps(data, indent=2) + "\n")
    os.replace(tmp, path)


# -- one row ------------------------------------------------------------------------------------
def _peak_rss() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux: kilobytes


def _gguf_sizes(path: Path) -> dict[str, float]:
    """Bits per weight of a GGUF file's tensors: all of them, and the blocks' linear weights."""
    total_b = total_n = lin_b = lin_n = 0
    for t in GGUFReader(str(path)).tensors:
        b, n = int(t.n_bytes), int(t.n_elements)
        total_b, total_n = total_b + b, total_n + n
        if t.name.startswith("blk.") and len(t.shape) == 2:
            lin_b, lin_n = lin_b + b, lin_n + n
    return {"bits_per_weight": 8 * total_b / total_n, "linear_bits_per_weight": 8 * lin_b / lin_n}


def source_format(model: str | None) -> str | None:
    """The block type most decoder weights of a GGUF original are stored in (Q4_1 for the default model), or
    None for a float original (a folder, or a GGUF of F32 / F16 / BF16 weights). The reference is that file
    dequantized: a row of the same type re-quantizes it exactly, so the report says so."""
    path = resolve(model)
    if not path.is_file():
        return None
    kinds: dict[str, int] = {}
    for t in GGUFReader(str(path)).tensors:
        if t.name.startswith("blk.") and len(t.shape) == 2:
            kinds[t.tensor_type.name] = kinds.get(t.tensor_type.name, 0) + int(t.n_elements)
    kind = max(kinds, key=kinds.get) if kinds else None
    return None if kind in (None, "F32", "F16", "BF16") else kind


def build(r: Recipe, model: torch.nn.Module, tok: Any, calib: list[torch.Tensor] | None,
          work: Path) -> tuple[torch.nn.Module, dict[str, Any]]:
    """Make the row's model from the loaded original; returns (model, facts: size on disk, bits per
    weight, quantize seconds: the method alone, or writing the GGUF file with its imatrix / auto
    allocation, not saving or reloading)."""

    start = time.perf_counter()
    if r.kind == "qat":
        target = r.args["target"]
        target = target if isinstance(target, str) else BaseConfig.from_dict(target)
        qat_windows(model, target, calib, QATTrainConfig(steps=r.args["steps"], batch=r.args["batch"], lr=r.args["lr"]),
                    progress=False)
        if isinstance(target, str):  # written and measured as the GGUF row of that mix
            r = Recipe(r.name, "gguf", {"mix": target, "imatrix": False})
        else:
            r = Recipe(r.name, "config", target.to_dict())
            calib = None  # RTN: the trained weights rounded as they trained
    if r.kind in ("gguf", "auto"):
        path = work / f"{r.name}.gguf"
        _write_gguf_row(r, model, tok, calib, path)
        seconds = time.perf_counter() - start

        q, _ = load(path, keep_blocks=True)
        facts = {"size_bytes": path.stat().st_size, **_gguf_sizes(path), "quantize_seconds": seconds}
        path.unlink()
        return q, facts
    if r.kind == "float":
        model = use_dense_kernels(model.to(getattr(torch, r.args["dtype"])))  # decode on the same kernels
    else:
        model = quantize(model, BaseConfig.from_dict(r.args), calib)
    seconds = time.perf_counter() - start
    size = model_size(model)
    tmp = work / f"{r.name}.checkpoint"
    save(model, tok, tmp)
    facts = {"size_bytes": disk_bytes(tmp), "bits_per_weight": size.bits_per_weight,
             "linear_bits_per_weight": size.linear_bits_per_weight, "quantize_seconds": seconds}
    shutil.rmtree(tmp, ignore_errors=True)
    return model, facts


def _write_gguf_row(r: Recipe, model: torch.nn.Module, tok: Any, calib: list[torch.Tensor] | None,
                    path: Path) -> None:
    if r.kind == "auto":
        plan = allocate_for(model, BaseConfig.from_dict(r.args), calib)
        export_gguf(model, tok, path, plan.file_type, imatrix=plan.importance, types=plan.types)
        return
    importance = None
    if r.args["imatrix"]:
        importance = compute_imatrix(model, calib).importance()
    export_gguf(model, tok, path, r.args["mix"], imatrix=importance, progress=False)


def measure(r: Recipe, setup: Setup, eval_ids: torch.Tensor, calib_ids: torch.Tensor | None,
            ref: Any, work: Path, progress: bool = True, other: dict[str, torch.Tensor] | None = None) -> dict[str, Any]:
    """Load the model, make the row's version of it, and measure it. `ref`: the Reference, or a
    function reading it (called after the peak memory of load + quantize is taken). `other`: the other
    text's windows ("other") and the original's ppl on them ("other_ref_ppl")."""

    model, tok = load(setup.model)
    model, facts = build(r, model, tok, None if calib_ids is None else list(calib_ids), work)
    peak = _peak_rss()
    ref = ref() if callable(ref) else ref  # read after the peak: the reference is not the method's memory
    d = divergence(model, eval_ids, ref, progress=progress)
    ref_nll = ref.nll
    tps = decode_tokens_per_s(model, tok, setup.decode_tokens, progress=False)
    extra = {}
    if other:
        o = perplexity_of_windows(model, other["other"], progress=False)
        extra = {"ppl_other": o.ppl, "ppl_other_change_pct": 100 * (o.ppl / float(other["other_ref_ppl"]) - 1)}
    return {**extra, "method": r.name, "recipe": dataclasses.asdict(r), **facts, "ppl": d.ppl, "ppl_stderr": d.ppl_stderr,
            "kl_mean": d.kl_mean, "kl_stderr": d.kl_stderr,
            "kl_p99": d.kl_p99, "top1_agreement": d.top1_agreement, "tokens_scored": d.tokens_scored,
            "decode_tokens_per_s": tps, "peak_rss_bytes": peak,
            "eval_seconds": d.seconds, "reference_ppl": perplexity(ref_nll, d.tokens_scored),
            "ppl_change_pct": 100 * (d.ppl / perplexity(ref_nll, d.tokens_scored) - 1)}


def _worker(job_path: str) -> int:
    """A row in its own process: reads the job file, writes the row file."""
    job = json.loads(Path(job_path).read_text())
    setup = Setup(**job["setup"])
    r = Recipe(**job["recipe"])
    ids = load_file(job["ids"])
    row = measure(r, setup, ids["eval"], ids.get("calib"), lambda: Reference.from_tensors(load_file(job["ref"])),
                  Path(job["work"]), other=ids if "other" in ids else None)
    row["key"] = job["key"]
    _write_json(Path(job["row"]), row)
    return 0


# -- the whole comparison ------------------------------------------------------------------------
def compare(model: str | None = None, methods: list[str] | tuple[str, ...] = DEFAULT_METHODS,
            out: str | Path = "compare", text: str | None = None, calib: str | None = None,
            eval_windows: int = 8, samples: int = 16, ctx: int = 512, decode_tokens: int = 32,
            fresh: bool = False, isolate: bool = True, progress: bool = True,
            limits: dict[str, Any] | None = None, other_text: str | None = None) -> dict[str, Any]:
    """Measure every method in `methods` on `model` (default: the embedded default model) and write
    OUT/results.json, OUT/report.md, OUT/pareto.png, OUT/speed.png and OUT/report.html. Returns the results.
    `limits` (eval/recommend.py: max_size_mb, max_ppl_increase, min_tokens_per_s, runtime) choose the
    recommendation the report opens with. `other_text`: a file every row is also evaluated on (out of
    domain: a text unlike the calibration), beside the evaluation text."""

    recipes = [recipe(m) for m in methods]
    if len({r.name for r in recipes}) != len(recipes):
        raise ModelpressError("a method is named twice in --methods")
    setup = Setup(model, text, calib, eval_windows, samples, ctx, decode_tokens, other_text)
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise ModelpressError(f"{out} is a file; --out must be a folder")
    skey = setup.key_fields()  # also checks the texts and the model path before anything runs
    rows_dir, work = out / "rows", out / "work"
    rows_dir.mkdir(parents=True, exist_ok=True)
    work.mkdir(exist_ok=True)
    keys = {r.name: row_key(skey, r) for r in recipes}
    paths = {r.name: rows_dir / f"{r.name}-{keys[r.name]}.json" for r in recipes}
    todo = [r for r in recipes if fresh or not paths[r.name].is_file()]
    say = _say if progress else (lambda *a: None)
    say(f"compare: {len(recipes)} methods, {len(recipes) - len(todo)} reused from {rows_dir}, {len(todo)} to run")
    data = _shared_data(setup, skey, work, any(r.calibrated for r in todo), bool(todo), say)
    failed: dict[str, str] = {}
    for i, r in enumerate(todo, 1):
        left = ", ".join(x.name for x in todo[i:]) or "nothing"
        say(f"[{i}/{len(todo)}] {r.name}: running (left after it: {left})")
        start = time.perf_counter()
        try:
            err = _run_row(r, setup, keys[r.name], paths[r.name], data, work, isolate, progress)
        except KeyboardInterrupt:
            say(f"interrupted during {r.name}; the finished rows are kept in {rows_dir}: rerun the same "
                "command to measure only what is missing")
            raise
        if err:
            failed[r.name] = err
            say(f"[{i}/{len(todo)}] {r.name}: FAILED after {time.perf_counter() - start:.0f} s: {err}")
        else:
            row = json.loads(paths[r.name].read_text())
            say(f"[{i}/{len(todo)}] {r.name}: ppl {row['ppl']:.4f}, KL {row['kl_mean']:.4f}, "
                f"{row['size_bytes'] / 1e6:.1f} MB, {time.perf_counter() - start:.0f} s")
    rows = [json.loads(paths[r.name].read_text()) for r in recipes if r.name not in failed]
    results = {"model": str(model or "default: SmolLM2-135M-Instruct"), "settings": dataclasses.asdict(setup),
               "key": skey, "reference_ppl": rows[0]["reference_ppl"] if rows else None, "rows": rows,
               "failed": failed, "source_format": source_format(model)}
    results["recommendation"] = recommend(rows, model, **(limits or {})) if rows else []
    results["sensitivity"] = _sensitivity(setup, skey, out, say) if rows else {}
    write_reports(out, results)
    if not failed:
        shutil.rmtree(work, ignore_errors=True)  # the reference log-probs are large; rows are kept
    return results


def _tag(skey: dict[str, Any]) -> str:
    """A short digest of the settings that shared files (reference log-probs, sensitivities) were made with."""
    return hashlib.sha256(json.dumps(skey, sort_keys=True).encode()).hexdigest()[:12]


def _sensitivity(setup: Setup, skey: dict[str, Any], out: Path, say: Any) -> dict[str, float]:
    """Every decoder linear layer's predicted KL in 4 bits (eval/sensitivity.py) on the calibration windows,
    kept in OUT/sensitivity.json for the same model and texts."""
    path, tag = out / "sensitivity.json", _tag(skey)
    if path.is_file():
        kept = json.loads(path.read_text())
        if kept.get("key") == tag:
            return kept["layers"]
    say("measuring each layer's sensitivity (Fisher information on 4 calibration windows)")
    model, tok = load(setup.model)
    sens = layer_sensitivity(model, calibration_windows(tok, setup.calib_text, setup.ctx, min(setup.samples, 4)))
    _write_json(path, {"key": tag, "layers": sens})
    return sens


def _say(msg: str) -> None:
    print(f"modelpress: {msg}", file=sys.stderr, flush=True)


def _shared_data(setup: Setup, skey: dict[str, Any], work: Path, need_calib: bool, need_ref: bool,
                 say: Any) -> dict[str, Any]:
    """Token windows and the original model's log-probs, in files the row processes read."""
    data: dict[str, Any] = {"ids": work / "ids.safetensors", "ref": work / "reference.safetensors"}
    tag = _tag(skey)
    stamp = work / "reference.key"
    if not need_ref or (stamp.is_file() and stamp.read_text() == tag and data["ref"].is_file()):
        return data
    say("loading the model and computing its reference log-probs")
    model, tok = load(setup.model)
    ids = {"eval": windows(tokenize(tok, load_text(setup.eval_text, "eval")), setup.ctx, setup.eval_windows)}
    ids["calib"] = windows(tokenize(tok, load_text(setup.calib_text, "calib")), setup.ctx, setup.samples)
    if setup.other_text:
        ids["other"] = windows(tokenize(tok, read_text(setup.other_text)), setup.ctx, setup.eval_windows)
        ids["other_ref_ppl"] = torch.tensor(perplexity_of_windows(model, ids["other"], progress=False).ppl)
    save_file({k: v.contiguous() for k, v in ids.items()}, str(data["ids"]))
    save_file(reference(model, ids["eval"]).tensors(), str(data["ref"]))
    stamp.write_text(tag)
    return data


def _run_row(r: Recipe, setup: Setup, key: str, path: Path, data: dict[str, Any], work: Path, isolate: bool,
             progress: bool) -> str | None:
    """Run one row; None when its file was written, else what went wrong."""
    job = {"setup": dataclasses.asdict(setup), "recipe": dataclasses.asdict(r), "key": key, "row": str(path),
           "ids": str(data["ids"]), "ref": str(data["ref"]), "work": str(work)}
    if not isolate:
        ids = load_file(str(data["ids"]))
        row = measure(r, setup, ids["eval"], ids.get("calib"), Reference.from_tensors(load_file(str(data["ref"]))),
                      work, progress, other=ids if "other" in ids else None)
        _write_json(path, {**row, "key": key})
        return None
    job_path, error = work / f"{r.name}.job.json", work / f"{r.name}.error.txt"
    _write_json(job_path, job)
    error.unlink(missing_ok=True)
    proc = _row_processes().Process(target=_child, args=(str(job_path), str(error), progress), name=r.name)
    proc.start()
    try:
        proc.join()
    finally:
        if proc.is_alive():  # interrupted: the row goes with the parent
            proc.terminate()
            proc.join()
    if proc.exitcode != 0 or not path.is_file():
        tail = error.read_text().strip().splitlines() if error.is_file() else []
        return tail[-1] if tail else f"exit status {proc.exitcode} (its output is above)"
    return None


# what every row imports: loaded once into the fork server, before any torch operation runs
_PRELOAD = ["torch", "safetensors.torch", "transformers", "transformers.models.llama.modeling_llama",
            "modelpress.eval.compare", "modelpress.eval.divergence", "modelpress.model.load",
            "modelpress.model.gguf_model", "modelpress.methods"]


@functools.cache
def _row_processes() -> Any:
    ctx = multiprocessing.get_context("forkserver")
    ctx.set_forkserver_preload(_PRELOAD)
    return ctx


def _child(job_path: str, error_path: str, progress: bool) -> None:
    """A row in a forked process. What went wrong goes to `error_path` (the parent prints its last
    line): a user's mistake as its message, a bug as its traceback (also shown on stderr)."""
    if not progress:
        os.dup2(os.open(os.devnull, os.O_WRONLY), 2)
    try:
        _worker(job_path)
    except KeyboardInterrupt:  # Ctrl-C reaches the whole process group: the parent reports it
        sys.exit(130)
    except ModelpressError as e:
        Path(error_path).write_text(str(e))
        sys.exit(1)
    except BaseException:
        Path(error_path).write_text(traceback.format_exc())
        raise


if __name__ == "__main__":
    sys.exit(_worker(sys.argv[1]))
