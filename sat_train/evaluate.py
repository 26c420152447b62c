"""`sat-train eval`: robustness of a trained run on evaluation shards.

    sat-train eval runs/sat --shards shards/fashion-mnist/test
    sat-train eval runs/sat --shards shards/fashion-mnist/test --limit 1000 --autoattack 200 --eps 2/255,4/255,8/255

Runs clean accuracy, FGSM and PGD-k (k = 20, step eps/4, random start; each sample keeps its first
fooling iterate, see --no-early-stop) at eps = 1..8/255 in L-inf, PGD in
L2, Carlini-Wagner L2 (short budget), optionally AutoAttack on the first N samples, and the paper's
distortions (contrast, low-pass, high-pass). Prints a table with gradient-masking warnings and writes
RUN/eval/<shard-set name>.json atomically (per row: accuracy, n, attack parameters, time). Config: flags,
or `--config eval.toml` (EvalConfig fields; flags win; unknown keys are an error). Budgets (--eps,
--autoattack-eps) are in [0, 1] pixel units like fit's --eps, written 8/255 or 0.0314; the table and
the JSON rows also give them in 1/255 (eps_255).

Before any attack: the checkpoint must hold finite weights and fit the shard set (classes, channels,
size), and the shard set is checked as `fit` checks it (--verify-shards sha256, the default, or size;
every label against the class count). The results record which model was attacked (BatchNorm folded
or not, and why not).
"""
from __future__ import annotations

import dataclasses
import json
import re
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from sat_train.config import MAX_SEED
from sat_train.distortions import LEVELS
from sat_train.loader import BACKENDS as LOADER_BACKENDS
from shards.cli import CommandParser, Config, ConfigError, add_fields, add_progress, field_names, option, read_config
from shards.manifest import VERIFY_MODES

RESULTS_VERSION = 2  # 2: config eps and autoattack_eps in [0, 1] pixel units (1: in 1/255)


AA_VERSIONS = ("standard", "plus", "rand")


class EvalError(ConfigError):
    """A user mistake or bad input: one line, non-zero exit."""


def _budget_help(what: str) -> str:
    return f"{what}, in [0, 1] pixel units like fit's --eps: write 8/255 or 0.0314"


