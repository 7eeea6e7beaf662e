"""What every benchmark script shares: the result file's header and its atomic write."""
from __future__ import annotations

import atexit
import json
import os
import platform
import shutil
import signal
import statistics
import tempfile
import time
from pathlib import Path

import torch

from modelpress.kernels import cpu_name  # noqa: F401  (the benchmarks name the CPU in every result)

MODEL = "SmolLM2-135M-Instruct (Q4_1 GGUF dequantized to fp32)"
# On CPUs with AMX (Sapphire Rapids and later) a llama.cpp built with GGML_NATIVE crashes in its AMX
# matmul (ggml_backend_amx_mul_mat, llama.cpp issue #20824); the peer then runs a build of the same
# sources without AMX, pointed at by LLAMA_CPP_LIB_PATH
LIB_NOTE = ("llama.cpp 0.3.36's vendored sources built with -DGGML_NATIVE=OFF -DGGML_AVX512=ON -DGGML_AVX512_VBMI=ON "
            "-DGGML_AVX512_VNNI=ON -DGGML_AVX512_BF16=ON (AVX2, FMA, F16C, BMI2 on; AMX off: its AMX matmul "
            "segfaults here, llama.cpp #20824), BUILD_SHARED_LIBS=ON")


def scratch(prefix: str) -> Path:
    """A new temporary folder for a benchmark's checkpoints and GGUF files (hundreds of MB each), removed
    when the process ends: normally, on an exception, on Ctrl-C or on SIGTERM (a kill -9 leaves it).
    MP_KEEP_SCRATCH=1 keeps it, to look at the files."""
    folder = Path(tempfile.mkdtemp(prefix=prefix))
    if os.environ.get("MP_KEEP_SCRATCH") != "1":
        atexit.register(shutil.rmtree, folder, ignore_errors=True)
        if signal.getsignal(signal.SIGTERM) is signal.SIG_DFL:
            signal.signal(signal.SIGTERM, _exit_on_sigterm)
    return folder


def _exit_on_sigterm(signum: int, frame: object) -> None:
    """SIGTERM as SystemExit, so that atexit runs (its default ends the process without it)."""
    raise SystemExit(128 + signum)


def median_seconds(fn, repeats: int) -> float:  # noqa: ANN001
    """The median wall time of fn() over `repeats` calls, after one untimed warm-up call."""
    fn()
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def write_result(path: str | Path, benchmark: str, rows: list[dict], **fields: object) -> Path:
    """{benchmark, model, **fields, torch, threads, machine, cpu, date, rows} as JSON, written
    under a temporary name and renamed, so a reader never sees half a file."""
    # a llama.cpp built apart (LLAMA_CPP_LIB_PATH, read by llama-cpp-python): say which one ran
    lib = os.environ.get("LLAMA_CPP_LIB_PATH")
    fields = {**fields, **({"llama_cpp_lib": lib, "llama_cpp_lib_note": LIB_NOTE} if lib else {})}
    result = {"benchmark": benchmark, "model": MODEL, **fields, "torch": torch.__version__,
              "threads": torch.get_num_threads(), "machine": platform.machine(), "cpu": cpu_name(),
              "date": time.strftime("%Y-%m-%d %H:%M"), "rows": rows}
    out = Path(path)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_suffix(".tmp")
    tmp.write_text(json.dumps(result, indent=2) + "\n")
    os.replace(tmp, out)
    return out


def emitter(path: str | Path, benchmark: str, **fields: object):  # noqa: ANN201
    """(rows, emit): emit(row) appends the row, prints it as a JSON line and rewrites the result file, so
    a run stopped midway keeps what it measured."""
    rows: list[dict] = []

    def emit(row: dict) -> None:
        rows.append(row)
        print(json.dumps(row), flush=True)
        write_result(path, benchmark, rows, **fields)

    return rows, emit
