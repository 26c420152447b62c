"""`sat-train teacher-saliency`: a shard set whose saliency maps come from a trained model, computed once.

    sat-train teacher-saliency shards/fashion-mnist/train --teacher runs/standard \\
        --out shards/fashion-mnist-teacher/train                              # grad-sign, true label
    sat-train teacher-saliency IN --teacher RUN --explainer gradcam++ --target pred --out OUT
    sat-train fit --shards shards/fashion-mnist-teacher/train --method sat --run runs/sat-teacher

The paper's CIFAR setting (Mangla et al. 2020): a teacher trained normally or adversarially gives
each image its map. The reference code recomputes every map in every epoch, one image per
forward/backward; here every batch is one forward/backward and the maps are stored once, in a
complete new shard set (same samples, keys, labels and image bytes as IN; see shards/derive.py),
which `fit --method sat`, `experiment` ([sources] teacher = "OUT") and `preprocess
verify/info/preview` read like any other. Explainers, conventions and the exact 8-bit ranges are
documented in sat_train/explain.py.

Default explainer: grad-sign, the sign of the plain input gradient. The paper says guided backprop,
but its code's guided backprop only rewires nn.ReLU modules while its networks call F.relu, so every
published number was made with grad-sign maps; `--explainer guided-backprop` gives the real one.

Resumable: rerun the same command after an interruption; finished shards are checked (sha256) and
kept. The manifest records the explainer and all its parameters, the teacher checkpoint's sha256 and
the input set's fingerprint. Bad input (a teacher whose classes, channels or image size do not fit
IN, a missing or damaged checkpoint, a damaged IN) stops with one line naming the file, exit 2.
"""
from __future__ import annotations

import functools
import sys
from dataclasses import dataclass
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path

import torch

from shards.derive import (Batch, Derivation, DeriveError, decode_images, derive, encode_saliency, open_input,
                           run_command)
from shards.format import LABEL_EXT, MANIFEST_NAME, ShardFormatError, decode_label
from shards.manifest import Manifest, read_manifest
from shards.storage import sha256_file
from sat_train.checkpoint import CheckpointError, load_model
from shards.cli import CommandParser, Config, ConfigError, add_fields, add_progress, fail, from_file_and_flags, option
from sat_train.explain import RANGES, ExplainConfig, ExplainError, explain

DERIVATION = "teacher-saliency"


def check_teacher_fits(ckpt: dict, manifest: Manifest) -> None:
    """The teacher must have been trained for this set's classes, channels and image size."""
    spec, image, path = ckpt["model_spec"], manifest.image, ckpt["path"]
    where = manifest.root / MANIFEST_NAME
    if list(ckpt["classes"]) != list(manifest.classes):
        raise CheckpointError(f"{path}: the teacher's {len(ckpt['classes'])} classes differ from the "
                              f"{manifest.num_classes} classes of {where} (labels would mean other classes)")
    if spec["in_channels"] != image["channels"]:
        raise CheckpointError(f"{path}: the teacher takes {spec['in_channels']}-channel images, {where} holds "
                              f"{image['channels']}-channel ones")
    if spec["image_size"] != image["height"] or image["height"] != image["width"]:
        raise CheckpointError(f"{path}: the teacher was trained on {spec['image_size']} px images, {where} holds "
                              f"{image['width']}x{image['height']}")


def _versions() -> dict:
    out = {"torch": torch.__version__}
    try:
        out["captum"] = version("captum")
    except PackageNotFoundError:
        out["captum"] = None
    return out


def make_maps_fn(model, cfg: ExplainConfig, manifest: Manifest, device: torch.device):
    """The derive callback: decode a batch, explain it in one pass, encode the maps."""
    image, num_classes = manifest.image, manifest.num_classes

    def make_maps(batch: Batch) -> list[dict]:
        samples = batch.samples
        pixels = decode_images(samples, image, batch.where)
        x = torch.from_numpy(pixels).to(device).permute(0, 3, 1, 2).float().div_(255.0)
        try:
            labels = [decode_label(s[LABEL_EXT]) for s in samples]
        except (KeyError, ShardFormatError) as e:
            raise DeriveError(f"{batch.where}: a sample has no valid label ({e})") from None
        bad = [s["__key__"] for s, y in zip(samples, labels) if not 0 <= y < num_classes]
        if bad:
            raise DeriveError(f"{batch.where}: sample {bad[0]!r} has a label outside 0..{num_classes - 1}")
        y = torch.tensor(labels, dtype=torch.int64, device=device)
        maps = explain(model, x, y, cfg, keys=[s["__key__"] for s in samples])
        return [{"sal.png": png} for png in encode_saliency(maps)]

    return make_maps


def worker_maps(teacher: str, cfg: ExplainConfig, in_dir: str, sha256: str):
    """make_maps for a --workers process: one CPU thread (the processes are the parallelism), the same checkpoint."""
    torch.set_num_threads(1)
    model, ckpt = load_model(teacher, device="cpu")
    if sha256_file(ckpt["path"]) != sha256:
        raise DeriveError(f"{ckpt['path']}: the checkpoint changed while the teacher set was being made")
    return make_maps_fn(model.requires_grad_(False), cfg, read_manifest(in_dir), torch.device("cpu"))


