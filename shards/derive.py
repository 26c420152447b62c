"""Derived shard sets: the samples of an input set with new saliency maps, shard by shard.

    from shards.derive import Derivation, derive, decode_images, encode_saliency
    derive("shards/fmnist/train", "shards/fmnist-teacher/train",
           Derivation("teacher-saliency", params={...}, saliency={"kind": "teacher", ...}),
           make_maps=lambda batch: [{"sal.png": png} for png in ...], batch_size=256)

Used by `sat-train teacher-saliency` (maps from a trained model) and `preprocess shuffle-saliency`
(the `shuffled` control). The output has the input's shard names, sample order, keys and every
component byte for byte, except those `make_maps` returns (always `sal.png`, optionally `json`).

Layout and guarantees (as build-shards, but without depending on preprocess/):

    OUT/<input shard names>.tar, .idx   final names appear only when complete (ShardWriter)
    OUT/.derive/plan.json               what this folder derives: refuses to mix two derivations
    OUT/.derive/<shard>.json            sidecar of a finished shard: plan digest + size/sha256
    OUT/manifest.json                   written last

- The input is checked against its manifest first (sizes and sha256 of every tar and index); a damaged
  set stops with one line naming the file (DeriveError).
- Resumable per shard: a rerun keeps shards whose sidecar and bytes match (sha256 is re-checked, not
  trusted) and derives the rest. A shard is always derived from its start with the same batches, so a
  resumed run ends byte-identical to an uninterrupted one on CPU.
- The manifest keeps every field of the input's (classes, image, config, source, split, ...) and
  replaces `shards`, `counts`, `saliency` and `fingerprint`; `derived_from` records the input
  (path, fingerprint, manifest sha256, saliency, counts, its own `derived_from` if any), the
  derivation (name + params) and the derived digest. `fingerprint` = {"digest", "input_digest",
  "derivation"}: `sat-train fit --resume` compares it, so a run never continues on another set.
- `workers > 1` derives whole shards in spawned processes; a shard's bytes do not depend on the process.
- The digest covers the input's exact bytes (its shard sha256s) and the derivation's name and params,
  not paths, batch size or device (those go to `derived_from.execution`).

Why one file over 350 lines: the plan, the per-shard sidecars, the shard work and the output manifest
are one contract (the layout and guarantees above) that resume relies on; split, a change to one of
them could no longer be read against the others.
"""
from __future__ import annotations

import hashlib
import json
import shutil
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np

from shards.format import FORMAT_NAME, MANIFEST_NAME, SALIENCY_EXT, ShardFormatError, saliency_to_uint8, uint8_to_saliency
from shards.manifest import Manifest, check_shard_files, read_manifest
from shards.provenance import satpipe_version, write_provenance
from shards.reading import decode_image, index_key, iter_tar_samples, read_dali_index
from shards.storage import atomic_write_json, sha256_file
from shards.writer import ShardWriter

STATE_DIR = ".derive"
REPLACEABLE = (SALIENCY_EXT, "json")  # what a derivation may change; images, labels and keys never
SALIENCY_ENCODING = "uint8 = round((s + 1) * 127.5)"
SMALL_MAP_PIXELS = 900  # maps this small are stored uncompressed, as build-shards does (see preprocess/pipeline.py)


class DeriveError(Exception):
    """The derivation cannot go on; one line naming the file and the problem."""

    def __init__(self, msg: str, code: int = 2):
        super().__init__(msg)
        self.code = code


@dataclass
class Derivation:
    """What turns the input's maps into the output's: recorded in the manifest and its digest."""

    name: str  # e.g. "teacher-saliency", "shuffle-saliency"
    params: dict  # every parameter that changes the maps (JSON values)
    saliency: dict  # the output manifest's `saliency` block (kind, range, ...)
    execution: dict = field(default_factory=dict)  # recorded, not digested: batch size, device, versions


@dataclass
class Batch:
    """Consecutive samples of one input shard, handed to `make_maps`."""

    samples: list[dict]  # {"__key__": key, ext: bytes, ...} as read from the tar
    shard: int  # position of the shard in the manifest
    first: int  # position of samples[0] in the whole set (manifest order)
    where: str  # the input tar, for error messages


MakeMaps = Callable[[Batch], list[dict]]


# ----------------------------------------------------------------------------- sample helpers

