"""Build planning and the state of an output folder (what resume and multi-node builds rely on).

The plan is a pure function of (config, input fingerprint, work items): items shuffled with the
seed (so every shard mixes classes), then packed into shards by expected sample count. Its digest
names the exact build; every finished shard leaves a sidecar `.build/<shard>.json` with that digest,
its size/sha256 and its counts. A re-run keeps shards whose sidecar and bytes match and builds the
rest, so a killed build resumes to byte-identical files; a different plan refuses to mix.

One exception (`carry_over`): when the inputs changed only in files of items that had been skipped
while loading (the user fixed an empty or truncated image the build reported), a re-run keeps the
other shards and rebuilds the shards of those items, as a fresh build of the fixed inputs would
write them. It needs the source's `item_files` (each sidecar records the sizes of its items' files)
and is exactly as strict as the input fingerprint (names and sizes).

    OUT/<split>-000000.tar, .idx   shards (final names appear only when complete)
    OUT/.build/plan.json           manifest header: config, fingerprint, classes, plan-time skips
    OUT/.build/<split>-000000.json per-shard sidecar
    OUT/.build/node-R-of-K.json    a node of a multi-node build finished its part
    OUT/manifest.json              written last
"""
from __future__ import annotations

import hashlib
import json
import os
import shutil
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from shards.format import MANIFEST_NAME, PROVENANCE_NAME
from shards.storage import atomic_write_json, sha256_file
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


def layout_digest(shards: list[ShardPlan]) -> str:
    """Which items, expecting how many samples, go into which shard (the plan without its inputs)."""
    h = hashlib.sha256()
    for s in shards:
        h.update((s.name + ":" + ",".join(f"{it.id}*{it.expected}" for it in s.items) + "\n").encode())
    return h.hexdigest()[:16]


def digest_of(obj) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True).encode()).hexdigest()[:16]


def input_stamps(source, items: list[WorkItem]) -> dict[str, str] | None:
    """Per item the byte sizes of the files it reads ("1234,-1"; -1 = missing), or None when the
    source cannot name them. What a later `carry_over` compares: stat only, no reads."""
    stamps = {}
    for it in items:
        files = source.item_files(it) if hasattr(source, "item_files") else None
        if files is None:
            return None
        sizes = []
        for f in files:
            try:
                sizes.append(str(os.stat(f).st_size))
            except (OSError, ValueError):
                sizes.append("-1")
        stamps[it.id] = ",".join(sizes)
    return stamps


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


def prepare_output(out: Path, header: dict, overwrite: bool, source=None, shards: list[ShardPlan] = ()) -> str:
    """Create OUT, refuse to mix with a different earlier build (unless overwrite), save the header.

    Returns a line for the log when an earlier build was carried over to changed inputs, else ""."""
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise BuildError(f"{out}: cannot create output folder ({e.strerror})") from None
    earlier = read_json(state_dir(out) / "plan.json") or read_json(out / MANIFEST_NAME)
    foreign = earlier is None and any(out.glob("*.tar"))
    note = ""
    if earlier is not None and earlier.get("plan") != header["plan"] or foreign:
        if foreign:
            why = "holds tar files of an unknown build"
        elif overwrite:
            why = "replaced"
        else:
            why, note = carry_over(out, earlier, header, source, shards)
        if why:
            if not overwrite:
                raise BuildError(f"{out}: {why}; pass --overwrite to replace it")
            clear_output(out)
    try:
        state_dir(out).mkdir(exist_ok=True)
        atomic_write_json(state_dir(out) / "plan.json", header)
    except OSError as e:
        raise BuildError(f"{out}: output folder is not writable ({e.strerror})") from None
    return note


def carry_over(out: Path, earlier: dict, header: dict, source, shards: list[ShardPlan]) -> tuple[str, str]:
    """Move an earlier build of the same config and plan to inputs that changed only in files of items
    it had skipped: keep every other shard (its sidecar now names the new plan) and drop the shards of
    those items, which the build then makes. Returns (why not, "") or ("", a line for the log)."""
    same = ("config_digest", "layout", "classes", "image", "saliency", "plan_skips")
    if any(earlier.get(k) != header.get(k) for k in same):
        return f"holds a different build ({_describe_difference(earlier, header)})", ""
    old_fp, new_fp = earlier.get("fingerprint", {}), header["fingerprint"]
    changed_keys = sorted(k for k in set(old_fp) | set(new_fp) if k != "digest" and old_fp.get(k) != new_fp.get(k))
    file_keys = set(getattr(source, "item_file_keys", ()))
    if not file_keys or not set(changed_keys) <= file_keys:
        name = getattr(source, "name", "?")
        what = ", ".join(changed_keys) if file_keys else f"source {name!r} cannot tell which items changed"
        return f"holds a build of other inputs (inputs changed: {what})", ""
    keep, rebuild, built_changed = [], [], []
    for s in shards:
        side = read_json(state_dir(out) / f"{s.name}.json")
        if side is None or side.get("plan") != earlier["plan"]:
            continue  # not built yet: built now from the current inputs
        inputs = side.get("inputs")
        now = input_stamps(source, s.items)
        if inputs is None or now is None:
            return ("holds a build of other inputs (inputs changed, and the earlier build did not record "
                    "the files of its items)"), ""
        changed = [i for i, stamp in now.items() if inputs["stamps"].get(i) != stamp]
        skipped = set(inputs["skipped"])
        built_changed += [i for i in changed if i not in skipped]
        (rebuild if changed else keep).append((s, side))
    if built_changed:
        by_id = {it.id: it for s in shards for it in s.items}
        files = source.item_files(by_id[built_changed[0]])
        return (f"holds a build of other inputs: {len(built_changed)} item(s) that had been built changed "
                f"(e.g. {files[0] if files else built_changed[0]}); only files of skipped items may change "
                "between a build and its re-run"), ""
    # the manifest goes first: from here on the folder is an unfinished build of the new inputs
    (out / MANIFEST_NAME).unlink(missing_ok=True)
    for s, _ in rebuild:
        for p in (out / f"{s.name}.tar", out / f"{s.name}.idx", state_dir(out) / f"{s.name}.json"):
            p.unlink(missing_ok=True)
    for s, side in keep:
        atomic_write_json(state_dir(out) / f"{s.name}.json", {**side, "plan": header["plan"]})
    return "", (f"{out}: inputs changed only in files of items skipped before (fixed?): keeping "
                f"{len(keep)} shards, rebuilding {len(rebuild)}")


def clear_output(out: Path) -> None:
    """Remove an earlier build (--overwrite): shards, indexes, manifest, provenance, state, stale temp files."""
    for pattern in ("*.tar", "*.idx", ".*.tmp-*", MANIFEST_NAME, PROVENANCE_NAME):
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
