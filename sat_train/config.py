"""`TrainConfig`: every knob of `sat-train fit`, from a TOML file and/or flags (flags win).

    sat-train fit --config fit.toml --epochs 5          # TrainConfig keys at top level or in one [fit] table
    sat-train fit --shards shards/fm/train --eps 8/255 --run runs/sat   # eps: 8/255 or 0.0314, [0, 1] units

Unknown keys (file) and unknown flags are rejected. The config is printed at start and saved as
RUN/config.json. Semantics worth knowing:

- batch_size is PER PROCESS. Under `torchrun --nproc_per_node N` the global batch is N * batch_size.
- lr is used as given whatever the world size (no implicit scaling): when you multiply the global
  batch, scale lr yourself (linear rule: lr * N) if you want the single-process dynamics.
- epochs count passes over the shard set; under DDP each process sees 1/N of it per epoch.
- p of SAT follows the curriculum p = 1 - sat_a ** (epoch / sat_tau) (epoch from 0; sat_tau = 10, the paper's,
  made for 100 epochs) unless sat_p is set; sat_final_p = 0.9 solves sat_tau so the last epoch reaches p = 0.9.
- Every number must be finite (nan / inf are refused: they used to train to NaN weights and "succeed")
  and in its range (see `validate`); a loss that still turns non-finite stops the run (sat_train.fit).
- --resume may change only runtime fields (RESUMABLE_CHANGES). `epochs` may change only with the
  constant schedule: cosine and piecewise lay their learning-rate curve over the planned epochs, so a
  run resumed with other epochs would follow a curve that no uninterrupted run follows. To train in
  slices, keep epochs and pass --stop-after-epochs.
"""
from __future__ import annotations

import argparse
import typing
from dataclasses import dataclass
from pathlib import Path

from sat_train.loader import BACKENDS as LOADER_BACKENDS
from sat_train.methods import ATTACK_BN_MODES, METHODS
from sat_train.models import ARCHS, check_arch
from shards.cli import CommandParser, Config, ConfigError, add_fields, coerce_field, field_names, option, read_config
from shards.cli import non_finite  # noqa: F401  (re-exported: evaluate and tests check configs with it)
from shards.manifest import VERIFY_MODES

OPTIMIZERS = ("sgd", "adam")
SCHEDULES = ("cosine", "piecewise", "constant")
AMP_MODES = ("auto", "bf16", "fp16", "off")
DEVICES = ("auto", "cpu", "cuda")
DECODE_MODES = ("auto", "gpu", "cpu")


