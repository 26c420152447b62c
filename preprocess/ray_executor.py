"""`build-shards --executor ray`: every planned shard is one Ray task running `build.build_shard`.

    preprocess build-shards coco ... --executor ray --workers 8              # a local Ray instance, 8 CPUs
    preprocess build-shards coco ... --executor ray --ray-address HOST:6379  # join the user's cluster

What stays with the driver (this process): the plan, the check of which shards are already complete
(a re-run skips them, as with --workers), the progress bar and the manifest, all the same code as a
local build, so the bytes are the same. The tasks write each shard and its sidecar into --out
directly: on a cluster --out must be a folder every node sees (a shared file system).

Failures: Ray retries a task that raised or whose worker died (`--retries`, default 2; a shard is
idempotent: same name, same bytes, temp name + rename); when one still fails, the build cancels the
rest and stops with one line naming the shard and the cause. Complete shards stay, so a re-run of
the same command resumes.

Ray is optional (`pip install 'satpipe[ray]'`); only this module imports it. Without --ray-address a
local instance is started with --workers CPUs and stopped when the build ends; a process that has
already called `ray.init` (a notebook, a test) has its session used as it is.
"""
from __future__ import annotations

import logging
import os
import socket
import sys
from typing import Iterator

from preprocess.plan import BuildError, ShardPlan

_WORKER_READY = False  # per Ray worker process: init_worker ran


def _ready_worker() -> None:
    """The local workers' per-process setup, once per Ray worker process."""
    global _WORKER_READY
    if not _WORKER_READY:
        from preprocess.workers import init_worker

        init_worker()  # one OpenCV thread per task (Ray runs one task per CPU), heap kept for decode buffers
        _WORKER_READY = True


def _build_shard_task(job, shard: ShardPlan) -> tuple[str, dict]:
    """The Ray task: the local workers' build_shard, after the same per-process setup."""
    _ready_worker()
    from preprocess.build import build_shard

    return build_shard((job, shard))


def _warm_worker_task() -> bool:
    """Run once per CPU while the driver plans: the worker imports and warms up what a shard needs (what
    the local forkserver preloads, preprocess/forkserver_preload.py: cv2, the build, Numba's kernels),
    so its first shard starts warm. Measured on the 20k-object benchmark: a cold worker's first shard
    took 0.97 s against 0.43 s for the next ones."""
    try:
        _ready_worker()
        import preprocess.forkserver_preload  # noqa: F401
    except Exception:  # only a head start: a cold worker warms up in its first shard
        return False
    return True


def import_ray():
    try:
        import ray
    except ImportError:
        raise BuildError("--executor ray needs Ray: pip install 'satpipe[ray]' (or 'ray>=2.40')") from None
    return ray


def check_address(address: str, timeout: float = 10.0) -> None:
    """Refuse an address where nothing listens, in `timeout` seconds: ray.init would retry for minutes,
    printing warnings. 'auto' and Ray Client URLs (ray://) are left to Ray."""
    if address == "auto" or "://" in address:
        return
    host, _, port = address.rpartition(":")
    if not host or not port.isdigit():
        raise BuildError(f"--ray-address {address!r}: expected HOST:PORT (the head node's GCS port, 6379 by "
                         "default), 'auto' or ray://HOST:PORT")
    try:
        socket.create_connection((host.strip("[]"), int(port)), timeout=timeout).close()
    except OSError as e:
        raise BuildError(f"--ray-address {address}: nothing answers there ({e.strerror or e}); is the cluster "
                         "up (ray start --head)?", code=1) from None


JOIN_ERRORS = (ConnectionError, RuntimeError, ValueError, TimeoutError)  # what ray.init raises when it cannot


def connect(ray, cfg) -> bool:
    """Join --ray-address, or start a local instance with --workers CPUs; True when this build must
    stop it again. An existing session of this process is used as it is."""
    if cfg.ray_address:
        check_address(cfg.ray_address)
    if ray.is_initialized():
        return False
    # Ray's own notices (token authentication is on, ...) would bury the build's lines; errors still show
    quiet = dict(logging_level=logging.ERROR, log_to_driver=True)
    try:
        if cfg.ray_address:
            with stderr_held() as held:  # Ray's client logs a warning per retry while it cannot join
                try:
                    ray.init(address=cfg.ray_address, **quiet)
                except JOIN_ERRORS:
                    held.drop()  # summarised in the one line below
                    raise
        else:
            # a local instance is this build's alone: nothing of it needs to be reported anywhere
            os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
            ray.init(num_cpus=cfg.workers, include_dashboard=False, **quiet)
    except JOIN_ERRORS as e:
        ray_log = held.text if cfg.ray_address else ""  # what Ray's client logged while it could not join
        where = f"--ray-address {cfg.ray_address}" if cfg.ray_address else "a local Ray instance"
        raise BuildError(f"{where}: cannot start or join Ray ({str(e).splitlines()[0] if str(e) else type(e).__name__})"
                         f"{ray_said(ray_log)}{auth_hint(cfg, ray_log)}", code=1) from None
    return True


