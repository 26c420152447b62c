"""build-shards --executor ray on a real local Ray instance (2 CPUs, started once for this module):
the same bytes as a local build, a killed driver resumes to the same bytes, a failing shard task is
retried and then named. Faults are real: a source raising in the real build_shard, a SIGKILL."""
from __future__ import annotations

import logging
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))
from coco_fixture import make_coco  # noqa: E402

from preprocess.build import build, run  # noqa: E402
from preprocess.config import BuildConfig  # noqa: E402
from shards.format import PROVENANCE_NAME  # noqa: E402

ray = pytest.importorskip("ray")

# A user's source that fails for one item the first `fail_times` times it is loaded, counting its
# attempts in marker files (tasks run in other processes). Ray workers import it by name.
FLAKY_SOURCE = '''
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from preprocess.sources.base import RawSample, Source, WorkItem


class FlakySource(Source):
    name = "flaky"
    channels = 1
    config_defaults = {"size": 16, "image_format": "png"}

    @dataclass
    class Options:
        markers: str = ""
        fail_item: str = "blob3"
        fail_times: int = 0

    def __init__(self, cfg):
        super().__init__(cfg)
        self._classes = ["a", "b"]

    def fingerprint(self):
        return {"blobs": 6}

    def items(self):
        return [WorkItem(f"blob{i}", 1, i) for i in range(6)], []

    def load(self, item):
        if item.id == self.options.fail_item:
            folder = Path(self.options.markers)
            attempt = len(list(folder.glob("attempt-*")))
            (folder / f"attempt-{attempt}").touch()
            if attempt < self.options.fail_times:
                raise RuntimeError(f"injected fault {attempt + 1}")
        img = np.zeros((16, 16), np.uint8)
        img[item.data:item.data + 8, 4:12] = 200
        yield RawSample(key=item.id, image=img, label=item.data % 2)
'''


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    """One local Ray instance for the module; its workers can import the flaky source."""
    modules = tmp_path_factory.mktemp("user_modules")
    (modules / "flaky_source.py").write_text(FLAKY_SOURCE)
    old = os.environ.get("PYTHONPATH")
    os.environ["PYTHONPATH"] = os.pathsep.join(p for p in (str(modules), old) if p)  # the raylet passes it on
    try:
        ray.init(num_cpus=2, include_dashboard=False, logging_level=logging.ERROR)
    finally:
        os.environ.pop("PYTHONPATH") if old is None else os.environ.__setitem__("PYTHONPATH", old)
    sys.path.insert(0, str(modules))
    from preprocess.sources import SOURCES

    SOURCES["flaky"] = "flaky_source:FlakySource"
    yield ray.get_runtime_context().gcs_address
    SOURCES.pop("flaky", None)
    sys.path.remove(str(modules))
    ray.shutdown()


def coco_cfg(root: Path, out: Path, **kw) -> BuildConfig:
    base = dict(source="coco", annotations=str(root / "ann.json"), images=str(root / "images"), size=32,
                shard_size=2, out=str(out), progress=False)
    return BuildConfig(**{**base, **kw})


def outputs(out: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(out.iterdir()) if p.is_file() and p.name != PROVENANCE_NAME}


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    root = tmp_path_factory.mktemp("coco")
    make_coco(root, num_images=40, objects=1, width=320, height=240)
    ref = root / "ref"
    build(coco_cfg(root, ref), log=lambda *_: None)  # the local build every Ray build must equal
    return root, ref


def test_ray_build_equals_local_build(cluster, dataset, tmp_path):
    root, ref = dataset
    logs = []
    build(coco_cfg(root, tmp_path / "ray", executor="ray"), log=logs.append)
    assert outputs(tmp_path / "ray") == outputs(ref)
    assert "one Ray task per shard" in logs[0] and "(2 CPUs)" in logs[0]
    logs.clear()
    build(coco_cfg(root, tmp_path / "ray", executor="ray"), log=logs.append)  # a re-run skips finished shards
    assert "20 already complete, 0 to build" in logs[0]


def test_session_warms_one_worker_per_cpu_and_leaves_a_joined_session_running(cluster):
    """The warm-up tasks (submitted before the driver plans) import and warm what a shard needs in
    Ray's worker processes; a session this build did not start is not stopped by it."""
    from preprocess.ray_executor import RaySession

    session = RaySession(BuildConfig(source="coco", executor="ray", progress=False))
    assert (session.started, session.cpus, len(session.warming)) == (False, 2, 2)
    assert ray.get(session.warming, timeout=120) == [True, True]  # False: the warm-up failed in the worker
    session.stop()
    assert ray.is_initialized()


