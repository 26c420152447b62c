"""Damaged shard sets: `preprocess verify` names the damage, `sat-train fit` and `sat-train eval` refuse
it (one line, exit 2) before anything is trained on or attacked. One case per kind of damage seen in
issue 16: a flipped byte in a tar, a shifted offset in a DALI index, a label outside the classes, a
manifest entry pointing outside the set's folder, an extra tar the manifest does not list (the folder
holds more than this build: refused until it is moved out, rather than guessed about).

The sets are tiny (tests/conftest.py); every refusal happens at start, so no test here trains."""
from __future__ import annotations

import json

import pytest
import torch

from preprocess.verify import main as verify_main
from sat_train.checkpoint import checkpoint_path, save_checkpoint
from sat_train.evaluate import main as eval_main
from sat_train.fit import main as fit_main
from sat_train.loader import make_loader
from sat_train.models import build_model, model_spec
from shards.format import encode_label
from shards.manifest import read_manifest
from shards.reading import iter_tar_samples, read_dali_index
from shards.storage import sha256_file
from shards.writer import ShardWriter


def _reseal(root, tar_name):
    """Make the manifest agree with a rewritten tar + index, so only deeper checks can tell."""
    raw = json.loads((root / "manifest.json").read_text())
    for s in raw["shards"]:
        if s["tar"] == tar_name:
            tar, idx = root / s["tar"], root / s["index"]
            s.update(bytes=tar.stat().st_size, sha256=sha256_file(tar), index_bytes=idx.stat().st_size,
                     index_sha256=sha256_file(idx))
    (root / "manifest.json").write_text(json.dumps(raw))


def flip_byte(root):
    tar = read_manifest(root).tar_paths()[1]
    data = bytearray(tar.read_bytes())
    data[1500] ^= 0x01  # same size: only sha256 can see it
    tar.write_bytes(bytes(data))
    return str(tar), "sha256 differs"


def shift_index(root):
    idx = read_manifest(root).index_paths()[0]
    lines = idx.read_text().splitlines()
    f = lines[2].split()
    f[1] = str(int(f[1]) + 512 if len(str(int(f[1]) + 512)) == len(f[1]) else int(f[1]) - 512)  # same length
    lines[2] = " ".join(f)
    idx.write_text("\n".join(lines) + "\n")  # same size as before: only the index's sha256 can see it
    return str(idx), "sha256 differs"


def label_out_of_range(root):
    tar = read_manifest(root).tar_paths()[0]
    samples = list(iter_tar_samples(tar))
    samples[5]["label.i64"], samples[5]["cls"] = encode_label(77), b"77"
    with ShardWriter(tar) as w:
        for s in samples:
            w.write(s)
    _reseal(root, tar.name)  # a consistent set whose bytes are all as the manifest says
    return f"{tar}: sample ", f"{samples[5]['__key__']}: label 77 outside 0..3"  # fit/eval: "'s000005' has label 77"


def foreign_tar(root):
    raw = json.loads((root / "manifest.json").read_text())
    raw["shards"][1]["tar"] = "/etc/hostname"
    (root / "manifest.json").write_text(json.dumps(raw))
    return "'/etc/hostname' is not a plain file name", "manifest.json"


def escaping_index(root):
    raw = json.loads((root / "manifest.json").read_text())
    raw["shards"][0]["index"] = "../elsewhere/train-000000.idx"
    (root / "manifest.json").write_text(json.dumps(raw))
    return "'../elsewhere/train-000000.idx' is not a plain file name", "manifest.json"


def extra_tar(root):
    stray = root / "train-000099.tar"
    stray.write_bytes((root / "train-000000.tar").read_bytes())
    return str(stray), "a tar or index the manifest does not list"


DAMAGE = [flip_byte, shift_index, label_out_of_range, foreign_tar, escaping_index, extra_tar]


@pytest.fixture
def untrained_run(tmp_path):
    """A run folder with an (untrained) checkpoint for the tiny sets: eval needs no trained model to refuse."""
    def make(root):
        m = read_manifest(root)
        torch.manual_seed(0)
        model = build_model("tiny-cnn", m.num_classes, m.image["channels"], m.image["height"])
        run = tmp_path / "run"
        save_checkpoint(checkpoint_path(run), {
            "model": model.state_dict(), "model_spec": model_spec("tiny-cnn", m.num_classes, m.image["channels"],
                                                                  m.image["height"]),
            "config": {"method": "standard"}, "epoch": 1, "classes": m.classes, "shards_fingerprint": {}})
        return run
    return make


