"""Where shard-set bytes live: local files written atomically, or object-storage / web URLs read through fsspec.

Local writes go to a temp name in the same folder, are fsynced, then renamed, so a file with its
final name is always complete (`atomic_write`, `atomic_write_bytes`, `atomic_write_json`; a
writer callback serves torch.save and matplotlib too). `tmp_name` is the one temp-name scheme:
`.NAME.tmp-PID`, which no final shard name matches and which cleanup code globs for.

URLs (`s3://bucket/prefix`, `https://host/path`, any fsspec protocol) become `location(url)`: a
universal_pathlib `UPath`, so `root / "manifest.json"`, `.open("rb")`, `.stat()` and `.read_text()`
work as on a local `Path`. Credentials are never handled here: s3fs uses boto's usual chain
(AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY, AWS_PROFILE and ~/.aws files, instance roles) and
AWS_ENDPOINT_URL for S3-compatible servers. What is configured here is how long a request may
take: connect and read timeouts and a small, fixed number of retries (SATPIPE_REMOTE_TIMEOUT
seconds per read, default 30), so a wrong address fails in seconds instead of hanging. Remote
failures become `StorageError`, a `ShardFormatError` whose one-line message names the URL and
says what went wrong (access denied, no such bucket, cannot connect, timed out).
"""
from __future__ import annotations

import contextlib
import hashlib
import json
import os
import re
from pathlib import Path
from typing import BinaryIO, Callable

from shards.format import ShardFormatError

_URL = re.compile(r"^[A-Za-z][A-Za-z0-9+.-]*://")
LOCAL_PROTOCOLS = ("file", "local")
S3_RETRIES = 2  # s3fs's own retries of a failed request (on top of botocore's attempts below)
BOTO_ATTEMPTS = 2
HTTP_READ_BLOCK = 8 << 20  # bytes per ranged read when a web server supports ranges


class StorageError(ShardFormatError):
    """A remote shard set or output cannot be reached or read (one line: URL and cause). A subclass of
    ShardFormatError because every reader and writer of shard sets already reports those in one line."""


# ----------------------------------------------------------------------------- local files, atomically

def tmp_name(path: str | os.PathLike) -> Path:
    """Temp name in the same folder (so rename is atomic); never matches a final shard name."""
    path = Path(path)
    return path.with_name(f".{path.name}.tmp-{os.getpid()}")


class AtomicFile:
    """A file that appears under its final name only once complete: written under `tmp_name`, then
    `commit()` flushes, fsyncs and renames; `abort()` (or leaving a `with` block by an exception)
    removes the temp file. For writers that keep a file open across many calls (ShardWriter)."""

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)
        self.tmp = tmp_name(self.path)
        self.file: BinaryIO = open(self.tmp, "wb")

    def commit(self) -> Path:
        f = self.file
        f.flush()
        os.fsync(f.fileno())
        f.close()
        os.replace(self.tmp, self.path)
        return self.path

    def abort(self) -> None:
        try:
            self.file.close()
        except OSError:  # the last flush fails again (disk full): the temp file goes anyway
            pass
        self.tmp.unlink(missing_ok=True)

    def __enter__(self) -> BinaryIO:
        return self.file

    def __exit__(self, exc_type, exc, tb):
        if exc_type is None:
            try:
                self.commit()
            except BaseException:
                self.abort()
                raise
        else:
            self.abort()


def atomic_write(path: str | os.PathLike, write: Callable[[BinaryIO], object]) -> Path:
    """Call `write(f)` on a temp file next to `path`, then fsync and rename it to `path`.

        atomic_write(ckpt, lambda f: torch.save(state, f))
        atomic_write(png, lambda f: fig.savefig(f, format="png"))"""
    with AtomicFile(path) as f:
        write(f)
    return Path(path)


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> Path:
    return atomic_write(path, lambda f: f.write(data))


def atomic_write_json(path: str | os.PathLike, obj) -> Path:
    return atomic_write_bytes(path, (json.dumps(obj, indent=2, sort_keys=True) + "\n").encode())


# ----------------------------------------------------------------------------- URLs

def is_url(where) -> bool:
    """True for `s3://...`, `https://...` and other fsspec URLs (not for file:// or plain paths)."""
    if not isinstance(where, str):  # a Path, or a UPath (which knows its protocol)
        return getattr(where, "protocol", "") not in ("", *LOCAL_PROTOCOLS)
    m = _URL.match(where)
    return bool(m) and m.group(0)[:-3].lower() not in LOCAL_PROTOCOLS


def remote_timeout() -> float:
    try:
        t = float(os.environ.get("SATPIPE_REMOTE_TIMEOUT", "30"))
    except ValueError:
        t = 30.0
    return t if t > 0 else 30.0


def storage_options(protocol: str) -> dict:
    """fsspec options that bound every request: connect/read timeouts and few retries. Nothing here
    names a credential: the client libraries find those themselves."""
    t = remote_timeout()
    if protocol in ("s3", "s3a"):
        return {"config_kwargs": {"connect_timeout": min(t, 10.0), "read_timeout": t,
                                  "retries": {"max_attempts": BOTO_ATTEMPTS, "mode": "standard"}}}
    if protocol in ("http", "https"):
        import aiohttp

        return {"client_kwargs": {"timeout": aiohttp.ClientTimeout(total=None, connect=min(t, 10.0), sock_read=t)}}
    return {}


