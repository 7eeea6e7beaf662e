"""W8A8 on a network that is not a decoder (methods/w8a8._quantize_network): a small CNN trained here
on scikit-learn's bundled digits (no download): Conv-BN-ReLU fusion keeps the function, and int8
weights and activations keep the accuracy with each calibrator."""
import copy

import pytest
import torch

import modelpress
from modelpress import W8A8Config
from modelpress.methods.w8a8 import fuse_conv_bn_relu
from modelpress.nn.w8a8_conv import W8A8Conv2d
from tests.digits_cnn import trained_cnn

pytest.importorskip("sklearn", reason="scikit-learn (its bundled digits are the CNN's data) is not installed")


@pytest.fixture(scope="module")
def digits():
    """(trained fp32 model, train images, test images, test labels): 8 x 8 digits, 1400 / 397 split."""
    return trained_cnn()


def _accuracy(model, x, y) -> float:
    with torch.no_grad():
        return 100.0 * float((model(x).argmax(-1) == y).float().mean())


def test_conv_bn_relu_fusion_keeps_the_function(digits):
    model, _, x, _ = digits
    fused = copy.deepcopy(model)
    relu = fuse_conv_bn_relu(fused, {"0", "3"})
    assert {k: v[1] for k, v in relu.items()} == {"0": "2", "3": "5"}  # the ReLUs the quantized convs take over
    assert isinstance(fused[1], torch.nn.Identity) and isinstance(fused[4], torch.nn.Identity)
    with torch.no_grad():
        torch.testing.assert_close(fused(x), model(x), rtol=0, atol=1e-4)


@pytest.mark.parametrize("config", [W8A8Config(), W8A8Config(calibrator="percentile"), W8A8Config(calibrator="entropy"),
                                    W8A8Config(calibrator="mse"), W8A8Config(activations="dynamic")],
                         ids=["max", "percentile", "entropy", "mse", "dynamic"])
def test_int8_keeps_the_accuracy(digits, config):
    model, train, x, y = digits
    fp32 = _accuracy(model, x, y)
    q = modelpress.quantize(copy.deepcopy(model), config, list(train[:512].split(64)))
    assert isinstance(q[0], W8A8Conv2d) and q[0].relu and type(q[8]).__name__ == "W8A8Linear"
    # observed: fp32 97.48 %; int8 97.23 (max, mse, dynamic) and 97.48 (percentile, entropy): one image of 397
    assert fp32 > 95 and _accuracy(q, x, y) >= fp32 - 1.0, (fp32, _accuracy(q, x, y))


def test_w8a8_conv_equals_the_fake_quantized_float_conv(digits):
    """The im2col product is the float convolution of the int8-rounded weights and activations."""
    model, train, _, _ = digits
    conv = copy.deepcopy(model[3])
    q = W8A8Conv2d.from_conv(conv, 0.02)
    x = torch.relu(torch.randn(2, 16, 8, 8))
    with torch.no_grad():
        xq = torch.round(x / 0.02).clamp(-128, 127) * 0.02
        ref = torch.nn.functional.conv2d(xq, q.linear.dequantize().reshape(conv.weight.shape), conv.bias, padding=1)
        torch.testing.assert_close(q(x), ref, rtol=0, atol=1e-5)


def test_what_a_network_cannot_do_is_refused(digits):
    model, train, _, _ = digits
    with pytest.raises(modelpress.ModelpressError, match="SmoothQuant folds scales into a decoder"):
        modelpress.quantize(copy.deepcopy(model), W8A8Config(smoothquant=0.5), [train[:8]])
    with pytest.raises(modelpress.ModelpressError, match="needs example inputs"):
        modelpress.quantize(copy.deepcopy(model), W8A8Config(), None)
    grouped = torch.nn.Sequential(torch.nn.Conv2d(4, 4, 3, groups=2))
    with pytest.raises(modelpress.ModelpressError, match="groups=1"):
        modelpress.quantize(grouped, W8A8Config(), [torch.randn(1, 4, 8, 8)])
