"""`sat-train teacher-saliency`: a complete, verifiable teacher shard set; every bad input refused in one line."""
import numpy as np
import pytest
import torch

from shards.derive import decode_images, saliency_png_to_float
from shards.format import MANIFEST_NAME, SALIENCY_EXT, decode_label
from shards.manifest import read_manifest
from shards.reading import iter_tar_samples
from shards.storage import sha256_file
from sat_train import teacher as teacher_cli
from sat_train.checkpoint import save_checkpoint
from sat_train.explain import ExplainConfig, explain
from sat_train.models import build_model, model_spec


def save_teacher(run, *, classes=4, channels=3, size=16, arch="tiny-cnn", seed=0):
    """A real checkpoint in a run folder (random weights: these tests are about the command, not accuracy)."""
    torch.manual_seed(seed)
    spec = model_spec(arch, classes, channels, size)
    model = build_model(**spec)
    save_checkpoint(run / "checkpoints" / "last.pt", {
        "model": model.state_dict(), "model_spec": spec, "config": {"method": "standard", "eps": 8 / 255},
        "epoch": 1, "classes": [f"class{i}" for i in range(classes)], "shards_fingerprint": {"digest": "x"}})
    return run


def _run(*argv):
    return teacher_cli.main([*map(str, argv), "--no-progress"])


def _files(root):
    return {p.name: p.read_bytes() for p in sorted(root.iterdir()) if p.is_file()}


@pytest.fixture
def tiny(tiny_shards, tmp_path):
    return tiny_shards(num_samples=40, per_shard=16, size=16, channels=3, num_classes=4), save_teacher(tmp_path / "t")


def test_teacher_set_verifies_keeps_images_and_records_teacher_and_explainer(tiny, tmp_path):
    from preprocess.verify import verify

    src, run = tiny
    out = tmp_path / "out"
    assert _run(src, "--teacher", run, "--out", out, "--explainer", "gradcam++", "--target", "pred",
                "--batch-size", "7") == 0
    assert verify(out, progress=False) == []
    m_in, m_out = read_manifest(src), read_manifest(out)
    model = build_model("tiny-cnn", 4, 3, 16)
    model.load_state_dict(torch.load(run / "checkpoints" / "last.pt", weights_only=True)["model"])
    model.eval()
    for tar_in, tar_out in zip(m_in.tar_paths(), m_out.tar_paths()):
        before, after = list(iter_tar_samples(tar_in)), list(iter_tar_samples(tar_out))
        for a, b in zip(before, after):  # image, label, cls, json and key: byte for byte
            assert {k: v for k, v in a.items() if k != SALIENCY_EXT} == {k: v for k, v in b.items() if k != SALIENCY_EXT}
        # the stored maps are the explainer's, within the 8-bit encoding's half step
        x = torch.from_numpy(decode_images(before, m_in.image)).permute(0, 3, 1, 2).float() / 255
        y = torch.tensor([decode_label(s["label.i64"]) for s in before])
        want = explain(model, x, y, ExplainConfig(explainer="gradcam++", target="pred"))
        got = np.stack([saliency_png_to_float(s[SALIENCY_EXT]) for s in after])
        assert np.abs(got - want).max() <= 1 / 255 + 1e-5
    sal = m_out.raw["saliency"]
    assert sal["kind"] == "teacher" and sal["explainer"] == "gradcam++" and sal["range"] == [0.0, 1.0]
    params = m_out.raw["derived_from"]["derivation"]["params"]
    assert params == {"explainer": "gradcam++", "target": "pred", "normalize": "minmax", "channels": "sum",
                      "blur_sigma_frac": 0.0, "cam_layer": "body.6", "cam_upsample": "bilinear",
                      "teacher_sha256": sha256_file(run / "checkpoints" / "last.pt")}
    assert sal["teacher"]["sha256"] == params["teacher_sha256"] and sal["teacher"]["arch"] == "tiny-cnn"
    assert m_out.raw["derived_from"]["fingerprint"] == m_in.fingerprint
    assert m_out.fingerprint["input_digest"] == m_in.fingerprint["digest"]


