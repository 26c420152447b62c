"""Shard sets on object storage (issue 13): build to s3://, read back, train from s3:// and http://.

Real components on the loopback only: one moto S3 server for the module (`moto_server`, IAM
authentication on, so wrong credentials are refused as by S3) and a `python -m http.server` for
https-like reads (plain http on 127.0.0.1). Credentials come from the environment, as a user's would.
"""
from __future__ import annotations

import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

pytest.importorskip("s3fs")
pytest.importorskip("moto")
boto3 = pytest.importorskip("boto3")

sys.path.insert(0, str(Path(__file__).parent / "preprocess"))
from coco_fixture import make_coco  # noqa: E402

from shards.format import MANIFEST_NAME, PROVENANCE_NAME  # noqa: E402

BUCKET = "satpipe-test"
MOTO = Path(sys.executable).with_name("moto_server")
REQUEST = re.compile(r'"(?:\x1b\[[0-9;]*m)*(PUT|GET|HEAD|POST|DELETE) (\S+) HTTP')


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_for_port(port: int, proc: subprocess.Popen, what: str, seconds: float = 30.0) -> None:
    end = time.monotonic() + seconds
    while time.monotonic() < end:
        if proc.poll() is not None:
            raise RuntimeError(f"{what} exited with {proc.returncode}")
        try:
            socket.create_connection(("127.0.0.1", port), timeout=0.2).close()
            return
        except OSError:
            time.sleep(0.1)
    raise RuntimeError(f"{what} did not listen on port {port}")


@pytest.fixture(scope="module")
def s3(tmp_path_factory):
    """A moto S3 server on 127.0.0.1 with authentication on: its first 3 requests (an IAM user, its key,
    an allow-all policy) need none, every later one needs that key. The env holds it for the module."""
    if not MOTO.exists():
        pytest.skip("moto_server not installed (pip install 'moto[server]')")
    port, folder = free_port(), tmp_path_factory.mktemp("moto")
    log = folder / "requests.log"
    with open(log, "w") as f:
        proc = subprocess.Popen([str(MOTO), "-H", "127.0.0.1", "-p", str(port)], stdout=f, stderr=subprocess.STDOUT,
                                env={**os.environ, "INITIAL_NO_AUTH_ACTION_COUNT": "3"})
    try:
        wait_for_port(port, proc, "moto_server")
        endpoint = f"http://127.0.0.1:{port}"
        iam = boto3.client("iam", endpoint_url=endpoint, region_name="us-east-1", aws_access_key_id="none",
                           aws_secret_access_key="none")
        iam.create_user(UserName="satpipe-test")
        key = iam.create_access_key(UserName="satpipe-test")["AccessKey"]
        iam.put_user_policy(UserName="satpipe-test", PolicyName="all", PolicyDocument=json.dumps(
            {"Version": "2012-10-17", "Statement": [{"Effect": "Allow", "Action": "*", "Resource": "*"}]}))
        with pytest.MonkeyPatch.context() as mp:
            for name, value in {"AWS_ACCESS_KEY_ID": key["AccessKeyId"], "AWS_SECRET_ACCESS_KEY": key["SecretAccessKey"],
                                "AWS_ENDPOINT_URL": endpoint, "AWS_DEFAULT_REGION": "us-east-1",
                                "AWS_CONFIG_FILE": str(folder / "none"), "AWS_SHARED_CREDENTIALS_FILE": str(folder / "none"),
                                "SATPIPE_REMOTE_TIMEOUT": "5", "SATPIPE_SHARD_CACHE": str(folder / "cache")}.items():
                mp.setenv(name, value)
            mp.delenv("AWS_PROFILE", raising=False)
            mp.delenv("AWS_SESSION_TOKEN", raising=False)
            import s3fs

            fs = s3fs.S3FileSystem(skip_instance_cache=True)
            fs.mkdir(BUCKET)
            yield type("S3", (), {"endpoint": endpoint, "port": port, "log": log, "fs": fs, "folder": folder,
                                  "secret": key["SecretAccessKey"]})
    finally:
        proc.terminate()
        proc.wait(timeout=10)


@pytest.fixture(scope="module")
def coco(tmp_path_factory):
    root = tmp_path_factory.mktemp("coco")
    make_coco(root, num_images=24, objects=1)
    return root


def build_cmd(coco: Path, out: str, *extra) -> list[str]:
    return ["build-shards", "coco", "--annotations", str(coco / "ann.json"), "--images", str(coco / "images"),
            "--size", "16", "--shard-size", "2", "--out", out, "--no-progress", *map(str, extra)]