def decode_images(samples: list[dict], image: dict, where: str = "") -> np.ndarray:
    """uint8 (N, H, W, C) pixels (RGB) of the samples' images, as the loaders see them (shards.reading)."""
    out = np.empty((len(samples), image["height"], image["width"], image["channels"]), np.uint8)
    for i, s in enumerate(samples):
        try:
            out[i] = decode_image(s.get(image["format"]), image, s.get("__key__", "?"))
        except ShardFormatError as e:
            raise DeriveError(f"{where}: {e}") from None
    return out


def encode_saliency(maps) -> list[bytes]:
    """`sal.png` bytes of float maps (N, H, W) in [-1, 1], in the shard format's 8-bit encoding."""
    import cv2

    grey = saliency_to_uint8(maps)
    small = grey[0].size <= SMALL_MAP_PIXELS if len(grey) else True
    params = [cv2.IMWRITE_PNG_COMPRESSION, 0] if small else []
    out = []
    for g in grey:
        ok, buf = cv2.imencode(".png", np.ascontiguousarray(g), params)
        if not ok:
            raise DeriveError("OpenCV could not encode a saliency png")
        out.append(buf.tobytes())
    return out


def saliency_png_to_float(data: bytes) -> np.ndarray:
    """float32 (H, W) map in [-1, 1] of one `sal.png` (any size)."""
    import cv2

    grey = cv2.imdecode(np.frombuffer(data, np.uint8), cv2.IMREAD_UNCHANGED)
    if grey is None or grey.ndim != 2 or grey.dtype != np.uint8:
        raise DeriveError("a sal.png does not decode to an 8-bit grey map")
    return uint8_to_saliency(grey)


# ----------------------------------------------------------------------------- input and output folder

def open_input(in_dir) -> Manifest:
    """The input's manifest after a full check (sizes + sha256 of every file); DeriveError otherwise."""
    try:
        manifest = read_manifest(in_dir)
    except ShardFormatError as e:
        raise DeriveError(str(e)) from None
    if not manifest.shards:
        raise DeriveError(f"{manifest.root / MANIFEST_NAME}: the shard set lists no shards")
    problems = check_shard_files(manifest, full=True)
    if problems:
        more = f" (and {len(problems) - 1} more problem(s))" if len(problems) > 1 else ""
        raise DeriveError(f"{problems[0]}{more}")
    return manifest


def _digest(obj) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True).encode()).hexdigest()[:16]


def plan_header(manifest: Manifest, derivation: Derivation) -> dict:
    identity = {"input_shards": [[s["tar"], s["sha256"], s["samples"]] for s in manifest.shards],
                "input_digest": manifest.fingerprint.get("digest"), "derivation": derivation.name,
                "params": derivation.params}
    return {"plan": _digest(identity), "derivation": {"name": derivation.name, "params": derivation.params},
            "input": str(manifest.root.resolve()), "shards": [s["tar"] for s in manifest.shards]}


def _read_json(path: Path) -> dict | None:
    try:
        return json.loads(path.read_text())
    except (FileNotFoundError, json.JSONDecodeError, UnicodeDecodeError):
        return None  # absent or left half-written by a killed run: treated as absent


def _earlier_plan(out: Path) -> tuple[str | None, bool]:
    """(plan digest of what OUT holds, whether OUT holds shards of something that is not a derivation)."""
    state = _read_json(out / STATE_DIR / "plan.json")
    if state is not None:
        return state.get("plan"), False
    manifest = _read_json(out / MANIFEST_NAME)
    if manifest is not None:
        return (manifest.get("derived_from") or {}).get("digest"), not manifest.get("derived_from")
    return None, any(out.glob("*.tar"))


def prepare_output(out: Path, header: dict, overwrite: bool) -> None:
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise DeriveError(f"{out}: cannot create the output folder ({e.strerror})") from None
    plan, foreign = _earlier_plan(out)
    if foreign or (plan is not None and plan != header["plan"]):
        if not overwrite:
            why = "holds a shard set that is not this derivation" if foreign else \
                "holds a different derivation (other input, derivation or parameters)"
            raise DeriveError(f"{out}: {why}; pass --overwrite to replace it")
        for pattern in ("*.tar", "*.idx", ".*.tmp-*", MANIFEST_NAME):
            for p in out.glob(pattern):
                p.unlink()
        shutil.rmtree(out / STATE_DIR, ignore_errors=True)
    try:
        (out / STATE_DIR).mkdir(exist_ok=True)
        atomic_write_json(out / STATE_DIR / "plan.json", header)
    except OSError as e:
        raise DeriveError(f"{out}: the output folder is not writable ({e.strerror})") from None


