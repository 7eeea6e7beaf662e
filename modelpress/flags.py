"""Command-line flags made from dataclass fields: every field declared with `config.option(default,
help)` becomes `--field-name` (bool: --x / --no-x; tuple: comma-separated; `int | None`: a number
or the word that means None), its help text the field's. A new field is a new flag with no CLI edit.
Fields that several classes share (bits, group_size) are one flag whose help names them all."""
from __future__ import annotations

import argparse
import dataclasses
from typing import Any, Iterable

from .errors import ModelpressError

UNSET = object()  # a flag left out (None is a value: group size 'channel')


def positive(text: str) -> int:
    """argparse type: a whole number above 0."""
    try:
        v = int(text)
    except ValueError:
        v = 0
    if v <= 0:
        raise argparse.ArgumentTypeError(f"expected a positive whole number, got {text!r}")
    return v


def fields_of(classes: Iterable[type]) -> dict[str, tuple[dataclasses.Field, list[str]]]:
    """name -> (the first such field, the names of the classes that have it); fields with help only."""
    out: dict[str, tuple[dataclasses.Field, list[str]]] = {}
    for cls in classes:
        label = getattr(cls, "method", "") or cls.__name__
        for f in dataclasses.fields(cls):
            if f.metadata.get("cli", True) and "help" in f.metadata:
                out.setdefault(f.name, (f, []))[1].append(label)
    return out


def field_names(cls: type) -> set[str]:
    return {f.name for f in dataclasses.fields(cls)}


def _kind(f: dataclasses.Field) -> dict[str, Any]:
    """argparse keywords from the field's annotation (a string under `from __future__ import annotations`,
    else the type itself)."""
    kind = f.type if isinstance(f.type, str) else str(f.type) if "|" in str(f.type) else f.type.__name__
    none = f.metadata.get("none")
    if kind == "bool":
        return {"action": argparse.BooleanOptionalAction}
    if kind.startswith("tuple"):
        return {"type": lambda t: tuple(x.strip() for x in t.split(",") if x.strip())}
    base = {"int": int, "float": float, "str": str}[kind.split("|")[0].strip()]

    def parse(text: str) -> Any:
        if none is not None and text.lower() in (none, "none"):
            return None
        try:
            return base(text)
        except ValueError:
            words = f" or {none!r}" if none else ""
            raise argparse.ArgumentTypeError(f"expected a {base.__name__}{words}, got {text!r}") from None

    return {"type": parse, **({"choices": f.metadata["choices"]} if "choices" in f.metadata else {})}


def add(parser: argparse.ArgumentParser, classes: Iterable[type], label: bool = True) -> None:
    """One flag per field of `classes` (label: prefix the help with the classes that take it)."""
    for name, (f, owners) in fields_of(classes).items():
        default = f.default if f.default is not None else "none"
        default = ",".join(default) if isinstance(default, tuple) else default
        prefix = f"{', '.join(owners)}: " if label else ""
        parser.add_argument("--" + name.replace("_", "-"), dest=name, default=UNSET, **_kind(f),
                            help=f"{prefix}{f.metadata['help']} (default: {default})")


def given(args: argparse.Namespace, cls: type, what: str, classes: Iterable[type]) -> dict[str, Any]:
    """The flags given that `cls` takes; a flag given that it does not take is an error naming `what`."""
    every = fields_of(classes)
    mine = field_names(cls)
    out = {n: getattr(args, n) for n in every if getattr(args, n, UNSET) is not UNSET}
    for name in out:
        if name not in mine:
            takes = ", ".join("--" + n.replace("_", "-") for n in every if n in mine) or "no options"
            raise ModelpressError(f"--{name.replace('_', '-')} does not apply to {what} (it takes {takes})")
    return out


def method_config(args: argparse.Namespace, methods: dict[str, type]) -> Any:
    """The config of --method (one of `methods`, by name) from the flags given; group size left out: 64, or
    per channel at 8 bits."""
    if args.method not in methods:
        raise ModelpressError(f"unknown method {args.method!r}; choose one of: {', '.join(sorted(methods))}")
    chosen = given(args, methods[args.method], f"--method {args.method}", methods.values())
    if "group_size" in field_names(methods[args.method]) and "group_size" not in chosen:
        chosen["group_size"] = None if chosen.get("bits") == 8 else 64
    try:
        return methods[args.method](**chosen)
    except ValueError as e:
        raise ModelpressError(str(e)) from None


STRUCTURED_PARTS = ("mlp", "heads")


def structured_spec(text: str) -> dict[str, float]:
    """argparse type of prune's --structured: 'mlp=0.25,heads=0.25' -> {'mlp': 0.25, 'heads': 0.25}."""
    out: dict[str, float] = {}
    for part in (p.strip() for p in text.split(",") if p.strip()):
        key, sep, value = (s.strip() for s in part.partition("="))
        try:
            if not sep or key not in STRUCTURED_PARTS:
                raise ValueError
            out[key] = float(value)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{part!r}: write PART=FRACTION, PART one of "
                                             f"{', '.join(STRUCTURED_PARTS)} (mlp=0.25,heads=0.25)") from None
    if not out:
        raise argparse.ArgumentTypeError("name what to cut: mlp=0.25,heads=0.25")
    return out


def take_structured(args: argparse.Namespace) -> None:
    """prune's --structured mlp=F,heads=F as --method structured --mlp F --heads F (a part it leaves out: 0)."""
    if args.method not in (None, "structured"):
        raise ModelpressError(f"--structured is structured pruning; it does not go with --method {args.method}")
    for part in STRUCTURED_PARTS:
        if getattr(args, part, UNSET) is not UNSET:
            raise ModelpressError(f"--{part} and --structured both set the {part} cut; give it once")
        setattr(args, part, args.structured.get(part, 0.0))
    args.method = "structured"


def build(args: argparse.Namespace, cls: type) -> Any:
    """An instance of `cls` from its flags (defaults where left out)."""
    return cls(**{n: v for n, v in ((n, getattr(args, n, UNSET)) for n in field_names(cls)) if v is not UNSET})


def name_dir_pairs(values: list[str] | None, flag: str) -> dict[str, str]:
    """{name: folder} of repeated `flag NAME=DIR` values (serve's --lora)."""
    out: dict[str, str] = {}
    for v in values or []:
        name, sep, folder = v.partition("=")
        if not sep or not name or not folder:
            raise ModelpressError(f"{flag} {v!r}: write NAME=DIR (the name clients send as `model`)")
        if name in out:
            raise ModelpressError(f"{flag}: the name {name!r} is given twice")
        out[name] = folder
    return out
