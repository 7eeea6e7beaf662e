"""Versioned, frozen method configs, saved as JSON beside the weights and read back on load."""
from __future__ import annotations

import dataclasses
from typing import Any, ClassVar

from .errors import ModelpressError

_CONFIG_TYPES: dict[str, type["BaseConfig"]] = {}


GROUP_SIZE_HELP = "input columns sharing one scale, or 'channel' for one per output channel"


def option(default: Any, help: str, **cli: Any) -> Any:  # noqa: A002
    """A config field with the help text its command-line flag shows (cli.py makes one flag per
    field). `cli` hints: choices=(...), none="word" (the word that means None), cli=False (no flag)."""
    return dataclasses.field(default=default, metadata={"help": help, **cli})


@dataclasses.dataclass(frozen=True)
class BaseConfig:
    """Base of every method config.

    Subclasses set `method` (the name users type) and validate their fields in `__post_init__`,
    raising `ValueError` with a message a user can act on. `targets` / `ignore` are regexes over
    module paths (fqn) choosing which linear layers are compressed; the output head and the
    embeddings are left alone unless a target names them.
    """

    method: ClassVar[str] = ""
    version: ClassVar[int] = 1
    calibrated: ClassVar[bool] = False  # whether the handler reads calibration windows
    targets: tuple[str, ...] = option((r".*",), "regexes of the layers to compress", cli=False)
    ignore: tuple[str, ...] = option((r"(^|\.)lm_head$",), "regexes of the layers to leave alone", cli=False)
    float_dtype: str = option("model", "the tensors left unquantized (embeddings, norms): 'model', its config's "
                                       "dtype (bf16 for the default model, as the peers save them), or float32",
                              choices=("model", "float32"))

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        if cls.method:
            _CONFIG_TYPES[cls.method] = cls

    def to_dict(self) -> dict[str, Any]:
        d = {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}
        d = {k: list(v) if isinstance(v, tuple) else v for k, v in d.items()}
        return {"method": self.method, "version": self.version, **d}

    def describe(self) -> str:
        """One line naming the method and its settings, e.g. 'nf4 (blocksize 64, double quant False, ...)'."""
        d = self.to_dict()
        for k in ("method", "version", "targets", "ignore"):
            d.pop(k)
        if d.get("float_dtype") == "model":  # the default: said only where changed
            d.pop("float_dtype")
        none = {f.name: f.metadata.get("none", "channel") for f in dataclasses.fields(self)}
        settings = ", ".join(f"{k.replace('_', ' ')} {none[k] if v is None else v}" for k, v in d.items())
        return f"{self.method} ({settings})"

    @staticmethod
    def from_dict(d: dict[str, Any]) -> "BaseConfig":
        d = dict(d)
        method = d.pop("method", None)
        version = d.pop("version", None)
        cls = _CONFIG_TYPES.get(method)
        if cls is None:
            raise ModelpressError(f"unknown method {method!r} in saved config; known: {sorted(_CONFIG_TYPES)}")
        if version is not None and version > cls.version:
            raise ModelpressError(
                f"config for {method!r} has version {version}, newer than this modelpress reads "
                f"({cls.version}); upgrade modelpress")
        names = {f.name for f in dataclasses.fields(cls)}
        kwargs = {k: tuple(v) if isinstance(v, list) else v for k, v in d.items() if k in names}
        return cls(**kwargs)


def config_types() -> dict[str, type[BaseConfig]]:
    """Every registered config class, keyed by method name."""
    return dict(_CONFIG_TYPES)
