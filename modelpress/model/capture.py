"""Hooks that keep running statistics of linear layers' inputs while calibration text flows.

State is O(features) or O(features^2) per layer, never the activations themselves, so memory does
not grow with the number of calibration samples. Layers that read the same input tensor (q, k, v
after one norm; gate and up) share one accumulator: the statistic is computed once.

    with HessianCapture(block_linears) as cap:
        run the block on the calibration batches
    H = cap.hessian("self_attn.q_proj")
"""
from __future__ import annotations

from typing import Callable

import torch

from ..core.act_calib import AbsHistogram
from ..core.hessian import HessianAccumulator


class _InputHooks:
    """Calls `add(key, x)` with each named module's input; modules fed the very same tensor share
    the first one's key (alias), so `add` runs once per distinct input."""

    def __init__(self, modules: dict[str, torch.nn.Module], add: Callable[[str, torch.Tensor], None]) -> None:
        self.modules, self._add = modules, add
        self.alias: dict[str, str] = {}
        self._handles: list = []
        # the last input seen and its key; holding the tensor (not its id) keeps its memory from
        # being reused by a later, different input that would then look identical
        self._last: tuple[torch.Tensor, str] | None = None

    def _hook(self, name: str) -> Callable:
        def pre_hook(module: torch.nn.Module, args: tuple) -> None:
            x = args[0]
            if self._last is not None and self._last[0] is x:
                self.alias.setdefault(name, self._last[1])
                return
            self._last = (x, name)
            self._add(self.alias.get(name, name), x.detach())

        return pre_hook

    def __enter__(self) -> "_InputHooks":
        self._handles = [m.register_forward_pre_hook(self._hook(n)) for n, m in self.modules.items()]
        return self

    def __exit__(self, *exc: object) -> None:
        for h in self._handles:
            h.remove()
        self._handles, self._last = [], None

    def key(self, name: str) -> str:
        return self.alias.get(name, name)


class HessianCapture(_InputHooks):
    """Running 2 X^T X / n of each module's input (core/hessian.py)."""

    def __init__(self, modules: dict[str, torch.nn.Module]) -> None:
        self.acc: dict[str, HessianAccumulator] = {}
        super().__init__(modules, self._accumulate)

    def _accumulate(self, key: str, x: torch.Tensor) -> None:
        if key not in self.acc:
            self.acc[key] = HessianAccumulator(x.shape[-1], x.device)
        self.acc[key].add(x)

    def hessian(self, name: str) -> torch.Tensor:
        return self.acc[self.key(name)].hessian()


class InputStatsCapture(_InputHooks):
    """Running mean |x| per input channel (AWQ's activation statistic), the l2 norm per channel (Wanda's
    and structured pruning's) and a few input rows kept for searches that must run the layer
    (`keep_rows` in total per module, first come first kept)."""

    def __init__(self, modules: dict[str, torch.nn.Module], keep_rows: int = 0) -> None:
        self.abs_sum: dict[str, torch.Tensor] = {}
        self.sq_sum: dict[str, torch.Tensor] = {}
        self.rows: dict[str, int] = {}
        self.kept: dict[str, list[torch.Tensor]] = {}
        self.keep_rows = keep_rows
        super().__init__(modules, self._accumulate)

    def _accumulate(self, key: str, x: torch.Tensor) -> None:
        x2 = x.reshape(-1, x.shape[-1]).float()
        if key not in self.abs_sum:
            self.abs_sum[key] = torch.zeros(x2.shape[-1], dtype=torch.float64, device=x.device)
            self.sq_sum[key] = torch.zeros_like(self.abs_sum[key])
            self.rows[key], self.kept[key] = 0, []
        self.abs_sum[key] += x2.abs().sum(0).double()
        self.sq_sum[key] += x2.double().pow(2).sum(0)
        self.rows[key] += x2.shape[0]
        have = sum(t.shape[0] for t in self.kept[key])
        if have < self.keep_rows:
            self.kept[key].append(x2[: self.keep_rows - have].clone())

    def mean_abs(self, name: str) -> torch.Tensor:
        key = self.key(name)
        return (self.abs_sum[key] / self.rows[key]).float()

    def norm(self, name: str) -> torch.Tensor:
        """||X_j||_2 over every calibration row, per input channel."""
        return self.sq_sum[self.key(name)].sqrt().float()

    def inputs(self, name: str) -> torch.Tensor:
        return torch.cat(self.kept[self.key(name)])


