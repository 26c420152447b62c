"""The grid file of `sat-train experiment`: parsing, checking and planning (what runs, with which config).

A grid names its shard sets ([sources]), the settings every run shares ([fit], [eval]) and blocks of
runs ([[runs]]: method x sources x eps x seeds, with per-block overrides). `plan()` turns it into a
list of `PlannedRun`s, every TrainConfig and EvalConfig validated before anything runs; unknown keys
are errors. The format is documented in sat_train/experiment.py (the command's --help).
"""
from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path

TABLES = ("experiment", "sources", "fit", "eval", "runs")
EXPERIMENT_KEYS = {"out", "progress", "train_shards", "eval_shards", "methods", "seeds", "eps", "clean_on_all", "autoattack_seeds",
                   "subprocess", "skip_done"}
RUN_KEYS = {"method", "methods", "sources", "seeds", "eps", "tag", "fit", "eval"}
DERIVED_KEYS = {"shards", "teacher", "from", "explainer", "args"}
GRID_OWNS = ("shards", "run", "method", "seed", "resume", "overwrite")  # set per run by the grid
BLOCK_OWNS = GRID_OWNS + ("eps",)  # a [[runs]] block sets eps with its own `eps` list
_EPS_FRACTION = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*/\s*255\s*$")
_EPS_RELATIVE = re.compile(r"^\s*eps\s*([*/])\s*(\d+(?:\.\d+)?)\s*$")  # "eps/4", "eps*0.25": per run's eps


class ExperimentError(Exception):
    """A bad grid file: one line, non-zero exit."""


@dataclass
class Source:
    """A saliency source: a shard set on disk, or one the experiment derives (`teacher`) from a trained
    run of the grid with `sat-train teacher-saliency` before the first run that trains on it."""

    name: str
    shards: str
    teacher: str | None = None  # name of the grid run whose checkpoint explains the images
    base: str | None = None  # the source whose images (and shard set) the teacher explains
    explainer: str = "grad-sign"
    args: list = field(default_factory=list)  # more `sat-train teacher-saliency` flags, as given

    @property
    def derived(self) -> bool:
        return self.teacher is not None


@dataclass
class PlannedRun:
    name: str
    method: str
    saliency: str | None  # source name (methods that use saliency only)
    seed: int
    eps: float | None  # training eps in [0, 1] pixel units; None for methods that use none (standard)
    tag: str
    train_shards: str
    run_dir: Path
    fit_values: dict = field(repr=False, default_factory=dict)
    eval_values: dict = field(repr=False, default_factory=dict)


@dataclass
class Grid:
    path: Path
    experiment: dict
    sources: dict  # name -> Source, in file order
    fit: dict
    eval: dict
    runs: list  # PlannedRun, in execution order
    eval_cfg: object = None  # the [eval] EvalConfig (before per-run AutoAttack eps)

    @property
    def out(self) -> Path:
        return Path(self.experiment["out"])


def uses_saliency(method: str) -> bool:
    return method.startswith("sat")


def uses_eps(method: str) -> bool:
    return method != "standard"


def parse_eps(value, where: str) -> tuple[float, str]:
    """(eps in [0, 1] pixel units, label for run names) from "8/255" or a number such as 0.1."""
    if isinstance(value, str) and _EPS_FRACTION.match(value):
        n = float(_EPS_FRACTION.match(value).group(1))
        return n / 255, f"{n:g}_255"
    if isinstance(value, (int, float)) and not isinstance(value, bool) and 0 < value <= 1:
        return float(value), f"{value:g}"
    raise ExperimentError(f"{where}: eps {value!r} is neither \"N/255\" nor a number in (0, 1]")


def eps_text(eps: float | None) -> str:
    """eps as people write it: 8/255, or 0.1 when it is no whole number of 255ths."""
    if eps is None:
        return "-"
    e = eps_255(eps)
    return f"{e:g}/255" if abs(e - round(e)) < 1e-9 else f"{eps:g}"


def eps_255(eps: float) -> float:
    """eps in 1/255 units, as tables and run names show it (0.1 -> 25.5)."""
    return round(eps * 255, 6)


def _unknown(keys, known, where: str) -> None:
    bad = sorted(set(keys) - set(known))
    if bad:
        raise ExperimentError(f"{where}: unknown key(s) {', '.join(bad)}; known: {', '.join(sorted(known))}")


def _list(value, what: str, where: str) -> list:
    if not isinstance(value, list) or not value:
        raise ExperimentError(f"{where}: {what} must be a non-empty list")
    return value