@dataclass
class EvalConfig(Config):
    config_error = EvalError

    eps: list[float] = option([k / 255 for k in range(1, 9)], _budget_help("L-inf budgets (FGSM, PGD), comma-separated"),
                              default_help="1/255,2/255,...,8/255")
    pgd_steps: int = option(20, "PGD steps (random start, step eps * pgd_step_ratio)")
    pgd_step_ratio: float = option(0.25, "PGD step size as a fraction of eps, in (0, 1] (0.25: eps/4)")
    pgd_restarts: int = option(1, "PGD random restarts (a sample counts as robust only if it survives all)",
                               aliases=("--restarts",))
    pgd_early_stop: bool = option(True, "each sample keeps its first fooling iterate (stronger, and cheaper; "
                                  "attacks.pgd); --no-early-stop: plain last-iterate PGD", aliases=("--early-stop",))
    check_steps: list[int] = option([5, 10], "extra PGD step counts at the largest eps (gradient-masking check), "
                                    "comma-separated")
    fgsm: bool = option(True, "FGSM at every L-inf eps")
    l2_eps: list[float] = option([0.25, 0.5, 1.0], "L2 PGD budgets in [0, 1] pixel units, comma-separated "
                                 "(empty: none)")
    cw: int = option(1000, "Carlini-Wagner L2 on the first N samples (0 = off)")
    cw_steps: int = option(20, "CW-L2 optimization steps per binary-search step")
    cw_search_steps: int = option(3, "CW-L2 binary-search steps over the constant c")
    cw_lr: float = option(0.01, "CW-L2 Adam learning rate")
    cw_initial_const: float = option(1e-3, "CW-L2 initial constant c")
    cw_confidence: float = option(0.0, "CW-L2 confidence margin kappa (>= 0)")
    autoattack: int = option(0, "AutoAttack on the first N samples (0 = off; slow on CPU)")
    autoattack_eps: float = option(8 / 255, _budget_help("AutoAttack L-inf budget"), default_help="8/255")
    autoattack_version: str = option("standard", "AutoAttack version (torchattacks)", choices=AA_VERSIONS)
    distortions: bool = option(True, "the paper's distortions: contrast, low-pass and high-pass filtering")
    contrast: list[float] = option(list(LEVELS["contrast"]), "contrast levels in [0, 1], comma-separated")
    low_pass: list[float] = option(list(LEVELS["low-pass"]), "low-pass Gaussian sigmas in pixels (> 0), comma-separated")
    high_pass: list[float] = option(list(LEVELS["high-pass"]), "high-pass Gaussian sigmas in pixels (> 0), "
                                    "comma-separated")
    distortion_grey: float | None = option(None, "filter padding grey in [0, 1] (reference: 0.4423); none = each "
                                           "image's mean (see distortions.py)")
    batch_size: int = option(256, "images per batch")
    limit: int = option(0, "evaluate the first N samples only (0 = all)")
    seed: int = option(0, "seed of random starts and restarts")
    device: str = option("auto", "where to evaluate: auto, cpu, cuda or cuda:N")
    loader_backend: str = option("auto", "data loader (see sat_train.loader)", choices=LOADER_BACKENDS)
    loader_decode: str = option("auto", "DALI on CUDA: gpu, cpu or auto (see sat_train.loader.dali_backend)",
                                choices=("auto", "gpu", "cpu"))
    verify_shards: str = option("sha256", "check shard files before evaluating: sha256 (every byte) or size (cheap)",
                                choices=VERIFY_MODES)
    sanity_tol: float = option(0.0, "accuracy points of slack before a masking check warns")
    aa_gap: float = option(5.0, "warn when AutoAttack is this many points below PGD on the same samples")

    def validate(self) -> None:
        def need(ok, msg):
            if not ok:
                raise EvalError(msg)
        for name, values in (("eps", self.eps), ("autoattack_eps", [self.autoattack_eps])):
            big = [e for e in values if e > 1]
            need(not big, f"{name} = {big[0] if big else 0:g} is over 1: budgets are in [0, 1] pixel units, as "
                          f"fit's --eps; write {big[0] if big else 0:g}/255")
            need(all(e > 0 for e in values), f"{name} values must be in (0, 1]")
        need(all(e > 0 for e in self.l2_eps), "l2_eps values must be > 0")
        need(self.pgd_steps >= 1 and all(k >= 1 for k in self.check_steps), "PGD steps must be >= 1")
        need(0 < self.pgd_step_ratio <= 1, "pgd_step_ratio must be in (0, 1]")
        need(self.pgd_restarts >= 1, "pgd_restarts must be >= 1")
        need(min(self.cw, self.autoattack, self.limit) >= 0, "cw, autoattack and limit must be >= 0")
        need(self.batch_size >= 1, "batch_size must be >= 1")
        need(all(0 <= c <= 1 for c in self.contrast), "contrast levels must be in [0, 1]")
        need(all(s > 0 for s in list(self.low_pass) + list(self.high_pass)), "filter sigmas must be > 0")
        need(self.cw_steps >= 1 and self.cw_search_steps >= 1, "cw_steps and cw_search_steps must be >= 1")
        need(self.cw_lr > 0 and self.cw_initial_const > 0 and self.cw_confidence >= 0,
             "cw_lr and cw_initial_const must be > 0, cw_confidence >= 0")
        need(self.distortion_grey is None or 0 <= self.distortion_grey <= 1, "distortion_grey must be in [0, 1]")
        need(self.sanity_tol >= 0 and self.aa_gap >= 0, "sanity_tol and aa_gap must be >= 0")
        need(0 <= self.seed <= MAX_SEED, "seed must be in [0, 2**63 - 1]")
        need(re.fullmatch(r"auto|cpu|cuda(:\d+)?", self.device) is not None, "device: auto | cpu | cuda | cuda:N")


def comparable_config(saved: dict, results_version=RESULTS_VERSION) -> dict:
    """An EvalConfig dict as `experiment` compares them: budgets in today's [0, 1] units (results_version 1
    held eps and autoattack_eps in 1/255) and floats to 12 digits (25.5/255 and 0.1 are the same budget)."""
    def rounded(v):
        if isinstance(v, float):
            return float(f"{v:.12g}")
        return [rounded(x) for x in v] if isinstance(v, (list, tuple)) else v

    out = dict(saved)
    if results_version == 1 and isinstance(out.get("eps"), list):
        out["eps"] = [e / 255 for e in out["eps"]]
    if results_version == 1 and isinstance(out.get("autoattack_eps"), (int, float)):
        out["autoattack_eps"] = out["autoattack_eps"] / 255
    return {k: rounded(v) for k, v in out.items()}