@pytest.mark.parametrize("damage", DAMAGE, ids=lambda f: f.__name__)
def test_damage_is_named_by_verify_and_refused_by_fit_and_eval(damage, tiny_shards, untrained_run, tmp_path, capsys):
    root = tiny_shards(num_samples=32, per_shard=16)
    run = untrained_run(root)
    where, what = damage(root)

    assert verify_main([str(root), "--no-progress"]) == 1
    err = capsys.readouterr().err
    assert where in err and what in err and "Traceback" not in err

    fit_run = tmp_path / "fit-run"
    assert fit_main(["--shards", str(root), "--run", str(fit_run), "--arch", "tiny-cnn", "--epochs", "1",
                     "--batch-size", "8", "--loader-backend", "torch", "--num-workers", "0", "--no-progress"]) == 2
    err = [ln for ln in capsys.readouterr().err.splitlines() if not ln.startswith("loader: backend")]
    assert len(err) == 1 and where in err[0] and err[0].startswith("sat-train fit:"), err
    assert not (fit_run / "metrics.jsonl").exists() and not checkpoint_path(fit_run).exists()  # nothing trained

    assert eval_main([str(run), "--shards", str(root), "--loader-backend", "torch", "--no-progress"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and where in err[0] and err[0].startswith("sat-train eval:"), err
    assert not (run / "eval").exists()  # nothing reported


def test_the_cheap_mode_is_opt_in_and_named_in_its_messages(tiny_shards, capsys):
    """--verify-shards size skips the hashing (its refusals then point to the full check); sha256 is the default."""
    root = tiny_shards(num_samples=32, per_shard=16)
    where, _ = flip_byte(root)
    make_loader(root, 8, train=False, backend="torch", device="cpu", verify="size")  # the cheap check passes
    tar = read_manifest(root).tar_paths()[0]
    tar.write_bytes(tar.read_bytes()[:4000])
    with pytest.raises(Exception, match="--verify-shards sha256 checks every byte"):
        make_loader(root, 8, train=False, backend="torch", device="cpu", verify="size")


def test_an_unlisted_tar_is_refused_and_reading_works_again_once_it_is_moved_out(tiny_shards, tmp_path):
    root = tiny_shards(num_samples=32, per_shard=16)
    stray, _ = extra_tar(root)
    with pytest.raises(Exception, match="does not list"):
        make_loader(root, 8, train=False, backend="torch", device="cpu", num_workers=0)
    (root / "train-000099.tar").rename(tmp_path / "moved.tar")
    assert verify_main([str(root), "--no-progress"]) == 0
    loader = make_loader(root, 8, train=False, backend="torch", device="cpu", num_workers=0)
    assert sum(len(y) for _x, _s, y in loader) == 32


def test_verify_names_tar_members_with_no_place_in_a_shard(tiny_shards, capsys):
    import io
    import tarfile

    root = tiny_shards(num_samples=16, per_shard=16)
    tar = read_manifest(root).tar_paths()[0]
    with tarfile.open(tar, "a") as tf:  # appended after the samples: the index and counts still match
        for name, kind in (("../../escape.txt", tarfile.REGTYPE), ("/etc/abs.txt", tarfile.REGTYPE),
                           ("link.txt", tarfile.SYMTYPE), ("dev.txt", tarfile.CHRTYPE)):
            info = tarfile.TarInfo(name)
            info.type = kind
            if kind == tarfile.SYMTYPE:
                info.linkname = "/etc/passwd"
            tf.addfile(info, io.BytesIO(b"") if kind == tarfile.REGTYPE else None)
    _reseal(root, tar.name)
    assert verify_main([str(root), "--no-progress"]) == 1
    err = capsys.readouterr().err
    assert "'../../escape.txt' is a name that leaves the extraction folder" in err
    assert "'/etc/abs.txt' is a name that leaves" in err
    assert "'link.txt' is a link" in err and "'dev.txt' is a device file" in err


def test_eval_refuses_a_model_with_non_finite_weights(tiny_shards, untrained_run, capsys):
    root = tiny_shards(num_samples=16, per_shard=16)
    run = untrained_run(root)
    ckpt = torch.load(checkpoint_path(run), weights_only=True)
    name = next(k for k in ckpt["model"] if k.endswith("weight"))
    ckpt["model"][name][0] = float("nan")
    torch.save(ckpt, checkpoint_path(run))
    assert eval_main([str(run), "--shards", str(root), "--loader-backend", "torch", "--no-progress"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and f"weight '{name}' holds nan or inf" in err[0], err
    assert not (run / "eval").exists()


def test_fit_refuses_a_one_class_set(tiny_shards, tmp_path, capsys):
    root = tiny_shards(num_samples=16, per_shard=16, num_classes=1)
    assert fit_main(["--shards", str(root), "--run", str(tmp_path / "r"), "--arch", "tiny-cnn", "--epochs", "1",
                     "--batch-size", "8", "--loader-backend", "torch", "--num-workers", "0", "--no-progress"]) == 2
    err = [ln for ln in capsys.readouterr().err.splitlines() if not ln.startswith("loader: backend")]
    assert len(err) == 1 and "needs at least 2 classes" in err[0] and "manifest.json" in err[0], err
