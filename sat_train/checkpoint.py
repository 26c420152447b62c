"""Run-folder checkpoints: written atomically by `fit`, read back by `fit --resume` and by `eval`.

A run folder RUN/ holds config.json, metrics.jsonl, summary.json and RUN/checkpoints/last.pt, a
torch.save'd dict:

    {"checkpoint_version": 1, "model": state_dict, "model_spec": {"arch", "num_classes", "in_channels",
     "image_size"}, "config": TrainConfig as dict, "epoch": completed epochs, "optimizer": state_dict,
     "scheduler": state_dict, "rng": {"torch", "cuda", "numpy", "python"}, "classes": [...],
     "shards_fingerprint": manifest fingerprint, "shards": the set's folder or URL, "satpipe_version": "...",
     "provenance": shards.provenance.provenance() of the process that saved it}

Everything in it is plain data or tensors, so it loads with `torch.load(weights_only=True)` (no pickle
code execution from a checkpoint someone handed you).

    from sat_train.checkpoint import load_model
    model, ckpt = load_model("runs/sat")          # eval mode, on CPU
"""
from __future__ import annotations

import os
import random
from pathlib import Path

import numpy as np
import torch

from shards.provenance import provenance
from shards.storage import atomic_write

CHECKPOINT_VERSION = 1
CHECKPOINT_DIR = "checkpoints"
LAST = "last.pt"
REQUIRED_KEYS = ("model", "model_spec", "config", "epoch", "classes")


class CheckpointError(Exception):
    """A checkpoint is missing, unreadable, from an older format or does not fit its model."""


def checkpoint_path(run_dir: str | os.PathLike) -> Path:
    return Path(run_dir) / CHECKPOINT_DIR / LAST


# ----------------------------------------------------------------------------- RNG states

def rng_state() -> dict:
    """Every global RNG a training step may touch, as weights_only-loadable data."""
    np_state = np.random.get_state()
    return {
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
        "numpy": {"name": np_state[0], "keys": torch.from_numpy(np_state[1].astype(np.int64)),
                  "pos": int(np_state[2]), "has_gauss": int(np_state[3]), "cached": float(np_state[4])},
        "python": list(_listify(random.getstate())),
    }


def _listify(x):
    return [_listify(v) for v in x] if isinstance(x, (tuple, list)) else x


def _tupleify(x):
    return tuple(_tupleify(v) for v in x) if isinstance(x, list) else x


def set_rng_state(state: dict) -> None:
    """Restore what get_rng_state saved (its tensors may come from a checkpoint mapped to any device)."""
    torch.set_rng_state(state["torch"].cpu())
    if state.get("cuda") and torch.cuda.is_available() and len(state["cuda"]) == torch.cuda.device_count():
        torch.cuda.set_rng_state_all([t.cpu() for t in state["cuda"]])
    n = state["numpy"]
    np.random.set_state((n["name"], n["keys"].cpu().numpy().astype(np.uint32), n["pos"], n["has_gauss"], n["cached"]))
    random.setstate(_tupleify(state["python"]))


# ----------------------------------------------------------------------------- save / load

def save_checkpoint(path: str | os.PathLike, state: dict) -> Path:
    """torch.save through shards.storage.atomic_write (temp name, fsync, rename): `last.pt` is always
    complete. Every checkpoint records the provenance of the process that saved it."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    full = {"checkpoint_version": CHECKPOINT_VERSION, "provenance": provenance(), **state}
    return atomic_write(path, lambda f: torch.save(full, f))


def load_checkpoint(where: str | os.PathLike, map_location="cpu") -> dict:
    """Read a checkpoint from a run folder (its checkpoints/last.pt) or a .pt file, and check its shape."""
    where = Path(where)
    path = checkpoint_path(where) if where.is_dir() else where
    if not path.is_file():
        raise CheckpointError(f"{path}: no checkpoint (did the run finish an epoch?)")
    try:
        ckpt = torch.load(path, map_location=map_location, weights_only=True)
    except Exception as e:  # torch raises many types for corrupt / foreign files
        raise CheckpointError(f"{path}: not a readable checkpoint ({type(e).__name__}: {str(e).splitlines()[0]})") from None
    if not isinstance(ckpt, dict):
        raise CheckpointError(f"{path}: not a satpipe checkpoint (holds a {type(ckpt).__name__})")
    version = ckpt.get("checkpoint_version")
    if version != CHECKPOINT_VERSION:
        raise CheckpointError(f"{path}: checkpoint format {version!r}, this satpipe reads {CHECKPOINT_VERSION}")
    missing = [k for k in REQUIRED_KEYS if k not in ckpt]
    if missing:
        raise CheckpointError(f"{path}: checkpoint lacks {', '.join(missing)}")
    ckpt["path"] = str(path)
    return ckpt


def first_non_finite(state: dict) -> str | None:
    """Name of the first floating-point tensor of a state_dict holding nan or inf (None: all finite)."""
    for name, t in state.items():
        if torch.is_tensor(t) and t.is_floating_point() and not bool(torch.isfinite(t).all()):
            return name
    return None


def load_model(run_dir: str | os.PathLike, device="cpu"):
    """(model in eval mode on `device`, checkpoint dict) from a run folder or a checkpoint file.

    Refuses weights holding nan or inf (a diverged run): attacks on such a model would report
    accuracies and pass every gradient-masking check while measuring nothing."""
    from sat_train.models import build_model

    ckpt = load_checkpoint(run_dir, map_location=device)
    spec = ckpt["model_spec"]
    try:
        model = build_model(spec["arch"], spec["num_classes"], spec["in_channels"], spec["image_size"])
    except (KeyError, ValueError) as e:
        raise CheckpointError(f"{ckpt['path']}: bad model_spec {spec!r} ({e})") from None
    try:
        model.load_state_dict(ckpt["model"])
    except RuntimeError as e:
        raise CheckpointError(f"{ckpt['path']}: weights do not fit {spec['arch']} ({str(e).splitlines()[0]})") from None
    bad = first_non_finite(ckpt["model"])
    if bad is not None:
        raise CheckpointError(f"{ckpt['path']}: weight {bad!r} holds nan or inf (the run diverged); refusing to use "
                              f"this model")
    return model.to(device).eval(), ckpt
