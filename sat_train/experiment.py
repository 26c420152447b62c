"""`sat-train experiment`: a grid of runs (methods x saliency sources x seeds) -> fit -> eval -> compare.

    sat-train experiment grid.toml
    sat-train experiment grid.toml --dry-run          # print the plan only

grid.toml:

    [experiment]
    out = "experiments/fmnist"                  # OUT/runs/<run>, OUT/report/, OUT/configs/, OUT/experiment.json
    train_shards = "shards/fashion-mnist/train"
    eval_shards = "shards/fashion-mnist/test"
    methods = ["standard", "sat", "pgd", "sat+pgd"]
    seeds = [0, 1]
    subprocess = false     # true: each fit/eval in its own `python -m sat_train` process
    skip_done = true       # finished fits and matching evals are kept, so a rerun continues a grid

    [experiment.saliency]  # optional: saliency source name -> training shard set built with it
    masks = "shards/fmnist-masks/train"
    boxes = "shards/fmnist-boxes/train"

    [fit]                  # TrainConfig keys shared by every run (the grid sets shards, run, method, seed)
    epochs = 10
    arch = "cnn4"

    [eval]                 # EvalConfig keys (see sat-train eval --help)
    limit = 1000

Methods that use saliency (sat, sat+pgd, sat+trades) run once per saliency source; the others once per
seed, on the first source's shard set (the sources differ only in their saliency maps). Every config is
checked before the first run starts; unknown keys are errors. A run that fails stops the grid (exit 1):
fix the cause and rerun, finished work is skipped.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path

EXPERIMENT_KEYS = {"out", "train_shards", "eval_shards", "methods", "seeds", "subprocess", "skip_done", "saliency"}
GRID_OWNS = ("shards", "run", "method", "seed", "resume", "overwrite")


class ExperimentError(Exception):
    """A bad grid file: one line, non-zero exit."""


@dataclass
class PlannedRun:
    name: str
    method: str
    saliency: str | None
    seed: int
    train_shards: str
    run_dir: Path
    fit_values: dict = field(repr=False, default_factory=dict)


def _toml_value(v) -> str:
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, (int, float)):
        return repr(v)
    if isinstance(v, str):
        return json.dumps(v)  # a JSON string is a valid TOML basic string
    if isinstance(v, (list, tuple)):
        return "[" + ", ".join(_toml_value(x) for x in v) + "]"
    raise ExperimentError(f"cannot write {v!r} to TOML")


def to_toml(values: dict) -> str:
    return "".join(f"{k} = {_toml_value(v)}\n" for k, v in values.items() if v is not None)


def _uses_saliency(method: str) -> bool:
    return method.startswith("sat")


def load_grid(path: Path) -> tuple[dict, dict, dict]:
    from sat_train.config import read_toml

    data = read_toml(path, ExperimentError, "grid file")
    unknown = sorted(set(data) - {"experiment", "fit", "eval"})
    if unknown:
        raise ExperimentError(f"{path}: unknown table(s) {', '.join(unknown)} (use [experiment], [fit], [eval])")
    exp = data.get("experiment", {})
    unknown = sorted(set(exp) - EXPERIMENT_KEYS)
    if unknown:
        raise ExperimentError(f"{path}: unknown [experiment] key(s) {', '.join(unknown)}; known: "
                              f"{', '.join(sorted(EXPERIMENT_KEYS))}")
    for key in ("out", "eval_shards", "methods"):
        if not exp.get(key):
            raise ExperimentError(f"{path}: [experiment] needs {key}")
    if not exp.get("train_shards") and not exp.get("saliency"):
        raise ExperimentError(f"{path}: [experiment] needs train_shards or a [experiment.saliency] table")
    fit = data.get("fit", {})
    owned = sorted(set(fit) & set(GRID_OWNS))
    if owned:
        raise ExperimentError(f"{path}: [fit] must not set {', '.join(owned)} (the grid sets them per run)")
    return exp, fit, data.get("eval", {})


def plan(path: Path):
    """(experiment table, planned runs, EvalConfig), every config validated up front."""
    from sat_train.config import ConfigError, from_dict
    from sat_train.evaluate import EvalConfig, EvalError

    exp, fit, ev = load_grid(path)
    out = Path(exp["out"])
    sources = dict(exp.get("saliency") or {}) or {None: exp["train_shards"]}
    first = next(iter(sources.items()))
    seeds = [int(s) for s in exp.get("seeds", [0])]
    runs = []
    for method in exp["methods"]:
        for source, shards in (sources.items() if _uses_saliency(method) else [first]):
            for seed in seeds:
                tag = f"-{source}" if source is not None and _uses_saliency(method) else ""
                name = f"{method.replace('+', '-')}{tag}-s{seed}"
                values = {**fit, "shards": str(shards), "run": str(out / "runs" / name), "method": method,
                          "seed": seed, "progress": fit.get("progress", False)}
                try:
                    from_dict(values, f"{path} [fit] for {name}")
                except ConfigError as e:
                    raise ExperimentError(str(e)) from None
                runs.append(PlannedRun(name, method, source if _uses_saliency(method) else None, seed, str(shards),
                                       out / "runs" / name, values))
    try:
        eval_cfg = EvalConfig.from_dict(ev, f"{path} [eval]")
    except EvalError as e:
        raise ExperimentError(str(e)) from None
    return exp, runs, eval_cfg


def _call(command: str, argv: list[str], use_subprocess: bool) -> int:
    if use_subprocess:
        return subprocess.call([sys.executable, "-m", "sat_train", command, *argv])
    import importlib

    from sat_train.cli import COMMANDS

    return int(importlib.import_module(COMMANDS[command][0]).main(argv) or 0)


def _fit_done(run: PlannedRun) -> bool:
    summary = run.run_dir / "summary.json"
    if not summary.exists():
        return False
    s = json.loads(summary.read_text())
    return s.get("epochs") == s.get("epochs_planned") == run.fit_values.get("epochs", s.get("epochs_planned"))


def _eval_done(run: PlannedRun, eval_name: str, eval_cfg) -> bool:
    path = run.run_dir / "eval" / f"{eval_name}.json"
    if not path.exists():
        return False
    try:
        return json.loads(path.read_text()).get("config") == json.loads(json.dumps(dataclasses.asdict(eval_cfg)))
    except json.JSONDecodeError:
        return False


def run_grid(path: Path, dry_run: bool = False, use_subprocess: bool | None = None) -> int:
    from shards.format import atomic_write_json

    exp, runs, eval_cfg = plan(path)
    out = Path(exp["out"])
    use_subprocess = bool(exp.get("subprocess", False)) if use_subprocess is None else use_subprocess
    skip_done = bool(exp.get("skip_done", True))
    eval_shards = Path(exp["eval_shards"])
    eval_name = eval_shards.resolve().name
    print(f"experiment {path}: {len(runs)} runs -> {out}")
    for r in runs:
        print(f"  {r.name:<28} method={r.method:<11} saliency={r.saliency or '-':<10} seed={r.seed}  "
              f"shards={r.train_shards}")
    print("  eval:", json.dumps(dataclasses.asdict(eval_cfg)))
    if dry_run:
        return 0
    configs = out / "configs"
    configs.mkdir(parents=True, exist_ok=True)
    eval_toml = configs / "eval.toml"
    eval_toml.write_text(to_toml(dataclasses.asdict(eval_cfg)))
    status = {}
    record = {"grid": str(path), "experiment": exp, "eval": dataclasses.asdict(eval_cfg), "eval_set": eval_name,
              "runs": [{"name": r.name, "method": r.method, "saliency": r.saliency, "seed": r.seed,
                        "run": str(r.run_dir), "fit": r.fit_values} for r in runs], "status": status}
    for r in runs:
        fitted = skip_done and _fit_done(r)
        if fitted:
            status[r.name] = {"fit": "skipped (finished earlier)"}
        else:
            resume = skip_done and (r.run_dir / "checkpoints" / "last.pt").exists()
            values = {**r.fit_values, "resume": resume, "overwrite": not resume and r.run_dir.exists()}
            fit_toml = configs / f"{r.name}.fit.toml"
            fit_toml.write_text(to_toml(values))
            print(f"\n== fit {r.name}" + (" (resuming)" if resume else ""), flush=True)
            rc = _call("fit", ["--config", str(fit_toml)], use_subprocess)
            status[r.name] = {"fit": "resumed" if resume else "trained", "fit_exit": rc}
            if rc != 0:
                atomic_write_json(out / "experiment.json", record)
                print(f"sat-train experiment: fit of {r.name} failed (exit {rc}); fix it and rerun (finished runs "
                      f"are kept)", file=sys.stderr)
                return 1
        atomic_write_json(r.run_dir / "experiment.json", {"grid": str(path), "name": r.name, "method": r.method,
                                                          "saliency": r.saliency, "seed": r.seed})
        if fitted and _eval_done(r, eval_name, eval_cfg):
            status[r.name]["eval"] = "skipped (same config evaluated earlier)"
            continue
        print(f"\n== eval {r.name}", flush=True)
        rc = _call("eval", [str(r.run_dir), "--shards", str(eval_shards), "--config", str(eval_toml),
                            "--no-progress"], use_subprocess)
        status[r.name].update({"eval": "evaluated", "eval_exit": rc})
        if rc != 0:
            atomic_write_json(out / "experiment.json", record)
            print(f"sat-train experiment: eval of {r.name} failed (exit {rc})", file=sys.stderr)
            return 1
    atomic_write_json(out / "experiment.json", record)
    print("\n== compare", flush=True)
    return _call("compare", [*(str(r.run_dir) for r in runs), "--out", str(out / "report"), "--eval", eval_name],
                 use_subprocess)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="sat-train experiment", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    p.add_argument("grid", help="grid TOML file ([experiment], [fit], [eval])")
    p.add_argument("--dry-run", action="store_true", help="check every config and print the plan, run nothing")
    p.add_argument("--subprocess", action="store_true", default=None, help="run each step in its own process")
    args = p.parse_args(sys.argv[1:] if argv is None else argv)
    try:
        return run_grid(Path(args.grid), args.dry_run, args.subprocess)
    except ExperimentError as e:
        print(f"sat-train experiment: error: {e}", file=sys.stderr)
        return 2