def location(where: str | os.PathLike):
    """A local Path, or for a URL a UPath (pathlib-like, backed by fsspec) with bounded timeouts."""
    if isinstance(where, Path) or not is_url(where):
        if hasattr(where, "protocol") and hasattr(where, "fs"):  # already a UPath
            return where
        return Path(where)
    try:
        from upath import UPath
    except ImportError:
        raise StorageError(f"{where}: reading or writing URLs needs fsspec and universal_pathlib: "
                           "pip install 'satpipe[cloud]'") from None
    protocol = str(where).split("://", 1)[0].lower()
    try:
        path = UPath(str(where).rstrip("/"), **storage_options(protocol))
        fs = path.fs
    except ImportError as e:  # s3fs (or the protocol's package) missing
        raise StorageError(f"{where}: no fsspec backend for {protocol}:// ({e}); pip install 'satpipe[cloud]'") from None
    except ValueError as e:  # unknown protocol
        raise StorageError(f"{where}: {e}") from None
    if protocol in ("s3", "s3a"):
        fs.retries = S3_RETRIES  # s3fs retries 5 times by default, each up to the read timeout
    return path


def open_binary(path, *, stream: bool = False) -> BinaryIO:
    """Open a local or remote file for reading. `stream=True`: sequential reading of a whole file
    (tars), so a web server is read as one response instead of ranged requests."""
    if not is_url(path):
        return open(path, "rb")
    if isinstance(path, str):
        path = location(path)
    protocol = path.protocol
    if stream and protocol in ("http", "https"):
        return path.fs.open(path.path, "rb", block_size=0)  # HTTPStreamFile: no Range header needed
    return path.open("rb", block_size=HTTP_READ_BLOCK) if protocol in ("http", "https") else path.open("rb")


def sha256_file(path, chunk: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with remote_errors(path), open_binary(path, stream=True) as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


@contextlib.contextmanager
def remote_errors(where):
    """Turn what s3fs / aiohttp / botocore raise for a remote `where` into one-line StorageErrors.
    Local paths pass through untouched (callers report their OSErrors as before)."""
    if not is_url(where):
        yield
        return
    try:
        yield
    except ShardFormatError:
        raise
    except FileNotFoundError as e:
        raise StorageError(f"{where}: {missing_because(e) or 'does not exist'}") from None
    except Exception as e:  # noqa: BLE001 -- the client libraries raise many types; each becomes one line
        raise StorageError(f"{where}: {describe_remote_error(e)}") from None


def missing_because(e: FileNotFoundError) -> str | None:
    """Why a remote file "does not exist" when the answer was no answer at all: fsspec's HTTP file system
    reports a refused connection or a timeout as FileNotFoundError (the real error is its __cause__);
    a missing S3 bucket says so in the message. None for a file that is really absent."""
    cause = e.__cause__
    if cause is not None and any(w in type(cause).__name__ for w in ("Connect", "Timeout")):
        return describe_remote_error(cause)
    if "bucket" in str(e).lower():
        return describe_remote_error(e)
    return None


def describe_remote_error(e: BaseException) -> str:
    """One line for what a client library raised; never includes request headers or credentials."""
    name = type(e).__name__
    text = str(e).strip().splitlines()[0] if str(e).strip() else name
    if isinstance(e, PermissionError) or "AccessDenied" in text or "Forbidden" in text or "InvalidAccessKeyId" in text:
        return f"access denied ({text}); check the credentials the S3 client finds (AWS_ACCESS_KEY_ID, AWS_PROFILE, ~/.aws)"
    if isinstance(e, FileNotFoundError):
        return f"no such bucket ({text})" if "bucket" in text.lower() else "does not exist"
    if "Timeout" in name or isinstance(e, TimeoutError):
        return f"timed out ({text}; SATPIPE_REMOTE_TIMEOUT={remote_timeout():g} s per request)"
    if "Connect" in name or isinstance(e, ConnectionError):
        return f"cannot connect ({text})"
    return f"{name}: {text}"


def list_sizes(root) -> dict[str, int]:
    """{file name: bytes} of the files directly in a folder or prefix: one listing, not one request
    per file. {} when the folder does not exist or cannot be listed (web servers without an index)."""
    if not is_url(root):
        try:
            return {p.name: p.stat().st_size for p in Path(root).iterdir() if p.is_file()}
        except OSError:
            return {}
    if root.protocol in ("http", "https"):  # an HTML index lists names, not sizes
        return {}
    with remote_errors(root):
        try:
            root.fs.invalidate_cache(root.path)  # fsspec caches listings per process: a set may have changed
            entries = root.fs.ls(root.path, detail=True)
        except (FileNotFoundError, NotImplementedError):
            return {}
    return {e["name"].rstrip("/").rsplit("/", 1)[-1]: int(e.get("size") or 0) for e in entries
            if e.get("type") == "file"}
