"""`TrainConfig`: every knob of `sat-train fit`, from a TOML file and/or flags (flags win).

    sat-train fit --config fit.toml --epochs 5          # fit.toml holds TrainConfig keys at top level

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
import dataclasses
import json
import math
import tomllib
import typing
from dataclasses import dataclass
from pathlib import Path

from sat_train.loader import BACKENDS as LOADER_BACKENDS
from sat_train.methods import ATTACK_BN_MODES, METHODS
from sat_train.models import check_arch
from shards.manifest import VERIFY_MODES

OPTIMIZERS = ("sgd", "adam")
SCHEDULES = ("cosine", "piecewise", "constant")
AMP_MODES = ("auto", "bf16", "fp16", "off")


class ConfigError(Exception):
    """A config file or flag is wrong; the message names the source and the problem."""


@dataclass
class TrainConfig:
    # data
    shards: str = ""  # training shard set: folder or URL (s3://bucket/prefix, https://...) with manifest.json; required
    run: str = ""  # run folder; default runs/<method>
    loader_backend: str = "auto"  # "auto" | "dali" | "torch" | "device" (see sat_train.loader)
    loader_memory_fraction: float = 0.5  # device backend: share of free GPU memory / available RAM the decoded set may use
    loader_decode: str = "auto"  # DALI on CUDA: "gpu" (nvJPEG) | "cpu" (threads, then one copy) | "auto" (cpu <= 64x64)
    num_workers: int = 2
    verify_shards: str = "sha256"  # check shard files at start: "sha256" (every byte, the default) | "size" (cheap)
    augment: bool = True  # random crop (pad crop_padding) + horizontal flip, shared by image and saliency
    crop_padding: int = 4
    flip: bool = True
    # model
    arch: str = "cnn4"  # see sat_train.models.ARCHS; resnet18 / preact-resnet18 / wrn-34-10 on a GPU
    # method
    method: str = "sat"
    eps: float = 8 / 255  # L-inf radius of every perturbation, in [0, 1] pixel units
    sat_a: float = 0.6  # curriculum base: p = 1 - sat_a ** (epoch / sat_tau)
    sat_p: typing.Optional[float] = None  # fixed p instead of the curriculum
    sat_tau: float = 10.0  # curriculum time scale: p = 1 - sat_a ** (epoch / sat_tau); 10 = the paper's (for 100 epochs)
    sat_final_p: typing.Optional[float] = None  # instead of sat_tau: the p of the last epoch (tau solved from epochs)
    sat_per_pixel: bool = False  # Bernoulli per pixel (shared by channels) instead of per element
    mix_prob: float = 0.5  # sat+pgd / sat+trades: probability that a batch gets the SAT perturbation
    pgd_steps: int = 7
    pgd_alpha: float = 2 / 255
    trades_beta: float = 6.0
    trades_steps: int = 10  # TRADES inner maximization steps (Zhang et al. 2019 use 10), step pgd_alpha
    fgsm_alpha: float = 1.25  # fgsm-rs step as a multiple of eps (Wong et al. 2020)
    attack_bn: str = "auto"  # BatchNorm mode while crafting attacks: auto (as the literature) | train | eval
    clean_acc_every: int = 10  # methods that train on perturbed inputs measure clean accuracy every k batches
    # optimization
    epochs: int = 20
    batch_size: int = 128  # per process
    optimizer: str = "sgd"
    lr: float = 0.1
    momentum: float = 0.9
    nesterov: bool = False
    weight_decay: float = 5e-4
    adam_betas: typing.Tuple[float, float] = (0.9, 0.999)
    schedule: str = "cosine"
    milestones: typing.Tuple[float, ...] = (0.5, 0.75)  # piecewise: fractions of training where lr *= gamma
    gamma: float = 0.1
    warmup_epochs: float = 0.0
    label_smoothing: float = 0.0
    # execution
    seed: int = 0
    device: str = "auto"  # auto | cpu | cuda
    amp: str = "auto"  # auto = bf16 on CUDA, off on CPU
    channels_last: bool = True  # on CUDA only
    compile: bool = False  # torch.compile the model
    deterministic: bool = False  # torch.use_deterministic_algorithms + no cudnn benchmark
    limit_batches: int = 0  # >0: stop each epoch after this many batches (smoke runs)
    stop_after_epochs: int = 0  # >0: exit after this many epochs in this call, as if preempted (time-sliced jobs); --resume continues
    progress: bool = True
    tensorboard: bool = False  # also write the per-epoch metrics as TensorBoard events under RUN/tensorboard (pip install 'satpipe[tensorboard]')
    resume: bool = False
    overwrite: bool = False  # replace an existing run folder's results instead of refusing

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    def pretty(self) -> str:
        width = max(len(f.name) for f in dataclasses.fields(self))
        return "\n".join(f"  {k:<{width}} = {v!r}" for k, v in self.to_dict().items())


# Fields that may differ between a run and its --resume (they do not change the math), and `epochs`,
# which may change only where the schedule does not depend on it (EPOCH_SCHEDULES; see resume_values).
RESUMABLE_CHANGES = {"epochs", "num_workers", "progress", "resume", "overwrite", "loader_backend", "loader_decode",
                     "loader_memory_fraction",
                     "device", "run", "shards", "stop_after_epochs", "verify_shards", "tensorboard"}
# (shards may move on disk: fit checks the manifest fingerprint against the checkpoint instead)
EPOCH_SCHEDULES = ("cosine", "piecewise")  # their learning-rate curve is laid out over `epochs`
MAX_SEED = 2**63 - 1
_HINTS = typing.get_type_hints(TrainConfig)


def _coerce(name: str, value, source: str):
    """Check/convert one value to the field's type; ConfigError names the source and key."""
    hint = _HINTS[name]
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    try:
        if origin is typing.Union:  # Optional[float]
            if value is None or (isinstance(value, str) and value.lower() in ("none", "")):
                return None
            return _coerce_plain(args[0], value)
        if origin is tuple:
            items = value.split(",") if isinstance(value, str) else list(value)
            inner = args[0]
            out = tuple(_coerce_plain(inner, v) for v in items)
            if args[-1] is not Ellipsis and len(out) != len(args):
                raise ValueError(f"needs {len(args)} values")
            return out
        return _coerce_plain(hint, value)
    except (TypeError, ValueError) as e:
        raise ConfigError(f"{source}: {name} = {value!r} is not a valid {getattr(hint, '__name__', hint)} ({e})") from None


