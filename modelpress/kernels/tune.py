"""Kernel auto-tuning, as TensorRT's builder does it: for each layer shape, time every variant of the
W8A8 product this machine has, keep the fastest, and remember the choice in a timing cache.

Variants (kernels/gemm_int8.c; every one gives the same numbers, so the choice is by time alone):
    tile      rows x 16-column blocks per register tile (ops.w8a8_tiles: "8x2", "1x8", ...)
    order     column tiles outermost ("cols": a thread keeps its weights in cache) or rows ("rows")
    threads   OpenMP threads: all of them, or fewer (small layers lose time waking workers)
    torch     torch._int_mm on the same int8 activations (the fallback), same epilogue
A variant's name: "2x4/cols/t0" (t0: all threads) or "torch._int_mm".

The cache is one JSON file per CPU model and kernel build (a rebuilt kernel or another processor
starts afresh), under $XDG_CACHE_HOME/modelpress/tuning, written under a temporary name and renamed:
    {"cpu": ..., "build": ..., "entries": {"w8a8 576x1536 m512": {"choice": "2x4/cols/t0",
                                                                   "us": {variant: microseconds}}}}
Rows are bucketed (ROW_BUCKETS: decode, small batches, prefill chunks); a call with m rows uses the
choice of the smallest bucket >= m. W8A8Linear asks `choice(k, n, m)` at every call: a dict lookup.

    modelpress tune [MODEL]    times the model's linear shapes and fills the cache
"""
from __future__ import annotations

import functools
import json
import os
import re
import time
import uuid
from pathlib import Path
from typing import Callable, Iterable

import torch
from tqdm.auto import tqdm

from ..core.grids import activation_scales
from . import build_id, cache_dir, cpu_name, lib, ops

ROW_BUCKETS = (1, 8, 64, 512)
TORCH = "torch._int_mm"
DEFAULT = "default"  # the untuned call: tile 0, column tiles outermost, all threads (default_name())
BUDGET_S = 0.02  # seconds per timed batch of calls
_cache: dict | None = None
_enabled = os.environ.get("MODELPRESS_NO_TUNING") != "1"


def bucket(m: int) -> int:
    return next((b for b in ROW_BUCKETS if m <= b), ROW_BUCKETS[-1])


def key(k: int, n: int, m: int) -> str:
    return f"w8a8 {k}x{n} m{bucket(m)}"


def cache_path() -> Path:
    slug = re.sub(r"[^A-Za-z0-9]+", "-", cpu_name()).strip("-")[:80]
    return cache_dir().parent / "tuning" / f"{slug}-{build_id() or 'nobuild'}.json"


def _load() -> dict:
    global _cache
    if _cache is None:
        try:
            _cache = json.loads(cache_path().read_text())["entries"]
        except (OSError, ValueError, KeyError):
            _cache = {}
    return _cache


def _save() -> Path:
    path = cache_path()
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{uuid.uuid4().hex[:8]}")
    tmp.write_text(json.dumps({"cpu": cpu_name(), "build": build_id(), "entries": _load()}, indent=1) + "\n")
    os.replace(tmp, path)
    return path


def set_enabled(on: bool) -> None:
    """Use the cache's choices (the default) or the untuned call (benchmarks measure both)."""
    global _enabled
    _enabled = on


@functools.lru_cache(maxsize=None)
def parse(name: str) -> tuple[int, int] | None:
    """(variant, threads) for gemm_int8.c from a variant's name; None for torch._int_mm."""
    if name == TORCH:
        return None
    if name == DEFAULT:
        return 0, 0
    tile, order, threads = name.split("/")
    return ops.w8a8_tiles(lib()).index(tile) + (ops.W8A8_ROWS_OUTER if order == "rows" else 0), int(threads[1:])


def default_name() -> str:
    return f"{ops.w8a8_tiles(lib())[0]}/cols/t0"


def choice(k: int, n: int, m: int) -> str | None:
    """The cached variant's name for this shape, or None (not tuned, or tuning switched off)."""
    if not _enabled:
        return None
    entry = _load().get(key(k, n, m))
    return entry["choice"] if entry else None