def load_sources(path: Path, data: dict) -> dict:
    sources = {}
    for name, spec in (data.get("sources") or {}).items():
        where = f"{path} [sources] {name}"
        if isinstance(spec, str):
            sources[name] = Source(name, spec)
            continue
        if not isinstance(spec, dict):
            raise ExperimentError(f"{where}: give a shard set path or a table (shards, teacher, from, explainer)")
        _unknown(spec, DERIVED_KEYS, where)
        missing = [k for k in ("shards", "teacher", "from") if not spec.get(k)]
        if missing:
            raise ExperimentError(f"{where}: a derived source needs {', '.join(missing)}")
        args = spec.get("args", [])
        if not isinstance(args, list) or not all(isinstance(a, str) for a in args):
            raise ExperimentError(f"{where}: args must be a list of strings (sat-train teacher-saliency flags)")
        sources[name] = Source(name, spec["shards"], spec["teacher"], spec["from"], spec.get("explainer", "grad-sign"),
                               args)
    for s in sources.values():
        if s.derived and (s.base not in sources or sources[s.base].derived):
            raise ExperimentError(f"{path} [sources] {s.name}: from = {s.base!r} must name a source on disk "
                                  f"({', '.join(n for n, o in sources.items() if not o.derived) or 'none given'})")
    return sources


def load_blocks(path: Path, data: dict, exp: dict) -> list[dict]:
    """[[runs]] blocks, or the [experiment] methods shorthand (one block per method)."""
    blocks = data.get("runs", [])
    if not isinstance(blocks, list):
        raise ExperimentError(f"{path}: runs must be an array of tables ([[runs]])")
    if exp.get("methods"):
        blocks = [{"method": m} for m in _list(exp["methods"], "methods", f"{path} [experiment]")] + blocks
    if not blocks:
        raise ExperimentError(f"{path}: no runs: give [experiment] methods or [[runs]] blocks")
    for i, block in enumerate(blocks):
        _unknown(block, RUN_KEYS, f"{path} [[runs]] #{i + 1}")
    return blocks


def plan(path: Path) -> Grid:
    """The grid, with every run planned and every config validated up front."""
    from sat_train.config import ConfigError, from_dict
    from shards.cli import read_config
    from sat_train.evaluate import EvalConfig, EvalError

    path = Path(path)
    data = read_config(path, error=ExperimentError, what="grid file")
    bad = sorted(set(data) - set(TABLES))
    if bad:
        raise ExperimentError(f"{path}: unknown table(s) {', '.join(bad)} (use {', '.join(f'[{t}]' for t in TABLES)})")
    exp = data.get("experiment", {})
    _unknown(exp, EXPERIMENT_KEYS, f"{path} [experiment]")
    for key in ("out", "eval_shards"):
        if not exp.get(key):
            raise ExperimentError(f"{path}: [experiment] needs {key}")
    sources = load_sources(path, data)
    on_disk = [s for s in sources.values() if not s.derived]
    plain_shards = exp.get("train_shards") or (on_disk[0].shards if on_disk else None)
    if not plain_shards:
        raise ExperimentError(f"{path}: [experiment] needs train_shards or a [sources] table")
    fit, ev = data.get("fit", {}), data.get("eval", {})
    owned = sorted(set(fit) & set(GRID_OWNS))
    if owned:
        raise ExperimentError(f"{path}: [fit] must not set {', '.join(owned)} (the grid sets them per run)")
    try:
        eval_cfg = EvalConfig.from_dict(dict(ev), f"{path} [eval]")
    except EvalError as e:
        raise ExperimentError(str(e)) from None
    grid_eps = [parse_eps(e, f"{path} [experiment]") for e in _list(exp["eps"], "eps", f"{path} [experiment]")] \
        if "eps" in exp else None
    grid_seeds = _list(exp.get("seeds", [0]), "seeds", f"{path} [experiment]")
    out = Path(exp["out"])
    runs = []
    aa_seeds = _list(exp["autoattack_seeds"], "autoattack_seeds", f"{path} [experiment]") \
        if "autoattack_seeds" in exp else None
    for i, block in enumerate(load_blocks(path, data, exp)):
        where = f"{path} [[runs]] #{i + 1}"
        methods = block.get("methods") or [block.get("method")]
        if not all(isinstance(m, str) and m for m in methods) or ("method" in block and "methods" in block):
            raise ExperimentError(f"{where}: give method = \"...\" or methods = [...]")
        overrides = block.get("fit", {})
        if not isinstance(overrides, dict):
            raise ExperimentError(f"{where}: fit must be a table of TrainConfig keys")
        owned = sorted(set(overrides) & set(BLOCK_OWNS))
        if owned:
            raise ExperimentError(f"{where}: fit must not set {', '.join(owned)} (the grid sets them per run)")
        eval_overrides = block.get("eval", {})
        if not isinstance(eval_overrides, dict):
            raise ExperimentError(f"{where}: eval must be a table of EvalConfig keys")
        seeds = _list(block.get("seeds", grid_seeds), "seeds", where)
        block_eps = [parse_eps(e, where) for e in _list(block["eps"], "eps", where)] if "eps" in block else grid_eps
        tag = str(block.get("tag", ""))
        for method in methods:
            if uses_saliency(method):
                names = _list(block.get("sources", list(sources) or [None]), "sources", where)
                unknown = [n for n in names if n is not None and n not in sources]
                if unknown:
                    raise ExperimentError(f"{where}: unknown source(s) {', '.join(map(str, unknown))}; [sources] has "
                                          f"{', '.join(sources) or 'none'}")
            elif "sources" in block and not any(uses_saliency(m) for m in methods):
                raise ExperimentError(f"{where}: {method} uses no saliency: drop sources")
            else:
                names = [None]  # a block's sources apply to its saliency methods only
            eps_axis = (block_eps or [None]) if uses_eps(method) else [None]
            for source in names:
                for eps in eps_axis:
                    for seed in seeds:
                        aa_off = {"autoattack": 0} if aa_seeds is not None and seed not in aa_seeds else {}
                        runs.append(_plan_run(method, source, sources, plain_shards, eps, seed, tag, fit, overrides,
                                              {**ev, **eval_overrides, **aa_off}, eval_cfg, out, f"{where} ({method})", from_dict,
                                              ConfigError))
    names = [r.name for r in runs]
    dup = sorted({n for n in names if names.count(n) > 1})
    if dup:
        raise ExperimentError(f"{path}: run name(s) {', '.join(dup)} planned twice: give the blocks different tags")
    _check_derived(path, sources, runs)
    # a run on a derived source keeps its place in the grid unless that is before the run its teacher
    # needs: then it moves to just after the teacher run (a stable sort), so the derivation can happen
    position = {r.name: i for i, r in enumerate(runs)}

    def when(i_r):
        i, r = i_r
        source = sources.get(r.saliency)
        return max(i, position[source.teacher] + 0.5) if source is not None and source.derived else i

    runs = [r for _i, r in sorted(enumerate(runs), key=when)]
    return Grid(path, exp, sources, fit, ev, runs, eval_cfg)


