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

from shards.format import PROVENANCE_NAME  # noqa: E402


def cli(*args) -> list[str]:
    return [sys.executable, "-m", "preprocess", *map(str, args)]


def build_args(root: Path, out: Path, *extra) -> list[str]:
    return cli("build-shards", "coco", "--annotations", root / "ann.json", "--images", root / "images",
               "--size", 32, "--shard-size", 2, "--out", out, "--no-progress", *extra)


def outputs(out: Path) -> dict[str, bytes]:
    """The files a user gets: tars, indexes, manifest (the .build state folder is not compared, nor
    provenance.json: which software wrote the set, e.g. a commit landing between two builds)."""
    return {p.name: p.read_bytes() for p in sorted(out.iterdir()) if p.is_file() and p.name != PROVENANCE_NAME}


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


# ----------------------------------------------------------------------------- inputs fixed after a skip

def _build_in_process(root: Path, out: Path, logs: list | None = None) -> dict:
    from preprocess.build import build
    from preprocess.config import BuildConfig

    cfg = BuildConfig(source="coco", annotations=str(root / "ann.json"), images=str(root / "images"), size=32,
                      shard_size=2, out=str(out), progress=False)
    return build(cfg, log=(logs.append if logs is not None else lambda *_: None))


@pytest.fixture()
def broken_coco(tmp_path):
    """6 images x 2 objects, 2 objects per shard; one image an empty file (a counted skip)."""
    root = tmp_path / "coco"
    make_coco(root, num_images=6, objects=2)
    good = (root / "images" / "img_0003.jpg").read_bytes()
    (root / "images" / "img_0003.jpg").write_bytes(b"")
    return root, good


def test_fixed_skipped_image_resumes_without_overwrite(broken_coco, tmp_path):
    root, good = broken_coco
    out = tmp_path / "out"
    m = _build_in_process(root, out)
    assert m["counts"]["skipped"].get("empty image") == 2
    before = {p.name: p.stat().st_mtime_ns for p in out.glob("*.tar")}
    (root / "images" / "img_0003.jpg").write_bytes(good)  # the user fixes the image
    logs: list = []
    m = _build_in_process(root, out, logs)  # no --overwrite
    assert "empty image" not in m["counts"]["skipped"] and m["counts"]["written"] == 12
    assert any("inputs changed only in files of items skipped before" in line for line in logs), logs
    fresh = tmp_path / "fresh"
    _build_in_process(root, fresh)
    assert outputs(out) == outputs(fresh)  # as a fresh build of the fixed inputs, manifest included
    after = {p.name: p.stat().st_mtime_ns for p in out.glob("*.tar")}
    rebuilt = {n for n in after if before.get(n) != after[n]}
    assert 1 <= len(rebuilt) <= 2 and len(after) == 6  # only the shard(s) holding that image's objects


def test_fixed_skipped_image_with_another_image_changed_refuses(broken_coco, tmp_path):
    root, good = broken_coco
    out = tmp_path / "out"
    _build_in_process(root, out)
    (root / "images" / "img_0003.jpg").write_bytes(good)
    other = root / "images" / "img_0001.jpg"
    other.write_bytes(other.read_bytes() + b"\0")  # a built image changed too
    from preprocess.plan import BuildError

    with pytest.raises(BuildError, match=r"1 item\(s\) that had been built changed \(e\.g\. .*img_0001\.jpg\).*--overwrite"):
        _build_in_process(root, out)
    assert (out / "manifest.json").is_file()  # the refused re-run changed nothing


def test_fixed_skipped_image_resumes_for_voc_too(tmp_path):
    """VOC names its files (image + masks) as well: guards `item_files` in a second source."""
    import dataset_fixtures as fx
    import numpy as np

    from preprocess.build import build
    from preprocess.config import BuildConfig

    root, rng = tmp_path / "voc", np.random.default_rng(0)
    for i in range(4):
        fx.write_jpeg(root / "JPEGImages" / f"f{i}.jpg", fx.object_photo(rng, 48, 64, (10, 5, 40, 35)))
        (root / "Annotations").mkdir(parents=True, exist_ok=True)
        (root / "Annotations" / f"f{i}.xml").write_text(fx.voc_xml(f"f{i}.jpg", 64, 48, [{"name": "dog", "box": (11, 6, 40, 35)}]))
    good = (root / "JPEGImages" / "f2.jpg").read_bytes()
    (root / "JPEGImages" / "f2.jpg").write_bytes(b"")
    cfg = BuildConfig(source="voc", root=str(root), split="all", size=32, shard_size=1, out=str(tmp_path / "out"),
                      progress=False)
    assert build(cfg, log=lambda *_: None)["counts"]["skipped"] == {"empty image": 1}
    (root / "JPEGImages" / "f2.jpg").write_bytes(good)
    logs: list = []
    assert build(cfg, log=logs.append)["counts"]["written"] == 4
    assert any("keeping 3 shards, rebuilding 1" in line for line in logs), logs
