"""What every benchmark script shares: the result file's header and its atomic write."""
from __future__ import annotations

import json
import os
import platform
import time
from pathlib import Path

import torch

MODEL = "SmolLM2-135M-Instruct (Q4_1 GGUF dequantized to fp32)"


def write_result(path: str | Path, benchmark: str, rows: list[dict], **fields: object) -> Path:
    """{benchmark, model, **fields, torch, threads, machine, cpu, date, rows} as JSON, written
    under a temporary name and renamed, so a reader never sees half a file."""
    result = {"benchmark": benchmark, "model": MODEL, **fields, "torch": torch.__version__,
              "threads": torch.get_num_threads(), "machine": platform.machine(), "cpu": platform.processor(),
              "date": time.strftime("%Y-%m-%d %H:%M"), "rows": rows}
    out = Path(path)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_suffix(".tmp")
    tmp.write_text(json.dumps(result, indent=2) + "\n")
    os.replace(tmp, out)
    return out
