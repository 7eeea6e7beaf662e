"""Calibrate one decoder block at a time (the sequential pipeline of GPTQ, AWQ, llm-compressor):

 1. capture the inputs of block 0 for every calibration batch (the model runs up to block 0 and
    stops there; the keyword arguments the model gives its blocks - rotary embeddings, mask - are
    kept with them);
 2. for each block: `compress(index, block, run)` gathers statistics by calling `run()` (the block
    on every batch, outputs dropped) under its hooks, and replaces the block's layers;
 3. the compressed block runs once more on every batch; its outputs are the next block's inputs
    (unless `compress` returns them itself: model/stages.py computes them on the way).
Only one block's inputs and outputs live at a time, besides the model. Works with any
transformers decoder whose `model.model.layers` holds the blocks.

    stats = run_sequential(model, windows, compress, batch_size=8)
"""
from __future__ import annotations

import dataclasses
import resource
import sys
import time
from typing import Any, Callable

import torch
from tqdm.auto import tqdm

from ..errors import ModelpressError
from .walker import iter_targets


class _Stop(Exception):
    pass


@dataclasses.dataclass
class BlockInputs:
    hidden: list[torch.Tensor]          # one (B, T, H) tensor per batch
    kwargs: list[dict[str, Any]]        # what the model passed each block, per batch


@dataclasses.dataclass
class SequentialStats:
    blocks: int
    seconds: float
    peak_rss_bytes: int                 # the process' peak resident memory so far


def blocks_of(model: torch.nn.Module) -> torch.nn.ModuleList:
    inner = getattr(model, "model", None)
    layers = getattr(inner, "layers", None)
    if not isinstance(layers, torch.nn.ModuleList):
        raise ModelpressError(f"{type(model).__name__} keeps no decoder blocks in model.layers; "
                              "block-by-block calibration supports transformers decoder models")
    return layers


def block_targets(model: torch.nn.Module, config: Any, calib: Any) -> dict[int, dict[str, torch.nn.Module]]:
    """{id(block): {name inside the block: linear}} for the layers `config` targets, checking that
    there is calibration text and that every target lies inside a decoder block."""

    if not calib:
        raise ModelpressError(f"{config.method} needs calibration text (windows of token ids)")
    targets = dict(iter_targets(model, config.targets, config.ignore))
    out: dict[int, dict[str, torch.nn.Module]] = {}
    for i, block in enumerate(blocks_of(model)):
        prefix = f"model.layers.{i}."
        out[id(block)] = {f[len(prefix):]: m for f, m in targets.items() if f.startswith(prefix)}
    inside = sum(len(v) for v in out.values())
    if inside != len(targets):
        outside = next(f for f in targets if not f.startswith("model.layers."))
        raise ModelpressError(f"{config.method} quantizes the decoder blocks' layers; {outside} lies outside them")
    return out


@torch.no_grad()
def capture_inputs(model: torch.nn.Module, windows: list[torch.Tensor], batch_size: int) -> BlockInputs:
    """Inputs of block 0 for each batch of calibration windows (equal lengths per batch)."""
    first = blocks_of(model)[0]
    got = BlockInputs([], [])

    def pre_hook(module: torch.nn.Module, args: tuple, kwargs: dict) -> None:
        got.hidden.append(args[0] if args else kwargs.pop("hidden_states"))
        got.kwargs.append({k: v for k, v in kwargs.items() if k != "hidden_states"})
        raise _Stop

    handle = first.register_forward_pre_hook(pre_hook, with_kwargs=True)
    try:
        for i in range(0, len(windows), batch_size):
            batch = torch.stack(windows[i:i + batch_size]) if isinstance(windows, list) else windows[i:i + batch_size]
            try:
                model.model(input_ids=batch, use_cache=False)
            except _Stop:
                pass
    finally:
        handle.remove()
    return got


def _out(y: Any) -> torch.Tensor:
    return y[0] if isinstance(y, tuple) else y


@torch.no_grad()
def run_block(block: torch.nn.Module, inputs: BlockInputs, keep: bool = True,
              stop_at: torch.nn.Module | None = None) -> list[torch.Tensor]:
    """The block on every batch; its outputs (or none, when only hooks need the pass). With
    `stop_at`, each batch stops as that module is called (after the hooks registered before this
    call have seen its input): a statistics pass need not compute the last layer's output."""
    handle = None
    if stop_at is not None:
        def stop(module: torch.nn.Module, args: tuple) -> None:
            raise _Stop
        handle = stop_at.register_forward_pre_hook(stop)
    outs = []
    try:
        for h, kw in zip(inputs.hidden, inputs.kwargs):
            try:
                y = _out(block(h, **kw))
            except _Stop:
                continue
            if keep:
                outs.append(y)
    finally:
        if handle is not None:
            handle.remove()
    return outs


def peak_rss_bytes() -> int:
    kb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return kb if sys.platform == "darwin" else kb * 1024


class BlockRun:
    """What `compress` gets: `run(stop_at=None)` runs the block on every batch for the hooks
    (`stop_at` may name the block's last module, to skip computing its output); `inputs` are the
    block's inputs, for a method that runs the block its own way."""

    def __init__(self, block: torch.nn.Module, inputs: BlockInputs) -> None:
        self.block, self.inputs = block, inputs

    def __call__(self, stop_at: torch.nn.Module | None = None) -> None:
        run_block(self.block, self.inputs, keep=False, stop_at=stop_at)


def run_sequential(model: torch.nn.Module, windows: list[torch.Tensor],
                   compress: Callable[[int, torch.nn.Module, BlockRun], list[torch.Tensor] | None],
                   batch_size: int = 8, desc: str = "calibrate") -> SequentialStats:
    """Steps 1-3 of the module docstring; `compress(i, block, run)` does step 2 for block i and
    may return the compressed block's outputs on every batch (then step 3 is skipped)."""
    start = time.perf_counter()
    blocks = blocks_of(model)
    inputs = capture_inputs(model, windows, batch_size)
    for i, block in enumerate(tqdm(blocks, desc=desc, unit="block", leave=False)):
        outs = compress(i, block, BlockRun(block, inputs))
        inputs = BlockInputs(run_block(block, inputs) if outs is None else outs, inputs.kwargs)
    return SequentialStats(len(blocks), time.perf_counter() - start, peak_rss_bytes())
