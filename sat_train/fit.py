"""`sat-train fit`: train a classifier on a shard set with standard, SAT, PGD, TRADES or FGSM-RS training.

    sat-train fit --shards shards/fashion-mnist/train --method sat --run runs/sat
    sat-train fit --config fit.toml --epochs 30                      # TOML keys = TrainConfig fields
    sat-train fit --run runs/sat --resume                            # continue from runs/sat/checkpoints/last.pt
    torchrun --nproc_per_node 4 -m sat_train fit --shards ... --method sat --run-dir runs/sat-4gpu
    (under torchrun spell it --run-dir: torchrun's parser reads `--run` as its own --run-path)

Multi-process: under torchrun every process trains a DistributedDataParallel replica on its 1/N of
each epoch (nccl on CUDA, gloo on CPU). --batch-size is per process (global = N x batch size) and
--lr is used as given (scale it yourself for a larger global batch). Rank 0 writes the run folder:

    RUN/config.json       the full TrainConfig
    RUN/metrics.jsonl     one JSON line per epoch: epoch, loss, train_acc (clean), input_acc, p, lr,
                          images_per_s, epoch_time_s, perturbations (batches per kind)
    RUN/checkpoints/last.pt   written atomically after every epoch (see sat_train.checkpoint)
    RUN/summary.json      at the end: method, saliency source, epochs, train time, throughput, final loss/acc
    RUN/tensorboard/      with --tensorboard: the metrics lines as TensorBoard scalars (step = epoch + 1)

Safety: before the first step the shard set is checked against its manifest (--verify-shards sha256,
the default: every tar and index byte, hashed in parallel threads; `size`: sizes only) and every label
against the class count. A loss (or weight) that turns nan or inf stops the run: one line naming the
epoch and step, exit 2, no checkpoint of those weights (checkpoints/last.pt keeps the last good epoch).
One line per epoch goes to stderr (loss, accuracy, p, img/s, time left); a tqdm bar too on a terminal.

Determinism: data order and augmentation follow (seed, epoch); the perturbation draws use a
generator seeded by (seed, epoch, rank); all global RNG states are checkpointed. On CPU a run stopped
after epoch k (--stop-after-epochs k, or a crash after the checkpoint) and resumed ends with the same
weights, bit for bit, as an uninterrupted run.
"""
from __future__ import annotations

import inspect
import json
import math
import os
import sys
import time
from contextlib import nullcontext
from pathlib import Path

import numpy as np
import torch

from sat_train import distributed as D
from sat_train import run_folder as RF
from sat_train.checkpoint import (CheckpointError, checkpoint_path, first_non_finite, load_checkpoint, rng_state,
                                  save_checkpoint, set_rng_state)
from sat_train.config import ConfigError, TrainConfig, config_from_argv
from sat_train.loader import LoaderError
from sat_train.methods import Method, config_p
from sat_train.models import build_model, model_spec
from sat_train.optim import make_optimizer, make_scheduler
from shards.format import ShardFormatError
from shards.provenance import satpipe_version
from shards.storage import atomic_write_json

CHECK_EVERY = 10  # steps between loss syncs (progress bar and the non-finite loss check)


class TrainingDiverged(Exception):
    """The loss or the weights became nan/inf; the message says where and what was kept."""


class _NonFinite(Exception):
    def __init__(self, step: int, value: float):
        super().__init__(step, value)
        self.step, self.value = step, value


# OSError: unwritable run folder, disk full, ... (the message names the path)
USER_ERRORS = (ConfigError, CheckpointError, ShardFormatError, LoaderError, TrainingDiverged, OSError)


def _seed(*parts: int) -> int:
    return int(np.random.SeedSequence([int(p) for p in parts]).generate_state(1)[0])


def _ddp_without_buffer_sync() -> dict:
    """DDP keyword that stops the per-forward buffer broadcast: `forward_sync_buffers` where this torch
    has it (2.13 deprecates `broadcast_buffers` with a FutureWarning on every rank), else the old name."""
    params = inspect.signature(torch.nn.parallel.DistributedDataParallel.__init__).parameters
    return {"forward_sync_buffers": False} if "forward_sync_buffers" in params else {"broadcast_buffers": False}


def amp_dtype(cfg: TrainConfig, device: torch.device):
    mode = ("bf16" if device.type == "cuda" else "off") if cfg.amp == "auto" else cfg.amp
    return {"bf16": torch.bfloat16, "fp16": torch.float16, "off": None}[mode]


