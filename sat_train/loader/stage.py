"""Local copies of remote shard sets for the DALI backend, which reads local files only.

    stage_shard_set("s3://bucket/shards/fmnist/train") -> ~/.cache/satpipe/shards/<url hash>/

Why staging rather than feeding DALI through `external_source` from the network: the DALI backend
already feeds its pipeline from Python (dali_backend._PlanSource), but with one `os.pread` per
sample at index offsets, in plan order across shards; over S3 or HTTP that would be one ranged
request per sample (~10-50 ms each), every epoch. A local copy is read once, checked once, and
every epoch after that runs at local-disk speed with the exact code path (and bytes) of a local set.
The torch and device backends stream tars from the URL instead (one sequential read per shard).

Where: $SATPIPE_SHARD_CACHE, else ~/.cache/satpipe/shards; one folder per URL (sha256 of the URL),
holding the shards, their indexes and, written last, the manifest's exact bytes.
Bound: $SATPIPE_SHARD_CACHE_GB (default 50 GiB) for the whole cache. A set larger than the bound
is refused in one line; otherwise the least recently used other sets are removed until it fits.
Checks: every shard and index is downloaded under a temp name, hashed while it is written, and
renamed only when its sha256 equals the manifest's; a file already cached is kept only when its
size and sha256 still match the manifest of the URL (a rebuilt set replaces its changed shards).
So every byte DALI reads was checked against the manifest's sha256 before use.
Concurrency: an exclusive lock file per set, so DDP ranks (or runs) on one host stage it once.
"""
from __future__ import annotations

import fcntl
import hashlib
import os
import shutil
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from shards.format import MANIFEST_NAME, ShardFormatError
from shards.manifest import HASH_THREADS, read_manifest
from shards.storage import AtomicFile, atomic_write_bytes, open_binary, remote_errors, sha256_file

from .plan import LoaderError

DEFAULT_CACHE_GB = 50.0
USED_STAMP = ".last-used"
CHUNK = 1 << 20


def cache_root() -> Path:
    return Path(os.environ.get("SATPIPE_SHARD_CACHE") or Path.home() / ".cache" / "satpipe" / "shards")


def cache_bound() -> int:
    raw = os.environ.get("SATPIPE_SHARD_CACHE_GB", "")
    try:
        gb = float(raw) if raw else DEFAULT_CACHE_GB
    except ValueError:
        raise LoaderError(f"SATPIPE_SHARD_CACHE_GB={raw!r} is not a number of GiB") from None
    return int(gb * 2**30)


class Staged:
    """A staged copy: its folder, and the shared lock that keeps other processes from evicting it while
    it is read (held until `release()` or until the object is garbage collected)."""

    def __init__(self, folder: Path, lock):
        self.folder, self._lock = folder, lock

    def release(self) -> None:
        if self._lock is not None:
            self._lock.close()
            self._lock = None

    def __del__(self):
        self.release()


def stage_shard_set(url: str, root: Path | None = None, bound: int | None = None, log=None) -> Staged:
    """A checked local copy of the shard set at `url` (see the module docstring); LoaderError (one line)
    otherwise."""
    root = Path(root) if root is not None else cache_root()
    bound = cache_bound() if bound is None else bound
    try:
        manifest = read_manifest(url)
    except ShardFormatError as e:
        raise LoaderError(str(e)) from None
    files = [(s[k], s[size], s[sha]) for s in manifest.shards
             for k, size, sha in (("tar", "bytes", "sha256"), ("index", "index_bytes", "index_sha256"))]
    need = sum(size for _, size, _ in files)
    if need > bound:
        raise LoaderError(f"{url}: {need / 2**30:.2f} GiB of shards exceed the local shard cache's bound of "
                          f"{bound / 2**30:.2f} GiB (SATPIPE_SHARD_CACHE_GB); raise it or use --loader-backend torch, "
                          "which streams from the URL")
    folder = root / hashlib.sha256(url.rstrip("/").encode()).hexdigest()[:24]
    folder.mkdir(parents=True, exist_ok=True)
    lock = open(folder.parent / f"{folder.name}.lock", "w")
    try:
        fcntl.flock(lock, fcntl.LOCK_EX)  # another rank staging the same set: wait, then find it done
        (folder / USED_STAMP).touch()
        _make_room(root, folder, need, bound)
        (folder / MANIFEST_NAME).unlink(missing_ok=True)  # a set being (re)staged is not a shard set
        todo = [f for f in files if not _cached(folder / f[0], f[1], f[2])]
        if todo and log:
            log(f"loader: staging {len(todo)} of {len(files)} files of {url} into {folder} (DALI reads local files)")
        with ThreadPoolExecutor(max(1, min(HASH_THREADS, len(todo) or 1))) as pool:
            problems = [p for p in pool.map(lambda f: _download(manifest.root / f[0], folder / f[0], f[2]), todo) if p]
        if problems:
            raise LoaderError(problems[0] + (f" (and {len(problems) - 1} more)" if len(problems) > 1 else ""))
        with remote_errors(manifest.root / MANIFEST_NAME), open_binary(manifest.root / MANIFEST_NAME) as f:
            atomic_write_bytes(folder / MANIFEST_NAME, f.read())  # last: the copy is complete and checked
        listed = {name for name, _, _ in files} | {MANIFEST_NAME, USED_STAMP}
        for stale in folder.iterdir():  # shards of an earlier version of the set
            if stale.name not in listed and stale.is_file():
                stale.unlink()
        fcntl.flock(lock, fcntl.LOCK_SH)  # readers share it; eviction by another process needs it exclusive
    except BaseException:
        lock.close()
        raise
    return Staged(folder, lock)


def _cached(path: Path, size: int, sha: str) -> bool:
    """A cached copy that still matches the manifest; one that does not is removed (never read again)."""
    if path.is_file() and path.stat().st_size == size and sha256_file(path) == sha:
        return True
    path.unlink(missing_ok=True)
    return False


def _download(src, dst: Path, sha: str) -> str | None:
    """Copy src to dst under a temp name, hashing on the way; rename only when the sha256 matches."""
    h = hashlib.sha256()
    try:
        out = AtomicFile(dst)
        try:
            with remote_errors(src), open_binary(src, stream=True) as f:
                while block := f.read(CHUNK):
                    h.update(block)
                    out.file.write(block)
        except BaseException:
            out.abort()
            raise
        if h.hexdigest() != sha:
            out.abort()
            return f"{src}: sha256 differs from the manifest (corrupt or replaced); not staged"
        out.commit()
    except ShardFormatError as e:
        return str(e)
    except OSError as e:
        return f"{dst}: cannot write the local copy ({e.strerror or e})"
    return None


def _make_room(root: Path, keep: Path, need: int, bound: int) -> None:
    """Remove least recently used other sets until the cache holds at most `bound` bytes with `need` in."""
    def size(folder: Path) -> int:
        return sum(p.stat().st_size for p in folder.iterdir() if p.is_file())

    others = [d for d in root.iterdir() if d.is_dir() and d != keep]
    total = sum(size(d) for d in others) + need
    for d in sorted(others, key=lambda d: (d / USED_STAMP).stat().st_mtime if (d / USED_STAMP).exists() else 0.0):
        if total <= bound:
            break
        lock = d.parent / f"{d.name}.lock"
        with open(lock, "w") as f:
            try:
                fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)  # in use by another process right now: keep it
            except BlockingIOError:
                continue
            total -= size(d)
            shutil.rmtree(d, ignore_errors=True)