def _coerce_plain(typ, value):
    if typ is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in ("true", "1", "yes", "false", "0", "no"):
            return value.lower() in ("true", "1", "yes")
        raise ValueError("expected true/false")
    if typ is int and isinstance(value, (bool, float)):
        raise TypeError("expected an integer")
    if typ is float and isinstance(value, bool):
        raise TypeError("expected a number")
    if typ is str and not isinstance(value, str):
        raise TypeError("expected a string")
    return typ(value)


def read_toml(path: str | Path, error: type[Exception] | None = None, what: str = "config file") -> dict:
    """Parse a TOML file; a missing or malformed file raises `error` (ConfigError by default) as one line.
    Shared by fit, eval and experiment configs."""
    path, error = Path(path), error or ConfigError
    try:
        return tomllib.loads(path.read_text())
    except FileNotFoundError:
        raise error(f"{path}: no such {what}") from None
    except tomllib.TOMLDecodeError as e:
        raise error(f"{path}: not valid TOML ({e})") from None


def load_toml(path: str | Path) -> dict:
    path = Path(path)
    data = read_toml(path)
    names = {f.name for f in dataclasses.fields(TrainConfig)}
    unknown = sorted(set(data) - names)
    if unknown:
        raise ConfigError(f"{path}: unknown config key(s) {', '.join(unknown)} (see sat-train fit --help)")
    return {k: _coerce(k, v, str(path)) for k, v in data.items()}


def from_dict(values: dict, source: str = "config") -> TrainConfig:
    names = {f.name for f in dataclasses.fields(TrainConfig)}
    unknown = sorted(set(values) - names)
    if unknown:
        raise ConfigError(f"{source}: unknown config key(s) {', '.join(unknown)}")
    cfg = TrainConfig(**{k: _coerce(k, v, source) for k, v in values.items()})
    validate(cfg)
    return cfg


