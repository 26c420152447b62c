"""The run folder of `sat-train fit`: what is in it, when a folder holds a run, the per-epoch line, the summary.

    RUN/config.json       the full TrainConfig
    RUN/metrics.jsonl     one JSON line per epoch (written before that epoch's checkpoint)
    RUN/checkpoints/last.pt   atomic, after every epoch (sat_train.checkpoint)
    RUN/summary.json      at the end
    RUN/tensorboard/      with --tensorboard: the metrics lines as TensorBoard scalars (rank 0)

A folder holds a run once it has a checkpoint or a summary; before that (killed in its first epoch:
config.json, perhaps a metrics line or a checkpoint's temp file) a plain rerun or --resume starts it.
"""
from __future__ import annotations

import json
import shutil
import sys
from pathlib import Path

from sat_train import distributed as D
from sat_train.checkpoint import CheckpointError, checkpoint_path
from sat_train.config import ConfigError, TrainConfig
from sat_train.methods import config_tau, uses_curriculum
from shards.provenance import provenance, satpipe_version
from shards.storage import atomic_write_bytes

RUN_FILES = ("config.json", "metrics.jsonl", "summary.json")
TENSORBOARD_DIR = "tensorboard"


def resolve_run_dir(cfg: TrainConfig) -> Path:
    return Path(cfg.run or f"runs/{cfg.method.replace('+', '-')}")


def prepare_run_dir(cfg: TrainConfig, run: Path, info: D.DistInfo) -> bool:
    """Refuse to mix two runs in one folder; --overwrite clears this project's files only. Returns
    True when training continues from the run's checkpoint.

    A folder whose run never finished an epoch (config.json, perhaps a metrics line or a temp file of
    a checkpoint being written when it was killed, but no checkpoint) is not a run yet: a plain rerun
    starts it, and so does --resume. Temp files of writes cut short by a kill are removed."""
    ckpt = checkpoint_path(run)
    if info.is_main:
        for stale in [*run.glob(".*.tmp-*"), *ckpt.parent.glob(".*.tmp-*")]:
            stale.unlink(missing_ok=True)
    started = ckpt.exists() or (run / "summary.json").exists()
    if cfg.resume:
        if ckpt.exists():
            return True
        if started:
            raise CheckpointError(f"{ckpt}: no checkpoint to resume (the run finished and its checkpoint was removed?)")
        if info.is_main:
            print(f"sat-train fit: {run} holds no checkpoint yet (stopped in its first epoch): starting it from epoch 1",
                  file=sys.stderr)
    elif started and not cfg.overwrite:
        raise ConfigError(f"{run}: already holds a run; pass --resume to continue it or --overwrite to start over")
    if info.is_main:
        for name in RUN_FILES:
            (run / name).unlink(missing_ok=True)
        shutil.rmtree(run / "checkpoints", ignore_errors=True)
        shutil.rmtree(run / TENSORBOARD_DIR, ignore_errors=True)
    return False


def epoch_line(row: dict, epochs: int, history: list[dict], last_epoch: int, method: str) -> str:
    """One line per epoch (also without progress bars, e.g. inside `sat-train experiment`). p only for
    the methods that follow SAT's curriculum: the others ignore it (metrics.jsonl keeps it regardless)."""
    mean_time = sum(r["epoch_time_s"] for r in history) / len(history)
    left = mean_time * (last_epoch - row["epoch"] - 1)
    p = f"p {row['p']:.3f}  " if uses_curriculum(method) else ""
    return (f"epoch {row['epoch'] + 1}/{epochs}  loss {row['loss']:.4f}  acc {row['train_acc']:.3f}  {p}"
            f"{row['images_per_s']:.0f} img/s  {row['epoch_time_s']:.1f} s  ~{_duration(left)} left")


def require_tensorboard() -> None:
    """--tensorboard without the package: one line, before any data is read (on every rank alike)."""
    try:
        import torch.utils.tensorboard  # noqa: F401
    except ImportError:
        raise ConfigError("--tensorboard needs the tensorboard package: pip install 'satpipe[tensorboard]'") from None