def shard_done(out: Path, name: str, plan: str) -> dict | None:
    """The ShardInfo dict of a finished output shard whose files still match (sha256), else None."""
    side = _read_json(out / STATE_DIR / f"{Path(name).stem}.json")
    if side is None or side.get("plan") != plan or not isinstance(side.get("shard"), dict):
        return None
    if check_shard_files(Manifest(root=out, raw={"shards": [side["shard"]]}), full=True):
        return None
    return side["shard"]


# ----------------------------------------------------------------------------- deriving

def read_samples(manifest: Manifest, n: int):
    """Samples of input shard n in order. A local shard is sliced at its DALI index's offsets out of one
    mmap (both files passed the sha256 check): no per-member tar parsing. A remote one is streamed."""
    import mmap

    entry = manifest.shards[n]
    tar = manifest.root / entry["tar"]
    if getattr(manifest, "remote", False):
        yield from iter_tar_samples(tar)
        return
    index = read_dali_index(manifest.root / entry["index"])
    with open(tar, "rb") as f, mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as data:
        for components in index:
            if any(off + size > len(data) for _, off, size, _ in components):
                raise DeriveError(f"{tar}: its index points past the end of the file")
            yield {"__key__": index_key(components), **{ext: data[off:off + size] for ext, off, size, _ in components}}


def derive_shard(manifest: Manifest, n: int, first: int, out: Path, plan: str, make_maps: MakeMaps,
                 batch_size: int, bar=None, writer_cls=ShardWriter) -> dict:
    """Write output shard n (all its samples, in order) and its sidecar; returns its ShardInfo dict."""
    entry = manifest.shards[n]
    src = manifest.root / entry["tar"]
    for stale in out.glob(f".{Path(entry['tar']).stem}.*.tmp-*"):  # temp files of a killed run
        stale.unlink(missing_ok=True)
    count = 0
    with writer_cls(out / entry["tar"]) as writer:
        batch: list[dict] = []

        def flush():
            nonlocal count
            new = make_maps(Batch(batch, n, first + count, str(src)))
            if len(new) != len(batch):
                raise DeriveError(f"{src}: the derivation returned {len(new)} maps for {len(batch)} samples (a bug)")
            for sample, parts in zip(batch, new):
                extra = set(parts) - set(REPLACEABLE)
                if SALIENCY_EXT not in parts or extra:
                    raise DeriveError(f"{src}: a derivation must return sal.png and may return json, got {sorted(parts)}")
                writer.write({**sample, **parts})
            count += len(batch)
            if bar is not None:
                bar.update(len(batch))
            batch.clear()

        try:
            for sample in read_samples(manifest, n):
                if SALIENCY_EXT not in sample:
                    raise DeriveError(f"{src}: sample {sample['__key__']!r} has no {SALIENCY_EXT}")
                batch.append(sample)
                if len(batch) == batch_size:
                    flush()
            if batch:
                flush()
        except ShardFormatError as e:
            raise DeriveError(str(e)) from None
        if count != entry["samples"]:
            raise DeriveError(f"{src}: {count} samples, its manifest says {entry['samples']}")
    info = writer.info.to_dict()
    atomic_write_json(out / STATE_DIR / f"{Path(entry['tar']).stem}.json", {"plan": plan, "shard": info})
    return info


