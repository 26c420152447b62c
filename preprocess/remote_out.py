"""`build-shards --out s3://bucket/prefix`: build in a local staging folder, publish every file in order.

    preprocess build-shards coco ... --out s3://bucket/shards/coco/train [--workers N | --executor ray]

The build itself is the local one (same planning, same shard bytes, same manifest) run against a
temporary staging folder; this module moves files between it and the bucket (through fsspec/s3fs,
any fsspec URL whose single-object writes are atomic, as S3's are):

* Publishing order. The process that wrote a shard (a --workers process or a Ray task, on any
  node: nothing of the driver's disk is needed) uploads its tar, then its index, then its sidecar
  `.build/<shard>.json`, and deletes its local copies, so staging holds about one shard per worker.
  The driver uploads `provenance.json` and then `manifest.json` after every shard is published.
  An S3 object is visible only once completely written, so a reader who finds the manifest finds
  every shard it lists, complete.
* Resume against the bucket. Before planning, one listing of the prefix is taken and the small
  state files (`.build/plan.json`, sidecars, the manifest) are copied into staging; plan.py's usual
  logic decides (resume, carry over, refuse, or --overwrite), and what it changed in staging is
  mirrored back: a manifest it removed goes first, then sidecars it removed, shards without a sidecar
  of the current plan, and the new plan and sidecars go up. A shard counts as done when its
  sidecar (same plan digest) is there and its tar and index objects have the sidecar's sizes (from
  the listing: an object is complete or absent, so the size tells another build's file apart; the
  bytes were hashed when written, and `preprocess verify URL` hashes every one).
* Credentials come from the S3 client's own chain (environment, AWS_PROFILE, ~/.aws, roles;
  AWS_ENDPOINT_URL for S3-compatible servers); nothing here reads, logs or saves them, and the
  URL (never a key) is the only remote name written anywhere. `--out` is a runtime field, so the
  manifest is byte-identical to a local build's.
* Multi-node builds without Ray (--num-nodes) write to one shared folder; with a URL use
  --executor ray instead (refused in one line).
"""
from __future__ import annotations

import atexit
import json
import shutil
import tempfile
from pathlib import Path

from shards.format import MANIFEST_NAME, PROVENANCE_NAME
from shards.storage import StorageError, location, remote_errors
from preprocess.plan import STATE_DIR, BuildError, ShardPlan, prepare_output, read_json, state_dir