def test_killed_driver_then_rerun_gives_the_same_bytes(cluster, dataset, tmp_path):
    root, ref = dataset
    out = tmp_path / "killed"
    cmd = [sys.executable, "-m", "preprocess", "build-shards", "coco", "--annotations", str(root / "ann.json"),
           "--images", str(root / "images"), "--size", "32", "--shard-size", "2", "--out", str(out),
           "--no-progress", "--executor", "ray", "--ray-address", cluster]
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.time() + 120
        while not list(out.glob(".build/train-*.json")) and time.time() < deadline and proc.poll() is None:
            time.sleep(0.002)
        os.kill(proc.pid, signal.SIGKILL)  # the driver, after its first shard's sidecar appeared
    finally:
        proc.wait()
    assert proc.returncode == -signal.SIGKILL, "the build finished before it could be killed"
    assert not (out / "manifest.json").exists()
    logs = []
    build(coco_cfg(root, out, executor="ray"), log=logs.append)
    assert "already complete" in logs[0]
    assert outputs(out) == outputs(ref)


def test_failing_task_is_retried_then_named(cluster, tmp_path, capsys):
    def flaky(name: str, fail_times: int) -> BuildConfig:
        markers = tmp_path / name / "markers"
        markers.mkdir(parents=True)
        return BuildConfig(source="flaky", shard_size=2, out=str(tmp_path / name / "out"), progress=False,
                           executor="ray", retries=2, size=16, image_format="png",
                           source_options={"markers": str(markers), "fail_times": fail_times})

    cfg = flaky("recovers", fail_times=2)  # fails twice, the second retry succeeds
    assert build(cfg, log=lambda *_: None)["counts"]["written"] == 6
    assert len(list((tmp_path / "recovers" / "markers").iterdir())) == 3

    cfg = flaky("fails", fail_times=10)
    assert run(cfg) == 1
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1, err  # one line: the shard and the cause, no traceback
    assert err.startswith("preprocess build-shards: shard train-0000") and "failed 3 time(s)" in err
    assert "RuntimeError: injected fault 3" in err
    assert len(list((tmp_path / "fails" / "markers").iterdir())) == 3  # 1 try + 2 retries, then stop
    assert not (tmp_path / "fails" / "out" / "manifest.json").exists()


def test_unreachable_ray_address_is_one_line(tmp_path, capsys):
    """Checked before Ray is asked (ray.init would retry for minutes); no cluster needed."""
    import socket

    with socket.socket() as s:  # a port on the loopback where nothing listens
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    cfg = BuildConfig(source="flaky", out=str(tmp_path / "o"), executor="ray", ray_address=f"127.0.0.1:{port}",
                      progress=False)
    from preprocess.ray_executor import connect

    with pytest.raises(Exception, match=rf"--ray-address 127.0.0.1:{port}: nothing answers there"):
        connect(ray, cfg)


def test_joining_a_token_cluster_without_the_token_mode_says_what_to_set(cluster, dataset, tmp_path):
    """The module's instance uses Ray's token authentication (ray.init turns it on for the local clusters
    it starts, Ray >= 2.59); a driver without RAY_AUTH_MODE=token cannot join. Ray gives up after ~20 s,
    its client logging a warning per retry; the build says instead, in one line, what Ray said and what
    to set."""
    if os.environ.get("RAY_AUTH_MODE", "").lower() != "token":
        pytest.skip("this Ray does not turn on token authentication for local instances")
    root, _ = dataset
    env = {k: v for k, v in os.environ.items() if k != "RAY_AUTH_MODE"}
    cmd = [sys.executable, "-m", "preprocess", "build-shards", "coco", "--annotations", str(root / "ann.json"),
           "--images", str(root / "images"), "--size", "32", "--out", str(tmp_path / "o"), "--no-progress",
           "--executor", "ray", "--ray-address", cluster]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=180)
    assert proc.returncode == 1, proc.stderr
    assert "Traceback" not in proc.stderr
    ours = [line for line in proc.stderr.splitlines() if line.startswith("preprocess build-shards:")]
    assert len(ours) == 1 and "cannot start or join Ray" in ours[0], proc.stderr
    assert "Ray said: " in ours[0] and "InvalidAuthToken" in ours[0] and "set RAY_AUTH_MODE=token here too" in ours[0]
    assert "gcs_client" not in proc.stderr  # Ray's per-retry warnings are summarised in that line, not printed
    assert not (tmp_path / "o" / "manifest.json").exists()
