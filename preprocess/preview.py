"""`preprocess preview`: a PNG grid of samples from a shard set, to look at before spending GPU hours.

    preprocess preview shards/fashion-mnist/train --out preview.png --n 16

Per sample three panels: the image, its saliency as a heat map (-1 blue ... +1 red, 0 = the
middle colour: "unknown" / `--saliency none`), and the heat map over the image; the class name
and index are the title, the saliency panel names the kind that sample's map shows (mask, box...),
and the grid's title the set's (`mixed` with the count of each). Samples are the first N in shard order (builds shuffle at write time,
so they already mix classes). Reads and decodes with shards/reading.py; the set may be a URL
(s3://bucket/prefix, https://...).
"""
from __future__ import annotations

import json
import math
import os
import sys
from pathlib import Path

import numpy as np

from shards.cli import CommandParser
from shards.format import ShardFormatError, uint8_to_saliency
from shards.manifest import check_shard_files, read_manifest
from shards.reading import decode_sample, iter_tar_samples
from shards.storage import atomic_write
from preprocess.info import saliency_summary

PANEL_INCHES = 1.4
DPI = 100


class PreviewError(Exception):
    """A user-facing problem (bad folder, damaged shard, unwritable output); one line, exit 2."""


def decode_preview(sample: dict, image_info: dict) -> tuple[np.ndarray, np.ndarray, int]:
    """(image HxW or HxWx3 uint8 RGB, saliency HxW float in [-1, 1], label) of one shard sample."""
    try:
        d = decode_sample(sample, image_info)
    except ShardFormatError as e:
        raise PreviewError(str(e)) from None
    img = d.image[..., 0] if d.image.shape[2] == 1 else d.image
    return img, uint8_to_saliency(d.saliency), d.label


def _sample_kind(sample: dict) -> str | None:
    """The saliency kind recorded in a sample's json (None for sets built before it was recorded)."""
    try:
        meta = json.loads(sample.get("json", b"{}"))
    except (ValueError, UnicodeDecodeError):
        return None
    return meta.get("saliency") if isinstance(meta, dict) else None


def first_samples(root: str | os.PathLike, n: int):
    """(manifest, [(key, image, saliency, label, kind)]) for the first n samples of a checked shard set."""
    manifest = read_manifest(root)
    problems = check_shard_files(manifest)
    if problems:  # a truncated tar would show garbage or stop half-way: name it instead
        raise PreviewError(problems[0] + (f" (and {len(problems) - 1} more problems)" if len(problems) > 1 else ""))
    out = []
    for tar in manifest.tar_paths():
        for sample in iter_tar_samples(tar):
            img, sal, label = decode_preview(sample, manifest.image)
            out.append((sample["__key__"], img, sal, label, _sample_kind(sample)))
            if len(out) >= n:
                return manifest, out
    return manifest, out


def render_grid(samples, classes: list[str], out: Path, cols: int | None = None, title: str = "") -> tuple[int, int]:
    """Draw the grid and write it to `out` atomically (temp name, then rename); returns (width, height)."""
    import matplotlib

    matplotlib.use("Agg")  # files only: no display on build machines
    import matplotlib.pyplot as plt

    n = len(samples)
    groups = cols or max(1, math.ceil(math.sqrt(n)))
    rows = math.ceil(n / groups)
    fig, axes = plt.subplots(rows, 3 * groups, figsize=(3 * groups * PANEL_INCHES, rows * (PANEL_INCHES + 0.25)),
                             dpi=DPI, squeeze=False)
    heat = plt.get_cmap("coolwarm")
    for ax in axes.flat:
        ax.axis("off")
    for i, (key, img, sal, label, kind) in enumerate(samples):
        r, c = divmod(i, groups)
        a_img, a_sal, a_ovl = axes[r, 3 * c: 3 * c + 3]
        grey = img.ndim == 2
        rgb = np.repeat(img[..., None], 3, axis=2) if grey else img
        name = classes[label] if 0 <= label < len(classes) else "?"
        a_img.imshow(img, cmap="gray" if grey else None, vmin=0, vmax=255, interpolation="nearest")
        a_img.set_title(f"{name} ({label})", fontsize=7)
        a_sal.imshow(sal, cmap=heat, vmin=-1.0, vmax=1.0, interpolation="nearest")
        a_sal.set_title(f"saliency ({kind})" if kind else "saliency", fontsize=6)
        # overlay: the heat map blended over the image where salient (s > 0), image alone elsewhere
        colour = heat((sal + 1.0) / 2.0)[..., :3]
        alpha = np.clip(sal, 0.0, 1.0)[..., None] * 0.6
        a_ovl.imshow((rgb / 255.0) * (1 - alpha) + colour * alpha, interpolation="nearest")
        a_ovl.set_title(key[:18], fontsize=5)
    if title:
        fig.suptitle(title, fontsize=8)
    fig.tight_layout()
    out.parent.mkdir(parents=True, exist_ok=True)
    try:
        atomic_write(out, lambda f: fig.savefig(f, format="png", dpi=DPI))
    finally:
        plt.close(fig)
    w, h = fig.get_size_inches() * DPI
    return int(round(w)), int(round(h))


def grid_title(root, manifest, shown: int) -> str:
    info = manifest.image
    return (f"{root}: {shown} of {manifest.num_samples} samples, {info['width']}x{info['height']}x{info['channels']} "
            f"{info['format']}, saliency {saliency_summary(manifest.raw)}")


def build_parser() -> CommandParser:
    ap = CommandParser("preprocess preview", __doc__)
    ap.add_argument("dir", help="shard set folder or URL (s3://bucket/prefix, https://...) with manifest.json")
    ap.add_argument("--out", required=True, help="PNG file to write")
    ap.add_argument("--n", type=int, default=16, help="number of samples (default: 16)")
    ap.add_argument("--cols", type=int, default=0, help="samples per row (default: about sqrt(n))")
    return ap


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if not 1 <= args.n <= 400:
        print(f"preprocess preview: --n must be in [1, 400], got {args.n}", file=sys.stderr)
        return 2
    out = Path(args.out)
    try:
        manifest, samples = first_samples(args.dir, args.n)
        if not samples:
            raise PreviewError(f"{args.dir}: the shard set holds no samples")
        size = render_grid(samples, manifest.classes, out, args.cols or None, grid_title(args.dir, manifest, len(samples)))
    except (PreviewError, ShardFormatError) as e:
        print(f"preprocess preview: {e}", file=sys.stderr)
        return 2
    except OSError as e:
        print(f"preprocess preview: {out}: cannot write ({e.strerror or e})", file=sys.stderr)
        return 2
    print(f"wrote {out} ({size[0]}x{size[1]} px, {len(samples)} samples from {args.dir})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