def derive(in_dir, out_dir, derivation: Derivation, make_maps: MakeMaps | None, *, batch_size: int = 256,
           overwrite: bool = False, progress: bool = True, log=print, manifest: Manifest | None = None,
           writer_cls=ShardWriter, workers: int = 1, maps_factory: Callable[[], MakeMaps] | None = None) -> dict:
    """Derive OUT from IN (see the module docstring); returns the output manifest.

    Pass `manifest` when the caller already ran `open_input(in_dir)` (it reads every byte);
    `writer_cls` may be a faster ShardWriter with the same bytes (preprocess.tar_fast.FastShardWriter).
    workers > 1: whole shards in that many spawned processes, each calling the picklable `maps_factory`
    once for its own `make_maps` (a shard's bytes do not depend on which process wrote it)."""
    from tqdm import tqdm

    if batch_size < 1 or workers < 1:
        raise DeriveError(f"batch size and workers must be >= 1, not {batch_size} and {workers}")
    if (make_maps if workers == 1 else maps_factory) is None:
        raise DeriveError(f"{derivation.name}: no map function for {workers} worker(s) (a bug)", code=1)
    manifest = manifest or open_input(in_dir)
    out = Path(out_dir)
    if out.resolve() == manifest.root.resolve():
        raise DeriveError(f"{out}: the output folder must differ from the input")
    header = plan_header(manifest, derivation)
    prepare_output(out, header, overwrite)
    firsts = np.concatenate([[0], np.cumsum([s["samples"] for s in manifest.shards])]).tolist()
    infos = {n: shard_done(out, s["tar"], header["plan"]) for n, s in enumerate(manifest.shards)}
    todo = [n for n, info in infos.items() if info is None]
    log(f"{derivation.name}: {manifest.root} -> {out}: {manifest.num_samples} samples in {len(infos)} shards, "
        f"{len(infos) - len(todo)} already complete, {len(todo)} to derive"
        + (f", {min(workers, len(todo))} workers" if workers > 1 and todo else ""))
    bar = tqdm(total=sum(manifest.shards[n]["samples"] for n in todo), unit="sample", disable=not progress or not todo,
               file=sys.stderr, dynamic_ncols=True, desc=derivation.name)
    try:
        if workers == 1 or len(todo) < 2:
            maps = make_maps or maps_factory()
            for n in todo:
                infos[n] = derive_shard(manifest, n, firsts[n], out, header["plan"], maps, batch_size, bar, writer_cls)
        else:
            import multiprocessing

            tasks = [(maps_factory, header["plan"], manifest.root, n, firsts[n], out, batch_size, writer_cls) for n in todo]
            with multiprocessing.get_context("spawn").Pool(min(workers, len(todo))) as pool:
                for n, info in pool.imap_unordered(_derive_shard_task, tasks):
                    infos[n] = info
                    bar.update(info["samples"])
    finally:
        bar.close()
    result = output_manifest(manifest, derivation, header, [infos[n] for n in range(len(infos))])
    write_provenance(out)  # which software made the set; beside the manifest, not part of its identity
    atomic_write_json(out / MANIFEST_NAME, result)
    log(f"{out}: {result['counts']['written']} samples in {len(result['shards'])} shards "
        f"({derivation.name}, fingerprint {result['fingerprint']['digest']})")
    return result


_WORKER: dict = {}  # per worker process: the plan it serves, its manifest and map function


def _derive_shard_task(task) -> tuple[int, dict]:
    factory, plan, root, n, first, out, batch_size, writer_cls = task
    if _WORKER.get("plan") != plan:
        _WORKER.update(plan=plan, manifest=read_manifest(root), make_maps=factory())
    return n, derive_shard(_WORKER["manifest"], n, first, Path(out), plan, _WORKER["make_maps"], batch_size, None,
                           writer_cls)


def run_command(prog: str, out, job: Callable[[], object], user_errors: tuple = ()) -> int:
    """Exit status of a derivation command: bad input is one line and exit 2 (or the error's code); a disk
    or folder problem exit 1; Ctrl-C 130. Finished shards are kept in every case."""
    try:
        job()
    except (DeriveError, *user_errors) as e:
        print(f"{prog}: {e}", file=sys.stderr)
        return getattr(e, "code", 2)
    except OSError as e:  # disk full, folder removed under us...
        print(f"{prog}: {e.filename or out}: {e.strerror or e}; finished shards are kept, rerun the same command "
              "to resume", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print(f"{prog}: interrupted; rerun the same command to resume", file=sys.stderr)
        return 130
    return 0


def output_manifest(manifest: Manifest, derivation: Derivation, header: dict, infos: list[dict]) -> dict:
    raw = manifest.raw
    written = sum(i["samples"] for i in infos)
    if written != manifest.num_samples or raw.get("format") != FORMAT_NAME:
        raise DeriveError(f"{manifest.root}: derived {written} of {manifest.num_samples} samples (a bug)", code=1)
    derived_from = {
        "path": header["input"], "fingerprint": manifest.fingerprint,
        "manifest_sha256": sha256_file(manifest.root / MANIFEST_NAME),
        "saliency": raw.get("saliency"), "counts": raw.get("counts"),
        "derivation": {"name": derivation.name, "params": derivation.params},
        "execution": derivation.execution, "digest": header["plan"],
    }
    if raw.get("derived_from"):  # a derivation of a derived set keeps the whole chain
        derived_from["derived_from"] = raw["derived_from"]
    return {
        **raw,
        "satpipe_version": satpipe_version(),
        "saliency": {"encoding": SALIENCY_ENCODING, **derivation.saliency},
        "fingerprint": {"digest": header["plan"], "input_digest": manifest.fingerprint.get("digest"),
                        "derivation": derivation.name},
        "shards": infos,
        # every input sample is read once and written once; the input's own skips stay in derived_from.counts
        "counts": {"read": written, "written": written, "skipped": {}},
        "skip_examples": {},
        "derived_from": derived_from,
    }