OUTPUTS: list[str] = []  # everything the commands of this module printed (checked for the secret at the end)


def run(capsys, module: str, argv: list) -> tuple[int, str, str]:
    """A console command in this process (`preprocess` or `sat_train.fit`); (exit status, stdout, stderr)."""
    import importlib

    capsys.readouterr()
    rc = importlib.import_module(module).main([str(a) for a in argv])
    out, err = capsys.readouterr()
    OUTPUTS.append(out + err)
    return rc, out, err


def requests(s3, start: int = 0) -> list[tuple[str, str]]:
    """(method, path) of every request the server logged since byte `start` of its log."""
    with open(s3.log, "rb") as f:
        f.seek(start)
        text = f.read().decode("utf-8", "replace")
    return [(m.group(1), m.group(2)) for m in REQUEST.finditer(text)]


def bucket_files(s3, prefix: str) -> dict[str, bytes]:
    base = f"{BUCKET}/{prefix}/"
    s3.fs.invalidate_cache()
    return {p[len(base):]: s3.fs.cat(p) for p in s3.fs.find(base) if "/.build/" not in p}


def set_files(folder: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in folder.iterdir() if p.is_file()}


def same_set(a: dict, b: dict) -> bool:
    """Equal files, provenance.json aside (which software wrote a set is not part of it)."""
    return {k: v for k, v in a.items() if k != PROVENANCE_NAME} == {k: v for k, v in b.items() if k != PROVENANCE_NAME}


