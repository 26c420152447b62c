"""Build planning and the state of an output folder (what resume and multi-node builds rely on).

The plan is a pure function of (config, input fingerprint, work items): items shuffled with the
seed (so every shard mixes classes), then packed into shards by expected sample count. Its digest
names the exact build; every finished shard leaves a sidecar `.build/<shard>.json` with that digest,
its size/sha256 and its counts. A re-run keeps shards whose sidecar and bytes match and builds the
rest, so a killed build resumes to byte-identical files; a different plan refuses to mix.

    OUT/<split>-000000.tar, .idx   shards (final names appear only when complete)
    OUT/.build/plan.json           manifest header: config, fingerprint, classes, plan-time skips
    OUT/.build/<split>-000000.json per-shard sidecar
    OUT/.build/node-R-of-K.json    a node of a multi-node build finished its part
    OUT/manifest.json              written last
"""
from __future__ import annotations

import hashlib
import json
import shutil
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from shards.format import MANIFEST_NAME, atomic_write_json, sha256_file
from preprocess.sources.base import WorkItem

STATE_DIR = ".build"


class BuildError(Exception):
    """The build cannot go on; the message names the file/folder and the problem (exit 1 or 2)."""

    def __init__(self, msg: str, code: int = 2):
        super().__init__(msg)
        self.code = code


@dataclass
class ShardPlan:
    index: int
    name: str  # file stem, e.g. train-000003
    items: list[WorkItem]

    @property
    def expected(self) -> int:
        return sum(it.expected for it in self.items)


def make_plan(items: list[WorkItem], split: str, shard_size: int, seed: int) -> list[ShardPlan]:
    """Shuffle items with the seed, then cut into shards of about `shard_size` expected samples.

    An item's samples stay together (an image is decoded once); an item larger than a shard gets
    a shard of its own. Samples inside a shard are shuffled again by the worker."""
    order = np.random.default_rng(seed).permutation(len(items))
    shards: list[list[WorkItem]] = [[]]
    count = 0
    for i in order:
        it = items[int(i)]
        if shards[-1] and count + it.expected > shard_size:
            shards.append([])
            count = 0
        shards[-1].append(it)
        count += it.expected
    return [ShardPlan(n, f"{split}-{n:06d}", its) for n, its in enumerate(shards) if its]


def plan_digest(config_digest: str, fingerprint_digest: str, shards: list[ShardPlan]) -> str:
    h = hashlib.sha256(f"{config_digest}\n{fingerprint_digest}\n".encode())
    for s in shards:
        h.update((s.name + ":" + ",".join(it.id for it in s.items) + "\n").encode())
    return h.hexdigest()[:16]


def digest_of(obj) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True).encode()).hexdigest()[:16]


# ----------------------------------------------------------------------------- output folder state

def state_dir(out: Path) -> Path:
    return out / STATE_DIR


def read_json(path: Path) -> dict | None:
    try:
        return json.loads(path.read_text())
    except (FileNotFoundError, json.JSONDecodeError, UnicodeDecodeError):
        return None  # absent or half-written by a killed run: treated as absent


def _describe_difference(old: dict, new: dict) -> str:
    oc, nc = old.get("config", {}), new.get("config", {})
    keys = sorted(k for k in set(oc) | set(nc) if oc.get(k) != nc.get(k) and k not in ("root", "annotations", "images"))
    parts = [f"config differs in {', '.join(keys)}"] if keys else []
    if old.get("fingerprint", {}).get("digest") != new.get("fingerprint", {}).get("digest"):
        parts.append("inputs changed")
    return "; ".join(parts) or "different plan"


def prepare_output(out: Path, header: dict, overwrite: bool) -> None:
    """Create OUT, refuse to mix with a different earlier build (unless overwrite), save the header."""
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise BuildError(f"{out}: cannot create output folder ({e.strerror})") from None
    earlier = read_json(state_dir(out) / "plan.json") or read_json(out / MANIFEST_NAME)
    foreign = earlier is None and any(out.glob("*.tar"))
    if earlier is not None and earlier.get("plan") != header["plan"] or foreign:
        if not overwrite:
            why = "holds tar files of an unknown build" if foreign else \
                f"holds a different build ({_describe_difference(earlier, header)})"
            raise BuildError(f"{out}: {why}; pass --overwrite to replace it")
        clear_output(out)
    try:
        state_dir(out).mkdir(exist_ok=True)
        atomic_write_json(state_dir(out) / "plan.json", header)
    except OSError as e:
        raise BuildError(f"{out}: output folder is not writable ({e.strerror})") from None


def clear_output(out: Path) -> None:
    """Remove an earlier build (--overwrite): shards, indexes, manifest, state, stale temp files."""
    for pattern in ("*.tar", "*.idx", ".*.tmp-*", MANIFEST_NAME):
        for p in out.glob(pattern):
            p.unlink()
    shutil.rmtree(state_dir(out), ignore_errors=True)


def remove_stale_temps(out: Path, name: str) -> None:
    """Temp files a killed run left for this shard (only ours: other nodes may be writing theirs)."""
    for p in out.glob(f".{name}.*.tmp-*"):
        p.unlink(missing_ok=True)


def shard_done(out: Path, shard: ShardPlan, plan: str) -> dict | None:
    """The sidecar of a shard that is complete and intact for this plan, else None."""
    side = read_json(state_dir(out) / f"{shard.name}.json")
    if side is None or side.get("plan") != plan:
        return None
    info = side.get("shard")
    if info is None:  # every sample of this shard was skipped: nothing on disk to check
        return side
    for name, size_key, sha_key in ((info["tar"], "bytes", "sha256"), (info["index"], "index_bytes", "index_sha256")):
        p = out / name
        if not p.is_file() or p.stat().st_size != info[size_key] or sha256_file(p) != info[sha_key]:
            return None
    return side
