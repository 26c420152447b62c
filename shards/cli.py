"""The one config and command-line layer of every satpipe command (build-shards, verify, info, preview,
finalize, shuffle-saliency, teacher-saliency, fit, eval, compare, experiment).

It lives in shards/ because shards/ is the one package both preprocess/ and sat_train/ may import (the
data flows one way; the two halves share only the shard format and this layer). Standard library only:
what the commands need (help and choices from field metadata, "8/255" numbers, TOML/JSON files with
unknown keys refused, one error line) is a few hundred lines, less than adapting a dataclass-to-CLI
library (tyro) to the same error style, torchrun's --run-dir spelling and the sources' own Options.

- A command's settings are one dataclass deriving from `Config`; each field is declared with
  `option(default, help, choices=...)`, so help text and valid values live in the field's metadata.
- Validation happens on construction (`__post_init__`): every value is coerced to the field's type,
  nan/inf refused, choices checked, then the class's own `validate()`. `TrainConfig(method="x")` raises.
- Numbers accept fractions everywhere: `--eps 8/255` and `--eps 0.0314` are the same kind of value, and
  `8/255` parses to exactly the float 8 / 255.
- `add_fields(parser, cls)` adds every field as a flag (`--shard-size` for shard_size; bools as
  `--x/--no-x`), help from the metadata with its default and, for choice fields, the valid values.
- `read_config(path, cls, table)` reads TOML (optionally one named table such as [fit] or [eval]) or
  JSON (a saved config.json or a manifest's config); unknown keys are refused, naming the file and key.
- One error style: `COMMAND: message` on stderr, exit 2, no traceback (`CommandParser` makes argparse's
  own refusals look the same; `run_command` turns a command's user errors into that line).
"""
from __future__ import annotations

import argparse
import dataclasses
import functools
import json
import math
import re
import sys
import tomllib
import types
import typing
from pathlib import Path


# printed by `sat-train --help` and `preprocess --help`: what every command has in common
CONVENTIONS = """\
Conventions of every command (preprocess and sat-train alike):
  inputs are positional (shard sets, run folders; fit and eval name their shard set with --shards);
  what a command writes is --out: build-shards, shuffle-saliency and teacher-saliency a shard set folder,
  preview a PNG file, eval a results JSON file, compare a report folder; fit writes its run folder,
  --run (also spelled --out, and --run-dir under torchrun).
  --config FILE.toml holds the command's flags as keys (shard_size for --shard-size; JSON is read too);
  flags override the file; unknown keys are an error.
  eps and every pixel budget are in [0, 1] units, written 8/255 or 0.0314.
  --progress/--no-progress on every command that draws a progress bar.
  A user error is one line, `COMMAND: message`, exit 2 (verify and info: 1 for a set
  they cannot read or find damaged)."""


class ConfigError(ValueError):
    """A config file or flag is wrong; the message (one line) names the source and the problem."""


# ----------------------------------------------------------------------------- fields

def option(default=dataclasses.MISSING, help: str = "", choices=None, *, factory=None, flag: str | None = None,
           aliases: tuple = (), metavar: str | None = None, default_help: str | None = None):
    """A dataclass field carrying its command-line help. `choices`: the valid values (checked on
    construction, listed in --help). `aliases`: further flag spellings. `default_help`: how --help shows
    the default when the stored value means something else (e.g. "" for "shards/SOURCE/SPLIT"); "" shows none."""
    meta = {"help": help, "choices": tuple(choices) if choices is not None else None, "flag": flag,
            "aliases": tuple(aliases), "metavar": metavar, "default_help": default_help}
    if factory is None and isinstance(default, (list, dict, set)):
        value = default
        factory = functools.partial(type(value), value)  # a fresh copy per instance
    if factory is not None:
        return dataclasses.field(default_factory=factory, metadata=meta)
    return dataclasses.field(default=default, metadata=meta)


_FRACTION = re.compile(r"^\s*([^/\s]+)\s*/\s*([^/\s]+)\s*$")


def number(value) -> float:
    """A float from a number or a string such as "0.0314", "8/255" (exactly 8 / 255) or "25.5/255"."""
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return float(value)
    if not isinstance(value, str):
        raise TypeError("expected a number")
    m = _FRACTION.match(value)
    if m:
        num, den = float(m.group(1)), float(m.group(2))
        if den == 0:
            raise ValueError("division by zero")
        return num / den
    return float(value)


@functools.lru_cache(maxsize=None)
def hints(cls) -> dict:
    return typing.get_type_hints(cls)


