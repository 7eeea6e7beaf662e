"""Writes bnb_8bit_blocks.json from bitsandbytes (run once, with bitsandbytes 0.50.2 installed):
    python tests/golden/make_bnb_8bit.py
Pins, where bitsandbytes is absent: the 8-bit blockwise quantization of double-quantized absmax
constants, and LLM.int8 weight codes and one matmul with an outlier column."""
import json
from pathlib import Path

import bitsandbytes as bnb
import bitsandbytes.functional as F
import torch
from bitsandbytes.autograd._functions import MatmulLtState


def hexes(t: torch.Tensor) -> list[str]:
    return [float(v).hex() for v in t.reshape(-1).tolist()]


g = torch.Generator().manual_seed(3)
# absmax-like positive constants, 300 of them: one full nested block of 256 and a partial one
absmax = torch.rand(300, generator=g) * 0.1 + 0.01
offset = absmax.mean()
q, state = F.quantize_blockwise(absmax - offset, blocksize=256)
w = torch.randn(6, 32, generator=g) * 0.1
cb, scb, _ = F.int8_vectorwise_quant(w.to(torch.float16))
x = torch.randn(3, 32, generator=g)
x[1, 4] = 9.0  # one outlier column
st = MatmulLtState()
st.CB, st.SCB, st.threshold, st.has_fp16_weights, st.is_training = cb, scb, 6.0, False, False
y = bnb.matmul(x, cb, state=st, threshold=6.0)
out = {
    "source": f"bitsandbytes {bnb.__version__} CPU; see tests/golden/make_bnb_8bit.py",
    "double_quant": {"absmax_fp32_hex": hexes(absmax), "offset_fp32_hex": float(offset).hex(),
                     "qabsmax": q.tolist(), "absmax2_fp32_hex": hexes(state.absmax)},
    "llm_int8": {"weight_fp32_hex": hexes(w), "CB": cb.tolist(), "SCB_fp32_hex": hexes(scb),
                 "x_fp32_hex": hexes(x), "threshold": 6.0, "y_fp32_hex": hexes(y)},
}
Path(__file__).with_name("bnb_8bit_blocks.json").write_text(json.dumps(out, indent=1) + "\n")
