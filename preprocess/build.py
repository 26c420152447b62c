"""`preprocess build-shards`: plan, build missing shards with N worker processes, write the manifest.

    preprocess build-shards coco --annotations ann.json --images img/ --size 64 --workers 2
    preprocess build-shards coco ... --num-nodes 3 --node-rank 0   (then `preprocess finalize OUT`)

Each worker writes whole shards (one shard's encoded samples in memory at a time, so peak memory
does not grow with the dataset). Shards get their final names only when complete (ShardWriter, with
template tar headers: preprocess/tar_fast.py), then a sidecar records their checksum; the manifest
comes last. Re-running the same command resumes (see preprocess/plan.py). `--out s3://bucket/prefix`
builds through a local staging folder and publishes each shard from the process that made it, the
manifest last (preprocess/remote_out.py).
"""
from __future__ import annotations

import dataclasses
import sys
import threading
import uuid
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from tqdm import tqdm

from shards.format import ShardFormatError, sanitize_key
from shards.storage import atomic_write_json, is_url
from preprocess.config import BuildConfig
from preprocess.finalize import MAX_EXAMPLES, merge_counts, summary_line, write_manifest
from preprocess.plan import (BuildError, ShardPlan, digest_of, input_stamps, layout_digest, make_plan, plan_digest,
                             prepare_output, remove_stale_temps, shard_done, state_dir)
from preprocess.remote_out import open_remote_output, publish_shard
from preprocess.sources import Skip, SourceError, get_source_class
from preprocess.tar_fast import FastShardWriter
from preprocess.workers import PoolStarter

# ----------------------------------------------------------------------------- one shard (worker side)

@dataclass
class Job:
    """What a worker needs besides its shard; small (the source holds no items, no pixels)."""

    source: object
    cfg: BuildConfig
    kind: str  # saliency kind
    out: Path
    plan: str  # plan digest, written into each sidecar
    token: str = ""  # unique per build() call (a worker keeps one source per build)
    remote: str = ""  # --out URL: `out` is a staging folder, each finished shard is uploaded (remote_out.py)


_CURRENT: dict = {}  # per process: the build token and the first Job received for that build


def _record(counts: dict, examples: dict, skip: Skip) -> None:
    counts["skipped"][skip.reason] = counts["skipped"].get(skip.reason, 0) + skip.count
    counts["read"] += skip.count
    ex = examples.setdefault(skip.reason, [])
    if len(ex) < MAX_EXAMPLES:
        ex.append(f"{skip.id}: {skip.detail}" if skip.detail else skip.id)


def build_shard(task: tuple[Job, ShardPlan]) -> tuple[str, dict]:
    """Load, render and write one shard; returns (name, sidecar). Runs in a worker (or inline)."""
    import cv2

    from preprocess.pipeline import kind_used, make_sample

    job, shard = task
    # one Job per process and build: a source's lazily loaded state (e.g. a decompressed IDX array)
    # then lives as long as the worker instead of being rebuilt for every shard
    if _CURRENT.get("token") != job.token:
        _CURRENT.clear()
        _CURRENT.update(token=job.token, job=job)
    job = _CURRENT["job"]
    source, cfg, out = job.source, job.cfg, job.out
    if job.remote:  # the staging folder, also on a Ray node other than the driver's
        state_dir(out).mkdir(parents=True, exist_ok=True)
    remove_stale_temps(out, shard.name)
    counts = {"read": 0, "written": 0, "skipped": {}}
    examples: dict = {}
    samples, keys = [], set()
    kinds: dict[str, int] = {}  # samples per saliency kind really drawn (pipeline.kind_used)
    stamps = input_stamps(source, shard.items)  # before reading: a file that changes meanwhile shows later
    skipped_items = set()  # items with a sample skipped: their files may be fixed before a re-run
    for item in shard.items:
        for r in source.load(item):
            if isinstance(r, Skip):
                _record(counts, examples, r)
                skipped_items.add(item.id)
                continue
            try:
                sample = make_sample(r, job.kind, cfg)
            except (ValueError, cv2.error) as e:
                _record(counts, examples, Skip(item.id, "processing error", str(e).splitlines()[0][:200]))
                skipped_items.add(item.id)
                continue
            used = kind_used(r, job.kind)
            kinds[used] = kinds.get(used, 0) + 1
            key, n = sample["__key__"], 1
            while key in keys:  # two source ids that sanitize alike (a.jpg / a.png): keep both
                key, n = sanitize_key(f"{sample['__key__']}_{n}"), n + 1
            keys.add(key)
            sample["__key__"] = key
            samples.append(sample)
            counts["read"] += 1
            counts["written"] += 1
    counts["saliency_kinds"] = dict(sorted(kinds.items()))
    info = None
    if samples:
        # a second shuffle inside the shard: objects of one image are not neighbours in the stream
        order = np.random.default_rng([cfg.seed, shard.index]).permutation(len(samples))
        with FastShardWriter(out / f"{shard.name}.tar") as w:
            for i in order:
                w.write(samples[int(i)])
        info = w.info.to_dict()
    inputs = None if stamps is None else {"stamps": stamps, "skipped": sorted(skipped_items)}
    side = {"plan": job.plan, "shard": info, "counts": counts, "examples": examples, "inputs": inputs}
    atomic_write_json(state_dir(out) / f"{shard.name}.json", side)
    if job.remote:
        publish_shard(job.remote, out, shard.name, side)  # tar, index, then sidecar
    return shard.name, side


