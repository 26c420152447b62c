"""Command line of `preprocess build-shards` (the build itself is preprocess/build.py).

    preprocess build-shards coco --annotations ann.json --images img/ --size 64 --workers 2
    preprocess build-shards coco --help          (common flags + the flags of that source)
    preprocess build-shards coco --config build.toml --seed 3   (file values, flags override)

Every BuildConfig field is a flag (`--shard-size` for shard_size); a source's own `Options` fields
are flags too. Precedence: the source's `config_defaults` (e.g. 28 px raw for MNIST) < `--config
FILE` (TOML, or JSON such as a manifest's saved config; unknown keys are rejected; a source's options
go in a [source_options] table) < flags given on the command line. The config is printed before the
build and saved in the manifest.
"""
from __future__ import annotations

import dataclasses
import sys

from preprocess.config import BuildConfig, ConfigError
from preprocess.sources import SOURCES, SourceError, get_source_class
from shards.cli import CommandParser, add_fields, coerce_field, field_names, read_config, run_command

_SKIP_FIELDS = ("source", "source_options")


def make_parser(source: str | None) -> CommandParser:
    ap = CommandParser("preprocess build-shards", __doc__)
    ap.add_argument("source", choices=sorted(SOURCES), help=f"dataset reader, one of: {', '.join(sorted(SOURCES))}")
    ap.add_argument("--config", metavar="FILE.toml", help="load config values from a TOML file first (JSON read too)")
    ap.add_argument("--print-config", action="store_true", help="print the resolved config and exit")
    add_fields(ap.add_argument_group("build options"), BuildConfig, skip=_SKIP_FIELDS)
    if source in SOURCES:
        cls = get_source_class(source)
        if dataclasses.fields(cls.Options):
            add_fields(ap.add_argument_group(f"{source} options"), cls.Options)
    return ap


def config_from_args(argv: list[str]) -> tuple[BuildConfig, object]:
    first = next((a for a in argv if a in SOURCES), None)
    args = make_parser(first).parse_args(argv)
    values = read_config(args.config, BuildConfig) if args.config else {}
    # precedence: source's defaults < --config file < flags given on the command line
    source_cls = get_source_class(args.source)
    values = {**getattr(source_cls, "config_defaults", {}), **values}
    values["source"] = args.source
    options = dict(values.get("source_options") or {})
    option_names = field_names(source_cls.Options)
    unknown = sorted(set(options) - set(option_names))
    if unknown:
        raise ConfigError(f"unknown {args.source} options: {', '.join(unknown)}")
    for name, v in vars(args).items():
        if name in ("source", "config", "print_config"):
            continue
        if name in option_names:  # typed like the source's Options field ("3" -> 3)
            options[name] = coerce_field(source_cls.Options, name, v, f"--{name.replace('_', '-')}")
        else:
            values[name] = v
    values["source_options"] = options
    return BuildConfig.from_dict(values, args.config or "flags"), args


def main(argv: list[str] | None = None) -> int:
    from preprocess.build import run

    argv = list(sys.argv[1:] if argv is None else argv)

    def body():
        cfg, args = config_from_args(argv)
        print(f"build-shards config:\n{cfg}", file=sys.stderr)
        return 0 if args.print_config else run(cfg)

    return run_command("preprocess build-shards", body, (ConfigError, SourceError))
