"""A build killed with SIGKILL and re-run, and a 3-node build + finalize, give byte-identical files
to an uninterrupted single-node build. Real subprocesses of the `preprocess` CLI."""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))
from coco_fixture import make_coco  # noqa: E402


def cli(*args) -> list[str]:
    return [sys.executable, "-m", "preprocess", *map(str, args)]


def build_args(root: Path, out: Path, *extra) -> list[str]:
    return cli("build-shards", "coco", "--annotations", root / "ann.json", "--images", root / "images",
               "--size", 32, "--shard-size", 2, "--out", out, "--no-progress", *extra)


def outputs(out: Path) -> dict[str, bytes]:
    """The files a user gets: tars, indexes, manifest (the .build state folder is not compared)."""
    return {p.name: p.read_bytes() for p in sorted(out.iterdir()) if p.is_file()}


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    root = tmp_path_factory.mktemp("coco")
    # 160 images x 1 object, 2 per shard = 80 shards: plenty of time to kill it between shards
    make_coco(root, num_images=160, objects=1, width=320, height=240)
    ref = root / "ref"
    subprocess.run(build_args(root, ref), check=True, capture_output=True)
    return root, ref


def test_sigkill_then_rerun_is_byte_identical(dataset, tmp_path):
    root, ref = dataset
    out = tmp_path / "killed"
    proc = subprocess.Popen(build_args(root, out), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.time() + 120
        while not list(out.glob("*.tar")) and time.time() < deadline and proc.poll() is None:
            time.sleep(0.002)
        os.kill(proc.pid, signal.SIGKILL)
    finally:
        proc.wait()
    assert proc.returncode == -signal.SIGKILL, "the build finished before it could be killed"
    assert not (out / "manifest.json").exists()
    partial = len(list(out.glob("*.tar")))
    assert 1 <= partial < 80
    done = subprocess.run(build_args(root, out), capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    assert "already complete" in done.stdout
    assert outputs(out) == outputs(ref)
    assert not list(out.glob(".*tmp*"))  # no temp files left behind


def test_damaged_shard_is_rebuilt(dataset, tmp_path):
    root, ref = dataset
    out = tmp_path / "damaged"
    subprocess.run(build_args(root, out), check=True, capture_output=True)
    tar = sorted(out.glob("*.tar"))[3]
    tar.write_bytes(tar.read_bytes()[:1000])  # truncated behind the build's back
    (out / "manifest.json").unlink()
    subprocess.run(build_args(root, out), check=True, capture_output=True)
    assert outputs(out) == outputs(ref)


def test_three_nodes_then_finalize_is_byte_identical(dataset, tmp_path):
    root, ref = dataset
    out = tmp_path / "nodes"
    procs = [subprocess.Popen(build_args(root, out, "--num-nodes", 3, "--node-rank", r),
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for r in range(3)]
    # finalize before the nodes are done must refuse (naming what is missing) and write nothing
    early = subprocess.run(cli("finalize", out), capture_output=True, text=True)
    results = [p.communicate() + (p.returncode,) for p in procs]
    assert all(rc == 0 for _, _, rc in results), results
    assert all("run `preprocess finalize" in o for o, _, _ in results)
    if early.returncode != 0:
        assert "not ready" in early.stderr or "no build state" in early.stderr
    assert not (out / "manifest.json").exists() or early.returncode == 0
    fin = subprocess.run(cli("finalize", out), capture_output=True, text=True)
    assert fin.returncode == 0, fin.stderr
    assert outputs(out) == outputs(ref)
    # a part missing: finalize names it and exits non-zero
    missing = sorted(out.glob("*.tar"))[5]
    missing.unlink()
    fin = subprocess.run(cli("finalize", out), capture_output=True, text=True)
    assert fin.returncode == 1 and missing.name in fin.stderr
