"""`sat-train experiment`: a grid of runs (methods x saliency sources x eps x seeds) -> fit -> eval -> compare.

    sat-train experiment grid.toml
    sat-train experiment grid.toml --dry-run          # check every config, print the plan and what a run would redo

grid.toml (configs/fashion-mnist-study.toml is a full example; unknown tables and keys are errors):

    [experiment]
    out = "experiments/fmnist"         # OUT/runs/<run>, OUT/report/, OUT/configs/, OUT/experiment.json
    eval_shards = "shards/fashion-mnist/test"
    train_shards = "shards/fm/train"   # set of the methods without saliency (default: the first [sources] set)
    methods = ["standard", "sat"]      # shorthand: one [[runs]] block per method (every source, eps and seed)
    seeds = [0, 1]
    eps = ["8/255", 0.1]               # training eps (threat models), "N/255" or a number; default: [fit] eps
    clean_on_all = true                # also clean accuracy on the whole eval set ([eval] limit caps the attacks)
    autoattack_seeds = [0]             # [eval] autoattack only on runs with these seeds (default: every run)
    subprocess = false                 # true: each fit/eval in its own `python -m sat_train` process
    skip_done = true                   # keep finished work whose config matches (false: redo everything)
    progress = false                   # progress bars in fits, evals and derivations (--progress overrides)

    [sources]                          # saliency source name -> training shard set
    foreground = "shards/fm/train-foreground"
    shuffled = "shards/fm/train-shuffled"
    teacher = { shards = "shards/fm/train-teacher", teacher = "standard-s0", from = "foreground",
                explainer = "grad-sign", args = [] }    # derived, see below

    [fit]                              # TrainConfig keys shared by every run (sat-train fit --help)
    epochs = 10
    sat_final_p = 0.9
    pgd_alpha = "eps/2"                # "eps/N" or "eps*X": relative to each run's training eps

    [eval]                             # EvalConfig keys (sat-train eval --help); autoattack_eps defaults to each
    limit = 2000                       # run's training eps (standard: the first grid eps)
    eps = ["2/255", "8/255", 0.1]      # budgets in [0, 1] pixel units, as fit's eps: "N/255" or a number

    [[runs]]                           # a block: method(s) x sources x eps x seeds; every key but method optional
    method = "sat"                     # or methods = ["pgd", "fgsm-rs"]
    sources = ["foreground", "shuffled"]   # for the block's saliency methods; default: every source
    seeds = [0]                        # default: [experiment] seeds
    eps = ["8/255"]                    # default: [experiment] eps (`standard` uses no eps: one run per seed)
    tag = "p0.25"                      # part of the run names (runs differing only in `fit` need one)
    fit = { sat_final_p = 0.25 }       # TrainConfig overrides for this block
    eval = { autoattack = 0 }          # EvalConfig overrides for this block

Run names: METHOD[-SOURCE][-TAG][-epsEPS]-sSEED (eps only when the grid sets [experiment] eps), e.g.
sat-foreground-eps8_255-s0.

Derived sources: a [sources] table with `teacher` names a run of this grid; once that run is trained,
the experiment makes the set with `sat-train teacher-saliency FROM --teacher RUN --explainer E ARGS --out
SHARDS` (kept when it already holds the same derivation of the same checkpoint). A run on a derived
source keeps its place in the grid, or moves to just after its teacher run when declared before it.
Every other shard set must exist before the grid starts.

Reuse (skip_done): a finished run is kept only when its saved config.json equals the planned config in
every field but the runtime ones (FIT_RUNTIME: progress, workers, loader, device, paths, ...) and it
trained on the same shard set (manifest fingerprint); otherwise it is retrained from scratch (never
resumed from a checkpoint of another config), and the plan says why. An unfinished run with the planned
config resumes. An evaluation is kept only for the same eval config (EVAL_RUNTIME aside), the same
checkpoint (sha256) and the same evaluation set. A run that fails stops the grid (exit 1): fix the
cause and rerun; finished work is kept.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import subprocess
import sys
from pathlib import Path

from shards.cli import CommandParser, fail
from sat_train.grid import ExperimentError, Grid, PlannedRun, eps_text, plan  # noqa: F401  (re-exported for callers)

# fit_runtime(): TrainConfig fields that say how a run executes, not what it computes. `shards` is a path: the set is
# compared by its manifest fingerprint instead. (RESUMABLE_CHANGES minus epochs, which changes the math.)
EVAL_RUNTIME = {"device", "loader_backend", "loader_decode", "verify_shards"}  # how an eval runs, not what it measures
CLEAN_ONLY = {"eps": [], "fgsm": False, "check_steps": [], "l2_eps": [], "cw": 0, "autoattack": 0, "distortions": False,
              "limit": 0}


def fit_runtime() -> set:
    from sat_train.config import RESUMABLE_CHANGES

    return set(RESUMABLE_CHANGES) - {"epochs"}


def _json(value):
    return json.loads(json.dumps(value))  # tuples -> lists, as a saved config.json holds them


def config_changes(saved: dict, planned: dict, ignore: set, defaults: dict | None = None) -> list[str]:
    """'key old -> new' for each field that differs, `ignore`d fields aside. A field missing from the
    saved config counts as its default (a field added to satpipe later must not redo old runs)."""
    saved, planned = _json({**(defaults or {}), **saved}), _json(planned)
    missing = object()
    return [f"{k} {saved.get(k, '(unset)')!r} -> {planned.get(k, '(unset)')!r}"
            for k in sorted((set(saved) | set(planned)) - ignore) if saved.get(k, missing) != planned.get(k, missing)]


def _read_json(path: Path):
    try:
        return json.loads(path.read_text())
    except (OSError, json.JSONDecodeError):
        return None


def _fingerprint(shards: str) -> str | None:
    m = _read_json(Path(shards) / "manifest.json")
    return (m or {}).get("fingerprint", {}).get("digest")


def fit_decision(run: PlannedRun) -> tuple[str, str]:
    """(action, why): action is 'done' (keep), 'resume', 'train' (new) or 'retrain' (config changed)."""
    from sat_train.checkpoint import checkpoint_path
    from sat_train.config import TrainConfig, from_dict

    saved = _read_json(run.run_dir / "config.json")
    ckpt = checkpoint_path(run.run_dir)
    if saved is None:
        return ("retrain", "its folder holds an unreadable or partial run") if ckpt.exists() else ("train", "new")
    planned = from_dict(dict(run.fit_values)).to_dict()
    changes = config_changes(saved, planned, fit_runtime(), TrainConfig().to_dict())
    summary = _read_json(run.run_dir / "summary.json")
    trained_on = (summary or {}).get("shards_fingerprint") or _checkpoint_fingerprint(ckpt)
    want = _fingerprint(run.train_shards)
    if trained_on is not None and want is not None and (trained_on or {}).get("digest") != want:
        changes.append(f"training set {run.train_shards} changed (fingerprint {trained_on.get('digest')} -> {want})")
    if changes:
        return "retrain", "config changed since it was trained: " + "; ".join(changes)
    if summary is not None and summary.get("epochs") == summary.get("epochs_planned") == planned["epochs"]:
        return "done", "finished earlier with the same config"
    if ckpt.exists():
        return "resume", "unfinished, same config"
    return "train", "no checkpoint yet"


def _checkpoint_fingerprint(path: Path):
    if not path.exists():
        return None
    from sat_train.checkpoint import CheckpointError, load_checkpoint

    try:
        return load_checkpoint(path).get("shards_fingerprint")
    except CheckpointError:
        return None


def eval_decision(path: Path, eval_values: dict, checkpoint_sha: str, eval_fingerprint: str | None) -> str | None:
    """None when `path` holds this evaluation already, else why it must be (re)done."""
    from sat_train.evaluate import EvalConfig, comparable_config

    saved = _read_json(path)
    if saved is None:
        return "not evaluated yet"
    planned = comparable_config(dataclasses.asdict(EvalConfig.from_dict(dict(eval_values), "eval")))
    saved_cfg = comparable_config(saved.get("config") or {}, saved.get("results_version"))
    changes = config_changes(saved_cfg, planned, EVAL_RUNTIME)
    if changes:
        return "eval config changed: " + "; ".join(changes)
    if (saved.get("checkpoint") or {}).get("sha256") != checkpoint_sha:
        return "the checkpoint changed since it was evaluated"
    if eval_fingerprint is not None and (saved.get("shards_fingerprint") or {}).get("digest") != eval_fingerprint:
        return "the evaluation set changed"
    return None


def _call(command: str, argv: list[str], use_subprocess: bool) -> int:
    if use_subprocess:
        return subprocess.call([sys.executable, "-m", "sat_train", command, *argv])
    import importlib

    from sat_train.cli import COMMANDS

    return int(importlib.import_module(COMMANDS[command][0]).main(argv) or 0)


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


def check_inputs(grid: Grid) -> None:
    """Every shard set the grid reads must exist now, except derived ones (made during the run)."""
    derived = {s.shards for s in grid.sources.values() if s.derived}
    needed = {grid.experiment["eval_shards"]} | {r.train_shards for r in grid.runs if r.train_shards not in derived}
    missing = sorted(p for p in needed if not (Path(p) / "manifest.json").is_file())
    if missing:
        more = f" (and {len(missing) - 1} more)" if len(missing) > 1 else ""
        raise ExperimentError(f"{missing[0]}/manifest.json: no shard set{more}; build the sets the grid names first "
                              f"(`make study` builds those of configs/fashion-mnist-study.toml)")


def _progress_flag(grid: Grid) -> str:
    return "--progress" if getattr(grid, "progress", False) else "--no-progress"


def derive_source(grid: Grid, name: str, use_subprocess: bool) -> int:
    source = grid.sources[name]
    teacher = next(r for r in grid.runs if r.name == source.teacher)
    argv = [grid.sources[source.base].shards, "--teacher", str(teacher.run_dir), "--explainer", source.explainer,
            *source.args, "--out", source.shards, "--overwrite", _progress_flag(grid)]
    print(f"\n== derive source {name}: sat-train teacher-saliency {' '.join(argv)}", flush=True)
    return _call("teacher-saliency", argv, use_subprocess)  # same derivation of the same checkpoint: kept


def run_fit(grid: Grid, r: PlannedRun, skip_done: bool, use_subprocess: bool, status: dict) -> int:
    action, why = fit_decision(r) if skip_done else ("retrain", "skip_done = false")
    if action == "done":
        status[r.name] = {"fit": "skipped (finished earlier)"}
        print(f"\n== fit {r.name}: kept ({why})", flush=True)
        return 0
    resume = action == "resume"
    values = {**r.fit_values, "resume": resume, "overwrite": not resume and r.run_dir.exists()}
    fit_toml = grid.out / "configs" / f"{r.name}.fit.toml"
    fit_toml.write_text(to_toml(values))
    verb = {"resume": "resuming", "train": "training", "retrain": "retraining from scratch"}[action]
    print(f"\n== fit {r.name}: {verb} ({why})", flush=True)
    rc = _call("fit", ["--config", str(fit_toml)], use_subprocess)
    status[r.name] = {"fit": {"resume": "resumed", "train": "trained", "retrain": "retrained"}[action], "fit_exit": rc}
    if action == "retrain":
        status[r.name]["why"] = why
    return rc


def run_eval(grid: Grid, r: PlannedRun, eval_values: dict, out: Path | None, label: str, use_subprocess: bool,
             status: dict, skip_done: bool) -> int:
    from sat_train.checkpoint import checkpoint_path
    from shards.storage import sha256_file

    eval_shards = grid.experiment["eval_shards"]
    path = out or r.run_dir / "eval" / f"{Path(eval_shards).resolve().name}.json"
    why = eval_decision(path, eval_values, sha256_file(checkpoint_path(r.run_dir)), _fingerprint(eval_shards)) \
        if skip_done else "skip_done = false"
    if why is None:
        status[r.name][label] = "skipped (same config and checkpoint evaluated earlier)"
        return 0
    toml = grid.out / "configs" / f"{r.name}.{label}.toml"
    toml.write_text(to_toml(eval_values))
    print(f"\n== {label} {r.name}: {why}", flush=True)
    argv = [str(r.run_dir), "--shards", str(eval_shards), "--config", str(toml), _progress_flag(grid)]
    rc = _call("eval", argv + (["--out", str(out)] if out else []), use_subprocess)
    status[r.name].update({label: "evaluated", f"{label}_exit": rc})
    return rc


def print_plan(grid: Grid) -> None:
    print(f"experiment {grid.path}: {len(grid.runs)} runs -> {grid.out}")
    for r in grid.runs:
        print(f"  {r.name:<36} method={r.method:<8} saliency={r.saliency or '-':<11} eps={eps_text(r.eps):<7} seed={r.seed}  "
              f"shards={r.train_shards}")
    for s in grid.sources.values():
        if s.derived:
            print(f"  source {s.name}: derived from run {s.teacher} ({s.explainer}) on {s.base} -> {s.shards}")


def run_grid(path: Path, dry_run: bool = False, use_subprocess: bool | None = None, progress: bool | None = None) -> int:
    from shards.storage import atomic_write_json

    grid = plan(path)
    exp, out = grid.experiment, grid.out
    use_subprocess = bool(exp.get("subprocess", False)) if use_subprocess is None else use_subprocess
    grid.progress = bool(exp.get("progress", False)) if progress is None else progress
    if progress is not None or "progress" in exp:  # a runtime field: changes no fit's decision
        for r in grid.runs:
            r.fit_values["progress"] = grid.progress
    skip_done = bool(exp.get("skip_done", True))
    print_plan(grid)
    if dry_run:
        for r in grid.runs:
            action, why = fit_decision(r) if skip_done else ("retrain", "skip_done = false")
            print(f"  fit {r.name}: {action} ({why})")
        return 0
    check_inputs(grid)
    (out / "configs").mkdir(parents=True, exist_ok=True)
    status: dict = {}
    record = {"grid": str(path), "experiment": exp, "sources": {n: dataclasses.asdict(s) for n, s in grid.sources.items()},
              "eval": grid.eval, "eval_set": Path(exp["eval_shards"]).resolve().name,
              "runs": [{"name": r.name, "method": r.method, "saliency": r.saliency, "seed": r.seed, "eps": r.eps,
                        "tag": r.tag, "run": str(r.run_dir), "fit": r.fit_values, "eval": r.eval_values}
                       for r in grid.runs], "status": status}

    def fail(what: str, rc: int) -> int:
        atomic_write_json(out / "experiment.json", record)
        print(f"sat-train experiment: {what} failed (exit {rc}); fix it and rerun (finished work is kept)",
              file=sys.stderr)
        return 1

    derived_done = set()
    for r in grid.runs:
        if r.saliency in grid.sources and grid.sources[r.saliency].derived and r.saliency not in derived_done:
            rc = derive_source(grid, r.saliency, use_subprocess)
            if rc != 0:
                return fail(f"deriving source {r.saliency}", rc)
            derived_done.add(r.saliency)
        rc = run_fit(grid, r, skip_done, use_subprocess, status)
        if rc != 0:
            return fail(f"fit of {r.name}", rc)
        atomic_write_json(r.run_dir / "experiment.json", {"grid": str(path), "name": r.name, "method": r.method,
                                                          "saliency": r.saliency, "seed": r.seed, "eps": r.eps,
                                                          "tag": r.tag})
        rc = run_eval(grid, r, r.eval_values, None, "eval", use_subprocess, status, skip_done)
        if rc == 0 and exp.get("clean_on_all") and grid.eval_cfg.limit:
            clean = r.run_dir / "eval" / "clean-all" / f"{Path(exp['eval_shards']).resolve().name}.json"
            rc = run_eval(grid, r, {**r.eval_values, **CLEAN_ONLY}, clean, "clean-all", use_subprocess, status,
                          skip_done)
        if rc != 0:
            return fail(f"eval of {r.name}", rc)
    atomic_write_json(out / "experiment.json", record)
    print("\n== compare", flush=True)
    return _call("compare", [*(str(r.run_dir) for r in grid.runs), "--out", str(out / "report"),
                             "--eval", record["eval_set"]], use_subprocess)


def build_parser() -> CommandParser:
    p = CommandParser("sat-train experiment", __doc__)
    p.add_argument("grid", help="grid TOML file ([experiment], [sources], [fit], [eval], [[runs]])")
    p.add_argument("--dry-run", action="store_true",
                   help="check every config, print the plan and what a real run would keep or redo; run nothing")
    p.add_argument("--subprocess", action=argparse.BooleanOptionalAction, default=None,
                   help="run each step in its own process (default: [experiment] subprocess, else --no-subprocess)")
    p.add_argument("--progress", action=argparse.BooleanOptionalAction, default=None,
                   help="progress bars of the fits, evaluations and derivations (default: [experiment] progress, "
                        "else --no-progress: each fit still prints one line per epoch)")
    return p


def main(argv=None) -> int:
    args = build_parser().parse_args(sys.argv[1:] if argv is None else argv)
    try:
        return run_grid(Path(args.grid), args.dry_run, args.subprocess, args.progress)
    except ExperimentError as e:
        return fail("sat-train experiment", str(e))