def _plan_run(method, source, sources, plain_shards, eps, seed, tag, fit, overrides, ev, eval_cfg, out, where,
              from_dict, ConfigError) -> PlannedRun:
    from sat_train.evaluate import EvalConfig, EvalError

    if not isinstance(seed, int) or isinstance(seed, bool):
        raise ExperimentError(f"{where}: seed {seed!r} is not an integer")
    shards = sources[source].shards if source is not None else plain_shards
    parts = [method.replace("+", "-")] + ([source] if source else []) + ([tag] if tag else [])
    parts += [f"eps{eps[1]}"] if eps else []
    name = "-".join(parts + [f"s{seed}"])
    values = {**fit, **overrides, "shards": str(shards), "run": str(out / "runs" / name), "method": method,
              "seed": seed}
    values.setdefault("progress", False)
    if eps:
        values["eps"] = eps[0]
    for key, value in values.items():
        m = _EPS_RELATIVE.match(value) if isinstance(value, str) and key not in GRID_OWNS else None
        if m:  # a step size written relative to the training eps, e.g. pgd_alpha = "eps/4"
            base = values.get("eps", 8 / 255)
            values[key] = base * float(m.group(2)) if m.group(1) == "*" else base / float(m.group(2))
    try:
        cfg = from_dict(dict(values), f"{where} [fit] for {name}")
    except ConfigError as e:
        raise ExperimentError(str(e)) from None
    eval_values = dict(ev)
    train_eps = cfg.eps if uses_eps(method) else None
    if train_eps is not None and "autoattack_eps" not in ev:
        eval_values["autoattack_eps"] = train_eps  # AutoAttack at the run's own threat model
    if train_eps is not None and eps_255(train_eps) not in [eps_255(e) for e in eval_cfg.eps]:
        raise ExperimentError(f"{where}: [eval] eps must include the training eps {eps_text(train_eps)} "
                              f"of {name}, so its PGD and AutoAttack numbers can be checked against each other")
    try:
        EvalConfig.from_dict(dict(eval_values), f"{where} [eval] for {name}")
    except EvalError as e:
        raise ExperimentError(str(e)) from None
    return PlannedRun(name, method, source, seed, train_eps, tag, str(shards), out / "runs" / name, values, eval_values)


def _check_derived(path: Path, sources: dict, runs: list) -> None:
    by_name = {r.name: r for r in runs}
    for s in sources.values():
        if not s.derived:
            continue
        teacher = by_name.get(s.teacher)
        if teacher is None:
            raise ExperimentError(f"{path} [sources] {s.name}: teacher = {s.teacher!r} is not a run of this grid "
                                  f"(runs: {', '.join(list(by_name)[:6])}...)")
        if teacher.saliency is not None and sources[teacher.saliency].derived:
            raise ExperimentError(f"{path} [sources] {s.name}: the teacher run {s.teacher} trains on a derived source")

