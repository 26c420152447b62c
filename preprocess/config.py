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
from dataclasses import dataclass, field

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


class ConfigError(ValueError):
    """A user mistake in the build configuration (reported as one line, exit 2)."""


@dataclass
class BuildConfig:
    source: str = "coco"
    split: str = "train"
    # inputs (meaning depends on the source; see `preprocess build-shards SOURCE --help`)
    root: str = ""  # dataset folder
    annotations: str = ""  # annotation file (COCO json)
    images: str = ""  # image folder
    source_options: dict = field(default_factory=dict)  # source-specific options (validated by the source)
    # what a sample is and how it looks
    unit: str = "auto"  # object: one sample per annotated object; image: one per image; auto: the source's first
    size: int = 0  # output side in pixels (square); 0 = the source's default_size (64 when it has none)
    image_format: str = "jpg"
    jpeg_quality: int = 90
    saliency: str = "auto"  # auto = the best the source has (mask > box > foreground)
    sigma_frac: float = 0.05  # Gaussian sigma as a fraction of `size`; 0 = the paper's hard map
    foreground_threshold: float = 16.0  # grey levels a pixel must differ from the border colour to be foreground
    context: float = 0.25  # margin around an object box, as a fraction of its longer side, each side
    min_box: float = 2.0  # objects whose box side is below this many source pixels are skipped
    # input safety (issue 16): what is read at all
    max_pixels: int = 100_000_000  # images whose header declares more pixels are skipped, never decoded
    allow_outside_root: bool = False  # read image paths from annotations that resolve outside the dataset folder
    # shards
    shard_size: int = 1000  # samples per shard
    seed: int = 0
    # running
    out: str = ""
    workers: int = 1
    num_nodes: int = 1
    node_rank: int = 0
    overwrite: bool = False
    progress: bool = True
    executor: str = "local"  # local: --workers processes here; ray: one Ray task per shard (preprocess/ray_executor.py)
    ray_address: str = ""  # a running Ray cluster to join; empty: start a local instance with --workers CPUs
    retries: int = 2  # --executor ray: a failed shard task is tried again this many times

    def __post_init__(self):
        self.validate()

    def validate(self) -> None:
        def need(ok: bool, msg: str):
            if not ok:
                raise ConfigError(msg)

        need(self.unit in UNITS, f"--unit must be one of {UNITS}, got {self.unit!r}")
        need(self.image_format in IMAGE_FORMATS, f"--image-format must be one of {IMAGE_FORMATS}")
        need(self.saliency in SALIENCY_KINDS, f"--saliency must be one of {SALIENCY_KINDS}, got {self.saliency!r}")
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
        need(self.executor in EXECUTORS, f"--executor must be one of {EXECUTORS}, got {self.executor!r}")
        need(type(self.retries) is int and self.retries >= 0, f"--retries must be >= 0, got {self.retries!r}")
        need(self.executor == "ray" or not self.ray_address, "--ray-address needs --executor ray")
        need(self.executor == "local" or self.num_nodes == 1,
             "--executor ray spreads the shards over the cluster itself; --num-nodes is for builds without Ray")

    # ------------------------------------------------------------------ (de)serialization

    @classmethod
    def from_dict(cls, d: dict) -> "BuildConfig":
        """Build from a dict, rejecting unknown keys (a typo must not be silently ignored)."""
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(d) - known)
        if unknown:
            raise ConfigError(f"unknown config keys: {', '.join(unknown)}")
        return cls(**d)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

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
        width = max(len(f.name) for f in dataclasses.fields(self))
        return "\n".join(f"  {k:<{width}} = {v!r}" for k, v in self.to_dict().items())
