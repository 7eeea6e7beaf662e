"""GGUF block formats against their references: the legacy types' bytes against the `gguf`
package's quantizers, every type's bytes against llama.cpp's own quantizer (through its ggml
library) and against golden blocks made by it, every dequantization against the `gguf` package's."""
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from gguf import GGMLQuantizationType
from gguf.quants import dequantize as gguf_dequantize
from gguf.quants import quantize as gguf_quantize

from modelpress.core import kquants
from tests.golden.kquants_input import golden_imatrix, golden_input
from tests.llamacpp_ref import MISSING, quantize_ref

LEGACY = ("Q4_0", "Q4_1", "Q5_0", "Q5_1", "Q8_0")
GOLDEN = json.loads((Path(__file__).parents[1] / "golden" / "kquants_blocks.json").read_text())


def _awkward(rows: int = 24, cols: int = 512, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(rows, cols, generator=g) * torch.linspace(0.01, 2, cols)
    w[3] = 0.0
    w[5, :40] = 0.0
    w[7] = 1.5
    w[9, 100:200] = -0.3
    w[11, 256:300] = -0.0
    w[13] *= 1e-6
    w[15, :16] = torch.tensor([1e4] + [0.0] * 15)  # one outlier among zeros
    return w


@pytest.mark.parametrize("kind", LEGACY)
def test_legacy_types_equal_the_gguf_package(kind):
    """Every block but those of only zeros with some -0.0: there the gguf package writes d = +0.0
    and llama.cpp (and modelpress) -0.0 (max / -8 with max = 0); the llama.cpp test covers them."""
    w = _awkward()
    ref = gguf_quantize(w.numpy(), getattr(GGMLQuantizationType, kind)).reshape(-1, kquants.BLOCK[kind][1])
    got = kquants.quantize(w, kind).numpy().reshape(ref.shape)
    blocks = w.reshape(-1, 32)
    signed_zero = (blocks == 0).all(1) & torch.signbit(blocks).any(1)
    assert signed_zero.sum() == 1  # the -0.0 run of row 11 fills one block
    assert np.array_equal(got[~signed_zero.numpy()], ref[~signed_zero.numpy()])


@pytest.fixture(params=["kernel", "torch"])
def search(request, monkeypatch):
    """make_qx_quants through the compiled search, then through the torch reference."""
    from modelpress import kernels

    if request.param == "kernel" and kernels.lib() is None:
        pytest.skip("no C compiler here: the searches run in torch only")
    if request.param == "kernel":
        assert set(kquants.COMPILED) == {"make_qx_quants", "make_qkx2_quants", "quantize_legacy"}  # kernels/ installed them
        yield request.param
    else:
        with kquants.torch_reference():
            yield request.param


@pytest.mark.parametrize("weighted", [False, True], ids=["ref", "imatrix"])
@pytest.mark.parametrize("kind", kquants.TYPES)
def test_every_type_equals_llama_cpp(kind, weighted, search):
    if MISSING:
        pytest.skip(MISSING)
    for seed in range(3):
        w = _awkward(seed=seed)
        imatrix = torch.rand(w.shape[1], generator=torch.Generator().manual_seed(seed)) ** 3 * 10 if weighted else None
        got, want = kquants.quantize(w, kind, imatrix).numpy(), quantize_ref(w, kind, imatrix)
        n_bytes = kquants.BLOCK[kind][1]
        differ = (got != want).reshape(-1, n_bytes).any(1)
        assert not differ.any(), f"{kind}, seed {seed}: {int(differ.sum())} of {differ.size} blocks differ"


@pytest.mark.parametrize("kind", kquants.TYPES)
def test_every_type_equals_the_golden_blocks(kind, search):
    w = golden_input()
    assert list(w.shape) == GOLDEN["shape"]
    assert kquants.quantize(w, kind).numpy().tobytes().hex() == GOLDEN["bytes"][kind]
    assert kquants.quantize(w, kind, golden_imatrix()).numpy().tobytes().hex() == GOLDEN["imatrix_bytes"][kind]


@pytest.mark.parametrize("kind", kquants.TYPES)
def test_dequantize_equals_the_gguf_package(kind):
    w = _awkward()
    data = kquants.quantize(w, kind)
    want = gguf_dequantize(data.numpy(), getattr(GGMLQuantizationType, kind))
    got = kquants.dequantize(data, kind, w.shape[1])
    assert np.array_equal(got.numpy(), want)
    # and it is a quantization of w: error well under the weights' own spread
    rel = ((got - w).pow(2).mean() / w.pow(2).mean()).item()
    assert rel < {"Q2_K": 0.2, "Q3_K": 0.05}.get(kind, 0.02), rel


def test_bad_input_says_what_to_do():
    with pytest.raises(ValueError, match="unknown GGUF block type 'Q4_7'"):
        kquants.quantize(torch.zeros(2, 256), "Q4_7")
    with pytest.raises(ValueError, match="multiple of 256"):
        kquants.quantize(torch.zeros(2, 576), "Q4_K")
    with pytest.raises(ValueError, match="512 entries"):
        kquants.quantize(torch.zeros(2, 512), "Q4_K", torch.ones(256))
    with pytest.raises(ValueError, match="multiple of 32"):
        kquants.dequantize(torch.zeros(2, 18, dtype=torch.uint8), "Q4_0", 33)
