"""Adapters in PEFT's format, both ways: a folder of adapter_config.json (PEFT's LoraConfig fields)
and adapter_model.safetensors with PEFT's key names:
    base_model.model.<module path>.lora_A.weight      (r, in)     (QA-LoRA: (r, in / group))
    base_model.model.<module path>.lora_B.weight      (out, r)
    base_model.model.<module path>.lora_magnitude_vector  (out,)  DoRA only
`peft.PeftModel.from_pretrained(<transformers model>, folder)` opens what `save_adapter` writes, and
`load_adapter` reads what PEFT trained; PEFT options modelpress does not compute are refused by name.
PEFT itself is not needed for either (the format is JSON and safetensors)."""
from __future__ import annotations

import dataclasses
import json
import re
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

from ..errors import ModelpressError
from ..model.walker import replace
from ..record import record
from ..version import __version__
from .lora import LoraConfig, add_lora, linear_like, lora_layers, qa_lora_expand

PREFIX = "base_model.model."
CONFIG_FILE, WEIGHTS_FILE = "adapter_config.json", "adapter_model.safetensors"
# PEFT LoraConfig fields that change what an adapter computes, and the value modelpress computes
_MUST_BE = {"bias": "none", "fan_in_fan_out": False, "modules_to_save": None, "layers_to_transform": None,
            "layer_replication": None, "rank_pattern": {}, "alpha_pattern": {}, "lora_bias": False,
            "target_parameters": None, "trainable_token_indices": None, "alora_invocation_tokens": None,
            "exclude_modules": None, "use_bdlora": None}


# LoraConfig.init as PEFT's init_lora_weights
_PEFT_INIT: dict[str, Any] = {"kaiming": True, "gaussian": "gaussian", "pissa": "pissa", "loftq": "loftq"}


def peft_config(config: LoraConfig, base_model: str | None = None) -> dict[str, Any]:
    """adapter_config.json for `config`, as PEFT writes it (LORA, CAUSAL_LM)."""
    targets = "all-linear" if config.targets == "all-linear" else list(config.targets)
    return {"peft_type": "LORA", "task_type": "CAUSAL_LM", "base_model_name_or_path": base_model,
            "r": config.r, "lora_alpha": config.alpha, "lora_dropout": config.dropout, "target_modules": targets,
            "use_rslora": config.rslora, "use_dora": config.dora, "init_lora_weights": _PEFT_INIT[config.init],
            "use_qalora": config.qa_lora_group is not None, "qalora_group_size": config.qa_lora_group or 16,
            "bias": "none", "fan_in_fan_out": False, "modules_to_save": None, "inference_mode": True,
            "rank_pattern": {}, "alpha_pattern": {}, "layers_to_transform": None, "layers_pattern": None,
            "revision": None}


def config_from_peft(d: dict[str, Any], where: str) -> LoraConfig:
    """The LoraConfig of a PEFT adapter_config.json; what modelpress does not compute is refused."""
    if d.get("peft_type") != "LORA":
        raise ModelpressError(f"{where} is a {d.get('peft_type')} adapter; modelpress reads LoRA adapters")
    for key, want in _MUST_BE.items():
        value = d.get(key, want)
        if value != want and value not in (None, {}, [], False):
            raise ModelpressError(f"{where} sets {key}={d[key]!r}, which modelpress does not compute "
                                  f"(it reads adapters with {key}={want!r})")
    targets = d.get("target_modules")
    if isinstance(targets, str) and targets != "all-linear":
        raise ModelpressError(f"{where} names its targets by a regular expression ({targets!r}); modelpress reads a "
                              "list of module names or 'all-linear'")
    init = d.get("init_lora_weights", True)
    init = {v: k for k, v in _PEFT_INIT.items()}.get(init if isinstance(init, str) else True, "kaiming")
    return LoraConfig(r=int(d["r"]), alpha=float(d.get("lora_alpha", 8)), dropout=float(d.get("lora_dropout") or 0.0),
                      targets=targets if targets == "all-linear" else tuple(targets or ()),
                      rslora=bool(d.get("use_rslora")), dora=bool(d.get("use_dora")), init=init,
                      qa_lora_group=int(d.get("qalora_group_size", 16)) if d.get("use_qalora") else None)


def adapter_parameters(model: torch.nn.Module) -> dict[str, torch.nn.Parameter]:
    """The adapters' parameters under PEFT's key names."""
    out = {}
    for fqn, layer in lora_layers(model).items():
        out[f"{PREFIX}{fqn}.lora_A.weight"] = layer.lora_A.weight
        out[f"{PREFIX}{fqn}.lora_B.weight"] = layer.lora_B.weight
        if layer.lora_magnitude_vector is not None:
            out[f"{PREFIX}{fqn}.lora_magnitude_vector"] = layer.lora_magnitude_vector
    return out


