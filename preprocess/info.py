"""`preprocess info DIR`: a shard set's manifest in a readable form.

    preprocess info shards/coco/train
    preprocess info shards/coco/train --json     (the raw manifest)
    preprocess info s3://bucket/shards/coco/train  (or https://...; credentials: the S3 client's own)
"""
from __future__ import annotations

import json
import sys

from shards import provenance
from shards.cli import CommandParser
from shards.format import ShardFormatError
from shards.manifest import read_manifest


def _size(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} GiB"


def saliency_summary(raw: dict) -> str:
    """`box (requested mask)`, `mixed: mask 40, box 8 (requested mask)`...: the kind the samples' maps
    really show (manifest saliency.kind, counts.saliency_kinds), then what the build asked for."""
    sal = raw.get("saliency") or {}
    kind, requested = sal.get("kind", "?"), sal.get("requested")
    per_kind = (raw.get("counts") or {}).get("saliency_kinds") or {}
    text = kind + (": " + ", ".join(f"{k} {n}" for k, n in per_kind.items()) if len(per_kind) > 1 else "")
    return text + (f" (requested {requested})" if requested and requested != kind else "")


def describe(root) -> str:
    m = read_manifest(root)
    raw, img, counts = m.raw, m.image, m.raw["counts"]
    total = sum(s["bytes"] for s in m.shards)
    per = [s["samples"] for s in m.shards]
    classes = ", ".join(f"{i}:{c}" for i, c in enumerate(m.classes[:20]))
    if m.num_classes > 20:
        classes += f", ... ({m.num_classes - 20} more)"
    sal = raw.get("saliency", {})
    lines = [
        f"shard set   {root}",
        f"source      {raw.get('source', raw['config'].get('source'))}, split {raw.get('split', '?')}, "
        f"satpipe {raw.get('satpipe_version', '?')}",
        f"samples     {m.num_samples} in {len(m.shards)} shards ({min(per, default=0)}-{max(per, default=0)} each), "
        f"{_size(total)}",
        f"image       {img['format']} {img['width']}x{img['height']}x{img['channels']}",
        f"saliency    {saliency_summary(raw)}, sigma_frac {sal.get('sigma_frac', '?')}, {sal.get('encoding', '')}",
        f"classes     {m.num_classes}: {classes}",
        f"counts      read {counts['read']}, written {counts['written']}, "
        f"skipped {sum(counts['skipped'].values())}",
    ]
    derived = raw.get("derived_from")
    if isinstance(derived, dict):  # a derived set (shards/derive.py): teacher-saliency, shuffle-saliency
        params = ", ".join(f"{k}={v}" for k, v in derived.get("derivation", {}).get("params", {}).items())
        lines.append(f"derived     {derived.get('derivation', {}).get('name')} of {derived.get('path')} ({params})")
    examples = raw.get("skip_examples", {})
    for reason, n in counts["skipped"].items():
        ex = examples.get(reason, [])
        lines.append(f"  skipped   {n:>7}  {reason}" + (f"  (e.g. {'; '.join(ex[:2])})" if ex else ""))
    lines.append("fingerprint " + ", ".join(f"{k}={v}" for k, v in sorted(m.fingerprint.items())))
    lines.append(f"made by     {provenance.describe(provenance.read_provenance(m.root))}")
    lines.append("config")
    width = max(len(k) for k in raw["config"]) if raw["config"] else 0
    lines += [f"  {k:<{width}} = {v!r}" for k, v in raw["config"].items()]
    return "\n".join(lines)


def build_parser() -> CommandParser:
    ap = CommandParser("preprocess info", __doc__)
    ap.add_argument("dir", help="shard set folder or URL (s3://bucket/prefix, https://...) holding manifest.json")
    ap.add_argument("--json", action="store_true", help="print the manifest as JSON")
    return ap


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        if args.json:
            print(json.dumps(read_manifest(args.dir).raw, indent=2, sort_keys=True))
        else:
            print(describe(args.dir))
    except ShardFormatError as e:
        print(f"preprocess info: {e}", file=sys.stderr)
        return 1
    return 0