def variants(threads: int | None = None) -> list[str]:
    """Every variant name of the loaded build: tiles x orders x thread counts, then torch._int_mm."""
    most = threads or torch.get_num_threads()
    counts = sorted({0, *(t for t in (1, most // 2) if 0 < t < most)})
    return [f"{tile}/{order}/t{t}" for tile in ops.w8a8_tiles(lib()) for order in ("cols", "rows") for t in counts
            ] + [TORCH]


def _time(fn: Callable[[], object], repeats: int = 5) -> float:
    """Seconds per call: the fastest of `repeats` batches of calls, each batch about BUDGET_S long."""
    budget_s = BUDGET_S
    fn()
    t0 = time.perf_counter()
    fn()
    reps = max(1, int(budget_s / max(time.perf_counter() - t0, 1e-7)))
    best = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        for _ in range(reps):
            fn()
        best = min(best, (time.perf_counter() - t0) / reps)
    return best


def run_variant(name: str, x: torch.Tensor, w: torch.Tensor, packed: torch.Tensor, colsum: torch.Tensor,
                ws: torch.Tensor, bias: torch.Tensor | None, mode: str, xs: torch.Tensor | None) -> torch.Tensor:
    """One W8A8 product of x (m, k) by the named variant (w: the int8 weights (n, k), for torch)."""
    parsed = parse(name)
    if parsed is not None:
        return ops.w8a8_linear(lib(), x, packed, colsum, ws.contiguous(), bias, w.shape[0], mode, xs,
                               variant=parsed[0], threads=parsed[1])
    s = activation_scales(x, mode, xs if mode == "static" else None)
    q = torch.round(x / s[:, None]).clamp(-128, 127).to(torch.int8)
    y = torch._int_mm(q, w.t()).float() * (s[:, None] * ws[None, :])
    return y if bias is None else y + bias


def tune_shape(k: int, n: int, m: int) -> dict:
    """Times every variant on random data of this shape; stores and returns the cache entry."""
    gen = torch.Generator().manual_seed(k * 31 + n)
    w = torch.randint(-127, 128, (n, k), generator=gen, dtype=torch.int8)
    x, ws = torch.randn(m, k, generator=gen), torch.rand(n, generator=gen) / 100
    packed, colsum = ops.w8a8_pack(lib(), w)
    us = {name: round(_time(lambda name=name: run_variant(name, x, w, packed, colsum, ws, None, "token", None))
                      * 1e6, 2) for name in variants()}
    entry = {"choice": min(us, key=us.__getitem__), "us": us}
    _load()[key(k, n, m)] = entry
    return entry


def tune(shapes: Iterable[tuple[int, int]], rows: Iterable[int] = ROW_BUCKETS, force: bool = False,
         progress: bool = False) -> tuple[list[dict], Path]:
    """Tunes each (in, out) shape at each row bucket not yet in the cache (all of them with force);
    returns the table (one row per shape and bucket) and the cache file written."""
    if lib() is None:
        raise RuntimeError("the CPU kernels are not available here (no C compiler?): there is nothing to tune")
    todo = sorted({(k, n, bucket(m)) for k, n in shapes for m in rows})
    table = []
    for k, n, m in tqdm(todo, desc="tune", unit="shape", disable=not progress, leave=False):
        entry = _load().get(key(k, n, m))
        timed = force or entry is None
        if timed:
            entry = tune_shape(k, n, m)
        table.append(row(k, n, m, entry, timed))
    return table, _save()


def row(k: int, n: int, m: int, entry: dict, timed: bool = False) -> dict:
    """One line of the tuner's table: the shape, how many variants were timed, the choice, its gain."""
    us, best = entry["us"], entry["choice"]
    return {"shape": f"{k}x{n}", "rows": m, "variants": len(us), "choice": best, "default_us": us[default_name()],
            "best_us": us[best], "gain": round(us[default_name()] / us[best], 3), "timed_now": timed}


def describe_cache() -> list[dict]:
    """Every choice the cache holds, as the tuner's table rows (`modelpress info --tuning`)."""
    out = []
    for name, entry in sorted(_load().items()):
        shape, rows = name.split()[1:]
        k, n = map(int, shape.split("x"))
        out.append(row(k, n, int(rows[1:]), entry))
    return sorted(out, key=lambda r: (*map(int, r["shape"].split("x")), r["rows"]))