def fit(cfg: TrainConfig, info: D.DistInfo | None = None, return_model: bool = False):
    """Train as `cfg` says; returns the summary dict (rank 0 also writes it to RUN/summary.json),
    or (this process's bare model, summary) with return_model=True."""
    was_deterministic = torch.are_deterministic_algorithms_enabled()
    try:
        return _fit(cfg, info, return_model)
    finally:  # process-wide switch: leave it as found for whoever runs next in this process
        torch.use_deterministic_algorithms(was_deterministic)


def _fit(cfg: TrainConfig, info: D.DistInfo | None, return_model: bool):
    from sat_train.loader import make_loader

    info = info or D.DistInfo(device=D.resolve_device(cfg.device))
    device, main = info.device, info.is_main
    run = RF.resolve_run_dir(cfg)
    if not cfg.shards:
        raise ConfigError("no training shards given (--shards DIR)")
    if cfg.tensorboard:
        RF.require_tensorboard()
    resume = RF.prepare_run_dir(cfg, run, info)
    D.barrier(info)

    torch.manual_seed(cfg.seed)  # same initial weights on every rank (DDP also broadcasts rank 0's)
    np.random.seed(cfg.seed % 2**32)
    __import__("random").seed(cfg.seed)
    if cfg.deterministic:
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
        torch.use_deterministic_algorithms(True)
    torch.backends.cudnn.benchmark = device.type == "cuda" and not cfg.deterministic

    loader = make_loader(cfg.shards, cfg.batch_size, train=True, backend=cfg.loader_backend, augment=cfg.augment,
                         crop_padding=cfg.crop_padding, flip=cfg.flip, seed=cfg.seed, rank=info.rank,
                         world_size=info.world_size, device=device, num_workers=cfg.num_workers,
                         decode=cfg.loader_decode, memory_fraction=cfg.loader_memory_fraction,
                         verify=cfg.verify_shards)
    manifest = loader.manifest
    img = manifest.image
    spec = model_spec(cfg.arch, manifest.num_classes, img["channels"], img["height"])
    try:  # the shard set may not fit any model: one class, images under 8 px, ...
        bare = build_model(**spec).to(device)
    except ValueError as e:
        raise ConfigError(f"{manifest.root / 'manifest.json'}: {e}") from None
    channels_last = cfg.channels_last and device.type == "cuda"
    if channels_last:
        bare = bare.to(memory_format=torch.channels_last)
    steps_per_epoch = min(len(loader), cfg.limit_batches) if cfg.limit_batches else len(loader)
    if steps_per_epoch == 0:
        raise ConfigError(f"{cfg.shards}: {loader.num_samples} samples per process make no batch of {cfg.batch_size}")
    optimizer = make_optimizer(bare.parameters(), cfg)
    scheduler = make_scheduler(optimizer, cfg, steps_per_epoch)

    start_epoch = 0
    if resume:
        # to the CPU: load_state_dict moves weights and optimizer state to the model's device, and the
        # RNG states must stay CPU byte tensors (mapped to CUDA, torch.set_rng_state refuses them)
        ckpt = load_checkpoint(run, map_location="cpu")
        if ckpt.get("shards_fingerprint") != manifest.fingerprint:
            raise CheckpointError(f"{ckpt['path']}: trained on other shards than {cfg.shards} (fingerprint differs)")
        if ckpt["model_spec"] != spec:
            raise CheckpointError(f"{ckpt['path']}: model {ckpt['model_spec']} does not match {spec}")
        bare.load_state_dict(ckpt["model"])
        optimizer.load_state_dict(ckpt["optimizer"])
        scheduler.load_state_dict(ckpt["scheduler"])
        set_rng_state(ckpt["rng"])
        start_epoch = int(ckpt["epoch"])

    model = bare
    if info.enabled:
        # buffers are averaged once per epoch (D.average_buffers), not broadcast at every forward
        model = torch.nn.parallel.DistributedDataParallel(bare, device_ids=[device] if device.type == "cuda" else None,
                                                          **_ddp_without_buffer_sync())
    if cfg.compile:
        model = torch.compile(model)
    method = Method.from_config(cfg, channels_last=channels_last)
    dtype = amp_dtype(cfg, device)
    autocast = (lambda: torch.autocast(device.type, dtype=dtype)) if dtype else nullcontext
    scaler = torch.amp.GradScaler(device.type, enabled=dtype == torch.float16)

    if main:
        run.mkdir(parents=True, exist_ok=True)
        atomic_write_json(run / "config.json", cfg.to_dict())
        RF.trim_metrics(run / "metrics.jsonl", start_epoch)
        print(f"sat-train fit: {cfg.method} on {manifest.root} ({manifest.num_samples} samples, {manifest.num_classes} "
              f"classes, {img['height']}x{img['width']}x{img['channels']}) -> {run}\n"
              f"  {cfg.arch}, {info.world_size} process(es) on {device}, batch {cfg.batch_size}/process "
              f"(global {cfg.batch_size * info.world_size}), {steps_per_epoch} steps/epoch, loader {loader.backend}, "
              f"amp {dtype}, epochs {start_epoch}->{cfg.epochs}\nconfig:\n{cfg.pretty()}", file=sys.stderr)

    tb = RF.open_tensorboard(run, start_epoch) if main and cfg.tensorboard else None
    history = []
    last_epoch = cfg.epochs if not cfg.stop_after_epochs else min(cfg.epochs, start_epoch + cfg.stop_after_epochs)
    try:
        for epoch in range(start_epoch, last_epoch):
            p = config_p(cfg, epoch)
            loader.set_epoch(epoch)
            gen = torch.Generator(device=device).manual_seed(_seed(cfg.seed, epoch, info.rank))
            coin = torch.Generator().manual_seed(_seed(cfg.seed, epoch, 1 << 20))  # same on every rank
            try:
                stats = run_epoch(model, bare, loader, method, optimizer, scheduler, scaler, autocast, p, gen, coin,
                                  cfg, steps_per_epoch, info, desc=f"epoch {epoch + 1}/{cfg.epochs}")
            except _NonFinite as e:
                raise _diverged(run, epoch, f"loss became {e.value} at step {e.step + 1}/{steps_per_epoch}") from None
            D.average_buffers(bare, info)
            # same verdict on every rank: the loss is all-reduced, weights and averaged buffers are identical
            bad = "loss" if not math.isfinite(stats["loss"]) else first_non_finite(bare.state_dict())
            if bad is not None:
                raise _diverged(run, epoch, f"{bad!r} holds nan or inf at the end of the epoch")
            row = {"epoch": epoch, "p": p, **stats}
            history.append(row)
            if main:
                # metrics line first, checkpoint second: after a crash between the two, --resume redoes the
                # epoch and drops the line (RF.trim_metrics); the other order could lose an epoch's line
                with open(run / "metrics.jsonl", "a") as f:
                    f.write(json.dumps(row) + "\n")
                if tb is not None:  # with the metrics line, before the checkpoint (purged alike on resume)
                    RF.write_tensorboard(tb, row, cfg.method)
                save_checkpoint(checkpoint_path(run), {
                    "model": bare.state_dict(), "model_spec": spec, "config": cfg.to_dict(), "epoch": epoch + 1,
                    "optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(), "rng": rng_state(),
                    "classes": list(manifest.classes), "shards_fingerprint": manifest.fingerprint,
                    "shards": str(cfg.shards), "satpipe_version": satpipe_version()})
                print(RF.epoch_line(row, cfg.epochs, history, last_epoch, cfg.method), file=sys.stderr, flush=True)
            D.barrier(info)
    finally:
        loader.close()
        if tb is not None:
            tb.close()
    rows = RF.read_metrics(run / "metrics.jsonl") if main else history
    summary = RF.run_summary(cfg, manifest, run, rows, info, last_epoch)
    if main and last_epoch == cfg.epochs:
        atomic_write_json(run / "summary.json", summary)
    if main:
        RF.print_summary(summary, stopped=last_epoch < cfg.epochs)
    return (bare, summary) if return_model else summary


