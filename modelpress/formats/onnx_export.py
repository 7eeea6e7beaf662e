"""ONNX with QuantizeLinear / DequantizeLinear nodes (explicit quantization: TensorRT's since
TensorRT 10, and what ONNX Runtime runs on a CPU) for a network W8A8 quantized with static
activation scales: each W8A8Conv2d / W8A8Linear becomes
    x -> QuantizeLinear(input_scale, 0) -> DequantizeLinear -> Conv / Gemm(W) [-> Relu]
    W = DequantizeLinear(QuantizeLinear(weight, weight_scale per output channel, axis 0))
with our scales and int8 ranges (activations -128..127; the weights' codes are -127..127, so the
same range holds them). torch.onnx's exporter writes the graph from stand-in modules that compute
the same fake quantization (torch.fake_quantize_per_*_affine, which it exports as Q/DQ pairs).

Decoder models (the families whose blocks are Llama's plus biases or q/k norms: llama, mistral,
qwen2, qwen3) export as their prefill graph, input_ids (batch, seq) -> logits (batch, seq, vocab),
written by `PrefillGraph` from the model's own modules (embedding, norms, projections, MLP, head)
with rotary from a table and causal attention: transformers' own forward does not export (its mask
builder uses aten::diff, which no ONNX opset has, and torch.export rejects the fake quantizers).
A float model exports the same way (the peers' quantizers, ONNX Runtime's quantize_static, start
from that file).
"""
from __future__ import annotations

import copy
import uuid
from pathlib import Path

import torch
import torch.nn.functional as F

from ..errors import ModelpressError
from ..model.decoder import _rotary
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


PREFILL_FAMILIES = ("llama", "mistral", "qwen2", "qwen3")


class PrefillGraph(torch.nn.Module):
    """A decoder's prefill as plain tensor operations over its own modules: input_ids (B, T) ->
    logits (B, T, vocab), every position causal, no cache. max_len: the rotary table's length."""

    def __init__(self, model: torch.nn.Module, max_len: int) -> None:
        super().__init__()
        cfg = model.config
        if getattr(cfg, "model_type", None) not in PREFILL_FAMILIES or not hasattr(model.model, "layers"):
            raise ModelpressError(f"ONNX prefill export takes the model types {', '.join(PREFILL_FAMILIES)}; this model "
                                  f"is {getattr(cfg, 'model_type', type(model).__name__)!r}")
        window = getattr(cfg, "sliding_window", None) if cfg.model_type == "mistral" else None
        if window is not None and window < max_len:
            raise ModelpressError(f"this model attends over a sliding window of {window} tokens; export with "
                                  f"max_len <= {window}")
        self.n_heads, self.n_kv = cfg.num_attention_heads, cfg.num_key_value_heads or cfg.num_attention_heads
        self.head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
        self.embed_tokens, self.norm, self.lm_head = model.model.embed_tokens, model.model.norm, model.lm_head
        self.layers = model.model.layers
        x = torch.zeros(1, max_len, 1)
        with torch.no_grad():
            cos, sin = model.model.rotary_emb(x, torch.arange(max_len)[None])
        self.register_buffer("cos", cos[0].float())  # (max_len, head_dim)
        self.register_buffer("sin", sin[0].float())

    def _attention(self, attn: torch.nn.Module, h: torch.Tensor) -> torch.Tensor:
        b, t, _ = h.shape
        q = attn.q_proj(h).reshape(b, t, self.n_heads, self.head_dim)
        k = attn.k_proj(h).reshape(b, t, self.n_kv, self.head_dim)
        v = attn.v_proj(h).reshape(b, t, self.n_kv, self.head_dim)
        if getattr(attn, "q_norm", None) is not None:  # qwen3: RMSNorm per head
            q, k = attn.q_norm(q), attn.k_norm(k)
        cos, sin = self.cos[:t][None, :, None, :], self.sin[:t][None, :, None, :]
        q, k = _rotary(q, cos, sin), _rotary(k, cos, sin)
        rep = self.n_heads // self.n_kv
        q, k, v = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)           # (B, heads, T, D)
        k, v = k.repeat_interleave(rep, 1), v.repeat_interleave(rep, 1)
        out = F.scaled_dot_product_attention(q, k, v, is_causal=True, scale=float(attn.scaling))
        return attn.o_proj(out.transpose(1, 2).reshape(b, t, self.n_heads * self.head_dim))

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        x = self.embed_tokens(input_ids)
        for layer in self.layers:
            x = x + self._attention(layer.self_attn, layer.input_layernorm(x))
            x = x + layer.mlp(layer.post_attention_layernorm(x))
        return self.lm_head(self.norm(x)).float()


def _check_onnx() -> None:
    try:
        import onnx  # noqa: F401  (torch.onnx writes through it)
    except ImportError:
        raise ModelpressError("ONNX export needs the onnx package: pip install onnx (onnxruntime to run the file)") \
            from None


