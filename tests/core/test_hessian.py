"""HessianAccumulator: the running 2 X^T X / n over batches (upper triangle tiles, mirrored)
equals the fp64 product over all rows at once; column counts around the tile width."""
import pytest
import torch

from modelpress.core.hessian import HessianAccumulator


@pytest.mark.parametrize("cols", [5, 256, 300, 600])
def test_running_hessian_equals_the_product(cols):
    g = torch.Generator().manual_seed(cols)
    batches = [torch.randn(2, n, cols, generator=g) for n in (7, 1, 33)]
    acc = HessianAccumulator(cols)
    for x in batches:
        acc.add(x)
    X = torch.cat([x.reshape(-1, cols) for x in batches]).double()
    want = 2 * X.t() @ X / X.shape[0]
    H = acc.hessian()
    assert acc.rows == X.shape[0] and H.dtype == torch.float32
    torch.testing.assert_close(H.double(), want, rtol=1e-5, atol=1e-5)
    assert torch.equal(H, H.t())


def test_no_rows_is_an_error():
    with pytest.raises(ValueError, match="no calibration rows"):
        HessianAccumulator(4).hessian()
