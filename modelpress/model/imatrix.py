"""Compute llama.cpp's importance matrix: for every weight of the decoder blocks, the sum of x^2
per input column over the calibration tokens, and the token count (llama-imatrix collects the
same from each matmul's input; like its default, the output head is left out).

Runs block by block (model/sequential.py): only one block's activations live at once.

    im = compute_imatrix(model, windows)          # formats/imatrix.Imatrix, GGUF tensor names
    save_imatrix("imatrix.gguf", im)
"""
from __future__ import annotations

import torch

from ..formats.gguf_names import to_gguf
from ..formats.imatrix import Imatrix
from .capture import SquareSumCapture
from .sequential import run_block, run_sequential


@torch.no_grad()
def compute_imatrix(model: torch.nn.Module, windows: list[torch.Tensor], batch_size: int = 8,
                    dataset: str = "") -> Imatrix:
    sums: dict[str, torch.Tensor] = {}
    counts: dict[str, int] = {}

    def collect(i: int, block: torch.nn.Module, run) -> list[torch.Tensor]:  # noqa: ANN001
        prefix = f"model.layers.{i}."
        mods = {n: m for n, m in block.named_modules() if isinstance(m, torch.nn.Linear) or hasattr(m, "dequantize")}
        mods = {n: m for n, m in mods.items() if to_gguf(f"{prefix}{n}.weight") is not None}
        with SquareSumCapture(mods) as cap:
            outs = run_block(block, run.inputs)
        for n in mods:
            s, c = cap.sums(n)
            name = to_gguf(f"{prefix}{n}.weight")
            sums[name], counts[name] = s.float().cpu(), c
        return outs

    model.eval()
    run_sequential(model, windows, collect, batch_size, desc="imatrix")
    ctx = int(windows[0].numel()) if len(windows) else 0
    return Imatrix(sums, counts, chunk_count=len(windows), chunk_size=ctx, datasets=[dataset] if dataset else [])