def open_tensorboard(run: Path, start_epoch: int):
    """RUN/tensorboard's SummaryWriter (rank 0 only). Step = epochs completed (1 for the first epoch).
    On resume, events of epochs the checkpoint does not hold (a crash between the metrics line and the
    checkpoint) are purged, as trim_metrics drops their lines."""
    from torch.utils.tensorboard import SummaryWriter

    return SummaryWriter(str(run / TENSORBOARD_DIR), purge_step=start_epoch + 1 if start_epoch else None)


def tensorboard_scalars(row: dict, method: str) -> dict[str, float]:
    """{tag: value} of one metrics line: its numbers under their metrics.jsonl names (p only where the
    curriculum applies, as in the epoch line), batches per perturbation kind as perturbations/KIND."""
    out = {k: float(v) for k, v in row.items()
           if k != "epoch" and isinstance(v, (int, float)) and (k != "p" or uses_curriculum(method))}
    out.update({f"perturbations/{kind}": float(n) for kind, n in row.get("perturbations", {}).items()})
    return out


def write_tensorboard(writer, row: dict, method: str) -> None:
    for tag, value in tensorboard_scalars(row, method).items():
        writer.add_scalar(tag, value, global_step=row["epoch"] + 1)
    writer.flush()  # per epoch: a TensorBoard watching the folder sees the epoch now


def _duration(seconds: float) -> str:
    m, s = divmod(int(round(seconds)), 60)
    h, m = divmod(m, 60)
    return f"{h}h{m:02d}m" if h else (f"{m}m{s:02d}s" if m else f"{s}s")


def trim_metrics(path: Path, start_epoch: int) -> None:
    """On resume, drop lines of epochs the checkpoint does not hold (a crash between the two writes)."""
    if path.exists():
        keep = [r for r in read_metrics(path) if r["epoch"] < start_epoch]
        write_metrics_lines(path, keep)


def write_metrics_lines(path: Path, rows: list[dict]) -> None:
    atomic_write_bytes(path, "".join(json.dumps(r) + "\n" for r in rows).encode())


def read_metrics(path: Path) -> list[dict]:
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def run_summary(cfg, manifest, run, rows, info, epochs_done) -> dict:
    last = rows[-1] if rows else {}
    train_time = sum(r["epoch_time_s"] for r in rows)
    images = sum(r.get("images", 0) for r in rows)
    mcfg = manifest.raw.get("config", {})
    return {"method": cfg.method, "arch": cfg.arch, "run": str(run), "shards": str(cfg.shards),
            "data_source": mcfg.get("source"), "saliency_source": _saliency_kind(manifest), "epochs": epochs_done,
            "epochs_planned": cfg.epochs, "train_time_s": train_time, "images_per_s": images / train_time if train_time else 0.0,
            "final_loss": last.get("loss"), "final_train_acc": last.get("train_acc"), "final_input_acc": last.get("input_acc"),
            "final_p": last.get("p"), "sat_tau": config_tau(cfg), "world_size": info.world_size, "device": str(info.device),
            "shards_fingerprint": manifest.fingerprint, "satpipe_version": satpipe_version(),
            "provenance": provenance()}


def _saliency_kind(manifest):
    """How the shards' saliency maps were made: the manifest's saliency block, else its build config."""
    block = manifest.raw.get("saliency")
    if isinstance(block, dict) and block.get("kind"):
        return block["kind"]
    return manifest.raw.get("config", {}).get("saliency")


def print_summary(s: dict, stopped: bool) -> None:
    head = f"stopped after epoch {s['epochs']} of {s['epochs_planned']} (resume with --resume)" if stopped else "done"
    fmt = lambda v: "-" if v is None else (f"{v:.4f}" if isinstance(v, float) else str(v))  # noqa: E731
    lines = [f"sat-train fit: {head}",
             f"  run            {s['run']}",
             f"  method         {s['method']} ({s['arch']}) on {fmt(s['data_source'])}, saliency {fmt(s['saliency_source'])}",
             f"  epochs         {s['epochs']}/{s['epochs_planned']}  on {s['world_size']} x {s['device']}",
             f"  train time     {s['train_time_s']:.1f} s   ({s['images_per_s']:.0f} images/s)",
             f"  final loss     {fmt(s['final_loss'])}   clean train acc {fmt(s['final_train_acc'])}"
             f"   acc on trained inputs {fmt(s['final_input_acc'])}   p {fmt(s['final_p'])}"]
    print("\n".join(lines), file=sys.stderr)
