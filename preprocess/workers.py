"""The build's worker processes: a forkserver started early, warm workers, a pool started in a thread.

Kept free of heavy imports, so the `preprocess` console script can start the forkserver before it
imports anything else (`start_forkserver`, called when the command line asks for --workers > 1).
Why each piece (measured on the 20k-object benchmark, 2 cores; a 1000-object shard takes ~0.3 s):
- forkserver, not fork: workers come from a clean process (no threads inherited), preloaded with
  preprocess/forkserver_preload.py, which also renders one sample per saliency path, so Numba's
  kernels are loaded (~0.33 s) once, before forking, instead of in every worker's first shard.
- the forkserver is a fresh interpreter that imports cv2, numba and satpipe (~0.75 s with the
  warm-up): started at CLI entry, it gets ready while the main process imports and reads the
  annotations, instead of after.
- `Pool()` blocks until the server has forked every worker: `PoolStarter` runs it in a thread.
- workers keep freed buffers in the heap (`init_worker`): see there.
- the main process never imports the kernels (Numba, 0.15 s) when workers render, and the forkserver
  skips interpreter teardown when the build is over (0.14 s): forkserver_preload.py.
- a command reaps its children before it exits: `reap_helpers` runs at exit (it costs the ~10 ms the
  forkserver and the resource tracker take to stop, which a caller reading the output waited for anyway).
"""
from __future__ import annotations

import multiprocessing as mp
import threading

PRELOAD = ["preprocess.forkserver_preload"]
M_TRIM_THRESHOLD, M_MMAP_THRESHOLD = -1, -3  # glibc mallopt parameters


def start_forkserver() -> None:
    """Start the forkserver now (it preloads in the background; returns in milliseconds)."""
    from multiprocessing import forkserver

    mp.get_context("forkserver").set_forkserver_preload(PRELOAD)
    forkserver.ensure_running()
    _reap_at_exit()


_reaper_registered = False


def _reap_at_exit() -> None:
    """Run reap_helpers at exit, as the last of multiprocessing's own exit finalizers: after a pool's
    semaphores are released (stopping the tracker before would make it report them as leaked and
    unlink them, and their own finalizers would then print tracebacks)."""
    global _reaper_registered
    if not _reaper_registered:
        _reaper_registered = True
        from multiprocessing import util

        util.Finalize(None, reap_helpers, exitpriority=-100)


def reap_helpers() -> None:
    """Stop the forkserver and multiprocessing's resource tracker and wait for both.

    Without this they notice that their parent is gone only after it has exited: the command returns
    while processes of its group still run (and, in a container whose init does not reap, they stay
    as zombies). `_stop` (close the helper's pipe, wait for it) is what CPython's own tests use; there
    is no public API. Both are stopped at once, each in a thread (waitpid releases the GIL): each
    takes 20-50 ms to exit, most of it the kernel freeing its memory."""
    from multiprocessing import forkserver, resource_tracker

    def stop(helper):
        try:
            helper._stop()
        except (AttributeError, OSError):  # another Python's internals, or already gone: nothing to reap
            pass

    threads = [threading.Thread(target=stop, args=(h,)) for h in (forkserver._forkserver, resource_tracker._resource_tracker)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()


def _flag(argv: list[str], name: str) -> str | None:
    """The value of `--name V` or `--name=V` on a command line (the first one), else None."""
    for i, arg in enumerate(argv):
        if arg.startswith(name + "="):
            return arg.split("=", 1)[1]
        if arg == name and i + 1 < len(argv):
            return argv[i + 1]
    return None


def workers_requested(argv: list[str]) -> int:
    """--workers N (or --workers=N) from a build-shards command line; 0 when absent or malformed, and
    with --executor ray (its tasks run in Ray's worker processes: no forkserver here)."""
    if _flag(argv, "--executor") == "ray":
        return 0
    try:
        return int(_flag(argv, "--workers") or 0)
    except ValueError:
        return 0


def init_worker() -> None:
    import ctypes

    import cv2

    cv2.setNumThreads(1)  # N worker processes already fill the cores: no nested thread pools
    # Keep freed decode buffers in the heap: by default every decoded image (> 128 KiB) is a fresh mmap,
    # so each decode page-faults its output in again, and page faults of two workers running at once
    # cost ~19% more CPU per shard (measured: 0.39 s vs 0.34 s per 1000-object shard at 2 workers).
    try:
        libc = ctypes.CDLL(None)
        libc.mallopt(M_MMAP_THRESHOLD, 64 << 20)
        libc.mallopt(M_TRIM_THRESHOLD, 256 << 20)
    except (OSError, AttributeError):  # not glibc: only slower
        pass


class PoolStarter:
    """`Pool(workers)` in a thread, overlapping with the main thread's planning; `get()` waits for it."""

    def __init__(self, workers: int):
        self.pool, self.error = None, None
        self.thread = threading.Thread(target=self._start, args=(workers,), daemon=True)
        self.thread.start()

    def _start(self, workers: int) -> None:
        try:
            ctx = mp.get_context("forkserver")
            ctx.set_forkserver_preload(PRELOAD)
            _reap_at_exit()
            self.pool = ctx.Pool(workers, initializer=init_worker)
        except BaseException as e:  # handed to the main thread by get()
            self.error = e

    def get(self):
        self.thread.join()
        if self.error is not None:
            raise self.error
        return self.pool

    def stop(self) -> None:
        """After an error: stop the workers now."""
        self.thread.join()
        if self.pool is not None:
            self.pool.terminate()
            self.pool.join()
