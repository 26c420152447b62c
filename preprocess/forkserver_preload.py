"""Imported once by the build's forkserver (`set_forkserver_preload`): everything a build worker
needs, imported and warmed up before the workers are forked from it, so each starts ready (fork
copies the loaded modules and Numba's compiled kernels). The forkserver does this while the main
process reads the annotations, so on a 2-core machine it costs no wall time."""
import sys

# Numba imports scipy.linalg (0.15 s, on this process's critical path) at its first compile or cache
# load, only to offer BLAS (np.dot, np.linalg) in nopython code; no build kernel uses BLAS.
if "scipy" not in sys.modules:
    sys.modules["scipy"] = None  # makes `import scipy...` raise ImportError: Numba then skips BLAS

import cv2  # noqa: E402

cv2.setNumThreads(1)  # before any OpenCV call: a process that forks must not own a thread pool

import preprocess.build  # noqa: E402,F401  (the workers' entry point)
from preprocess.pipeline import warm_up  # noqa: E402

try:
    warm_up()
except Exception:  # only a head start: a worker that is not warm warms up in its first shard
    pass
