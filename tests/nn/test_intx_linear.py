import pytest
import torch

from modelpress.core import grids
from modelpress.nn import IntxLinear, intx_linear


def _linear(inf: int, out: int, bias: bool = False, seed: int = 0) -> torch.nn.Linear:
    torch.manual_seed(seed)
    lin = torch.nn.Linear(inf, out, bias=bias)
    with torch.no_grad():
        lin.weight.normal_(0, 0.05)
    return lin


@pytest.mark.parametrize("bits,group_size", [(8, None), (8, 32), (4, 64), (4, 128), (3, 64), (2, 32), (4, 48)])
@pytest.mark.parametrize("symmetric", [True, False])
def test_reference_forward_is_dequantize_then_matmul(bits, group_size, symmetric):
    lin = _linear(200, 24, bias=True)  # 200 columns: a partial last group for every group size
    q = IntxLinear.from_linear(lin, bits, group_size, symmetric)
    codes, scale, zp = grids.quantize_rtn(lin.weight.detach(), bits, group_size, symmetric)
    assert torch.equal(q.codes(), codes)
    w_hat = grids.dequantize(codes, scale, zp, bits, group_size)
    x = torch.randn(40, 200)  # 40 rows > FAST_MAX_ROWS: reference path
    torch.testing.assert_close(q(x), x @ w_hat.T + lin.bias, rtol=1e-5, atol=1e-5)


def test_int8_kernel_gets_aligned_weights_from_an_unaligned_buffer():
    """A checkpoint's loader can leave the codes at any offset of a buffer; torch's AVX-512 int8pack
    kernel reads them with aligned loads and crashed on such weights (torch 2.13, Zen 5). The
    kernel gets a 64-byte-aligned copy, and the same outputs."""
    if not intx_linear._KERNELS_TESTED:
        pytest.skip(f"torch {torch.__version__}: the CPU kernels are used only on torch >= 2.13")
    q = IntxLinear.from_linear(_linear(96, 96), 8, None, True)
    x = torch.randn(8, 96)
    want = q(x)
    buf = torch.empty(q.qdata.numel() + 1, dtype=torch.int8)
    buf[1:] = q.qdata.reshape(-1)
    q.qdata = buf[1:].view(q.qdata.shape)   # an odd address
    q._kernel = None
    assert q.qdata.data_ptr() % 64 != 0 and q._build_kernel()[1].data_ptr() % 64 == 0
    assert torch.equal(q(x), want)


@pytest.mark.parametrize("bits,group_size", [(8, None), (4, 64), (4, 128), (3, 64), (2, 32)])
@pytest.mark.parametrize("symmetric", [True, False])
def test_fast_kernel_agrees_with_reference(bits, group_size, symmetric):
    lin = _linear(576, 64, bias=True)  # 576 = SmolLM2's width; group 128 leaves a partial group
    q = IntxLinear.from_linear(lin, bits, group_size, symmetric)
    x = torch.randn(3, 576)
    if not intx_linear._KERNELS_TESTED:
        pytest.skip(f"torch {torch.__version__}: the CPU kernels are used only on torch >= 2.13")
    assert q._build_kernel(), "a torch kernel exists for this shape"
    fast = q(x)
    q.use_fast = False
    ref = q(x)
    # the kernels take bf16 activations (8 significant bits): error ~ 2**-8 of the output scale
    torch.testing.assert_close(fast, ref, rtol=2e-2, atol=2e-2 * ref.abs().max().item())


def test_state_dict_round_trip_and_storage():
    lin = _linear(576, 96)
    q = IntxLinear.from_linear(lin, 4, 64, symmetric=False)
    q2 = IntxLinear(576, 96, 4, 64, symmetric=False)
    q2.load_state_dict(q.state_dict())
    x = torch.randn(2, 576)
    assert torch.equal(q(x), q2(x))
    # 4-bit codes: 288 bytes per row; 9 groups of fp16 scale + uint8 zero point
    stored = sum(t.numel() * t.element_size() for t in q.state_dict().values())
    assert stored == 96 * 288 + 96 * 9 * 3
    assert stored < lin.weight.numel() * 4 / 7