class stderr_held:
    """File descriptor 2 into a temporary file for the block: Ray's C++ client writes there directly
    (one warning per second for ~20 s when it cannot join), which Python's stderr cannot catch. Written
    back when the block ends, unless `drop()` was called: a build that cannot start says one line."""

    def __enter__(self):
        import tempfile

        self.text, self._keep = "", True
        sys.stderr.flush()
        self._tmp = tempfile.TemporaryFile()
        self._saved = os.dup(2)
        os.dup2(self._tmp.fileno(), 2)
        return self

    def drop(self) -> None:
        self._keep = False

    def __exit__(self, *exc):
        sys.stderr.flush()
        os.dup2(self._saved, 2)
        os.close(self._saved)
        self._tmp.seek(0)
        self.text = self._tmp.read().decode(errors="replace")
        self._tmp.close()
        if self._keep and self.text:
            sys.stderr.write(self.text)
        return False


def ray_said(log: str) -> str:
    """The last warning or error Ray's client logged while joining, without its timestamp and source
    location: "[2026-... W 123 123] gcs_client.cc:210: Failed to ..." -> "Failed to ..."."""
    lines = [line.split("] ", 1)[-1] for line in log.splitlines() if line.strip()]
    if not lines:
        return ""
    last = lines[-1].split(": ", 1)[-1] if ".cc:" in lines[-1].split(": ", 1)[0] else lines[-1]
    return f"; Ray said: {last[:200]}"


def auth_hint(cfg, log: str = "") -> str:
    """What to try when joining failed and this process does not send Ray's auth token: clusters started
    with `ray start` use token authentication by default (Ray >= 2.59 for local clusters, all clusters
    later), and a driver then needs RAY_AUTH_MODE=token too; without it Ray retries for ~20 s, logging
    `InvalidAuthToken`, then fails with "Failed to connect"."""
    if not cfg.ray_address or os.environ.get("RAY_AUTH_MODE", "").lower() == "token":
        return ""
    if log and "auth" not in log.lower():
        return ""
    return ("; if the cluster uses token authentication, set RAY_AUTH_MODE=token here too (the token is read "
            "from RAY_AUTH_TOKEN, RAY_AUTH_TOKEN_PATH or ~/.ray/auth_token)")


def cluster_cpus(ray) -> int:
    return int(ray.cluster_resources().get("CPU", 0))


class RaySession:
    """Ray for one build, made ready before the driver plans: joined or started (`connect`), then one
    warm-up task per CPU submitted, which Ray's workers run while this process reads the annotations
    and plans, as the forkserver preloads for --workers. Ray keeps a job's idle workers for its next
    tasks, so the shards start on warm workers. `stop()` stops a local instance this build started.

    Joining and starting happen in this (the main) thread: a local `ray.init` from another thread hung
    here (Ray 2.60), so only the workers' warm-up overlaps with planning."""

    def __init__(self, cfg):
        self.ray = import_ray()
        self.started = connect(self.ray, cfg)
        self.cpus = cluster_cpus(self.ray)
        warm = self.ray.remote(_warm_worker_task).options(num_cpus=1, max_retries=0, scheduling_strategy="SPREAD")
        self.warming = [warm.remote() for _ in range(self.cpus)]  # never waited for: only a head start

    def stop(self) -> None:
        if self.started:
            self.ray.shutdown()


def _cause(ray, err: Exception) -> str:
    """The first line of what made a task fail: the task's own exception, or what Ray says happened."""
    cause = getattr(err, "cause", None) if isinstance(err, ray.exceptions.RayTaskError) else err
    cause = cause if cause is not None else err
    text = str(cause).strip().splitlines()
    return f"{type(cause).__name__}: {text[0] if text else ''}".rstrip(": ")


def run_shards(ray, job, todo: list[ShardPlan], retries: int) -> Iterator[tuple[str, dict]]:
    """Submit one task per shard (all at once: Ray queues them by free CPU); yield (name, sidecar) as
    tasks finish. A task that still fails after `retries` retries stops the build (BuildError)."""
    task = ray.remote(_build_shard_task).options(num_cpus=1, max_retries=retries, retry_exceptions=True)
    job_ref = ray.put(job)  # the source and config go to the cluster once, not once per shard
    pending = {task.remote(job_ref, s): s for s in todo}
    try:
        while pending:
            done, _ = ray.wait(list(pending), num_returns=1)
            for ref in done:
                shard = pending.pop(ref)
                try:
                    yield ray.get(ref)
                except ray.exceptions.RayError as e:
                    raise BuildError(f"shard {shard.name} failed {retries + 1} time(s), the last with "
                                     f"{_cause(ray, e)}; complete shards are kept, re-run the same command "
                                     "to resume", code=1) from None
    finally:
        for ref in pending:  # the build stopped (an error, Ctrl-C): nothing more is started for it
            ray.cancel(ref)