def build_parser() -> CommandParser:
    p = CommandParser("sat-train eval", __doc__)
    p.add_argument("run", help="run folder written by `sat-train fit` (holds checkpoints/last.pt): the input")
    p.add_argument("--shards", required=True, help="evaluation shard set: folder or URL (s3://bucket/prefix, "
                   "https://...) with manifest.json")
    p.add_argument("--config", help="TOML file of EvalConfig fields, top level or one [eval] table (JSON read too); "
                   "flags override it")
    p.add_argument("--out", help="results JSON file to write (default: RUN/eval/<shard-set name>.json)")
    add_fields(p.add_argument_group("attacks and run (override the config)"), EvalConfig)
    add_progress(p)
    return p


def parse_args(argv):
    return build_parser().parse_args(argv)


def load_config(args) -> EvalConfig:
    values = read_config(args.config, EvalConfig, table="eval", error=EvalError) if args.config else {}
    names = field_names(EvalConfig)
    flags = {k: v for k, v in vars(args).items() if k in names}
    return EvalConfig.from_dict({**values, **flags}, args.config or "flags")


def config_from_argv(argv) -> tuple:
    """(parsed arguments, validated EvalConfig) for `sat-train eval ARGV`; EvalError (or argparse's exit 2)
    for anything wrong. Starts nothing."""
    args = parse_args(argv)
    return args, load_config(args)


def pick_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dev = torch.device(name)
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise EvalError(f"--device {name}: no CUDA device on this machine")
    return dev


def check_compatible(ckpt: dict, manifest) -> list[str]:
    """Raise EvalError when the checkpoint's model cannot be evaluated on these shards; return warnings."""
    where, spec = ckpt.get("path", "checkpoint"), ckpt["model_spec"]
    mpath = manifest.root / "manifest.json"
    if spec["num_classes"] != manifest.num_classes:
        raise EvalError(f"{where}: model has {spec['num_classes']} classes but {mpath} has {manifest.num_classes}")
    if list(ckpt["classes"]) != list(manifest.classes):
        raise EvalError(f"{where}: class names differ from {mpath} (trained on {list(ckpt['classes'])[:4]}..., "
                        f"shards have {list(manifest.classes)[:4]}...)")
    img = manifest.image
    if spec["in_channels"] != img["channels"]:
        raise EvalError(f"{where}: model takes {spec['in_channels']}-channel images, {mpath} has {img['channels']}")
    if (img["height"], img["width"]) != (spec["image_size"], spec["image_size"]):
        raise EvalError(f"{where}: model was built for {spec['image_size']}px images, {mpath} has "
                        f"{img['height']}x{img['width']}")
    warnings = []
    if ckpt.get("shards_fingerprint") and ckpt["shards_fingerprint"] == manifest.fingerprint:
        warnings.append(f"{manifest.root} is the shard set this run trained on: these are training-set numbers")
    return warnings


def batches(loader, limit: int, device):
    """(x float [0, 1], y int64) on `device` from the loader's (x, s, y), stopping after `limit` samples."""
    seen = 0
    for x, _s, y in loader:
        if limit and seen >= limit:
            break
        if limit:
            x, y = x[: limit - seen], y[: limit - seen]
        x = x.to(device)
        x = x.float().div_(255) if x.dtype == torch.uint8 else x.float()
        seen += len(x)
        yield x, y.to(device).long().view(-1)


def format_table(rows: list[dict]) -> str:
    lines = [f"{'attack':<11} {'norm':<5} {'eps / level':>12} {'steps':>5} {'n':>6} {'acc %':>7} {'time s':>8}",
             "-" * 60]
    for r in rows:
        if r["eps"] is not None:
            strength = f"{r['eps_255']:g}/255" if r["norm"] == "linf" else f"{r['eps']:g}"
        elif r["level"] is not None:
            strength = ("c=" if r["attack"] == "contrast" else "sigma=") + f"{r['level']:g}"
        else:
            strength = "-"
        acc = "-" if r["accuracy"] is None else f"{100 * r['accuracy']:.2f}"
        steps = r["params"].get("steps", "")
        lines.append(f"{r['attack']:<11} {r['norm'] or '':<5} {strength:>12} {steps!s:>5} {r['n']:>6} {acc:>7} "
                     f"{r['time_s']:>8.2f}")
        if r["attack"] == "autoattack" and r["params"].get("stages"):
            lines.append("    robust after stage: " + ", ".join(f"{k} {v}" for k, v in r["params"]["stages"].items()))
        if r["attack"] == "cw-l2" and r["params"].get("median_l2") is not None:
            lines.append(f"    median L2 of successful CW examples: {r['params']['median_l2']:.4f}")
    return "\n".join(lines)


def _file_sha256(path) -> str:
    from shards.storage import sha256_file

    return sha256_file(path)