def adapter_state(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {k: p.detach().contiguous() for k, p in adapter_parameters(model).items()}


def save_adapter(model: torch.nn.Module, config: LoraConfig, out: str | Path, base_model: str | None = None,
                 state: dict[str, torch.Tensor] | None = None) -> Path:
    """Write the model's adapters (or `state`, under PEFT's keys) into the folder `out` in PEFT's
    format (each file under a temporary name, renamed when complete; other files are left alone)."""
    out = Path(out)
    state = adapter_state(model) if state is None else state
    if not state:
        raise ModelpressError("the model has no LoRA adapters to save")
    if out.exists() and not out.is_dir():
        raise ModelpressError(f"{out} is a file; give a folder for the adapter")
    out.mkdir(parents=True, exist_ok=True)
    weights, cfg = out / (WEIGHTS_FILE + ".partial"), out / (CONFIG_FILE + ".partial")
    save_file(state, str(weights), metadata={"format": "pt", "modelpress_version": __version__})
    cfg.write_text(json.dumps(peft_config(config, base_model), indent=2))
    weights.replace(out / WEIGHTS_FILE)
    cfg.replace(out / CONFIG_FILE)
    return out


def read_adapter(folder: str | Path) -> tuple[LoraConfig, dict[str, torch.Tensor]]:
    folder = Path(folder)
    if not (folder / CONFIG_FILE).is_file() or not (folder / WEIGHTS_FILE).is_file():
        raise ModelpressError(f"{folder} is not a LoRA adapter folder: it needs {CONFIG_FILE} and {WEIGHTS_FILE} "
                              "(PEFT's save_pretrained or modelpress finetune writes them)")
    try:
        config = config_from_peft(json.loads((folder / CONFIG_FILE).read_text()), str(folder / CONFIG_FILE))
        # PEFT writes ".lora_A.weight"; some older files hold ".lora_A.default.weight"
        state = {re.sub(r"\.default(\.weight)?$", lambda m: m.group(1) or "", k): v
                 for k, v in load_file(str(folder / WEIGHTS_FILE)).items()}
    except (ValueError, KeyError, TypeError, OSError) as e:
        raise ModelpressError(f"{folder} cannot be read as a LoRA adapter ({type(e).__name__}: {e})") from None
    return config, state


def load_adapter(model: torch.nn.Module, folder: str | Path) -> tuple[torch.nn.Module, LoraConfig]:
    """Add the adapters of a PEFT-format folder to `model` (in place); every adapted layer must get
    its tensors and every tensor a layer, with the shapes the model gives. The base is taken as it
    is (an adapter's PiSSA / LoftQ init is not run again on it)."""
    config, state = read_adapter(folder)
    add_lora(model, dataclasses.replace(config, init="kaiming"))
    fill_adapter(model, state, folder)
    return model, config


def fill_adapter(model: torch.nn.Module, state: dict[str, torch.Tensor], folder: str | Path) -> None:
    """Copy `state` (PEFT's keys, read from `folder`) into the model's adapters, checking that every
    adapted layer gets its tensors and every tensor a layer, with the shapes the model gives."""
    mine = adapter_parameters(model)
    missing, extra = sorted(set(mine) - set(state)), sorted(set(state) - set(mine))
    if missing or extra:
        raise ModelpressError(f"{folder} does not fit this model: "
                              + (f"no tensor for {missing[0]} ({len(missing)} missing)" if missing else "")
                              + ("; " if missing and extra else "")
                              + (f"{extra[0]} adapts no layer of it ({len(extra)} such)" if extra else ""))
    with torch.no_grad():
        for key, tensor in mine.items():
            if tensor.shape != state[key].shape:
                raise ModelpressError(f"{folder}: {key} has shape {tuple(state[key].shape)}, this model's layer "
                                      f"needs {tuple(tensor.shape)}")
            tensor.copy_(state[key])


def attach_adapters(model: torch.nn.Module, folders: dict[str, str | Path]) -> list[str]:
    """Serve several adapters on one base (in place): every layer any of them adapts becomes a
    MultiLoraLinear (nn/multi_lora.py) holding each adapter's A, B and scaling; returns the names in
    index order. DoRA adapters are refused (their magnitudes rescale the base's rows)."""
    from ..nn.multi_lora import MultiLoraLinear

    if lora_layers(model):
        raise ModelpressError("the model already carries an adapter; serve adapters on the base model")
    names = list(folders)
    linear = {fqn: m for fqn, m in model.named_modules() if linear_like(m)}
    for k, (name, folder) in enumerate(folders.items()):
        config, state = read_adapter(folder)
        if config.dora:
            raise ModelpressError(f"adapter {name!r} is DoRA, which the batched serving does not compute; merge it "
                                  "into a model (modelpress merge) and serve that")
        for key, a in state.items():
            if not key.endswith(".lora_A.weight"):
                continue
            fqn = key[len(PREFIX):-len(".lora_A.weight")]
            b = state.get(f"{PREFIX}{fqn}.lora_B.weight")
            base = linear.get(fqn)
            if base is None or b is None:
                raise ModelpressError(f"adapter {name!r} ({folder}) does not fit this model: {fqn} "
                                      + ("is not one of its linear layers" if base is None else "has no lora_B"))
            layer = model.get_submodule(fqn)
            if not isinstance(layer, MultiLoraLinear):
                layer = MultiLoraLinear(base, len(names))
                replace(model, fqn, layer)
            if config.qa_lora_group:
                a = qa_lora_expand(a, config.qa_lora_group, layer.in_features)
            if tuple(a.shape) != (config.r, layer.in_features) or tuple(b.shape) != (layer.out_features, config.r):
                raise ModelpressError(f"adapter {name!r}: {fqn}'s A / B shapes {tuple(a.shape)} / {tuple(b.shape)} do "
                                      f"not fit the layer ({layer.out_features} x {layer.in_features}, r {config.r})")
            layer.set_adapter(k, a, b, config.scaling)
    record(model).adapter = dict(folders)  # the model now carries adapters (save / export refuse it)
    return names