def coerce(hint, value):
    """`value` as the type `hint` (bool, int, float, str, dict, Optional[...], tuple[...], list[...]);
    strings (flags) are parsed, lists/tuples as comma-separated text. TypeError/ValueError if it does not fit."""
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin in (typing.Union, types.UnionType):
        inner = [a for a in args if a is not type(None)]
        if value is None or (isinstance(value, str) and value.strip().lower() in ("none", "")):
            return None
        return coerce(inner[0], value)
    if origin in (tuple, list) or hint in (tuple, list):
        items = [v for v in value.split(",") if v.strip()] if isinstance(value, str) else value
        if not isinstance(items, (list, tuple)):
            raise TypeError("expected a list")
        if origin is tuple and args and args[-1] is not Ellipsis:
            if len(items) != len(args):
                raise ValueError(f"needs {len(args)} values")
            return tuple(coerce(a, v) for a, v in zip(args, items))
        inner = args[0] if args else None
        out = [coerce(inner, v) if inner is not None else v for v in items]
        return tuple(out) if (origin or hint) is tuple else out
    if hint is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in ("true", "1", "yes", "false", "0", "no"):
            return value.lower() in ("true", "1", "yes")
        raise ValueError("expected true/false")
    if hint is int:
        if isinstance(value, bool) or isinstance(value, float):
            raise TypeError("expected an integer")
        return int(value)
    if hint is float:
        return number(value)
    if hint is str:
        if not isinstance(value, str):
            raise TypeError("expected a string")
        return value
    if hint is dict:
        if not isinstance(value, dict):
            raise TypeError("expected a table")
        return dict(value)
    return value


def coerce_field(cls, name: str, value, source: str | None = None):
    """`value` coerced to the type of field `name` of dataclass `cls`; its `config_error` (ConfigError for a
    plain dataclass) naming `source` and the key."""
    hint = hints(cls)[name]
    try:
        return coerce(hint, value)
    except (TypeError, ValueError) as e:
        prefix = f"{source}: " if source else ""
        error = getattr(cls, "config_error", ConfigError)
        kind = getattr(hint, "__name__", None) or str(hint).replace("typing.", "")
        raise error(f"{prefix}{name} = {value!r} is not a valid {kind} ({e})") from None


def non_finite(obj) -> list[str]:
    """Fields of a config dataclass holding nan or inf (alone, in a tuple or in a list)."""
    bad = []
    for f in dataclasses.fields(obj):
        value = getattr(obj, f.name)
        items = value if isinstance(value, (tuple, list)) else (value,)
        if any(isinstance(v, float) and not math.isfinite(v) for v in items):
            bad.append(f"{f.name} = {value!r}")
    return bad


class Config:
    """Mixin of every command's config dataclass: coerced and validated on construction.
    Subclasses set `config_error` to raise their own ConfigError subclass and override `validate`."""

    config_error = ConfigError

    def __post_init__(self):
        err, where = type(self).config_error, getattr(self, "_source", None)
        where = None if where == "flags" else where  # a flag's message names the field: no prefix needed
        prefix = f"{where}: " if where else ""
        for f in dataclasses.fields(self):  # object.__setattr__: frozen config classes are coerced too
            object.__setattr__(self, f.name, coerce_field(type(self), f.name, getattr(self, f.name), where))
        bad = non_finite(self)
        if bad:
            raise err(f"{prefix}{', '.join(bad)}: every number must be finite")
        for f in dataclasses.fields(self):
            choices = f.metadata.get("choices")
            value = getattr(self, f.name)
            if choices and value not in choices:
                raise err(f"{prefix}{f.name} {value!r} is not one of {', '.join(map(str, choices))}")
        try:
            self.validate()
        except err as e:
            raise err(f"{prefix}{e}" if prefix and not str(e).startswith(prefix) else str(e)) from None

    def validate(self) -> None:
        """Checks beyond type and choices; raise `config_error` with a one-line message."""

    @classmethod
    def from_dict(cls, values: dict, source: str = "config"):
        """An instance from a dict (a file's or the flags'), refusing unknown keys; errors name `source`."""
        names = [f.name for f in dataclasses.fields(cls)]
        unknown = sorted(set(values) - set(names))
        if unknown:
            raise cls.config_error(f"{source}: unknown config key(s) {', '.join(unknown)} (known: {', '.join(names)})")
        obj = cls.__new__(cls)
        object.__setattr__(obj, "_source", source)  # read by __post_init__ for its messages, then dropped
        try:
            cls.__init__(obj, **values)
        finally:
            obj.__dict__.pop("_source", None)
        return obj

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    def pretty(self) -> str:
        width = max(len(f.name) for f in dataclasses.fields(self))
        return "\n".join(f"  {k:<{width}} = {v!r}" for k, v in self.to_dict().items())


def field_names(cls) -> list[str]:
    return [f.name for f in dataclasses.fields(cls)]


# ----------------------------------------------------------------------------- files