def _diverged(run: Path, epoch: int, what: str) -> TrainingDiverged:
    kept = (f"{checkpoint_path(run)} keeps epoch {epoch}, the last good one" if epoch else
            "no checkpoint was written")
    return TrainingDiverged(f"training diverged in epoch {epoch + 1}: {what}; {kept} (lower --lr, or check the "
                            f"data and --weight-decay)")


def run_epoch(model, bare, loader, method, optimizer, scheduler, scaler, autocast, p, gen, coin, cfg, steps,
              info, desc) -> dict:
    """One epoch; raises _NonFinite (first bad step, value) when the loss turns nan or inf. The check
    rides on the loss sync every CHECK_EVERY steps; under DDP the verdict is all-reduced, so every
    rank stops at the same step (no rank waits in a collective the others left)."""
    from tqdm import tqdm

    model.train()
    device = info.device
    sums = torch.zeros(5, dtype=torch.float64, device=device)  # loss*n, n, input-correct, clean-correct, clean-n
    losses = torch.zeros(steps, dtype=torch.float32, device=device)  # per step: names the step that diverged
    kinds: dict[str, int] = {}
    show = cfg.progress and info.is_main and sys.stderr.isatty()  # piped output gets the epoch line only
    bar = tqdm(total=steps, desc=desc, disable=not show, leave=True, file=sys.stderr, dynamic_ncols=True)
    t0 = time.perf_counter()
    try:
        for i, (x, s, y) in enumerate(loader):
            if i >= steps:
                break
            with autocast():
                out = method.step(model, bare, x, s, y, p=p, generator=gen, coin=coin)
            optimizer.zero_grad(set_to_none=True)
            scaler.scale(out.loss).backward()
            scaler.step(optimizer)
            scaler.update()
            scheduler.step()
            kinds[out.perturbation] = kinds.get(out.perturbation, 0) + 1
            with torch.no_grad():
                n = len(y)
                clean = out.clean_logits
                if clean is None and i % cfg.clean_acc_every == 0:
                    # clean accuracy of the model being trained: eval mode, so no BN statistics move
                    was = bare.training
                    bare.eval()
                    with autocast():
                        clean = bare(x)
                    bare.train(was)
                losses[i] = out.loss.detach().float()
                batch = torch.stack([out.loss.detach().double() * n, torch.tensor(n, dtype=torch.float64, device=device),
                                     (out.train_logits.argmax(1) == y).sum().double(),
                                     (clean.argmax(1) == y).sum().double() if clean is not None else _zero(device),
                                     torch.tensor(n if clean is not None else 0, dtype=torch.float64, device=device)])
                sums += batch
            if i % CHECK_EVERY == 0 or i == steps - 1:
                _check_finite(losses, i, info)  # one device sync every CHECK_EVERY steps, not every step
                if show:
                    v = sums.tolist()
                    elapsed = time.perf_counter() - t0
                    bar.set_postfix(loss=f"{v[0] / v[1]:.4f}", acc=f"{v[3] / max(v[4], 1):.3f}",
                                    img_s=f"{v[1] * info.world_size / max(elapsed, 1e-9):.0f}")
            bar.update(1)
    finally:
        bar.close()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    elapsed = time.perf_counter() - t0
    D.all_reduce_sum(sums, info)
    loss_n, n, input_correct, clean_correct, clean_n = sums.tolist()
    return {"loss": loss_n / n, "train_acc": clean_correct / max(clean_n, 1), "input_acc": input_correct / n,
            "lr": optimizer.param_groups[0]["lr"], "images_per_s": n / elapsed, "epoch_time_s": elapsed,
            "images": int(n), "perturbations": kinds}


