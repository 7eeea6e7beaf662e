"""The formats a model is saved in and read from, each registered once by its own file: a name, the
methods whose layers it can hold, how to save, how a transformers folder in it is read back, and how
`info` describes a file. `save(..., format=...)`, `load` and `info` dispatch here, so a new format
is one new file in formats/ that calls `register_format` (and an import in formats/__init__.py).

A leaf: it imports nothing of modelpress but the error type and the record."""
from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any, Callable

from safetensors import SafetensorError, safe_open

from ..errors import ModelpressError
from ..record import check_no_adapter, record

MANIFEST = "modelpress.json"   # what marks a modelpress checkpoint folder


@dataclasses.dataclass(frozen=True)
class Format:
    name: str
    summary: str                                   # one line for --help and errors
    methods: tuple[str, ...] | None = None         # the methods whose layers it holds; None: any model
    save: Callable[..., Path] | None = None        # save(model, tokenizer, path) -> path
    check: Callable[[Path], Path] | None = None    # refuses a destination before any work is done
    quant_method: str | None = None                # config.json's quantization_config.quant_method it reads
    # read(quantization_config, state dict) -> (modelpress config or None, state dict, prepare(model))
    read: Callable[[dict[str, Any], dict], tuple[Any, dict, Callable]] | None = None
    describe: Callable[[Path], dict[str, Any]] | None = None   # `info`'s fields for a file in it

    def accepts(self, method: str | None) -> bool:
        return self.methods is None or method in self.methods


_FORMATS: dict[str, Format] = {}


def register_format(fmt: Format) -> Format:
    if fmt.name in _FORMATS:
        raise ValueError(f"format {fmt.name!r} is registered twice")
    _FORMATS[fmt.name] = fmt
    return fmt


def formats() -> dict[str, Format]:
    """Every registered format, by name (registration order)."""
    return dict(_FORMATS)


def get_format(name: str) -> Format:
    fmt = _FORMATS.get(name)
    if fmt is None:
        raise ModelpressError(f"unknown format {name!r}; choose one of: {', '.join(n for n, f in _FORMATS.items() if f.save)}")
    return fmt


def for_quant_method(quant_method: Any) -> Format:
    """The format that reads a transformers folder quantized with `quant_method`."""
    for fmt in _FORMATS.values():
        if fmt.quant_method is not None and fmt.quant_method == quant_method:
            return fmt
    readable = ", ".join(f.quant_method for f in _FORMATS.values() if f.quant_method)
    raise ModelpressError(f"this folder is quantized with {quant_method!r}, which modelpress does not load "
                          f"(it loads {readable})")


def detect(path: Path) -> str:
    """The format of a file or folder: "gguf", "modelpress", a quantized transformers layout's
    format name, or "transformers" (a plain one). ModelpressError where it is none of them."""
    if path.is_file():
        if path.suffix.lower() != ".gguf":
            raise ModelpressError(f"{path} is a file but not a .gguf; give a GGUF file or a model folder")
        return "gguf"
    if (path / MANIFEST).is_file():
        return "modelpress"
    if not (path / "config.json").is_file():
        raise ModelpressError(f"{path} holds neither config.json nor {MANIFEST}; "
                              "give a transformers model folder or a modelpress checkpoint")
    qc = read_config_json(path / "config.json").get("quantization_config")
    return for_quant_method(qc.get("quant_method")).name if qc else "transformers"


def read_config_json(path: Path) -> dict[str, Any]:
    """config.json as a dict; a damaged one is a user error."""
    try:
        config = json.loads(path.read_text())
    except (OSError, ValueError, RecursionError) as e:
        raise ModelpressError(f"{path} is not valid JSON ({' '.join(str(e).split())}); the folder is damaged") from None
    if not isinstance(config, dict) or not isinstance(config.get("quantization_config") or {}, dict):
        raise ModelpressError(f"{path} is not a transformers config (an object with an object quantization_config)")
    return config


def count_tensors(path: Path) -> int:
    try:
        with safe_open(str(path), "pt") as f:
            return len(list(f.keys()))
    except (SafetensorError, OSError) as e:
        raise ModelpressError(f"{path} is not a valid safetensors file ({e})") from None


def describe_transformers(folder: Path) -> dict[str, Any]:
    """`info` of a transformers folder (plain or quantized by another tool): its quant_method, its tensors."""
    qc = read_config_json(folder / "config.json").get("quantization_config") or {}
    return {"quantization": qc.get("quant_method"), "tensors": sum(count_tensors(f) for f in folder.glob("*.safetensors"))}


def describe(path: Path) -> dict[str, Any]:
    """What `info` prints of a file or folder: its format and that format's own fields."""
    fmt = _FORMATS.get(detect(path))
    # a quantized transformers folder shows as "transformers", its layout as `quantization`
    shown = "transformers" if fmt is not None and fmt.quant_method else fmt.name if fmt is not None else None
    return {"format": shown, **(fmt.describe(path) if fmt is not None and fmt.describe else {})}


def save(model: Any, tokenizer: Any, path: str | Path, format: str = "modelpress") -> Path:  # noqa: A002
    """Write `model` and its tokenizer to `path` in `format` (default: a modelpress checkpoint
    folder). A format that cannot hold the model's method says so before anything is written."""
    fmt = get_format(format)
    if fmt.save is None:
        raise ModelpressError(f"modelpress reads the {fmt.name} format but does not write it")
    check_no_adapter(model, f"saving as {fmt.name}")
    config = record(model).config
    method = config.method if config is not None else None
    if not fmt.accepts(method):
        raise ModelpressError(f"the {fmt.name} format holds {', '.join(fmt.methods or ())} models, not "
                              f"{method or 'an uncompressed one'}; save it as --format modelpress")
    return fmt.save(model, tokenizer, path)


def check_destination(format: str, method: str | None, path: str | Path) -> Path:  # noqa: A002
    """What `save` would refuse, refused now, before a model is loaded or compressed."""
    fmt = get_format(format)
    if fmt.save is None or not fmt.accepts(method):
        save_hint = ", ".join(n for n, f in _FORMATS.items() if f.save and f.accepts(method))
        raise ModelpressError(f"--format {fmt.name} cannot hold a {method or 'float'} model; use one of: {save_hint}")
    return fmt.check(Path(path)) if fmt.check else Path(path)