class RemoteOutput:
    """The bucket side of one build: staging folder, listing, pull, mirror, publish."""

    def __init__(self, url: str):
        self.url = url.rstrip("/")
        self.root = location(self.url)
        self.staging = Path(tempfile.mkdtemp(prefix="satpipe-build-"))
        atexit.register(shutil.rmtree, self.staging, True)  # also after an error or Ctrl-C
        self.listing: dict[str, int] = {}

    # ------------------------------------------------------------------ bucket access

    def _remote(self, rel: str) -> str:
        return f"{self.root.path}/{rel}"

    def _list(self) -> dict[str, int]:
        """{path relative to the prefix: bytes} of every object under it (one paginated listing)."""
        fs = self.root.fs
        with remote_errors(self.url):
            try:
                fs.invalidate_cache(self.root.path)  # listings are cached per process; this one must be fresh
                found = fs.find(self.root.path, detail=True)
            except FileNotFoundError:
                return {}
        base = self.root.path.rstrip("/") + "/"
        return {k[len(base):]: int(v.get("size") or 0) for k, v in found.items() if k.startswith(base)}

    def _delete(self, rels: list[str]) -> None:
        if rels:
            with remote_errors(self.url):
                self.root.fs.rm([self._remote(r) for r in rels])
            for r in rels:
                self.listing.pop(r, None)

    def _upload(self, local: Path, rel: str) -> None:
        with remote_errors(f"{self.url}/{rel}"):
            self.root.fs.put_file(str(local), self._remote(rel))
        self.listing[rel] = local.stat().st_size

    # ------------------------------------------------------------------ the build's hooks

    def prepare(self, out: Path, header: dict, overwrite: bool, source=None, shards: list[ShardPlan] = ()) -> str:
        """plan.prepare_output, decided on the bucket's state and mirrored back to it."""
        self.listing = self._list()
        state = [r for r in self.listing if r.startswith(STATE_DIR + "/") and r.endswith(".json")]
        known = f"{STATE_DIR}/plan.json" in self.listing or MANIFEST_NAME in self.listing
        if not known and any(r.endswith(".tar") and "/" not in r for r in self.listing) and not overwrite:
            raise BuildError(f"{self.url}: holds tar files of an unknown build; pass --overwrite to replace it")
        wanted = state + [r for r in (MANIFEST_NAME,) if r in self.listing]
        if wanted:
            with remote_errors(self.url):
                blobs = self.root.fs.cat([self._remote(r) for r in wanted])
            for r in wanted:
                target = self.staging / r
                target.parent.mkdir(parents=True, exist_ok=True)
                target.write_bytes(blobs[self._remote(r)])
        before = _snapshot(self.staging)
        try:
            note = prepare_output(self.staging, header, overwrite, source, shards)
        except BuildError as e:  # name the bucket, not the staging folder
            raise BuildError(str(e).replace(str(self.staging), self.url), code=e.code) from None
        after = _snapshot(self.staging)
        # a removed manifest first: from then on the prefix is an unfinished build
        self._delete([r for r in (MANIFEST_NAME, PROVENANCE_NAME) if r in self.listing and r not in after])
        # shards without a sidecar of this plan (another build's, or cut off before their sidecar) go
        current = {Path(r).stem for r, data in after.items()
                   if r.startswith(STATE_DIR + "/") and r != f"{STATE_DIR}/plan.json" and _plan_of(data) == header["plan"]}
        orphans = [r for r in self.listing
                   if "/" not in r and r.endswith((".tar", ".idx")) and Path(r).stem not in current]
        self._delete(orphans + [r for r in state if r not in after])
        for rel, data in sorted(after.items()):
            if rel.startswith(STATE_DIR + "/") and before.get(rel) != data:
                self._upload(self.staging / rel, rel)
        return note.replace(str(self.staging), self.url)

    def shard_done(self, shard: ShardPlan, plan: str) -> dict | None:
        """The sidecar of a shard whose tar and index are in the bucket with the sizes it records, else None."""
        side = read_json(state_dir(self.staging) / f"{shard.name}.json")
        if side is None or side.get("plan") != plan or f"{STATE_DIR}/{shard.name}.json" not in self.listing:
            return None
        info = side.get("shard")
        if info is not None and (self.listing.get(info["tar"]) != info["bytes"]
                                 or self.listing.get(info["index"]) != info["index_bytes"]):
            return None
        return side

    def publish_manifest(self) -> None:
        """provenance.json, then manifest.json: the last object of the build. Staging goes afterwards."""
        for rel in (PROVENANCE_NAME, MANIFEST_NAME):
            self._upload(self.staging / rel, rel)
        shutil.rmtree(self.staging, ignore_errors=True)


def publish_shard(url: str, out: Path, name: str, side: dict) -> None:
    """Worker side: upload one finished shard (tar, index, then sidecar) and drop the local copies."""
    root = location(url)
    files = [] if side.get("shard") is None else [side["shard"]["tar"], side["shard"]["index"]]
    for rel in [*files, f"{STATE_DIR}/{name}.json"]:
        with remote_errors(f"{url.rstrip('/')}/{rel}"):
            root.fs.put_file(str(out / rel), f"{root.path}/{rel}")
    for rel in files:
        (out / rel).unlink(missing_ok=True)


def open_remote_output(cfg) -> RemoteOutput:
    """The RemoteOutput of a build whose --out is a URL; BuildError for what cannot work."""
    if cfg.num_nodes > 1:
        raise BuildError(f"--out {cfg.out}: --num-nodes builds need one shared folder; for object storage use "
                         "--executor ray (one driver, any number of nodes)")
    try:
        return RemoteOutput(cfg.out)
    except StorageError as e:
        raise BuildError(str(e), code=1) from None


def _snapshot(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in folder.rglob("*") if p.is_file()}


def _plan_of(data: bytes) -> str | None:
    try:
        return json.loads(data).get("plan")
    except (ValueError, AttributeError):
        return None