def test_interrupted_command_resumes_to_identical_bytes(tiny, tmp_path, monkeypatch, capsys):
    src, run = tiny
    whole, out = tmp_path / "whole", tmp_path / "out"
    flags = ("--explainer", "smoothgrad", "--smoothgrad-samples", "3", "--batch-size", "6")
    assert _run(src, "--teacher", run, "--out", whole, *flags) == 0
    real = teacher_cli.make_maps_fn

    def dies_in_second_shard(*args):
        make_maps = real(*args)

        def wrapped(batch):
            if batch.shard == 1:
                raise KeyboardInterrupt
            return make_maps(batch)
        return wrapped

    monkeypatch.setattr(teacher_cli, "make_maps_fn", dies_in_second_shard)
    assert _run(src, "--teacher", run, "--out", out, *flags) == 130
    assert "rerun the same command" in capsys.readouterr().err
    assert not (out / MANIFEST_NAME).exists() and (out / "train-000000.tar").exists()
    monkeypatch.setattr(teacher_cli, "make_maps_fn", real)
    assert _run(src, "--teacher", run, "--out", out, *flags) == 0
    assert _files(out) == _files(whole)
    # another explainer into the same folder is refused, not mixed in
    assert _run(src, "--teacher", run, "--out", out, "--explainer", "grad-sign") == 2


def _truncate_first_tar(src):
    tar = src / "train-000000.tar"
    tar.write_bytes(tar.read_bytes()[:2048])
    return tar


@pytest.mark.parametrize("case,needle", [
    ("classes", "5 classes differ from the 4 classes"),
    ("channels", "takes 1-channel images"),
    ("size", "trained on 32 px images"),
    ("missing", "no checkpoint"),
    ("damaged", "not a readable checkpoint"),
    ("input", "train-000000.tar: 2048 bytes"),
])
def test_bad_input_is_one_line_exit_2_and_nothing_looks_complete(tiny, tmp_path, capsys, case, needle):
    src, run = tiny
    if case == "classes":
        run = save_teacher(tmp_path / "t5", classes=5)
    elif case == "channels":
        run = save_teacher(tmp_path / "t1", channels=1)
    elif case == "size":
        run = save_teacher(tmp_path / "t32", size=32)
    elif case == "missing":
        run = tmp_path / "empty-run"
        run.mkdir()
    elif case == "damaged":
        (run / "checkpoints" / "last.pt").write_bytes(b"PK\x03\x04 not a checkpoint")
    elif case == "input":
        _truncate_first_tar(src)
    out = tmp_path / "out"
    assert _run(src, "--teacher", run, "--out", out) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and needle in err and "Traceback" not in err
    named = {"input": "train-000000.tar", "missing": str(run)}.get(case, "last.pt")
    assert named in err
    assert not (out / MANIFEST_NAME).exists()


def test_fit_sat_trains_on_a_teacher_set(tiny, tmp_path):
    from sat_train.config import from_dict
    from sat_train.fit import fit

    src, run = tiny
    out = tmp_path / "out"
    assert _run(src, "--teacher", run, "--out", out) == 0
    summary = fit(from_dict({"shards": str(out), "run": str(tmp_path / "student"), "method": "sat", "arch": "tiny-cnn",
                             "epochs": 1, "batch_size": 8, "limit_batches": 2, "sat_p": 0.5, "progress": False,
                             "loader_backend": "torch", "num_workers": 0}))
    assert summary["saliency_source"] == "teacher"
    assert summary["shards_fingerprint"] == read_manifest(out).fingerprint != read_manifest(src).fingerprint


def test_workers_write_the_same_bytes_as_one_process(tiny, tmp_path):
    src, run = tiny
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # a worker runs one thread: same float order, same bytes
    try:
        assert _run(src, "--teacher", run, "--out", tmp_path / "one") == 0
    finally:
        torch.set_num_threads(threads)
    assert _run(src, "--teacher", run, "--out", tmp_path / "two", "--workers", "2") == 0
    one, two = read_manifest(tmp_path / "one"), read_manifest(tmp_path / "two")
    assert one.shards == two.shards and one.fingerprint == two.fingerprint
    assert two.raw["derived_from"]["execution"]["workers"] == 2