def load_saved(path: str | Path) -> dict:
    """Values of a saved RUN/config.json (for --resume)."""
    path = Path(path)
    try:
        data = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise ConfigError(f"{path}: cannot read the run's config ({e})") from None
    return {k: _coerce(k, v, str(path)) for k, v in data.items() if k in _HINTS}


def non_finite(obj) -> list[str]:
    """Fields of a config dataclass holding nan or inf (alone, in a tuple or in a list)."""
    bad = []
    for f in dataclasses.fields(obj):
        value = getattr(obj, f.name)
        items = value if isinstance(value, (tuple, list)) else (value,)
        if any(isinstance(v, float) and not math.isfinite(v) for v in items):
            bad.append(f"{f.name} = {value!r}")
    return bad


def validate(cfg: TrainConfig) -> None:
    def need(ok, msg):
        if not ok:
            raise ConfigError(msg)

    bad = non_finite(cfg)
    need(not bad, f"{', '.join(bad)}: every number must be finite")
    need(cfg.method in METHODS, f"method {cfg.method!r} is not one of {', '.join(METHODS)}")
    try:
        check_arch(cfg.arch)
    except ValueError as e:
        raise ConfigError(f"arch: {e}") from None
    need(cfg.optimizer in OPTIMIZERS, f"optimizer {cfg.optimizer!r} is not one of {', '.join(OPTIMIZERS)}")
    need(cfg.schedule in SCHEDULES, f"schedule {cfg.schedule!r} is not one of {', '.join(SCHEDULES)}")
    need(cfg.amp in AMP_MODES, f"amp {cfg.amp!r} is not one of {', '.join(AMP_MODES)}")
    need(cfg.attack_bn in ATTACK_BN_MODES, f"attack_bn {cfg.attack_bn!r} is not one of {', '.join(ATTACK_BN_MODES)}")
    need(cfg.device in ("auto", "cpu", "cuda"), f"device {cfg.device!r} is not auto, cpu or cuda")
    need(cfg.loader_backend in LOADER_BACKENDS,
         f"loader_backend {cfg.loader_backend!r} is not one of {', '.join(LOADER_BACKENDS)}")
    need(0 < cfg.loader_memory_fraction <= 1, f"loader_memory_fraction={cfg.loader_memory_fraction} must be in (0, 1]")
    need(cfg.loader_decode in ("auto", "gpu", "cpu"), f"loader_decode {cfg.loader_decode!r} is not auto, gpu or cpu")
    need(cfg.verify_shards in VERIFY_MODES, f"verify_shards {cfg.verify_shards!r} is not {' or '.join(VERIFY_MODES)}")
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

class OneLineParser(argparse.ArgumentParser):
    """argparse with the project's error style: `PROG: error: message`, one line, exit 2 (no usage dump)."""

    def error(self, message):
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def build_parser(prog: str = "sat-train fit", description: str | None = None) -> argparse.ArgumentParser:
    ap = OneLineParser(prog=prog, description=description, formatter_class=argparse.RawDescriptionHelpFormatter,
                                 argument_default=argparse.SUPPRESS)  # only flags the user gave override
    ap.add_argument("--config", metavar="FILE.toml", help="TOML file with TrainConfig keys (flags override it)")
    defaults = TrainConfig()
    for f in dataclasses.fields(TrainConfig):
        flag = "--" + f.name.replace("_", "-")
        hint, default = _HINTS[f.name], getattr(defaults, f.name)
        # --run-dir: torchrun's own parser takes `--run` for an abbreviation of its --run-path
        flags = [flag, "--run-dir"] if f.name == "run" else [flag]
        if hint is bool:
            ap.add_argument(*flags, dest=f.name, action=argparse.BooleanOptionalAction, help=f"(default {default})")
        else:
            ap.add_argument(*flags, dest=f.name, metavar=f.name.upper(), help=f"(default {default!r})")
    return ap


def parse_argv(argv: list[str], description: str | None = None) -> dict:
    """The values the user set explicitly: --config file keys, then flags on top (flags win)."""
    ap = build_parser(description=description)
    ns = vars(ap.parse_args(argv))
    values = load_toml(ns.pop("config")) if "config" in ns else {}
    values.update({k: _coerce(k, v, f"--{k.replace('_', '-')}") for k, v in ns.items()})
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
