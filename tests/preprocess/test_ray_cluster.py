"""build-shards --executor ray on a real two-node Ray cluster on the loopback: a head and a second node,
each a `ray start` with one CPU, with Ray's token authentication on; the build is a separate driver that
joins by address, as on a user's cluster. Its output equals a local build byte for byte."""
from __future__ import annotations

import os
import secrets
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))
from coco_fixture import make_coco  # noqa: E402

from preprocess.build import build  # noqa: E402
from preprocess.config import BuildConfig  # noqa: E402
from shards.format import PROVENANCE_NAME  # noqa: E402

pytest.importorskip("ray")
RAY = shutil.which("ray", path=str(Path(sys.executable).parent)) or shutil.which("ray")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def ray_running() -> bool:
    """Any Ray node on this machine (`ray stop` below would stop it too): a process named raylet."""
    for comm in Path("/proc").glob("[0-9]*/comm"):
        try:
            if comm.read_text().strip() == "raylet":
                return True
        except OSError:  # the process ended meanwhile
            pass
    return False


@pytest.fixture(scope="module")
def two_nodes(tmp_path_factory):
    """(address, env): a head and a second node on 127.0.0.1, one CPU each, token authentication."""
    if RAY is None:
        pytest.skip("the `ray` command is not installed")
    if ray_running():
        pytest.skip("a Ray node already runs on this machine; this test's `ray stop` would stop it")
    env = {**os.environ, "RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN": secrets.token_hex(16),
           "RAY_USAGE_STATS_ENABLED": "0"}
    port = free_port()
    address = f"127.0.0.1:{port}"
    common = ["--node-ip-address", "127.0.0.1", "--num-cpus", "1", "--disable-usage-stats"]
    try:
        subprocess.run([RAY, "start", "--head", "--port", str(port), "--include-dashboard", "false",
                        "--ray-client-server-port", str(free_port()),
                        "--temp-dir", str(tmp_path_factory.mktemp("ray")), *common],
                       env=env, check=True, capture_output=True, timeout=120)
        subprocess.run([RAY, "start", "--address", address, *common], env=env, check=True, capture_output=True,
                       timeout=120)
        yield address, env
    finally:
        subprocess.run([RAY, "stop", "--force"], env=env, capture_output=True, timeout=120)


def outputs(out: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(out.iterdir()) if p.is_file() and p.name != PROVENANCE_NAME}


def test_build_on_two_nodes_equals_local_build(two_nodes, tmp_path):
    address, env = two_nodes
    root = tmp_path / "coco"
    make_coco(root, num_images=24, objects=1, width=320, height=240)
    ref = tmp_path / "local"
    build(BuildConfig(source="coco", annotations=str(root / "ann.json"), images=str(root / "images"), size=32,
                      shard_size=2, out=str(ref), progress=False), log=lambda *_: None)
    out = tmp_path / "ray"
    cmd = [sys.executable, "-m", "preprocess", "build-shards", "coco", "--annotations", str(root / "ann.json"),
           "--images", str(root / "images"), "--size", "32", "--shard-size", "2", "--out", str(out),
           "--no-progress", "--executor", "ray", "--ray-address", address]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert f"one Ray task per shard on {address} (2 CPUs)" in proc.stdout + proc.stderr
    assert outputs(out) == outputs(ref)
    probe = ("import ray, logging; ray.init(address=%r, logging_level=logging.ERROR); "
             "print(sum(n['Alive'] for n in ray.nodes()))" % address)
    nodes = subprocess.run([sys.executable, "-c", probe], env=env, capture_output=True, text=True, timeout=120)
    assert nodes.stdout.strip().splitlines()[-1] == "2", nodes.stderr[-2000:]  # the second node did not drop out