def teacher_saliency(in_dir, teacher, out_dir, cfg: ExplainConfig, *, batch_size: int = 256, device: str = "auto",
                     overwrite: bool = False, progress: bool = True, log=print, workers: int = 1) -> dict:
    """Write the teacher shard set; returns its manifest. Raises DeriveError / CheckpointError / ExplainError."""
    from sat_train.distributed import resolve_device

    cfg.validate()
    try:
        read_manifest(in_dir)  # cheap checks first; open_input below reads every byte
    except ShardFormatError as e:
        raise DeriveError(str(e)) from None
    dev = resolve_device(device)
    if workers > 1 and dev.type != "cpu":
        raise DeriveError(f"--workers {workers}: worker processes are for CPU runs (one GPU process batches already)")
    model, ckpt = load_model(teacher, device=dev)
    model.requires_grad_(False)  # input gradients only: no weight gradients are ever computed
    manifest = open_input(in_dir)
    check_teacher_fits(ckpt, manifest)
    sha = sha256_file(ckpt["path"])
    params = {**cfg.params(model), "teacher_sha256": sha}
    n = cfg.normalization
    saliency = {
        "kind": "teacher", "explainer": cfg.explainer, "normalize": n, "range": RANGES[n],
        "values": "{-1, 0, 1}" if n == "sign" else f"[{RANGES[n][0]:g}, {RANGES[n][1]:g}]",
        "salient": 1.0, "background": RANGES[n][0], "sigma_frac": cfg.blur_sigma_frac, "params": params,
        "teacher": {"run": str(Path(teacher).resolve()), "checkpoint": str(Path(ckpt["path"]).resolve()),
                    "sha256": sha, "arch": ckpt["model_spec"]["arch"], "epochs": ckpt.get("epoch"),
                    "method": (ckpt.get("config") or {}).get("method"),
                    "eps": (ckpt.get("config") or {}).get("eps"),
                    "trained_on": (ckpt.get("shards_fingerprint") or {}).get("digest")},
    }
    derivation = Derivation(DERIVATION, params, saliency,
                            execution={"batch_size": batch_size, "device": str(dev), "workers": workers, **_versions()})
    factory = functools.partial(worker_maps, str(teacher), cfg, str(in_dir), sha)
    return derive(in_dir, out_dir, derivation, make_maps_fn(model, cfg, manifest, dev) if workers == 1 else None,
                  batch_size=batch_size, overwrite=overwrite, progress=progress, log=log, manifest=manifest,
                  workers=workers, maps_factory=factory)


@dataclass
class TeacherRun(Config):
    """How `teacher-saliency` runs (the maps do not depend on these)."""
    batch_size: int = option(256, "images per forward/backward")
    device: str = option("auto", "where the teacher runs", choices=("auto", "cpu", "cuda"))
    workers: int = option(1, "CPU only: shards in N processes of one thread each instead of one process with N torch "
                          "threads (bench/teacher.py measures which is faster on your machine)")
    overwrite: bool = option(False, "replace whatever else OUT holds (an output of this very derivation is kept and "
                             "resumed anyway)")

    def validate(self) -> None:
        if self.batch_size < 1 or self.workers < 1:
            raise ConfigError("batch_size and workers must be >= 1")


def build_parser() -> CommandParser:
    ap = CommandParser("sat-train teacher-saliency", __doc__)
    ap.add_argument("input", metavar="IN_SHARDS", help="input shard set (folder with manifest.json)")
    ap.add_argument("--teacher", required=True, metavar="RUN",
                    help="teacher run folder (its checkpoints/last.pt) or a checkpoint .pt file")
    ap.add_argument("--out", required=True, metavar="OUT_SHARDS", help="output shard set folder to write")
    ap.add_argument("--config", metavar="FILE.toml", help="TOML file of the option keys below (explainer, batch_size, "
                    "...); flags override it")
    add_fields(ap.add_argument_group("explainer (the maps)"), ExplainConfig)
    add_fields(ap.add_argument_group("run"), TeacherRun)
    add_progress(ap)
    return ap


def main(argv: list[str] | None = None) -> int:
    prog = "sat-train teacher-saliency"
    args = build_parser().parse_args(sys.argv[1:] if argv is None else argv)
    try:
        cfg, run = from_file_and_flags((ExplainConfig, TeacherRun), args, args.config)
    except (ConfigError, ExplainError) as e:
        return fail(prog, str(e))
    log = lambda msg: print(msg, file=sys.stderr)  # noqa: E731  (stdout stays clean)
    return run_command(prog, args.out, lambda: teacher_saliency(
        args.input, args.teacher, args.out, cfg, batch_size=run.batch_size, device=run.device,
        overwrite=run.overwrite, progress=args.progress, log=log, workers=run.workers),
        user_errors=(CheckpointError, ExplainError, ConfigError))
