"""Command line of `preprocess build-shards` (the build itself is preprocess/build.py).

    preprocess build-shards coco --annotations ann.json --images img/ --size 64 --workers 2
    preprocess build-shards coco --help          (common flags + the flags of that source)
    preprocess build-shards coco --config cfg.json --seed 3   (file values, flags override)

Every BuildConfig field is a flag (`--shard-size` for shard_size); a source's own `Options` fields
are flags too. Precedence: the source's `config_defaults` (e.g. 28 px raw for MNIST) < `--config
FILE.json` (a saved config; unknown keys are rejected) < flags given on the command line.
The config is printed before the build and saved in the manifest.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import sys

from preprocess.config import BuildConfig, ConfigError
from preprocess.sources import SOURCES, SourceError, get_source_class

_HELP = {
    "split": "split name: train/val/test; one shard set (and manifest) per split",
    "root": "dataset folder (sources that read a folder layout)",
    "annotations": "annotation file (COCO: instances JSON)",
    "images": "image folder (COCO: defaults to the annotation file's folder)",
    "unit": "object: one sample per annotated object (square crop + context); image: one per image; "
            "auto: the source's default (COCO/VOC: object; classification sets: image)",
    "size": "output side in pixels (square; image and saliency share the geometry); 0 = the source's default",
    "image_format": "jpg (see --jpeg-quality), png (lossless) or raw (HxWxC uint8, for tiny images)",
    "jpeg_quality": "JPEG quality 1-100",
    "saliency": "auto (mask if annotated, else foreground), mask, box (coarser map), foreground, foreground-box "
                "(the foreground's bounding box: the coarser map where there are no boxes), none (s=0)",
    "sigma_frac": "Gaussian blur sigma as a fraction of --size; 0 = the paper's hard map",
    "foreground_threshold": "foreground = pixels differing from the border colour by more than this many grey levels",
    "context": "margin around an object's box, as a fraction of its longer side, on each side",
    "min_box": "skip objects whose box is smaller than this many source pixels",
    "max_pixels": "skip (count as 'image too large') images whose header declares more pixels than this; "
                  "they are never decoded (a decompression bomb cannot exhaust memory)",
    "allow_outside_root": "read image files that annotations place outside the dataset folder (absolute "
                          "paths, '..', symlinks leading out); without it they are skipped as 'path outside root'",
    "shard_size": "samples per shard",
    "seed": "shuffle seed (which samples share a shard, and their order)",
    "out": "output folder, or a URL such as s3://bucket/prefix (credentials: the S3 client's own chain; "
           "see preprocess/remote_out.py) (default: shards/SOURCE/SPLIT)",
    "workers": "worker processes; each writes whole shards",
    "num_nodes": "split the shards over this many machines (each runs with its --node-rank)",
    "node_rank": "which part of a --num-nodes build this run writes",
    "overwrite": "replace an existing build with a different config or inputs",
    "progress": "show a progress bar (--no-progress to hide)",
    "executor": "local: --workers processes on this machine; ray: one Ray task per shard over a Ray cluster "
                "(pip install 'satpipe[ray]'), same bytes",
    "ray_address": "with --executor ray: the cluster to join (e.g. HOST:6379); empty: start a local Ray "
                   "instance with --workers CPUs",
    "retries": "with --executor ray: times a failed shard task is tried again before the build stops",
}
_SKIP_FIELDS = ("source", "source_options")


def _add_field(group, name: str, default, help_: str) -> None:
    flag = "--" + name.replace("_", "-")
    if isinstance(default, bool):
        group.add_argument(flag, dest=name, action=argparse.BooleanOptionalAction, default=None,
                           help=f"{help_} (default: {default})")
    else:
        kind = type(default) if default is not None else str
        shown = help_ if "(default:" in help_ else f"{help_} (default: {default!r})"  # a help that names its own
        group.add_argument(flag, dest=name, type=kind, default=None, help=shown)


def make_parser(source: str | None) -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="preprocess build-shards", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("source", choices=sorted(SOURCES), help="dataset reader")
    ap.add_argument("--config", metavar="FILE.json", help="load config values from a JSON file first")
    ap.add_argument("--print-config", action="store_true", help="print the resolved config and exit")
    common = ap.add_argument_group("build options")
    for f in dataclasses.fields(BuildConfig):
        if f.name not in _SKIP_FIELDS:
            default = f.default if f.default is not dataclasses.MISSING else f.default_factory()
            _add_field(common, f.name, default, _HELP.get(f.name, f.name))
    if source in SOURCES:
        cls = get_source_class(source)
        extra = dataclasses.fields(cls.Options)
        if extra:
            group = ap.add_argument_group(f"{source} options")
            for f in extra:
                default = f.default if f.default is not dataclasses.MISSING else f.default_factory()
                _add_field(group, f.name, default, f.metadata.get("help", f.name))
    return ap


def config_from_args(argv: list[str]) -> tuple[BuildConfig, argparse.Namespace]:
    first = next((a for a in argv if a in SOURCES), None)
    args = make_parser(first).parse_args(argv)
    values: dict = {}
    if args.config:
        try:
            with open(args.config) as f:
                values = json.load(f)
        except (OSError, json.JSONDecodeError) as e:
            raise ConfigError(f"{args.config}: cannot read config ({e})") from None
        if not isinstance(values, dict):
            raise ConfigError(f"{args.config}: config must be a JSON object")
    # precedence: source's defaults < --config file < flags given on the command line
    values = {**getattr(get_source_class(args.source), "config_defaults", {}), **values}
    values["source"] = args.source
    options = dict(values.get("source_options") or {})
    option_names = {f.name for f in dataclasses.fields(get_source_class(args.source).Options)}
    for name, v in vars(args).items():
        if v is None or name in ("source", "config", "print_config"):
            continue
        if name in option_names:
            options[name] = v
        else:
            values[name] = v
    unknown = sorted(set(options) - option_names)
    if unknown:
        raise ConfigError(f"unknown {args.source} options: {', '.join(unknown)}")
    values["source_options"] = options
    return BuildConfig.from_dict(values), args


def main(argv: list[str] | None = None) -> int:
    from preprocess.build import run

    argv = list(sys.argv[1:] if argv is None else argv)
    try:
        cfg, args = config_from_args(argv)
    except (ConfigError, SourceError) as e:
        print(f"preprocess build-shards: {e}", file=sys.stderr)
        return 2
    print(f"build-shards config:\n{cfg}", file=sys.stderr)
    if args.print_config:
        return 0
    return run(cfg)