@dataclass
class TrainConfig(Config):
    # data
    shards: str = option("", "training shard set: folder or URL (s3://bucket/prefix, https://...) with manifest.json "
                         "(required)", metavar="SHARDS", default_help="")
    # --run-dir: torchrun's own parser takes `--run` for an abbreviation of its --run-path
    run: str = option("", "run folder to write (checkpoints, metrics, config.json); --out and --run-dir are the same "
                      "flag (under torchrun spell it --run-dir: torchrun reads --run as its --run-path)",
                      aliases=("--out", "--run-dir"), metavar="RUN", default_help="runs/METHOD")
    loader_backend: str = option("auto", "data loader (see sat_train.loader): auto picks dali on CUDA when installed",
                                 choices=LOADER_BACKENDS)
    loader_memory_fraction: float = option(0.5, "device backend: share of free GPU memory / available RAM the "
                                           "decoded set may use, in (0, 1]")
    loader_decode: str = option("auto", "DALI on CUDA: gpu (nvJPEG), cpu (threads, then one copy), auto (cpu up to "
                                "64x64 px)", choices=DECODE_MODES)
    num_workers: int = option(2, "loader worker processes (torch backend)")
    verify_shards: str = option("sha256", "check shard files at start: sha256 (every byte) or size (cheap)",
                                choices=VERIFY_MODES)
    augment: bool = option(True, "random crop (pad --crop-padding) + horizontal flip, shared by image and saliency")
    crop_padding: int = option(4, "pixels of padding before the random crop")
    flip: bool = option(True, "random horizontal flip (with --augment)")
    # model
    arch: str = option("cnn4", f"model architecture: {', '.join(ARCHS)} (k: widen factor, e.g. wrn-34-10); "
                       "resnet18 / preact-resnet18 / wrn-34-10 want a GPU")
    # method: these fields are the method's hyper-parameters (sat_train.methods.Method reads them from here)
    method: str = option("sat", "training objective (see sat_train.methods)", choices=METHODS)
    eps: float = option(8 / 255, "L-inf radius of every perturbation, in [0, 1] pixel units; write 8/255 or 0.0314",
                       default_help="8/255")
    sat_a: float = option(0.6, "SAT curriculum base, in (0, 1]: p = 1 - sat_a ** (epoch / sat_tau)")
    sat_p: typing.Optional[float] = option(None, "SAT: a fixed p in [0, 1] instead of the curriculum")
    sat_tau: float = option(10.0, "SAT curriculum time scale: p = 1 - sat_a ** (epoch / sat_tau); 10 = the paper's "
                            "(made for 100 epochs)")
    sat_final_p: typing.Optional[float] = option(None, "SAT, instead of sat_tau: the p of the last epoch (tau solved "
                                                 "from epochs)")
    sat_per_pixel: bool = option(False, "SAT: one Bernoulli draw per pixel (shared by channels) instead of per element")
    mix_prob: float = option(0.5, "sat+pgd / sat+trades: probability that a batch gets the SAT perturbation")
    pgd_steps: int = option(7, "PGD training attack: steps (random start)")
    pgd_alpha: float = option(2 / 255, "PGD / TRADES inner step size, in [0, 1] pixel units (2/255 or 0.0078)",
                              default_help="2/255")
    trades_beta: float = option(6.0, "TRADES: weight of the KL (robustness) term")
    trades_steps: int = option(10, "TRADES inner maximization steps (Zhang et al. 2019 use 10), step pgd_alpha")
    fgsm_alpha: float = option(1.25, "fgsm-rs step as a multiple of eps (Wong et al. 2020)")
    attack_bn: str = option("auto", "BatchNorm mode while crafting training attacks: auto (as each method's "
                            "reference code), train or eval", choices=ATTACK_BN_MODES)
    clean_acc_every: int = option(10, "methods that train on perturbed inputs measure clean accuracy every k batches")
    # optimization
    epochs: int = option(20, "passes over the shard set (the cosine and piecewise schedules are laid over them)")
    batch_size: int = option(128, "batch size PER PROCESS (global batch = processes x batch size)")
    optimizer: str = option("sgd", "optimizer", choices=OPTIMIZERS)
    lr: float = option(0.1, "learning rate, used as given whatever the world size (scale it yourself)")
    momentum: float = option(0.9, "SGD momentum, in [0, 1)")
    nesterov: bool = option(False, "SGD with Nesterov momentum")
    weight_decay: float = option(5e-4, "L2 weight decay")
    adam_betas: typing.Tuple[float, float] = option((0.9, 0.999), "Adam betas, two numbers: B1,B2")
    schedule: str = option("cosine", "learning-rate schedule", choices=SCHEDULES)
    milestones: typing.Tuple[float, ...] = option((0.5, 0.75), "piecewise: fractions of training where lr *= gamma")
    gamma: float = option(0.1, "piecewise: lr factor at each milestone")
    warmup_epochs: float = option(0.0, "linear learning-rate warm-up, in epochs (fractions allowed)")
    label_smoothing: float = option(0.0, "label smoothing of the cross-entropy, in [0, 1)")
    # execution
    seed: int = option(0, "seed of the model init, shuffling, augmentation and perturbations")
    device: str = option("auto", "where to train: auto = cuda when available", choices=DEVICES)
    amp: str = option("auto", "mixed precision: auto = bf16 on CUDA, off on CPU", choices=AMP_MODES)
    channels_last: bool = option(True, "NHWC tensors for the model (on CUDA only)")
    compile: bool = option(False, "torch.compile the model")
    deterministic: bool = option(False, "torch.use_deterministic_algorithms + no cudnn benchmark")
    limit_batches: int = option(0, ">0: stop each epoch after this many batches (smoke runs)")
    stop_after_epochs: int = option(0, ">0: exit after this many epochs in this call, as if preempted (time-sliced "
                                    "jobs); --resume continues")
    progress: bool = option(True, "progress bar on a terminal (the per-epoch line is printed either way)")
    tensorboard: bool = option(False, "also write the per-epoch metrics as TensorBoard events under RUN/tensorboard "
                               "(pip install 'satpipe[tensorboard]')")
    resume: bool = option(False, "continue the run in --run from its last checkpoint, with its saved config (only "
                          "runtime fields may change)")
    overwrite: bool = option(False, "replace an existing run folder's results instead of refusing")

    def validate(self) -> None:
        validate(self)


