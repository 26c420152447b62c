"""BuildConfig: every knob of `preprocess build-shards`, as plain data.

The config is printed at the start of a build and saved in manifest.json. Fields split in two:
the ones that decide the bytes of the output (saved, compared on resume) and the ones that only
decide how the build runs (workers, node split, overwrite, output folder), which are left out of
the manifest so that a build with 1 or 8 workers, on 1 or 3 nodes, gives byte-identical files.
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
from dataclasses import dataclass

# ConfigError: a user mistake in the configuration (one line, exit 2), the same class for every command
from shards.cli import Config, ConfigError, option  # noqa: F401  (ConfigError re-exported)

UNITS = ("auto", "object", "image")
IMAGE_FORMATS = ("jpg", "png", "raw")
SALIENCY_KINDS = ("auto", "mask", "box", "foreground", "foreground-box", "none")

# fields that do not change a single output byte: never saved, never compared
RUNTIME_FIELDS = ("out", "workers", "num_nodes", "node_rank", "overwrite", "progress", "executor", "ray_address",
                  "retries")
EXECUTORS = ("local", "ray")
# input locations: saved (so a user sees what was read) but not compared, because the same data
# may sit at another path on another node; the input fingerprint covers their content
PATH_FIELDS = ("root", "annotations", "images")
# fields added after shards were first built: left out of the digest while at their default, so a
# build made before they existed still resumes (its digest did not include them either)
LATER_FIELDS = ("max_pixels", "allow_outside_root")


@dataclass
class BuildConfig(Config):
    source: str = option("coco", "dataset reader (the positional SOURCE)")
    split: str = option("train", "split name: train/val/test; one shard set (and manifest) per split")
    # inputs (meaning depends on the source; see `preprocess build-shards SOURCE --help`)
    root: str = option("", "dataset folder (sources that read a folder layout)")
    annotations: str = option("", "annotation file (COCO: instances JSON)")
    images: str = option("", "image folder (COCO: defaults to the annotation file's folder)")
    source_options: dict = option({}, "source-specific options (validated by the source)")
    # what a sample is and how it looks
    unit: str = option("auto", "object: one sample per annotated object (square crop + context); image: one per "
                       "image; auto: the source's default (COCO/VOC: object; classification sets: image)",
                       choices=UNITS)
    size: int = option(0, "output side in pixels (square; image and saliency share the geometry); 0 = the source's "
                       "default (64 when it has none)")
    image_format: str = option("jpg", "jpg (see --jpeg-quality), png (lossless) or raw (HxWxC uint8, for tiny images)",
                               choices=IMAGE_FORMATS)
    jpeg_quality: int = option(90, "JPEG quality 1-100")
    saliency: str = option("auto", "auto (mask if annotated, else foreground), mask, box (coarser map), foreground, "
                           "foreground-box (the foreground's bounding box: the coarser map where there are no boxes), "
                           "none (s=0)", choices=SALIENCY_KINDS)
    sigma_frac: float = option(0.05, "Gaussian blur sigma as a fraction of --size; 0 = the paper's hard map")
    foreground_threshold: float = option(16.0, "foreground = pixels differing from the border colour by more than "
                                         "this many grey levels")
    context: float = option(0.25, "margin around an object's box, as a fraction of its longer side, on each side")
    min_box: float = option(2.0, "skip objects whose box is smaller than this many source pixels")
    # input safety (issue 16): what is read at all
    max_pixels: int = option(100_000_000, "skip (count as 'image too large') images whose header declares more "
                             "pixels than this; they are never decoded (a decompression bomb cannot exhaust memory)")
    allow_outside_root: bool = option(False, "read image files that annotations place outside the dataset folder "
                                      "(absolute paths, '..', symlinks leading out); without it they are skipped as "
                                      "'path outside root'")
    # shards
    shard_size: int = option(1000, "samples per shard")
    seed: int = option(0, "shuffle seed (which samples share a shard, and their order)")
    # running
    out: str = option("", "output folder, or a URL such as s3://bucket/prefix (credentials: the S3 client's own "
                      "chain; see preprocess/remote_out.py)", default_help="shards/SOURCE/SPLIT")
    workers: int = option(1, "worker processes; each writes whole shards")
    num_nodes: int = option(1, "split the shards over this many machines (each runs with its --node-rank)")
    node_rank: int = option(0, "which part of a --num-nodes build this run writes")
    overwrite: bool = option(False, "replace an existing build with a different config or inputs")
    progress: bool = option(True, "show a progress bar")
    executor: str = option("local", "local: --workers processes on this machine; ray: one Ray task per shard over a "
                           "Ray cluster (pip install 'satpipe[ray]'), same bytes", choices=EXECUTORS)
    ray_address: str = option("", "with --executor ray: the cluster to join (e.g. HOST:6379); empty: start a local "
                              "Ray instance with --workers CPUs")
    retries: int = option(2, "with --executor ray: times a failed shard task is tried again before the build stops")

    def validate(self) -> None:
        def need(ok: bool, msg: str):
            if not ok:
                raise ConfigError(msg)

        need(self.size == 0 or 8 <= self.size <= 1024, f"--size must be 0 (auto) or in [8, 1024], got {self.size}")
        need(1 <= self.jpeg_quality <= 100, f"--jpeg-quality must be in [1, 100], got {self.jpeg_quality}")
        need(0.0 <= self.sigma_frac <= 1.0, f"--sigma-frac must be in [0, 1], got {self.sigma_frac}")
        need(0.0 <= self.context <= 4.0, f"--context must be in [0, 4], got {self.context}")
        need(0.0 <= self.foreground_threshold < 255.0, "--foreground-threshold must be in [0, 255) grey levels")
        need(self.min_box >= 0, "--min-box must be >= 0")
        need(type(self.max_pixels) is int and self.max_pixels >= 1,
             f"--max-pixels must be a whole number >= 1, got {self.max_pixels!r}")
        need(self.shard_size >= 1, f"--shard-size must be >= 1, got {self.shard_size}")
        need(self.workers >= 1, f"--workers must be >= 1, got {self.workers}")
        need(self.num_nodes >= 1, f"--num-nodes must be >= 1, got {self.num_nodes}")
        need(0 <= self.node_rank < self.num_nodes, f"--node-rank must be in [0, {self.num_nodes}), got {self.node_rank}")
        need(bool(self.split) and "/" not in self.split and not self.split.startswith("."),
             f"--split must be a plain name, got {self.split!r}")
        need(type(self.retries) is int and self.retries >= 0, f"--retries must be >= 0, got {self.retries!r}")
        need(self.executor == "ray" or not self.ray_address, "--ray-address needs --executor ray")
        need(self.executor == "local" or self.num_nodes == 1,
             "--executor ray spreads the shards over the cluster itself; --num-nodes is for builds without Ray")

    # ------------------------------------------------------------------ (de)serialization

    def saved(self) -> dict:
        """What goes into manifest.json: everything that decides the output bytes, plus input paths."""
        return {k: v for k, v in self.to_dict().items() if k not in RUNTIME_FIELDS}

    def digest(self) -> str:
        """Hash of the output-deciding fields: equal digests + equal input fingerprints = same shards."""
        default = {f.name: f.default for f in dataclasses.fields(self)}
        d = {k: v for k, v in self.saved().items()
             if k not in PATH_FIELDS and not (k in LATER_FIELDS and v == default[k])}
        return hashlib.sha256(json.dumps(d, sort_keys=True).encode()).hexdigest()[:16]

    def __str__(self) -> str:
        return self.pretty()
