"""The build's worker processes seen from outside: a command leaves no process of its group behind
(success or failure), and the workers' speed tricks do not change what user code can import.
Real `preprocess` commands in their own session (process group)."""
from __future__ import annotations

import os
import resource
import subprocess
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))
from coco_fixture import make_coco  # noqa: E402

pytestmark = pytest.mark.skipif(not Path("/proc/self/stat").is_file(), reason="reads /proc")


def group_members(pgid: int) -> list[str]:
    """'pid state cmdline' of every process (zombies included) whose process group is pgid."""
    found = []
    for d in os.listdir("/proc"):
        if not d.isdigit():
            continue
        try:
            stat = Path(f"/proc/{d}/stat").read_text()
            cmd = Path(f"/proc/{d}/cmdline").read_bytes().replace(b"\0", b" ").decode()[:100]
        except OSError:  # exited while we looked
            continue
        state, _ppid, pgrp = stat.rsplit(")", 1)[1].split()[:3]
        if int(pgrp) == pgid:
            found.append(f"{d} {state} {cmd}")
    return found


def run_in_own_group(args: list[str], env: dict | None = None, preexec=None) -> subprocess.CompletedProcess:
    """Run a command as its own session leader; returns once it exited, with what is left of its group."""
    proc = subprocess.Popen(args, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            start_new_session=True, env=env, preexec_fn=preexec)
    out, err = proc.communicate(timeout=240)
    left = group_members(proc.pid)  # right away: the command has returned
    return subprocess.CompletedProcess(args, proc.returncode, out, err), left


@pytest.fixture(scope="module")
def coco(tmp_path_factory):
    root = tmp_path_factory.mktemp("coco")
    make_coco(root, num_images=6, objects=2)
    return root


def coco_build(root: Path, out: Path, *extra) -> list[str]:
    return [sys.executable, "-m", "preprocess", "build-shards", "coco", "--annotations", str(root / "ann.json"),
            "--images", str(root / "images"), "--size", "32", "--shard-size", "3", "--out", str(out),
            "--no-progress", *map(str, extra)]


def _limit_file_size():
    # a file-size limit stands in for a full disk: writes past it fail (EFBIG instead of ENOSPC; Python
    # ignores SIGXFSZ). 8 KiB is below tarfile's 10 KiB stream buffer: the first write inside a shard fails.
    resource.setrlimit(resource.RLIMIT_FSIZE, (8 << 10, 8 << 10))


@pytest.mark.parametrize("workers", [1, 2])
def test_full_disk_is_one_line_and_no_leftover(coco, tmp_path, workers):
    out = tmp_path / "full"
    r, left = run_in_own_group(coco_build(coco, out, "--workers", workers, "--image-format", "png", "--size", 64),
                               preexec=_limit_file_size)
    assert r.returncode == 1
    config_lines = r.stderr.split("\n").index("build-shards config:")
    own = [ln for ln in r.stderr.splitlines()[config_lines + 1:] if not ln.startswith("  ")]
    assert len(own) == 1 and own[0].startswith("preprocess build-shards: ") and "File too large" in own[0], r.stderr
    assert "Traceback" not in r.stderr and "Exception ignored" not in r.stderr
    assert left == [], left
    assert not list(out.glob("*.tar"))  # nothing half-written under a final name
    if workers == 1:  # (a worker stopped by the pool may leave a temp name: the next run removes it)
        assert not list(out.glob(".*tmp*"))


USER_SOURCE = '''
"""A user's own source, registered at run time; it needs scipy in the workers."""
import numpy as np

from preprocess.sources.base import RawSample, Source, WorkItem


class BlobSource(Source):
    name = "user-blobs"
    channels = 1
    config_defaults = {"size": 16, "image_format": "png"}

    def __init__(self, cfg):
        super().__init__(cfg)
        self._classes = ["sharp", "soft"]

    def fingerprint(self):
        return {"blobs": 8}

    def items(self):
        return [WorkItem(f"blob{i}", 1, i) for i in range(8)], []

    def load(self, item):
        from scipy import ndimage  # the user's dependency, imported in the worker

        img = np.zeros((16, 16), np.float32)
        img[4:12, 4:12] = 255
        yield RawSample(key=item.id, image=ndimage.gaussian_filter(img, 0.5 + item.data % 2).astype(np.uint8),
                        label=item.data % 2)
'''

USER_SCRIPT = '''
import sys

from preprocess.cli import main
from preprocess.sources import SOURCES

SOURCES["user-blobs"] = "user_blobs:BlobSource"
if __name__ == "__main__":
    sys.exit(main(["build-shards", "user-blobs", "--shard-size", "3", "--out", sys.argv[1], "--workers", "2",
                   "--no-progress"]))
'''


def test_user_source_importing_scipy_builds_with_two_workers_and_leaves_no_process(tmp_path):
    """Also the plain case of a parallel command reaping its forkserver, resource tracker and workers."""
    (tmp_path / "user_blobs.py").write_text(USER_SOURCE)
    (tmp_path / "build_blobs.py").write_text(USER_SCRIPT)
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(tmp_path), os.environ.get("PYTHONPATH", "")])}
    r, left = run_in_own_group([sys.executable, str(tmp_path / "build_blobs.py"), str(tmp_path / "out")], env=env)
    assert r.returncode == 0, r.stderr
    assert "wrote" in r.stdout or "8 samples" in r.stdout, r.stdout
    assert left == []
