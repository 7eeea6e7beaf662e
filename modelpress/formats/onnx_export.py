"""ONNX with QuantizeLinear / DequantizeLinear nodes (explicit quantization: TensorRT's since
TensorRT 10, and what ONNX Runtime runs on a CPU) for a network W8A8 quantized with static
activation scales: each W8A8Conv2d / W8A8Linear becomes
    x -> QuantizeLinear(input_scale, 0) -> DequantizeLinear -> Conv / Gemm(W) [-> Relu]
    W = DequantizeLinear(QuantizeLinear(weight, weight_scale per output channel, axis 0))
with our scales and int8 ranges (activations -128..127; the weights' codes are -127..127, so the
same range holds them). torch.onnx's exporter writes the graph from stand-in modules that compute
the same fake quantization (torch.fake_quantize_per_*_affine, which it exports as Q/DQ pairs).
Decoder models (prefill graphs) are not exported yet.
"""
from __future__ import annotations

import copy
import uuid
from pathlib import Path

import torch
import torch.nn.functional as F

from ..errors import ModelpressError
from ..model.walker import replace
from ..nn import W8A8Linear
from ..nn.w8a8_conv import W8A8Conv2d


class _QDQ(torch.nn.Module):
    """A static W8A8 layer as float operations between fake quantizations (exported as Q/DQ)."""

    def __init__(self, layer: W8A8Linear, conv: W8A8Conv2d | None = None) -> None:
        super().__init__()
        if not layer.static:
            raise ModelpressError("ONNX Q/DQ export takes static activation scales (W8A8Config(activations='static')); "
                                  "this model's are computed per call")
        self.conv, self.input_scale = conv, float(layer.input_scale)
        w = layer.dequantize()
        self.register_buffer("weight", w if conv is None else w.reshape(conv.out_channels, conv.in_channels,
                                                                        *conv.kernel_size))
        self.register_buffer("weight_scale", layer.weight_scale.float().reshape(-1))
        self.register_buffer("bias", None if layer.bias is None else layer.bias.float())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = torch.fake_quantize_per_tensor_affine(x, self.input_scale, 0, -128, 127)
        zero = torch.zeros(self.weight_scale.shape, dtype=torch.int32)
        w = torch.fake_quantize_per_channel_affine(self.weight, self.weight_scale, zero, 0, -128, 127)
        if self.conv is None:
            return F.linear(x, w, self.bias)
        y = F.conv2d(x, w, self.bias, self.conv.stride, self.conv.padding, self.conv.dilation)
        return torch.relu(y) if self.conv.relu else y


def export_onnx(model: torch.nn.Module, example: torch.Tensor, path: str | Path, opset: int = 17) -> Path:
    """Write `model` (its W8A8 layers as Q/DQ, the rest as exported by torch.onnx) to `path`, the
    batch dimension dynamic; written under a temporary name and renamed when complete."""
    try:
        import onnx  # noqa: F401  (torch.onnx writes through it)
    except ImportError:
        raise ModelpressError("ONNX export needs the onnx package: pip install onnx (onnxruntime to run the file)") \
            from None
    if hasattr(getattr(model, "model", None), "layers"):
        raise ModelpressError("ONNX export of decoder models (a prefill graph) is not there yet; it takes networks "
                              "such as the CNNs W8A8Config quantizes")
    stand_in = copy.deepcopy(model).eval()
    convs = {fqn for fqn, m in stand_in.named_modules() if isinstance(m, W8A8Conv2d)}
    for fqn, m in list(stand_in.named_modules()):
        if fqn in convs:
            replace(stand_in, fqn, _QDQ(m.linear, m))
        elif isinstance(m, W8A8Linear) and fqn.rpartition(".")[0] not in convs:  # a conv's own product: done above
            replace(stand_in, fqn, _QDQ(m))
    path = Path(path)
    tmp = path.with_name(f".{path.name}.{uuid.uuid4().hex[:8]}.partial")
    try:
        torch.onnx.export(stand_in, (example,), str(tmp), dynamo=False, opset_version=opset, input_names=["input"],
                          output_names=["output"], dynamic_axes={"input": {0: "batch"}, "output": {0: "batch"}})
        tmp.replace(path)
    finally:
        tmp.unlink(missing_ok=True)
    return path