def _int8_weights(path: Path) -> None:
    """Rewrite path's weight quantizers, QuantizeLinear(float initializer W, scale, 0) -> DequantizeLinear,
    as int8 initializers -> DequantizeLinear (how quantized ONNX files store weights: a quarter of the
    bytes; the codes are our layers' own, recovered exactly as round(W / scale))."""
    import numpy as np
    import onnx
    from onnx import numpy_helper

    model = onnx.load(str(path))
    graph = model.graph
    inits = {i.name: i for i in graph.initializer}
    uses: dict[str, int] = {}
    for node in graph.node:
        for name in node.input:
            uses[name] = uses.get(name, 0) + 1
    dropped = []
    for node in graph.node:
        if node.op_type != "QuantizeLinear" or node.input[0] not in inits or node.input[1] not in inits:
            continue
        w, scale = numpy_helper.to_array(inits[node.input[0]]), numpy_helper.to_array(inits[node.input[1]])
        axis = next((a.i for a in node.attribute if a.name == "axis"), 1)
        shape = [1] * w.ndim
        shape[axis] = -1
        q = np.clip(np.rint(w / (scale.reshape(shape) if scale.ndim else scale)), -128, 127).astype(np.int8)
        qname = node.input[0] + "_int8"
        graph.initializer.append(numpy_helper.from_array(q, qname))
        for other in graph.node:
            if other.op_type == "DequantizeLinear" and other.input[0] == node.output[0]:
                other.input[0] = qname
        dropped.append(node)
        if uses[node.input[0]] == 1:
            graph.initializer.remove(inits[node.input[0]])
    for node in dropped:
        graph.node.remove(node)
    onnx.save(model, str(path))


def _export(stand_in: torch.nn.Module, example: torch.Tensor, path: str | Path, opset: int, names: tuple[str, str],
            dynamic: dict[int, str]) -> Path:
    """torch.onnx's TorchScript exporter, to a temporary name renamed when complete."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.{uuid.uuid4().hex[:8]}.partial")
    try:
        torch.onnx.export(stand_in, (example,), str(tmp), dynamo=False, opset_version=opset, input_names=[names[0]],
                          output_names=[names[1]], dynamic_axes={names[0]: dynamic, names[1]: dynamic})
        _int8_weights(tmp)
        tmp.replace(path)
    finally:
        tmp.unlink(missing_ok=True)
    return path


def _to_qdq(stand_in: torch.nn.Module) -> None:
    """Every W8A8 layer of stand_in replaced by its Q/DQ stand-in, in place; linear subclasses with
    kernels of their own (DenseLinear's few-row C product, which a trace would freeze into a constant)
    by a plain nn.Linear on the same tensors."""
    convs = {fqn for fqn, m in stand_in.named_modules() if isinstance(m, W8A8Conv2d)}
    for fqn, m in list(stand_in.named_modules()):
        if type(m) is not torch.nn.Linear and isinstance(m, torch.nn.Linear):
            plain = torch.nn.Linear(m.in_features, m.out_features, bias=m.bias is not None)
            plain.weight, plain.bias = m.weight, m.bias
            replace(stand_in, fqn, plain)
        elif fqn in convs:
            replace(stand_in, fqn, _QDQ(m.linear, m))
        elif isinstance(m, W8A8Linear) and fqn.rpartition(".")[0] not in convs:  # a conv's own product: done above
            replace(stand_in, fqn, _QDQ(m))


def export_prefill_onnx(model: torch.nn.Module, path: str | Path, max_len: int = 2048, opset: int = 17) -> Path:
    """Write a decoder's prefill graph (input_ids (batch, seq) int64 -> logits (batch, seq, vocab) fp32,
    both dimensions dynamic up to max_len) to `path`: static W8A8 layers as Q/DQ, float layers as
    they are. Dynamic W8A8 activations have no Q/DQ form (ONNX's scales are fixed) and are refused."""
    _check_onnx()
    stand_in = copy.deepcopy(model).float().eval()
    _to_qdq(stand_in)
    plain = (torch.nn.Linear, _QDQ)
    odd = sorted({type(m).__name__ for fqn, m in stand_in.model.layers.named_modules()
                  if fqn.endswith("_proj") and not isinstance(m, plain)})
    if odd:
        raise ModelpressError(f"ONNX export writes float and static W8A8 layers; this model has {', '.join(odd)} "
                              "layers (quantize with W8A8Config(activations='static'), or export a float model)")
    graph = PrefillGraph(stand_in, max_len).eval()
    example = torch.zeros(2, 16, dtype=torch.long)
    with torch.no_grad():
        return _export(graph, example, path, opset, ("input_ids", "logits"), {0: "batch", 1: "seq"})


def export_onnx(model: torch.nn.Module, example: torch.Tensor, path: str | Path, opset: int = 17) -> Path:
    """Write `model` (its W8A8 layers as Q/DQ, the rest as exported by torch.onnx) to `path`, the
    batch dimension dynamic; written under a temporary name and renamed when complete. A decoder
    model goes to export_prefill_onnx (`example` unused)."""
    _check_onnx()
    if hasattr(getattr(model, "model", None), "layers"):
        return export_prefill_onnx(model, path, opset=opset)
    stand_in = copy.deepcopy(model).eval()
    _to_qdq(stand_in)
    return _export(stand_in, example, path, opset, ("input", "output"), {0: "batch"})