# ----------------------------------------------------------------------------- the whole build

def _header(cfg: BuildConfig, source, kind: str, shards: list[ShardPlan], plan_skips: list[Skip]) -> dict:
    fingerprint = dict(source.fingerprint())
    fingerprint["digest"] = digest_of(fingerprint)
    counts = {"read": 0, "written": 0, "skipped": {}}
    examples: dict = {}
    for s in plan_skips:
        _record(counts, examples, s)
    return {
        "plan": plan_digest(cfg.digest(), fingerprint["digest"], shards),
        "config": cfg.saved(), "config_digest": cfg.digest(), "fingerprint": fingerprint,
        "classes": source.classes(),
        "image": {"format": cfg.image_format, "height": cfg.size, "width": cfg.size, "channels": source.channels},
        "saliency": {"requested": kind, "sigma_frac": cfg.sigma_frac, "encoding": "uint8 = round((s + 1) * 127.5)",
                     "salient": 1.0, "background": -1.0},
        "shard_names": [s.name for s in shards], "layout": layout_digest(shards),
        "plan_skips": counts, "plan_examples": examples,
    }


def _resolve(cfg: BuildConfig):
    """(cfg with --unit and --size resolved, source class, saliency kind), or a BuildError for a config the
    source cannot build: checked before any worker pool or Ray instance is started."""
    source_cls = get_source_class(cfg.source)
    defaults = getattr(source_cls, "config_defaults", {})
    if cfg.unit == "auto":  # resolved before anything is saved: the manifest names the real unit
        cfg = dataclasses.replace(cfg, unit=defaults.get("unit", source_cls.units[0]))
    if cfg.size == 0:
        cfg = dataclasses.replace(cfg, size=defaults.get("size", 64))
    if cfg.unit not in source_cls.units:
        raise BuildError(f"source {cfg.source!r} supports --unit {'|'.join(source_cls.units)}, not {cfg.unit!r}")
    try:
        kind = source_cls.resolve_saliency(cfg.saliency)
    except ValueError as e:
        raise BuildError(str(e)) from None
    return cfg, source_cls, kind


def build(cfg: BuildConfig, log=print) -> dict | None:
    """Run a build; returns the manifest (None for a non-final node of a multi-node build)."""
    cfg, source_cls, kind = _resolve(cfg)
    local_pool = cfg.workers > 1 and cfg.executor == "local"
    starter = PoolStarter(cfg.workers) if local_pool else None  # see preprocess/workers.py
    if cfg.executor == "ray":  # joined or started, its workers warming up while this process plans
        from preprocess.ray_executor import RaySession

        starter = RaySession(cfg)
    import cv2

    # --workers 1 builds in this process: one core too, like each worker (OpenCV would otherwise
    # spread decode/resize over every core, and "1 worker" would not mean one core)
    cv2_threads = cv2.getNumThreads()
    if starter is None and cfg.executor == "local":
        cv2.setNumThreads(1)
    try:
        return _build(cfg, source_cls, kind, log, starter)
    finally:
        cv2.setNumThreads(cv2_threads)
        if starter is not None:  # after an error: stop the workers now
            starter.stop()