def read_config(path, cls=None, table: str | None = None, error: type[Exception] = ConfigError,
                what: str = "config file") -> dict:
    """The key/values of a config file: TOML, or JSON for a `.json` file (a saved config.json, a manifest's
    config). With `table` (e.g. "eval"), a file holding only that table gives its contents. With `cls`,
    unknown keys are refused naming the file and the key. Missing or malformed files raise `error`."""
    path = Path(path)
    try:
        text = path.read_text()
    except FileNotFoundError:
        raise error(f"{path}: no such {what}") from None
    except OSError as e:
        raise error(f"{path}: cannot read the {what} ({e.strerror or e})") from None
    try:
        data = json.loads(text) if path.suffix == ".json" else tomllib.loads(text)
    except json.JSONDecodeError as e:
        raise error(f"{path}: not valid JSON ({e})") from None
    except tomllib.TOMLDecodeError as e:
        raise error(f"{path}: not valid TOML ({e})") from None
    if not isinstance(data, dict):
        raise error(f"{path}: the {what} must hold key = value pairs")
    if table and set(data) == {table} and isinstance(data[table], dict):
        data = data[table]
    if cls is not None:
        names = field_names(cls)
        unknown = sorted(set(data) - set(names))
        if unknown:
            raise error(f"{path}: unknown config key(s) {', '.join(unknown)} (known: {', '.join(names)})")
    return data


def from_file_and_flags(classes, ns: argparse.Namespace, path=None, table: str | None = None) -> list:
    """One instance of each config class from a --config file's keys and the flags given (flags win, and
    `add_fields` leaves only given flags in `ns`). A file key that no class has is refused, naming the file."""
    data = read_config(path, table=table) if path else {}
    known = {name for cls in classes for name in field_names(cls)}
    unknown = sorted(set(data) - known)
    if unknown:
        raise ConfigError(f"{path}: unknown config key(s) {', '.join(unknown)} (known: {', '.join(sorted(known))})")
    flags = vars(ns)
    out = []
    for cls in classes:
        names = field_names(cls)
        values = {**{k: v for k, v in data.items() if k in names}, **{k: v for k, v in flags.items() if k in names}}
        out.append(cls.from_dict(values, str(path) if path else "flags"))
    return out


# ----------------------------------------------------------------------------- flags

class CommandParser(argparse.ArgumentParser):
    """argparse in the project's error style: `PROG: message (see PROG --help)`, one line, exit 2.
    The whole docstring goes in the description once (no opening printed twice)."""

    def __init__(self, prog: str, doc: str | None = None, **kw):
        kw.setdefault("formatter_class", argparse.RawDescriptionHelpFormatter)
        super().__init__(prog=prog, description=doc, **kw)

    def error(self, message):
        self.exit(2, f"{self.prog}: {message} (see {self.prog} --help)\n")


def _shown(value) -> str:
    if isinstance(value, (list, tuple)):
        return ",".join(map(str, value)) if value else "none"
    if isinstance(value, str):
        return repr(value)
    return str(value)


def field_help(f: dataclasses.Field, default) -> str:
    text = f.metadata.get("help") or ""
    choices = f.metadata.get("choices")
    if choices:
        text += f" (one of: {', '.join(map(str, choices))})"
    shown = f.metadata.get("default_help")
    shown = _shown(default) if shown is None else shown
    if isinstance(default, bool):  # shown as the flag that gives it
        shown = f"--{'' if default else 'no-'}{f.name.replace('_', '-')}"
    if shown and "(default:" not in text:  # not twice where the help states its default in words
        text += f" (default: {shown})"
    return text.strip().replace("%", "%%")


def default_of(f: dataclasses.Field):
    if f.default is not dataclasses.MISSING:
        return f.default
    if f.default_factory is not dataclasses.MISSING:
        return f.default_factory()
    return None


def add_fields(group, cls, skip=(), only=None) -> list[str]:
    """Add every field of `cls` (but `skip`; or just `only`) as a flag to an argparse parser or group.
    Flags default to SUPPRESS: the namespace holds only what the user typed, as text (coerced by the
    config on construction, so "8/255" is a number everywhere). Returns the dests added."""
    added = []
    for f in dataclasses.fields(cls):
        if f.name in skip or (only is not None and f.name not in only) or f.name.startswith("_"):
            continue
        hint, default = hints(cls)[f.name], default_of(f)
        flags = [f.metadata.get("flag") or "--" + f.name.replace("_", "-"), *f.metadata.get("aliases", ())]
        help_ = field_help(f, default)
        if hint is bool:
            group.add_argument(*flags, dest=f.name, action=argparse.BooleanOptionalAction,
                               default=argparse.SUPPRESS, help=help_)
        else:
            group.add_argument(*flags, dest=f.name, default=argparse.SUPPRESS, help=help_,
                               metavar=f.metadata.get("metavar") or f.name.upper())
        added.append(f.name)
    return added


def add_progress(parser, default: bool = True) -> None:
    """--progress/--no-progress, the same on every command."""
    parser.add_argument("--progress", action=argparse.BooleanOptionalAction, default=default,
                        help=f"show a progress bar on stderr (default: --{'' if default else 'no-'}progress)")


def run_command(prog: str, body, user_errors=(ConfigError,), code: int = 2) -> int:
    """body()'s exit status; a user error prints `PROG: message` (one line, no traceback) and returns `code`."""
    try:
        return int(body() or 0)
    except user_errors as e:
        print(f"{prog}: {e}", file=sys.stderr)
        return code


def fail(prog: str, message: str, code: int = 2) -> int:
    print(f"{prog}: {message}", file=sys.stderr)
    return code