# Fields that may differ between a run and its --resume (they do not change the math), and `epochs`,
# which may change only where the schedule does not depend on it (EPOCH_SCHEDULES; see resume_values).
RESUMABLE_CHANGES = {"epochs", "num_workers", "progress", "resume", "overwrite", "loader_backend", "loader_decode",
                     "loader_memory_fraction",
                     "device", "run", "shards", "stop_after_epochs", "verify_shards", "tensorboard"}
# (shards may move on disk: fit checks the manifest fingerprint against the checkpoint instead)
EPOCH_SCHEDULES = ("cosine", "piecewise")  # their learning-rate curve is laid out over `epochs`
MAX_SEED = 2**63 - 1


def load_toml(path: str | Path) -> dict:
    """TrainConfig keys of a TOML file (top level, or a file holding only a [fit] table), coerced; JSON
    (a saved config.json) is read too. Unknown keys are refused naming the file."""
    data = read_config(path, TrainConfig, table="fit")
    return {k: coerce_field(TrainConfig, k, v, str(path)) for k, v in data.items()}


def from_dict(values: dict, source: str = "config") -> TrainConfig:
    return TrainConfig.from_dict(values, source)


def load_saved(path: str | Path) -> dict:
    """Values of a saved RUN/config.json (for --resume); keys of other satpipe versions are left out."""
    path = Path(path)
    try:
        data = read_config(path, what="run config")
    except ConfigError as e:
        raise ConfigError(f"cannot read the run's config: {e}") from None
    names = field_names(TrainConfig)
    return {k: coerce_field(TrainConfig, k, v, str(path)) for k, v in data.items() if k in names}


def validate(cfg: TrainConfig) -> None:
    def need(ok, msg):
        if not ok:
            raise ConfigError(msg)

    try:
        check_arch(cfg.arch)
    except ValueError as e:
        raise ConfigError(f"arch: {e}") from None
    need(0 < cfg.loader_memory_fraction <= 1, f"loader_memory_fraction={cfg.loader_memory_fraction} must be in (0, 1]")
    need(cfg.epochs >= 1 and cfg.batch_size >= 1, "epochs and batch_size must be >= 1")
    need(cfg.num_workers >= 0 and cfg.crop_padding >= 0, "num_workers and crop_padding must be >= 0")
    need(0 <= cfg.eps <= 1 and cfg.lr > 0, "eps must be in [0, 1] and lr > 0")
    need(0 < cfg.sat_a <= 1, f"sat_a={cfg.sat_a} must be in (0, 1]")
    need(cfg.sat_p is None or 0 <= cfg.sat_p <= 1, f"sat_p={cfg.sat_p} must be in [0, 1]")
    need(cfg.sat_tau > 0, f"sat_tau={cfg.sat_tau} must be > 0")
    need(cfg.sat_final_p is None or (0 < cfg.sat_final_p < 1 and cfg.sat_a < 1 and cfg.epochs >= 2
                                     and cfg.sat_tau == TrainConfig.sat_tau),
         f"sat_final_p={cfg.sat_final_p} needs 0 < sat_final_p < 1, sat_a < 1, epochs >= 2 and no sat_tau of its own")
    need(0 <= cfg.mix_prob <= 1, f"mix_prob={cfg.mix_prob} must be in [0, 1]")
    need(cfg.pgd_steps >= 1 and cfg.trades_steps >= 1, "pgd_steps and trades_steps must be >= 1")
    need(0 < cfg.pgd_alpha <= 1, f"pgd_alpha={cfg.pgd_alpha} must be in (0, 1]")
    need(cfg.trades_beta >= 0, f"trades_beta={cfg.trades_beta} must be >= 0")
    need(cfg.fgsm_alpha > 0, f"fgsm_alpha={cfg.fgsm_alpha} must be > 0")
    need(0 <= cfg.momentum < 1, f"momentum={cfg.momentum} must be in [0, 1)")
    need(cfg.weight_decay >= 0, f"weight_decay={cfg.weight_decay} must be >= 0")
    need(all(0 <= b < 1 for b in cfg.adam_betas), f"adam_betas={cfg.adam_betas} must be in [0, 1)")
    need(all(0 < m < 1 for m in cfg.milestones), "milestones are fractions of training in (0, 1)")
    need(cfg.gamma > 0, f"gamma={cfg.gamma} must be > 0")
    need(0 <= cfg.warmup_epochs <= cfg.epochs, f"warmup_epochs={cfg.warmup_epochs} must be in [0, epochs={cfg.epochs}]")
    need(cfg.clean_acc_every >= 1 and cfg.limit_batches >= 0 and cfg.stop_after_epochs >= 0,
         "clean_acc_every >= 1, limit_batches >= 0 and stop_after_epochs >= 0")
    need(0 <= cfg.label_smoothing < 1, "label_smoothing must be in [0, 1)")
    need(0 <= cfg.seed <= MAX_SEED, f"seed={cfg.seed} must be in [0, 2**63 - 1]")