def _build(cfg: BuildConfig, source_cls, kind: str, log, starter) -> dict | None:
    remote = open_remote_output(cfg) if is_url(cfg.out) else None
    out = remote.staging if remote else Path(cfg.out or Path("shards") / cfg.source / cfg.split)
    shown = remote.url if remote else out  # what the log names
    source = source_cls(cfg)
    items, plan_skips = source.items()
    if not items:
        reasons = {}
        for s in plan_skips:
            reasons[s.reason] = reasons.get(s.reason, 0) + s.count
        why = f" ({len(plan_skips)} annotations skipped: {reasons})" if plan_skips else ""
        raise BuildError(f"{cfg.annotations or cfg.root or cfg.source}: empty dataset, nothing to build{why}")
    shards = make_plan(items, cfg.split, cfg.shard_size, cfg.seed)
    header = _header(cfg, source, kind, shards, plan_skips)
    note = (remote.prepare if remote else prepare_output)(out, header, cfg.overwrite, source, shards)
    if note:
        log(note)

    mine = [s for s in shards if s.index % cfg.num_nodes == cfg.node_rank]
    sides: dict[str, dict] = {}
    todo = []
    for s in mine:
        done = remote.shard_done(s, header["plan"]) if remote else shard_done(out, s, header["plan"])
        if done is None:
            todo.append(s)
        else:
            sides[s.name] = done
    node = f" (node {cfg.node_rank} of {cfg.num_nodes})" if cfg.num_nodes > 1 else ""
    planned = (f"building {shown}{node}: {sum(s.expected for s in mine)} samples planned in {len(mine)} shards, "
               f"{len(sides)} already complete, {len(todo)} to build")
    job = Job(source, cfg, kind, out, header["plan"], token=uuid.uuid4().hex, remote=remote.url if remote else "")
    if cfg.executor == "ray" and todo:
        _build_on_ray(cfg, starter, job, todo, sides, lambda how: log(f"{planned}, {how}"))
    else:
        log(f"{planned}, {min(cfg.workers, max(len(todo), 1))} workers")
        pool = starter.get() if starter is not None and cfg.executor == "local" else None
        tasks = [(job, s) for s in todo]
        _collect(cfg, todo, pool.imap_unordered(build_shard, tasks) if pool is not None else map(build_shard, tasks),
                 sides)
        if pool is not None:
            pool.close()  # workers exit on their own (terminate would skip their cleanup)
            pool.join()
    atomic_write_json(state_dir(out) / f"node-{cfg.node_rank}-of-{cfg.num_nodes}.json",
                      {"plan": header["plan"], "shards": [s.name for s in mine]})
    if cfg.num_nodes > 1:
        counts, _ = merge_counts([sides[s.name] for s in mine])
        log(f"{out}{node}: wrote {counts['written']} samples in {len(mine)} shards; "
            f"run `preprocess finalize {out}` when every node is done")
        return None
    manifest = write_manifest(out, header, [sides[s.name] for s in shards])
    if remote:
        remote.publish_manifest()  # provenance.json, then the manifest: the last objects of the build
    log(summary_line(shown, manifest))
    return manifest


def _collect(cfg: BuildConfig, todo: list[ShardPlan], results, sides: dict) -> None:
    """Take (name, sidecar) results as shards finish, with one progress bar over all of them."""
    # a thread lock: tqdm's default multiprocessing lock leaks a semaphore under forkserver
    tqdm.set_lock(threading.RLock())
    bar = tqdm(total=sum(s.expected for s in todo), unit="sample", disable=not cfg.progress or not todo,
               file=sys.stderr, dynamic_ncols=True)
    by_name = {s.name: s for s in todo}
    try:
        for name, side in results:
            sides[name] = side
            bar.update(by_name[name].expected)
    finally:
        bar.close()


def _build_on_ray(cfg: BuildConfig, session, job: Job, todo: list[ShardPlan], sides: dict, log) -> None:
    """--executor ray: the same shards, one Ray task each (preprocess/ray_executor.py); `session` is the
    RaySession build() opened (and stops)."""
    from preprocess import ray_executor as rx

    started = session.started
    where = cfg.ray_address or ("this process's Ray session" if not started else "a local Ray instance")
    log(f"one Ray task per shard on {where} ({session.cpus} CPUs), up to {cfg.retries} retries each")
    _collect(cfg, todo, rx.run_shards(session.ray, job, todo, cfg.retries), sides)


def run(cfg: BuildConfig) -> int:
    """CLI wrapper: user mistakes become one line on stderr and a non-zero exit."""
    try:
        build(cfg)
    except (BuildError, SourceError, ShardFormatError) as e:
        print(f"preprocess build-shards: {e}", file=sys.stderr)
        return getattr(e, "code", 2)
    except OSError as e:  # disk full, folder removed under us...: say where, keep what is complete
        where = e.filename or cfg.out or "output"
        print(f"preprocess build-shards: {where}: {e.strerror or e}; complete shards are kept, "
              "re-run the same command to resume", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("preprocess build-shards: interrupted; re-run the same command to resume", file=sys.stderr)
        return 130
    return 0
