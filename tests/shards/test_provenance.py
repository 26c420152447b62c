"""Provenance (shards/provenance.py) on every artifact: a shard set, a run (summary + checkpoint), a report.

A shard set keeps it in provenance.json beside the manifest, so the manifest stays byte-identical
between builds of the same config made by different commits."""
import json
import subprocess
import sys
from pathlib import Path

import torch

from shards import provenance as P
from shards.format import MANIFEST_NAME, PROVENANCE_NAME

sys.path.insert(0, str(Path(__file__).parents[1] / "preprocess"))
from coco_fixture import make_coco  # noqa: E402

KEYS = {"satpipe", "git", "python", "packages"}


def check_block(block: dict) -> None:
    assert set(block) == KEYS
    assert block["satpipe"] == P.satpipe_version() and block["python"].count(".") == 2
    assert block["packages"]["torch"] == torch.__version__ and "numba" in block["packages"]
    assert any(k.startswith("opencv") for k in block["packages"]) and "pycocotools" in block["packages"]
    git = block["git"]
    assert git is None or (len(git["commit"]) == 40 and git["dirty"] in (True, False, None))


def git(root, *args):
    subprocess.run(["git", "-C", str(root), *args], check=True, capture_output=True)


def test_git_state_of_a_checkout_and_of_a_copy_inside_another_repository(tmp_path):
    repo = tmp_path / "repo"
    (repo / "shards").mkdir(parents=True)
    (repo / "shards" / "format.py").write_text("x = 1\n")
    git(repo, "init", "-q")
    git(repo, "-c", "user.name=t", "-c", "user.email=t@t", "add", ".")
    git(repo, "-c", "user.name=t", "-c", "user.email=t@t", "commit", "-qm", "one")
    head = subprocess.run(["git", "-C", str(repo), "rev-parse", "HEAD"], capture_output=True, text=True).stdout.strip()
    assert P.git_state(repo) == {"commit": head, "dirty": False}
    (repo / "shards" / "format.py").write_text("x = 2\n")
    assert P.git_state(repo) == {"commit": head, "dirty": True}
    (repo / "venv" / "site-packages" / "shards").mkdir(parents=True)  # an install inside the user's repository
    assert P.git_state(repo / "venv" / "site-packages") is None
    assert P.git_state(tmp_path) is None  # not a repository at all


def test_a_built_shard_set_records_it_beside_an_unchanged_manifest(tmp_path, monkeypatch):
    from preprocess.build import build
    from preprocess.config import BuildConfig
    from preprocess.info import describe

    make_coco(tmp_path / "coco", num_images=2, objects=2)
    cfg = dict(source="coco", annotations=str(tmp_path / "coco" / "ann.json"), images=str(tmp_path / "coco" / "images"),
               size=16, progress=False)
    build(BuildConfig(**cfg, out=str(tmp_path / "a")), log=lambda *_: None)
    check_block(json.loads((tmp_path / "a" / PROVENANCE_NAME).read_text()))
    assert "provenance" not in json.loads((tmp_path / "a" / MANIFEST_NAME).read_text())
    assert "made by     satpipe " in describe(tmp_path / "a")
    # another commit builds the same config: the manifest does not change, provenance.json does
    fake = {**P.provenance(), "git": {"commit": "f" * 40, "dirty": False}}
    monkeypatch.setattr(P, "_cached", lambda: fake)
    build(BuildConfig(**cfg, out=str(tmp_path / "b")), log=lambda *_: None)
    assert (tmp_path / "b" / MANIFEST_NAME).read_bytes() == (tmp_path / "a" / MANIFEST_NAME).read_bytes()
    assert json.loads((tmp_path / "b" / PROVENANCE_NAME).read_text())["git"]["commit"] == "f" * 40


def test_a_run_records_it_in_its_summary_and_checkpoint(tiny_shards, tmp_path):
    from sat_train.checkpoint import load_checkpoint
    from sat_train.config import from_dict
    from sat_train.fit import fit

    shards = tiny_shards(num_samples=32, per_shard=16)
    run = tmp_path / "run"
    fit(from_dict(dict(shards=str(shards), run=str(run), arch="tiny-cnn", epochs=1, batch_size=16,
                       loader_backend="torch", num_workers=0, progress=False, schedule="constant")))
    check_block(json.loads((run / "summary.json").read_text())["provenance"])
    ckpt = load_checkpoint(run)
    check_block(ckpt["provenance"])
    assert ckpt["shards"] == str(shards) and ckpt["satpipe_version"] == P.satpipe_version()


def test_report_lines_name_the_commit():
    block = {"satpipe": "1.2", "git": {"commit": "abc" * 14, "dirty": True}, "python": "3.11.0",
             "packages": {"torch": "2.13.0"}}
    assert P.provenance_lines(block) == [f"Made by satpipe 1.2, git {('abc' * 14)[:12]} (uncommitted changes), "
                                         "python 3.11.0; torch 2.13.0."]
    assert "not a git checkout" in P.describe({**block, "git": None})


def test_a_report_records_it(tmp_path):
    from sat_train.compare import compare

    run = tmp_path / "runs" / "r"
    run.mkdir(parents=True)
    (run / "config.json").write_text(json.dumps({"method": "standard", "seed": 0, "arch": "cnn4"}))
    path, _, _ = compare([run], tmp_path / "report")
    check_block(json.loads((tmp_path / "report" / "report.json").read_text())["provenance"])
    assert "Made by satpipe" in path.read_text()
