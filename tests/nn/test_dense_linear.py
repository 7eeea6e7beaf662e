import torch

from modelpress import kernels
from modelpress.model.walker import use_dense_kernels
from modelpress.nn.dense_linear import DenseLinear
from tests.conftest import tiny_llama


def test_kernel_rows_match_linear_and_grad_falls_back():
    torch.manual_seed(0)
    lin = torch.nn.Linear(100, 37, bias=True)  # 100 columns: the vector loop and a scalar tail
    dense = DenseLinear.from_linear(lin)
    assert dense.weight is lin.weight and dense.bias is lin.bias
    x = torch.randn(2, 3, 100)
    with torch.no_grad():
        torch.testing.assert_close(dense(x), lin(x), rtol=0, atol=1e-5)  # fp32, another sum order
    xg = x.clone().requires_grad_()
    dense(xg).sum().backward()  # autograd needs the graph: nn.Linear's own forward
    torch.testing.assert_close(xg.grad, lin.weight.sum(0).expand(2, 3, 100))


def test_use_dense_kernels_keeps_ties_and_state_dict():
    model = tiny_llama(tied=True)
    keys = list(model.state_dict())
    x = torch.randint(0, 261, (1, 6))
    with torch.no_grad():
        ref = model(x).logits
        use_dense_kernels(model)
        out = model(x).logits
    assert type(model.lm_head) is DenseLinear and model.lm_head.weight is model.model.embed_tokens.weight
    assert list(model.state_dict()) == keys
    tol = 1e-5 if kernels.lib() is not None else 0
    torch.testing.assert_close(out, ref, rtol=0, atol=tol)


def test_half_rows_without_native_gemm_are_fp32_products_rounded(monkeypatch):
    from modelpress.nn import dense_linear

    torch.manual_seed(0)
    for dtype in (torch.bfloat16, torch.float16):
        lin = torch.nn.Linear(96, 40, bias=True).to(dtype)
        dense = DenseLinear.from_linear(lin)
        x = torch.randn(3, 16, 96).to(dtype)                  # 48 rows: past the few-row kernel
        exact = (x.double() @ lin.weight.double().T + lin.bias.double())
        for native in (False, True):
            monkeypatch.setattr(dense_linear, "native_half_gemm", lambda _dtype, n=native: n)
            with torch.no_grad():
                y = dense(x)
            assert y.dtype == dtype and y.shape == (3, 16, 40)
            # one rounding of an fp32 sum: within one half-precision step of the exact product
            step = exact.abs().clamp(min=1e-3) * (2 ** -7 if dtype == torch.bfloat16 else 2 ** -10)
            assert ((y.double() - exact).abs() <= step).all()
        monkeypatch.setattr(dense_linear, "native_half_gemm", lambda _dtype: False)
        with torch.no_grad():
            torch.testing.assert_close(dense(x), lin(x), rtol=0, atol=float(step.max()))
