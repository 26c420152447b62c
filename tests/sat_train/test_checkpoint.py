import random

import numpy as np
import pytest
import torch

from sat_train.checkpoint import (CheckpointError, checkpoint_path, load_checkpoint, load_model, rng_state,
                                  save_checkpoint, set_rng_state)
from sat_train.models import build_model, model_spec


def _save(run, arch="tiny-cnn", **extra):
    model = build_model(arch, 4, 3, 16)
    state = {"model": model.state_dict(), "model_spec": model_spec(arch, 4, 3, 16), "config": {"method": "sat"},
             "epoch": 2, "classes": ["a", "b", "c", "d"], "rng": rng_state(), **extra}
    save_checkpoint(checkpoint_path(run), state)
    return model


def test_roundtrip_and_eval_mode(tmp_path):
    model = _save(tmp_path)
    loaded, ckpt = load_model(tmp_path)
    assert not loaded.training and ckpt["epoch"] == 2 and ckpt["classes"][0] == "a"
    x = torch.rand(2, 3, 16, 16)
    model.eval()
    assert torch.equal(model(x), loaded(x))
    assert not list((tmp_path / "checkpoints").glob(".*tmp*"))  # no temp file left behind


def test_missing_old_and_incompatible(tmp_path):
    with pytest.raises(CheckpointError, match="no checkpoint"):
        load_model(tmp_path)
    checkpoint_path(tmp_path).parent.mkdir(parents=True)
    checkpoint_path(tmp_path).write_bytes(b"garbage")
    with pytest.raises(CheckpointError, match="not a readable checkpoint"):
        load_model(tmp_path)
    torch.save({"model": {}}, checkpoint_path(tmp_path))
    with pytest.raises(CheckpointError, match="checkpoint format None"):
        load_model(tmp_path)
    _save(tmp_path)
    ckpt = torch.load(checkpoint_path(tmp_path), weights_only=True)
    ckpt["model_spec"]["arch"] = "cnn4"
    torch.save(ckpt, checkpoint_path(tmp_path))
    with pytest.raises(CheckpointError, match="do not fit cnn4"):
        load_model(tmp_path)


def test_rng_state_restores_every_generator(tmp_path):
    torch.manual_seed(1); np.random.seed(1); random.seed(1)
    state = rng_state()
    a = (torch.rand(3), np.random.rand(3), random.random())
    _save(tmp_path)  # round trip through a file: the state must survive weights_only loading
    set_rng_state(load_checkpoint(tmp_path)["rng"])  # saved after the draws of `a`: continues, differs
    b = (torch.rand(3), np.random.rand(3), random.random())
    set_rng_state(state)
    c = (torch.rand(3), np.random.rand(3), random.random())
    assert torch.equal(a[0], c[0]) and np.array_equal(a[1], c[1]) and a[2] == c[2]
    assert not torch.equal(a[0], b[0])