# ----------------------------------------------------------------------------- flags

def build_parser(prog: str = "sat-train fit", description: str | None = None) -> CommandParser:
    ap = CommandParser(prog, description)
    ap.add_argument("--config", metavar="FILE.toml", default=argparse.SUPPRESS,
                    help="TOML file of TrainConfig keys, top level or one [fit] table (a saved RUN/config.json is "
                         "read too); flags override it")
    add_fields(ap, TrainConfig)  # only the flags the user gave reach the namespace
    return ap


def parse_argv(argv: list[str], description: str | None = None) -> dict:
    """The values the user set explicitly: --config file keys, then flags on top (flags win)."""
    ns = vars(build_parser(description=description).parse_args(argv))
    values = load_toml(ns.pop("config")) if "config" in ns else {}
    values.update({k: coerce_field(TrainConfig, k, v, f"--{k.replace('_', '-')}") for k, v in ns.items()})
    return values


def parse_args(argv: list[str], description: str | None = None) -> TrainConfig:
    """TrainConfig from defaults < --config file < flags."""
    return from_dict(parse_argv(argv, description), "flags")


def resume_values(explicit: dict, saved: dict) -> dict:
    """Config values for --resume: the saved run's, with the explicitly given ones on top. Only
    runtime fields may change: anything else would break 'resumed == uninterrupted'."""
    changed = sorted(k for k, v in explicit.items() if k in saved and v != saved[k] and k not in RESUMABLE_CHANGES)
    if changed:
        raise ConfigError(f"--resume: cannot change {', '.join(changed)} of an existing run "
                          f"(only {', '.join(sorted(RESUMABLE_CHANGES - {'resume', 'overwrite'}))} may change)")
    schedule = saved.get("schedule", TrainConfig.schedule)
    if "epochs" in explicit and explicit["epochs"] != saved.get("epochs") and schedule in EPOCH_SCHEDULES:
        raise ConfigError(f"--resume: cannot change epochs ({saved.get('epochs')} -> {explicit['epochs']}) of a run with "
                          f"the {schedule} schedule: its learning-rate curve is laid out over the planned epochs, so the "
                          f"resumed run would match no uninterrupted run (train in slices with --stop-after-epochs, "
                          f"or start a new run)")
    if "epochs" in explicit and explicit["epochs"] != saved.get("epochs") and saved.get("sat_final_p") is not None:
        raise ConfigError(f"--resume: cannot change epochs of a run with sat_final_p (its SAT curriculum is laid out "
                          f"over the planned epochs)")
    return {**saved, **explicit}


def config_from_argv(argv: list[str], description: str | None = None) -> TrainConfig:
    """The TrainConfig `sat-train fit ARGV` runs with (flags, --config file, and for --resume the run's
    saved config.json), validated; ConfigError for anything wrong. Starts nothing."""
    explicit = parse_argv(argv, description)
    if explicit.get("resume"):
        if not explicit.get("run"):
            raise ConfigError("--resume needs --run RUN (the folder of the run to continue)")
        explicit = resume_values(explicit, load_saved(Path(explicit["run"]) / "config.json"))
    return from_dict(explicit, "flags")
