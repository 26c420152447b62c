"""Imported once by the build's forkserver (`set_forkserver_preload`): everything a build worker
needs, imported and warmed up before the workers are forked from it, so each starts ready (fork
copies the loaded modules and Numba's compiled kernels). The forkserver does this while the main
process reads the annotations, so on a 2-core machine it costs no wall time."""
import sys

# Numba imports scipy.linalg (0.15 s, on this process's critical path) at its first compile or cache
# load, only to offer BLAS (np.dot, np.linalg) in nopython code; no build kernel uses BLAS. scipy is
# hidden during the warm-up only: the workers forked from here import whatever user code needs.
_hide_scipy = "scipy" not in sys.modules
if _hide_scipy:
    sys.modules["scipy"] = None  # makes `import scipy...` raise ImportError: Numba then skips BLAS

import cv2  # noqa: E402

cv2.setNumThreads(1)  # before any OpenCV call: a process that forks must not own a thread pool

import preprocess.build  # noqa: E402,F401  (the workers' entry point)
from preprocess.pipeline import warm_up  # noqa: E402

try:
    warm_up()
except Exception:  # only a head start: a worker that is not warm warms up in its first shard
    pass
finally:
    if _hide_scipy and sys.modules.get("scipy", 0) is None:
        del sys.modules["scipy"]  # a user's source may import scipy (issue 15)
        # Numba's one-time check ("is BLAS there?") ran while scipy was hidden; give it the answer it
        # would have found (np.dot & co. import scipy when first compiled, so this imports nothing)
        _arraymath = sys.modules.get("numba.np.arraymath")
        if _arraymath is not None:
            import importlib.util

            _arraymath._HAVE_BLAS = importlib.util.find_spec("scipy") is not None


def _in_forkserver() -> bool:
    """True when multiprocessing's forkserver loop is importing this module (not a test or a user)."""
    from multiprocessing import forkserver

    frame = sys._getframe()
    while frame is not None:
        if frame.f_code is forkserver.main.__code__:
            return True
        frame = frame.f_back
    return False


if _in_forkserver():
    # The server exits when the build's main process has exited. It holds nothing to clean up (its
    # workers exit with os._exit and never run atexit), but a normal interpreter exit tears down cv2,
    # Numba and satpipe: ~0.14 s after the command has finished, with the command's stdout still open,
    # so whoever reads the command's output until EOF (a script, a pipe) waited for it.
    import atexit
    import os

    _server_pid = os.getpid()
    atexit.register(lambda: os.getpid() == _server_pid and os._exit(0))
