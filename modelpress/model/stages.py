"""True-sequential calibration of a pre-norm residual decoder block (Llama, Mistral, Qwen2, ...:
r = h + self_attn(input_layernorm(h)); out = r + mlp(post_attention_layernorm(r))), run in
stages over all calibration batches, keeping the intermediate tensors, so that every linear
layer's input is computed once, from the layers before it already compressed:

  stage 1  a = input_layernorm(h)                                   -> input of q, k, v
  stage 2  self_attn(a), stopped as o_proj is called (input kept)   -> input of o
  stage 3  r = h + o_proj(kept) (kept); post_attention_layernorm(r) -> input of gate, up
  stage 4  mlp(...), stopped as down_proj is called (input kept)    -> input of down
  output   r + down_proj(kept)

Between stages the caller compresses the layers whose inputs the stage produced (AutoGPTQ's
"true sequential" order). Against the generic two passes (the block with hooks on the original
weights, then the compressed block once more for the outputs), each matmul runs once instead of
about twice. Memory: the block's inputs, r and the down-projection inputs of every batch.

    stages = ResidualStages(block, inputs)         # None from ResidualStages.of(...) if it does not fit
    for names, xs in stages:                       # xs: one input tensor per batch, for `names`
        ... accumulate statistics over xs, compress names ...
    outputs = stages.outputs
"""
from __future__ import annotations

from typing import Iterator

import torch

from .sequential import BlockInputs, _out, _Stop

NORM1, ATTN, NORM2, MLP = "input_layernorm", "self_attn", "post_attention_layernorm", "mlp"
QKV = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj")
O, GATE_UP, DOWN = "self_attn.o_proj", ("mlp.gate_proj", "mlp.up_proj"), "mlp.down_proj"
LINEARS = (*QKV, O, *GATE_UP, DOWN)


def _input_of(parent: torch.nn.Module, stop: torch.nn.Module, *args: object, **kwargs: object) -> torch.Tensor:
    """The input `stop` receives when `parent(*args, **kwargs)` runs, which ends there."""
    got: list[torch.Tensor] = []

    def hook(module: torch.nn.Module, a: tuple) -> None:
        got.append(a[0])
        raise _Stop

    handle = stop.register_forward_pre_hook(hook)
    try:
        parent(*args, **kwargs)
    except _Stop:
        pass
    finally:
        handle.remove()
    if not got:
        raise RuntimeError(f"{type(parent).__name__} never called {type(stop).__name__}")
    return got[0]


class ResidualStages:
    def __init__(self, block: torch.nn.Module, inputs: BlockInputs) -> None:
        self.block, self.inputs = block, inputs
        self.outputs: list[torch.Tensor] = []

    @classmethod
    def of(cls, block: torch.nn.Module, inputs: BlockInputs, targets: dict[str, torch.nn.Module],
           check: bool = True) -> "ResidualStages | None":
        """The stages for `block` if it has the named parts, every target is one of its seven
        linear layers and (with `check`) the staged forward reproduces block(h) exactly on the
        first batch; else None (the caller falls back to the generic passes)."""
        try:
            for name in (NORM1, ATTN, NORM2, MLP, *LINEARS):
                block.get_submodule(name)
        except AttributeError:
            return None
        if not set(targets) <= set(LINEARS) or not inputs.hidden:
            return None
        stages = cls(block, inputs)
        if check:
            with torch.no_grad():
                h, kw = inputs.hidden[0], inputs.kwargs[0]
                if not torch.equal(stages._forward(h, kw), _out(block(h, **kw))):
                    return None
        return stages

    def _attn_in(self, h: torch.Tensor, kw: dict) -> torch.Tensor:
        b = self.block
        return _input_of(b.self_attn, b.self_attn.o_proj, hidden_states=b.input_layernorm(h), **kw)

    def _down_in(self, r: torch.Tensor) -> torch.Tensor:
        b = self.block
        return _input_of(b.mlp, b.mlp.down_proj, b.post_attention_layernorm(r))

    def _forward(self, h: torch.Tensor, kw: dict) -> torch.Tensor:
        b = self.block
        r = h + b.self_attn.o_proj(self._attn_in(h, kw))
        return r + b.mlp.down_proj(self._down_in(r))

    @torch.no_grad()
    def __iter__(self) -> Iterator[tuple[tuple[str, ...], list[torch.Tensor]]]:
        b, hs, kws = self.block, self.inputs.hidden, self.inputs.kwargs
        yield QKV, [b.input_layernorm(h) for h in hs]
        attn = [self._attn_in(h, kw) for h, kw in zip(hs, kws)]
        yield (O,), attn
        res = [h + b.self_attn.o_proj(a) for h, a in zip(hs, attn)]
        del attn
        yield GATE_UP, [b.post_attention_layernorm(r) for r in res]
        down = [self._down_in(r) for r in res]
        yield (DOWN,), down
        self.outputs = [r + b.mlp.down_proj(d) for r, d in zip(res, down)]
