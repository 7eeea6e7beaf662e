"""llama.cpp's LoRA adapter GGUF, as its convert_lora_to_gguf.py writes it, which llama.cpp applies
to a GGUF of the base model (`--lora FILE`, llama_adapter_lora_init):
    general.architecture  the base's GGUF architecture        general.type  "adapter"
    adapter.type          "lora"                                adapter.lora.alpha  float32
    <base tensor name>.lora_a   (r, in)  F32                    <base tensor name>.lora_b   (out, r)  F32
llama.cpp scales by alpha / r (r read from the tensors), so rsLoRA's alpha / sqrt(r) is written as the
alpha giving the same scale; QA-LoRA's pooled A is written expanded over its groups (the same
product); B's rows are permuted where the base file's q / k rows are (llama). DoRA has no form there."""
from __future__ import annotations

from pathlib import Path

import gguf
import torch

from ..errors import ModelpressError
from ..formats.gguf_writer import _permuted, gguf_arch, gguf_name
from .lora import lora_layers, qa_lora_expand


def lora_tensors(model: torch.nn.Module) -> list[tuple[str, torch.Tensor]]:
    """(GGUF name, F32 tensor) of every adapter: A as (r, in), B as (out, r)."""
    cfg = model.config
    arch = gguf_arch(cfg)
    out = []
    for fqn, layer in lora_layers(model).items():
        if layer.lora_magnitude_vector is not None:
            raise ModelpressError("llama.cpp's LoRA GGUF has no form for DoRA's magnitudes; merge the adapter "
                                  "(modelpress merge) and export the merged model instead")
        a = layer.lora_A.weight.detach().float()
        if layer.group:
            a = qa_lora_expand(a, layer.group, layer.in_features)
        b = layer.lora_B.weight.detach().float()
        name = gguf_name(f"{fqn}.weight", arch)
        out.append((f"{name}.lora_a", a.contiguous()))
        out.append((f"{name}.lora_b", _permuted(f"{fqn}.weight", b, cfg).contiguous()))
    if not out:
        raise ModelpressError("the model has no adapters to export (load one with --adapter)")
    return out


def export_gguf_lora(model: torch.nn.Module, path: str | Path) -> Path:
    """Write the model's adapters as llama.cpp's LoRA GGUF (a temporary name renamed when complete)."""
    path = Path(path)
    tensors = lora_tensors(model)
    alphas = {layer.scaling * layer.r for layer in lora_layers(model).values()}  # llama.cpp: scale = alpha / r
    if len(alphas) != 1:
        raise ModelpressError("llama.cpp's LoRA GGUF holds one alpha; these adapters scale differently per layer")
    alpha = alphas.pop()
    tmp = path.with_name(path.name + ".part")
    writer = gguf.GGUFWriter(str(tmp), gguf_arch(model.config))
    writer.add_type(gguf.GGUFType.ADAPTER)
    writer.add_string(gguf.Keys.Adapter.TYPE, "lora")
    writer.add_float32(gguf.Keys.Adapter.LORA_ALPHA, float(alpha))
    for name, t in tensors:
        writer.add_tensor(name, t.numpy())
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    tmp.replace(path)
    return path