def evaluate(run_dir, shard_dir, cfg: EvalConfig, out=None, progress=True) -> tuple[dict, Path]:
    """Library entry point: run the suite, write the JSON, return (results, path). Raises EvalError."""
    from shards.format import ShardFormatError
    from shards.manifest import read_manifest
    from shards.provenance import provenance
    from shards.storage import atomic_write_json, is_url, location
    from sat_train.checkpoint import CheckpointError, load_model
    from sat_train.loader import LoaderError, make_loader
    from sat_train.robustness import build_specs, prepare_for_attack, run_suite
    from sat_train.sanity import masking_checks

    run_dir, shard_dir = Path(run_dir), location(shard_dir)  # a folder, or a URL (s3://, https://) via fsspec
    if not run_dir.exists():
        raise EvalError(f"{run_dir}: no such run folder")
    try:
        manifest = read_manifest(shard_dir)
    except ShardFormatError as e:
        raise EvalError(str(e)) from None
    device = pick_device(cfg.device)
    try:
        model, ckpt = load_model(run_dir, device=device)
    except CheckpointError as e:
        raise EvalError(str(e)) from None
    notes = check_compatible(ckpt, manifest)
    mspec = ckpt["model_spec"]
    example = torch.rand(4, mspec["in_channels"], mspec["image_size"], mspec["image_size"], device=device,
                         generator=torch.Generator(device=device).manual_seed(cfg.seed))
    model, folding = prepare_for_attack(model, example)  # eval mode, frozen weights, BatchNorm folded into convs
    torch.manual_seed(cfg.seed)
    specs = build_specs(cfg)

    from tqdm import tqdm

    total = min(manifest.num_samples, cfg.limit) if cfg.limit else manifest.num_samples
    try:  # every sample once, in manifest order, on one process (eval is not distributed); the shard
        # files (sha256 by default) and every label are checked here, before any model is attacked
        loader = make_loader(shard_dir, cfg.batch_size, train=False, backend=cfg.loader_backend, device=device,
                             rank=0, world_size=1, decode=cfg.loader_decode, verify=cfg.verify_shards)
    except LoaderError as e:
        raise EvalError(str(e)) from None
    bar = tqdm(total=total, unit="img", desc="eval", disable=not progress, file=sys.stderr)
    t0 = time.perf_counter()
    try:
        rows = run_suite(model, batches(loader, cfg.limit, device), specs, n_classes=manifest.num_classes,
                         seed=cfg.seed, progress=bar)
    except LoaderError as e:  # a sample that cannot be read: the message names its tar and key
        raise EvalError(str(e)) from None
    finally:
        bar.close()
        loader.close()
    warnings = masking_checks(rows, main_steps=cfg.pgd_steps, tol=cfg.sanity_tol, aa_gap=cfg.aa_gap)
    for r in rows:
        del r["per_sample"]
    results = {
        "results_version": RESULTS_VERSION, "run": str(run_dir), "shards": str(shard_dir),
        "shards_fingerprint": manifest.fingerprint, "classes": manifest.classes,
        "checkpoint": {"path": ckpt.get("path"), "epoch": ckpt.get("epoch"), "model_spec": ckpt["model_spec"],
                       "sha256": _file_sha256(ckpt["path"])},  # `sat-train experiment` reuses evals of this checkpoint only
        "model": folding,
        "config": dataclasses.asdict(cfg), "device": str(device), "n": rows[0]["n"],
        "clean_accuracy": rows[0]["accuracy"], "rows": rows, "sanity": {"passed": not warnings, "warnings": warnings},
        "notes": notes, "total_time_s": round(time.perf_counter() - t0, 3),
        "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "provenance": provenance(),
    }
    out = Path(out) if out else run_dir / "eval" / f"{(shard_dir if is_url(shard_dir) else shard_dir.resolve()).name}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_json(out, results)
    return results, out


def main(argv=None) -> int:
    try:
        args, cfg = config_from_argv(sys.argv[1:] if argv is None else argv)
        print("eval config:", json.dumps(dataclasses.asdict(cfg), separators=(", ", ": ")))
        results, out = evaluate(args.run, args.shards, cfg, args.out, progress=args.progress)
    except EvalError as e:
        print(f"sat-train eval: {e}", file=sys.stderr)
        return 2
    print(format_table(results["rows"]))
    for note in results["notes"]:
        print(f"note: {note}")
    if results["model"]["batchnorm_layers"] and not results["model"]["batchnorm_folded"]:
        print(f"note: attacked the model as trained, BatchNorm not folded ({results['model']['reason']})")
    if results["sanity"]["warnings"]:
        for w in results["sanity"]["warnings"]:
            print(f"WARNING: {w}")
    else:
        print("gradient-masking checks: all passed")
    print(f"results: {out}")
    return 0
