"""Writes kquants_blocks.json from llama.cpp (run once, with llama-cpp-python 0.3.36 installed):
    python tests/golden/make_kquants.py
Pins every GGUF block type's bytes, where llama.cpp is absent, for one tensor that holds the
awkward cases: a zero row, a constant row, zero runs, -0.0, tiny and large magnitudes."""
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
from modelpress.core.kquants import TYPES  # noqa: E402
from tests.golden.kquants_input import golden_imatrix, golden_input  # noqa: E402
from tests.llamacpp_ref import quantize_ref  # noqa: E402

w = golden_input()
out = {"source": "llama.cpp (llama-cpp-python 0.3.36, libggml-base quantize_*), without and with an imatrix",
       "shape": list(w.shape), "bytes": {k: quantize_ref(w, k).tobytes().hex() for k in TYPES},
       "imatrix_bytes": {k: quantize_ref(w, k, golden_imatrix()).tobytes().hex() for k in TYPES}}
Path(__file__).with_name("kquants_blocks.json").write_text(json.dumps(out, indent=1) + "\n")
