"""The modelpress checkpoint: a folder that loads back to bit-identical logits, without pickle.

    DIR/model.safetensors   every tensor of the state dict (quantized modules: their own keys,
                            e.g. qdata, scale, zero_point, bias); a tied output head is stored
                            once, as the embedding
    DIR/config.json         the transformers model config; for bitsandbytes' methods (NF4, FP4,
                            LLM.int8) also their quantization_config, and the tensors use
                            bitsandbytes' keys, so transformers + bitsandbytes loads the folder
    DIR/modelpress.json     {"format": "modelpress", "format_version", "modelpress_version",
                             "quantization": <method config to_dict() or null>,
                             "modules": {fqn: <quantized module meta()>}}
    DIR/tokenizer*.json ... the tokenizer, as transformers saves it
The folder is written under a temporary name beside DIR and renamed when complete, so an
interrupted save leaves DIR as it was.
"""
from __future__ import annotations

import json
import os
import shutil
import tempfile
import uuid
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from transformers import AutoConfig, AutoTokenizer

from ..config import BaseConfig
from ..errors import ModelpressError
from ..model.build import build_causal_lm
from ..model.walker import HALF, replace, unquantized_fp32, within
from ..nn import QUANT_LINEAR_CLASSES
from ..record import record
from ..version import __version__
from .bnb import quantization_config
from .registry import (
    MANIFEST,
    Format,
    count_tensors,
    describe_transformers,
    register_format,
)

FORMAT_VERSION = 1
WEIGHTS = "model.safetensors"
# the files a checkpoint folder may hold: a folder holding anything else is never replaced
LAYOUT = frozenset({WEIGHTS, MANIFEST, "config.json", "generation_config.json", "tokenizer.json",
                    "tokenizer_config.json", "special_tokens_map.json", "added_tokens.json", "chat_template.jinja",
                    "chat_template.json", "vocab.json", "merges.txt", "tokenizer.model"})


def quantized_modules(model: torch.nn.Module) -> dict[str, dict[str, Any]]:
    qtypes = tuple(QUANT_LINEAR_CLASSES.values())
    return {fqn: m.meta() for fqn, m in model.named_modules() if isinstance(m, qtypes)}