def _check_finite(losses: torch.Tensor, i: int, info: D.DistInfo) -> None:
    """Raise _NonFinite if any rank's loss of steps 0..i was nan or inf (the first such step, its value)."""
    bad = ~torch.isfinite(losses[: i + 1])
    flag = bad.any().double().reshape(1)
    D.all_reduce_sum(flag, info)
    if flag.item() == 0:
        return
    per_step = bad.double()
    D.all_reduce_sum(per_step, info)  # rare path: which step went bad first, on any rank
    step = int(per_step.nonzero()[0, 0])
    value = float(losses[step]) if bad[step] else float("nan")  # this rank's loss there, if it was the bad one
    raise _NonFinite(step, value)


def _zero(device):
    return torch.zeros((), dtype=torch.float64, device=device)


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    info = None
    try:
        cfg = config_from_argv(argv, description=__doc__)
        info = D.setup(cfg.device)
        fit(cfg, info)
        return 0
    except USER_ERRORS as e:  # a user's mistake, bad data or a diverged run: one line, no traceback
        if info is None or info.is_main:  # under torchrun every rank raises the same: one line, not N
            print(f"sat-train fit: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:  # the last completed epoch is in checkpoints/last.pt
        print("sat-train fit: interrupted; continue with --resume --run RUN", file=sys.stderr)
        return 130
    finally:
        if info is not None:
            D.teardown(info)