class CallCapture:
    """The (args, kwargs) of a module's first `max_calls` calls, to replay the module later
    (AWQ's scale search runs each mapping's parent module on them)."""

    def __init__(self, modules: dict[str, torch.nn.Module], max_calls: int) -> None:
        self.modules, self.max_calls = modules, max_calls
        self.calls: dict[str, list[tuple[tuple, dict]]] = {n: [] for n in modules}
        self._handles: list = []

    def _hook(self, name: str) -> Callable:
        def pre_hook(module: torch.nn.Module, args: tuple, kwargs: dict) -> None:
            if len(self.calls[name]) < self.max_calls:
                self.calls[name].append((tuple(a.detach() if torch.is_tensor(a) else a for a in args), dict(kwargs)))

        return pre_hook

    def __enter__(self) -> "CallCapture":
        self._handles = [m.register_forward_pre_hook(self._hook(n), with_kwargs=True) for n, m in self.modules.items()]
        return self

    def __exit__(self, *exc: object) -> None:
        for h in self._handles:
            h.remove()
        self._handles = []


class SquareSumCapture(_InputHooks):
    """Running sum of x^2 per input column and the number of rows (tokens) seen: llama.cpp's
    importance matrix (tools/imatrix/imatrix.cpp accumulates the same, per weight tensor)."""

    def __init__(self, modules: dict[str, torch.nn.Module]) -> None:
        self.sq_sum: dict[str, torch.Tensor] = {}
        self.rows: dict[str, int] = {}
        super().__init__(modules, self._accumulate)

    def _accumulate(self, key: str, x: torch.Tensor) -> None:
        x2 = x.reshape(-1, x.shape[-1]).float()
        if key not in self.sq_sum:
            self.sq_sum[key] = torch.zeros(x2.shape[-1], dtype=torch.float64, device=x.device)
            self.rows[key] = 0
        # each batch summed in fp32 (torch sums in blocks: closer than llama.cpp's running fp32
        # sum), the batches in fp64; an fp64 copy of the activations would cost 4x the time
        self.sq_sum[key] += torch.einsum("ti,ti->i", x2, x2).double()
        self.rows[key] += x2.shape[0]

    def sums(self, name: str) -> tuple[torch.Tensor, int]:
        key = self.key(name)
        return self.sq_sum[key], self.rows[key]


class RangeCapture(_InputHooks):
    """Per input channel max |x| (SmoothQuant's statistic) and, with `histograms`, a running
    histogram of |x| over the whole input (core/act_calib.py: the int8 calibrators read it)."""

    def __init__(self, modules: dict[str, torch.nn.Module], histograms: bool = False) -> None:
        self.channel_max: dict[str, torch.Tensor] = {}
        self.hist: dict[str, AbsHistogram] = {}
        self.histograms = histograms
        super().__init__(modules, self._accumulate)

    def _accumulate(self, key: str, x: torch.Tensor) -> None:
        m = x.reshape(-1, x.shape[-1]).abs().amax(0).float()
        self.channel_max[key] = torch.maximum(self.channel_max[key], m) if key in self.channel_max else m
        if self.histograms:
            self.hist.setdefault(key, AbsHistogram()).add(x)

    def absmax(self, name: str) -> torch.Tensor:
        return self.channel_max[self.key(name)]

    def histogram(self, name: str) -> AbsHistogram:
        return self.hist[self.key(name)]