@pytest.fixture(scope="module")
def built(s3, coco, tmp_path_factory):
    """The same config built to disk and to the bucket (--workers 2); the server's request log of the latter."""
    from preprocess.build import build
    from preprocess.config import BuildConfig

    local = tmp_path_factory.mktemp("local") / "train"
    common = dict(source="coco", annotations=str(coco / "ann.json"), images=str(coco / "images"), size=16,
                  shard_size=2, progress=False)
    build(BuildConfig(**common, out=str(local)), log=lambda *_: None)
    start = s3.log.stat().st_size
    # a fresh process: the worker processes of one started earlier (another test's forkserver) would not see
    # this module's credentials, as a user's shell would have them from the start
    proc = subprocess.run([sys.executable, "-m", "preprocess", *build_cmd(coco, f"s3://{BUCKET}/sets/train"),
                           "--workers", "2"], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    OUTPUTS.append(proc.stdout + proc.stderr)
    return local, f"s3://{BUCKET}/sets/train", requests(s3, start), proc.stdout.strip().splitlines()


def test_s3_build_equals_the_local_build_and_verifies(s3, built, tmp_path, capsys):
    local, url, _, lines = built
    assert lines[-1].startswith(f"{url}: 24 samples in 12 shards"), lines
    remote = bucket_files(s3, "sets/train")
    assert set(remote) == set(set_files(local)) and len(remote) == 2 * 12 + 2 and same_set(remote, set_files(local))
    rc, out, err = run(capsys, "preprocess.cli", ["verify", url, "--no-progress"])
    assert rc == 0 and "OK (24 samples in 12 shards verified)" in out, err
    rc, out, _ = run(capsys, "preprocess.cli", ["info", url])
    assert rc == 0 and "samples     24 in 12 shards" in out and "made by     satpipe" in out
    rc, _, err = run(capsys, "preprocess.cli", ["preview", url, "--out", tmp_path / "p.png", "--n", 4])
    assert rc == 0 and (tmp_path / "p.png").read_bytes()[:4] == b"\x89PNG", err
    # a tar replaced by other bytes of the same size: verify names it (it hashes every object)
    for name, data in remote.items():
        s3.fs.pipe(f"{BUCKET}/broken/train/{name}", data)
    size = len(remote["train-000003.tar"])
    s3.fs.pipe(f"{BUCKET}/broken/train/train-000003.tar", remote["train-000004.tar"][:size].ljust(size, b"\0"))
    rc, _, err = run(capsys, "preprocess.cli", ["verify", f"s3://{BUCKET}/broken/train", "--no-progress"])
    assert rc == 1 and "train-000003.tar: sha256 differs from the manifest" in err


def test_every_shard_is_published_before_the_manifest(built):
    """From the server's own request log: per shard tar, then index, then sidecar; the manifest last."""
    log = built[2]
    puts = [path.split("?")[0].split("/sets/train/", 1)[1] for method, path in log
            if method == "PUT" and "/sets/train/" in path]
    assert puts[-2:] == [PROVENANCE_NAME, MANIFEST_NAME] and puts.count(MANIFEST_NAME) == 1
    for n in range(12):
        name = f"train-{n:06d}"
        order = [puts.index(f"{name}.tar"), puts.index(f"{name}.idx"), puts.index(f".build/{name}.json")]
        assert order == sorted(order), (name, puts)


def test_a_killed_build_leaves_no_manifest_and_resumes_from_the_bucket(s3, coco, built, capsys):
    url = f"s3://{BUCKET}/killed/train"
    start = s3.log.stat().st_size
    proc = subprocess.Popen([sys.executable, "-m", "preprocess", *build_cmd(coco, url)], stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline and proc.poll() is None:  # killed once 3 shards are published
        if sum(1 for m, p in requests(s3, start) if m == "PUT" and "/killed/train/.build/train-" in p) >= 3:
            proc.send_signal(signal.SIGKILL)
            break
        time.sleep(0.02)
    proc.wait(timeout=30)
    assert proc.returncode == -signal.SIGKILL, "the build finished before it could be killed"
    names = set(bucket_files(s3, "killed/train"))
    assert MANIFEST_NAME not in names and "train-000000.tar" in names
    rc, out, err = run(capsys, "preprocess.cli", build_cmd(coco, url))
    assert rc == 0, err
    done = int(re.search(r"(\d+) already complete", out).group(1))
    assert 3 <= done < 12
    assert same_set(bucket_files(s3, "killed/train"), set_files(built[0]))


@pytest.fixture(scope="module")
def served(s3, tmp_path_factory):
    """A tiny training set (tests/conftest.py) on the bucket and behind a local http.server."""
    sys.path.insert(0, str(Path(__file__).parent))
    from conftest import write_tiny_shard_set  # the tiny-set writer of tests/conftest.py

    folder = write_tiny_shard_set(tmp_path_factory.mktemp("www") / "tiny", num_samples=48, per_shard=16)
    for p in folder.iterdir():
        s3.fs.put_file(str(p), f"{BUCKET}/tiny/{p.name}")
    port = free_port()
    proc = subprocess.Popen([sys.executable, "-m", "http.server", str(port), "--bind", "127.0.0.1", "--directory",
                             str(folder.parent)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        wait_for_port(port, proc, "http.server")
        yield {"s3": f"s3://{BUCKET}/tiny", "http": f"http://127.0.0.1:{port}/tiny", "local": folder}
    finally:
        proc.terminate()
        proc.wait(timeout=10)


@pytest.mark.parametrize("scheme,backend", [("s3", "torch"), ("s3", "dali"), ("http", "torch"), ("http", "dali"),
                                            ("s3", "device")])
def test_fit_one_epoch_from_a_url(served, scheme, backend, tmp_path):
    from sat_train.config import from_dict
    from sat_train.fit import fit
    from sat_train.loader import dali_available

    if backend == "dali" and not dali_available():
        pytest.skip("nvidia.dali does not import")
    url, run = served[scheme], tmp_path / "run"
    summary = fit(from_dict(dict(shards=url, run=str(run), arch="tiny-cnn", epochs=1, batch_size=16,
                                 loader_backend=backend, num_workers=1, progress=False, schedule="constant")))
    assert summary["epochs"] == 1 and summary["shards"] == url
    assert summary["shards_fingerprint"] == json.loads((served["local"] / MANIFEST_NAME).read_text())["fingerprint"]
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert rows[0]["images"] == 48


def test_eval_from_a_url(served, tmp_path):
    from sat_train.config import from_dict
    from sat_train.evaluate import EvalConfig, evaluate
    from sat_train.fit import fit

    run = tmp_path / "run"
    fit(from_dict(dict(shards=str(served["local"]), run=str(run), arch="tiny-cnn", epochs=1, batch_size=16,
                       loader_backend="torch", num_workers=0, progress=False, schedule="constant")))
    cfg = EvalConfig.from_dict({"eps": ["8/255"], "pgd_steps": 2, "check_steps": [], "l2_eps": [], "cw": 0,
                                "fgsm": False, "distortions": False, "limit": 16,
                                "loader_backend": "torch", "device": "cpu"})
    results, out = evaluate(run, served["s3"], cfg, progress=False)
    assert results["shards"] == served["s3"] and results["n"] == 16 and out.name == "tiny.json"


def one_line_failure(result: tuple[int, str, str], *needles: str) -> str:
    """A non-zero exit whose error is one line (the last; commands print their config before it), no traceback."""
    rc, _, err = result
    lines = err.strip().splitlines()
    assert rc != 0 and "Traceback" not in err and lines, err
    assert all(n in lines[-1] for n in needles) and sum(needles[0] in line for line in lines) == 1, err
    return lines[-1]


def test_wrong_credentials_missing_bucket_and_no_server_fail_in_one_line(s3, served, coco, monkeypatch, capsys):
    import s3fs

    def fresh(**env):  # a new process would read the environment again; this one drops its cached clients
        for k, v in env.items():
            monkeypatch.setenv(k, v)
        s3fs.S3FileSystem.clear_instance_cache()

    fit = ["--shards", served["s3"], "--epochs", 1, "--arch", "tiny-cnn", "--loader-backend", "torch", "--no-progress"]
    try:
        fresh(AWS_SECRET_ACCESS_KEY="not-the-key")
        one_line_failure(run(capsys, "preprocess.cli", ["info", served["s3"]]), "access denied")
        one_line_failure(run(capsys, "sat_train.fit", fit + ["--run", s3.folder / "r1"]), "access denied")
        fresh(AWS_SECRET_ACCESS_KEY=s3.secret)
        one_line_failure(run(capsys, "preprocess.cli", ["verify", "s3://no-such-bucket/x", "--no-progress"]),
                         "no such bucket")
        one_line_failure(run(capsys, "preprocess.cli", build_cmd(coco, "s3://no-such-bucket/x")), "no such bucket")
        fresh(AWS_ENDPOINT_URL=f"http://127.0.0.1:{free_port()}")  # nothing listens there
        t0 = time.monotonic()
        one_line_failure(run(capsys, "preprocess.cli", ["info", f"http://127.0.0.1:{free_port()}/x"]), "cannot connect")
        one_line_failure(run(capsys, "preprocess.cli", ["info", served["s3"]]), "cannot connect")
        one_line_failure(run(capsys, "sat_train.fit", fit + ["--run", s3.folder / "r2"]), "cannot connect")
        assert time.monotonic() - t0 < 60  # bounded: timeouts and few retries, never a hang
    finally:
        monkeypatch.undo()
        s3fs.S3FileSystem.clear_instance_cache()


def test_credentials_are_never_written_or_printed(s3, built, served, tmp_path):
    """The secret key sits in the environment of every command above; no file they wrote and no output holds it."""
    secret = s3.secret.encode()
    assert OUTPUTS and not any(secret in text.encode() for text in OUTPUTS)
    for p in s3.fs.find(BUCKET):
        assert secret not in s3.fs.cat(p), p
    for root in (s3.folder / "cache", tmp_path.parent):  # the staging cache, every test's folders
        for p in Path(root).rglob("*"):
            if p.is_file() and p.stat().st_size < 50_000_000:
                assert secret not in p.read_bytes(), p


def test_dali_staging_is_bounded_and_checks_every_byte(s3, served, tmp_path):
    from sat_train.loader.plan import LoaderError
    from sat_train.loader.stage import stage_shard_set

    url = served["s3"]
    staged = stage_shard_set(url, root=tmp_path / "cache")
    assert set_files(staged.folder).keys() >= set_files(served["local"]).keys() - {PROVENANCE_NAME}
    assert same_set({k: v for k, v in set_files(staged.folder).items() if k != ".last-used"},
                    {k: v for k, v in set_files(served["local"]).items() if k != PROVENANCE_NAME})
    staged.release()
    with pytest.raises(LoaderError, match="exceed the local shard cache's bound"):
        stage_shard_set(url, root=tmp_path / "cache", bound=1000)
    # the bucket's shard replaced by other bytes of the same size: the cached copy is dropped, the new one refused
    tar = served["local"] / "train-000001.tar"
    s3.fs.pipe(f"{BUCKET}/tiny/train-000001.tar", bytes(len(tar.read_bytes())))
    try:
        (staged.folder / "train-000001.tar").write_bytes(bytes(len(tar.read_bytes())))
        with pytest.raises(LoaderError, match=r"tiny/train-000001.tar: sha256 differs from the manifest"):
            stage_shard_set(url, root=tmp_path / "cache")
        assert not (staged.folder / "train-000001.tar").exists() and not (staged.folder / MANIFEST_NAME).exists()
    finally:
        s3.fs.put_file(str(tar), f"{BUCKET}/tiny/train-000001.tar")