def stored_state_dict(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """The tensors a checkpoint stores (a tied output head once, as the embedding); a quantized model's
    unquantized tensors in the model's own dtype (bf16 / fp16: quantize rounded them to it already, so
    the cast is exact), as transformers, AutoGPTQ, AutoAWQ and bitsandbytes checkpoints keep them."""
    sd = model.state_dict()
    if getattr(model.config, "tie_word_embeddings", False):
        sd.pop("lm_head.weight", None)
    dt, plain = unquantized_fp32(model, record(model).config)
    sd = {k: v.to(dt) if k in plain else v for k, v in sd.items()}
    return {k: v.contiguous() for k, v in sd.items()}


def check_writable(out: str | Path) -> Path:
    """Refuse, before any work, a destination that cannot be written: the nearest folder that exists
    on the way to `out` must take a new file (tried for real: root ignores permission bits, a
    read-only file system does not)."""
    out = Path(out)
    here = out.parent
    while not here.exists() and here != here.parent:
        here = here.parent
    if not here.is_dir():
        raise ModelpressError(f"cannot write {out}: {here} is not a folder; choose another --out")
    try:
        with tempfile.TemporaryFile(dir=here):
            pass
    except OSError as e:
        raise ModelpressError(f"cannot write {out}: {here} is not writable ({e.strerror}); "
                              "choose another --out") from None
    return out


def check_target(out: str | Path) -> Path:
    """Refuse a destination whose contents a save would destroy: a folder is replaced only if it is
    empty or a modelpress checkpoint, that is its modelpress.json parses as one and every entry in it is
    a file of the checkpoint layout (LAYOUT, or one its manifest lists as written)."""
    out = check_writable(out)
    if out.exists() and not out.is_dir():
        raise ModelpressError(f"{out} exists and is not a folder; choose another --out")
    if not out.is_dir() or not any(out.iterdir()):
        return out
    refuse = (f"{out} is a folder that holds something other than a modelpress checkpoint ({{}}); "
              "choose an empty or new --out (nothing there is overwritten)")
    if not (out / MANIFEST).is_file():
        raise ModelpressError(refuse.format(f"no {MANIFEST}"))
    try:
        listed = read_manifest(out).get("files", [])
    except ModelpressError:
        raise ModelpressError(refuse.format(f"its {MANIFEST} is not a modelpress manifest")) from None
    allowed = LAYOUT | {f for f in listed if isinstance(f, str) and "/" not in f and "\\" not in f}
    for entry in out.iterdir():
        if entry.name not in allowed or entry.is_symlink() or not entry.is_file():
            raise ModelpressError(refuse.format(f"{entry.name} is not part of one"))
    return out


def save(model: torch.nn.Module, tokenizer: Any, out: str | Path) -> Path:
    """Write `model` (quantized or not) and its tokenizer to the folder `out`.

    `out` may be new, empty, or an earlier modelpress checkpoint (replaced only once the new one
    is complete); any other existing folder is refused rather than overwritten."""

    out = check_target(out)
    config = record(model).config
    manifest = {"format": "modelpress", "format_version": FORMAT_VERSION,
                "modelpress_version": __version__,
                "quantization": config.to_dict() if config is not None else None,
                "modules": quantized_modules(model)}
    qc = quantization_config(config, model) if config is not None else None  # bitsandbytes' layouts
    return write_folder(model, tokenizer, out, stored_state_dict(model), qc, manifest)


def write_folder(model: torch.nn.Module, tokenizer: Any, out: Path, tensors: dict[str, torch.Tensor],
                 quantization_config: dict[str, Any] | None, manifest: dict[str, Any] | None = None) -> Path:
    """A transformers folder: model.safetensors (`tensors`), config.json (the model's config with
    `quantization_config`, or none), the tokenizer, and modelpress.json when a manifest is given.
    Written under a temporary name beside `out`, then renamed; an existing `out` (the caller has
    checked that it may go) is replaced only once the new folder is complete."""
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.parent / f".{out.name}.tmp-{uuid.uuid4().hex[:8]}"
    tmp.mkdir()
    try:
        save_file({k: v.contiguous() for k, v in tensors.items()}, str(tmp / WEIGHTS), metadata={"format": "pt"})
        os.chmod(tmp / WEIGHTS, 0o644)
        model.config.save_pretrained(tmp)
        data = json.loads((tmp / "config.json").read_text())
        data.pop("quantization_config", None)  # a stale one from a loaded folder
        if quantization_config is not None:
            data["quantization_config"] = quantization_config
        (tmp / "config.json").write_text(json.dumps(data, indent=2, sort_keys=True) + "\n")
        if tokenizer is not None:
            tokenizer.save_pretrained(tmp)
        if manifest is not None:
            manifest = {**manifest, "files": sorted([p.name for p in tmp.iterdir()] + [MANIFEST])}
            (tmp / MANIFEST).write_text(json.dumps(manifest, indent=2) + "\n")
        old = None
        if out.exists():
            old = out.parent / f".{out.name}.old-{uuid.uuid4().hex[:8]}"
            os.replace(out, old)
        os.replace(tmp, out)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out


def with_layers_as(model: torch.nn.Module, layer_type: type, to_tensors: Any) -> dict[str, torch.Tensor]:
    """The model's stored tensors, each `layer_type` module's replaced by `to_tensors(module)`
    ({leaf name: tensor}): how the layouts other tools read are written."""
    quant = {f: m for f, m in model.named_modules() if isinstance(m, layer_type)}
    state = {k: v for k, v in stored_state_dict(model).items() if not any(k.startswith(f + ".") for f in quant)}
    for fqn, m in quant.items():
        state.update({f"{fqn}.{k}": v for k, v in to_tensors(m).items()})
    return state


def layers_from(state: dict[str, torch.Tensor], marker: str, build: Any) -> Any:
    """Read a foreign layout: every layer owning a `marker` tensor (e.g. "qweight") becomes
    `build({leaf: tensor})`; its tensors in `state` are replaced by the module's own. Returns
    prepare(model) for build_causal_lm, which swaps the built modules in."""

    layers = {}
    for p in [k[: -len(marker) - 1] for k in list(state) if k.endswith("." + marker)]:
        tensors = {k[len(p) + 1:]: state.pop(k) for k in list(state) if k.startswith(p + ".")}
        layers[p] = build(tensors)
        state.update({f"{p}.{k}": v for k, v in layers[p].state_dict().items()})

    def prepare(model: torch.nn.Module) -> None:
        for p, m in layers.items():
            replace(model, p, m)

    return prepare


def check_new(out: str | Path) -> Path:
    """Refuse any existing, non-empty destination (for layouts other tools read: no manifest
    tells that a folder is ours to replace)."""
    out = check_writable(out)
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise ModelpressError(f"{out} exists and is not empty; choose a new --out (nothing there is overwritten)")
    return out


def read_manifest(folder: str | Path) -> dict[str, Any]:
    path = Path(folder) / MANIFEST
    try:
        manifest = json.loads(path.read_text())
    except (OSError, ValueError, RecursionError) as e:  # ValueError: bad JSON or bytes that are not UTF-8
        raise ModelpressError(f"{path} is unreadable ({e}); the checkpoint is damaged, save it again") from None
    version = manifest.get("format_version") if isinstance(manifest, dict) else None
    if (not isinstance(manifest, dict) or manifest.get("format") != "modelpress" or type(version) is not int
            or not isinstance(manifest.get("modules", {}), dict)
            or not isinstance(manifest.get("quantization") or {}, dict)):
        raise ModelpressError(f"{path} is not a modelpress manifest (it needs \"format\": \"modelpress\", an integer "
                              "\"format_version\" and a \"modules\" object); save the checkpoint again")
    if version > FORMAT_VERSION:
        raise ModelpressError(f"{folder} was written by a newer modelpress (format "
                              f"{manifest['format_version']}); upgrade modelpress")
    return manifest


def read_safetensors(path: Path) -> dict[str, torch.Tensor]:
    """Tensors of a safetensors file (no pickle); a damaged file is a user error."""
    try:
        return load_file(str(path))
    except (SafetensorError, OSError, ValueError) as e:
        raise ModelpressError(f"{path} is not a valid safetensors file ({e}); "
                              "re-download or save it again") from None


def _module_from(folder: Path, model: torch.nn.Module, fqn: Any, meta: Any) -> torch.nn.Module:
    """The quantized module a manifest entry describes, its sizes checked against the linear layer
    it replaces (the model's own skeleton, on the meta device) before anything is allocated."""

    bad = f"{folder}/{MANIFEST}: module {fqn!r}"
    meta = dict(meta) if isinstance(meta, dict) else {}
    cls = QUANT_LINEAR_CLASSES.get(meta.pop("class", None))
    if cls is None:
        raise ModelpressError(f"{bad} has no class this modelpress knows; upgrade modelpress or save it again")
    try:
        target = model.get_submodule(fqn)
    except (AttributeError, TypeError):
        target = None
    if not isinstance(target, torch.nn.Linear):
        raise ModelpressError(f"{bad} is not a linear layer of this model; the checkpoint is damaged")
    if (meta.get("in_features"), meta.get("out_features")) != (target.in_features, target.out_features):
        raise ModelpressError(f"{bad} says {meta.get('in_features')!r} x {meta.get('out_features')!r} features where the "
                              f"model has {target.in_features} x {target.out_features}; the checkpoint is damaged")
    try:
        return cls(**meta)
    except (TypeError, ValueError, ArithmeticError) as e:  # an argument the class does not take, a value it refuses
        raise ModelpressError(f"{bad} cannot be rebuilt ({e}); the checkpoint is damaged") from None


def load(folder: str | Path) -> tuple[torch.nn.Module, Any]:
    """(model, tokenizer) from a modelpress checkpoint folder."""
    folder = Path(folder)
    manifest = read_manifest(folder)
    config = AutoConfig.from_pretrained(folder)
    state = read_safetensors(folder / WEIGHTS)
    inside = list(manifest["modules"])  # the rest (stored in the model's dtype) computes in fp32
    state = {k: v.float() if v.dtype in HALF and not within(k, inside) else v for k, v in state.items()}

    def swap_in(model: torch.nn.Module) -> None:
        for fqn, meta in manifest["modules"].items():
            replace(model, fqn, _module_from(folder, model, fqn, meta))

    model = build_causal_lm(config, state, prepare=swap_in)
    if manifest.get("quantization"):
        record(model).config = BaseConfig.from_dict(manifest["quantization"])
    tokenizer = AutoTokenizer.from_pretrained(folder)
    return model, tokenizer


def describe_checkpoint(folder: Path) -> dict[str, Any]:
    m = read_manifest(folder)
    q = m.get("quantization") or {}
    return {"format_version": m["format_version"], "method": q.get("method"),
            **{k: v for k, v in q.items() if k not in ("method", "version", "targets", "ignore")},
            "quantized_modules": len(m["modules"]), "tensors": count_tensors(folder / WEIGHTS)}

register_format(Format("modelpress", "a modelpress checkpoint folder (safetensors, config.json, modelpress.json)",
                       save=save, check=check_target, describe=describe_checkpoint))
register_format(Format("transformers", "a transformers folder (safetensors weights)", describe=describe_transformers))
