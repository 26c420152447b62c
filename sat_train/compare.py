"""`sat-train compare`: the report over several runs: one row per run group (mean ± std over seeds), plots,
gradient-masking checks.

    sat-train compare runs/standard runs/sat runs/pgd --out report/
    sat-train compare runs/* --out report/ --eval test      # pick the evaluation set when runs have several

Reads each run's config.json and summary.json (method, curriculum, eps, train time, images/s), the
manifest of its training set (the saliency kind), experiment.json when `sat-train experiment` made the
run (its saliency-source name), metrics.jsonl (loss per epoch), RUN/eval/<set>.json (from `sat-train
eval`) and RUN/eval/clean-all/<set>.json (clean accuracy on the whole set, when the experiment made one).

A group is every run whose config differs only in the seed (and runtime fields). report/report.md holds:
- per group: method, saliency source and kind, curriculum (a, tau, final p), training eps, seeds, clean /
  PGD at each eps / AutoAttack as mean ± std over seeds, train time per epoch and images/s;
- gradient-masking checks for every run trained against a perturbation: AutoAttack not far below PGD
  at its eps, accuracy falling with eps, and the evaluation's own sanity warnings;
- per run: the same numbers, one seed each; natural distortions when evaluated;
report/accuracy_vs_eps.png (group means with ± std bars, one panel per training eps),
report/train_loss.png, report/distortions.png (drawn by sat_train.compare_plots) and report/report.json
(every number of the tables).
Every file is written under a temporary name and renamed when complete.

Why one file of ~400 lines: reading runs, grouping seeds, the tables and report.md are one pass over
the same run dicts, and the CLI stays with them; the figures are apart (sat_train/compare_plots.py).
"""
from __future__ import annotations

import json
import statistics
import sys
from pathlib import Path

from sat_train.distortions import LEVELS
from shards.cli import CommandParser, fail
from shards.provenance import provenance, provenance_lines


class CompareError(Exception):
    """A user mistake or unreadable input: one line, non-zero exit."""


def _read_json(path: Path):
    try:
        return json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise CompareError(f"{path}: cannot read ({e})") from None


def _read_jsonl(path: Path) -> list[dict]:
    rows = []
    for i, line in enumerate(path.read_text().splitlines(), 1):
        if line.strip():
            try:
                rows.append(json.loads(line))
            except json.JSONDecodeError as e:
                raise CompareError(f"{path}:{i}: not a JSON line ({e})") from None
    return rows


def eval_sets(run: Path) -> list[str]:
    return sorted(p.stem for p in (run / "eval").glob("*.json") if not p.name.startswith("."))


def saliency_kind(shards: str | None, fallback: str | None) -> str | None:
    """What the training set's maps really are, from its manifest: `saliency.kind` (what the samples
    show; `mixed` with the count per kind from counts.saliency_kinds, e.g. "mixed: mask 812, box 188"),
    with the explainer of a teacher set and the maps a shuffled set permutes; else the build config's."""
    manifest = None
    if shards and (Path(shards) / "manifest.json").is_file():
        try:
            manifest = json.loads((Path(shards) / "manifest.json").read_text())
        except (OSError, json.JSONDecodeError):
            manifest = None
    if not isinstance(manifest, dict):
        return fallback
    block = manifest.get("saliency") if isinstance(manifest.get("saliency"), dict) else {}
    kinds = (manifest.get("counts") or {}).get("saliency_kinds") or {}
    if len(kinds) > 1:
        return "mixed: " + ", ".join(f"{k} {v}" for k, v in sorted(kinds.items(), key=lambda kv: -kv[1]))
    kind = block.get("kind") or manifest.get("config", {}).get("saliency") or fallback
    if kind == "unknown" and block.get("requested"):
        return f"unknown (requested {block['requested']})"
    extra = block.get("explainer") if kind == "teacher" else block.get("source_kind")
    return f"{kind} ({extra})" if extra and extra != kind else kind


def load_run(run: Path, eval_name: str | None) -> dict:
    run = Path(run)
    if not run.is_dir():
        raise CompareError(f"{run}: no such run folder")
    summary = _read_json(run / "summary.json") if (run / "summary.json").exists() else {}
    config = _read_json(run / "config.json") if (run / "config.json").exists() else {}
    if not summary and not config:
        raise CompareError(f"{run}: not a run folder (no summary.json or config.json)")
    metrics = _read_jsonl(run / "metrics.jsonl") if (run / "metrics.jsonl").exists() else []
    evaluation = clean_all = None
    if eval_name is not None and (run / "eval" / f"{eval_name}.json").exists():
        evaluation = _read_json(run / "eval" / f"{eval_name}.json")
        if "rows" not in evaluation:
            raise CompareError(f"{run / 'eval' / (eval_name + '.json')}: not a sat-train eval result (no rows)")
        if (run / "eval" / "clean-all" / f"{eval_name}.json").exists():
            clean_all = _read_json(run / "eval" / "clean-all" / f"{eval_name}.json")
    method = summary.get("method") or config.get("method", "?")
    # `sat-train experiment` labels each run with its grid's saliency-source name; else the shard set's own
    label = _read_json(run / "experiment.json").get("saliency") if (run / "experiment.json").exists() else None
    uses_saliency = "sat" in method
    train_time = summary.get("train_time_s", sum(m.get("epoch_time_s", 0.0) for m in metrics) or None)
    ips = summary.get("images_per_s")
    if ips is None and metrics:
        ips = statistics.fmean(m.get("images_per_s", 0.0) for m in metrics)
    epochs = len(metrics) or summary.get("epochs")
    return {"run": str(run), "name": run.name, "method": method, "config": config,
            "saliency": (label or summary.get("saliency_source")) if uses_saliency else None,
            "kind": saliency_kind(summary.get("shards") or config.get("shards"), summary.get("saliency_source"))
            if uses_saliency else None,
            "seed": config.get("seed"), "arch": summary.get("arch") or config.get("arch"), "epochs": epochs,
            "eps": config.get("eps") if method != "standard" else None, "curriculum": curriculum(config, summary)
            if uses_saliency else None, "train_time_s": train_time, "images_per_s": ips,
            "epoch_time_s": train_time / epochs if train_time and epochs else None,
            "metrics": metrics, "eval": evaluation, "clean_all": clean_all}


def curriculum(config: dict, summary: dict) -> str:
    """SAT's schedule as a label: fixed p, or a, tau (and the final p asked for / reached)."""
    if config.get("sat_p") is not None:
        return f"p={config['sat_p']:g} fixed"
    a, tau, final = config.get("sat_a", 0.6), summary.get("sat_tau", config.get("sat_tau", 10.0)), summary.get("final_p")
    label = f"a={a:g} τ={tau:.3g}"
    if config.get("sat_final_p") is not None:
        return label + f" → p={config['sat_final_p']:g}"
    return label + (f" → p={final:.2f}" if final is not None else "")


def pick_eval_name(runs: list[Path], wanted: str | None) -> str | None:
    if wanted:
        return wanted
    names = sorted({n for r in runs for n in eval_sets(Path(r))})
    if len(names) > 1:
        raise CompareError(f"the runs hold several evaluation sets ({', '.join(names)}): choose one with --eval NAME")
    return names[0] if names else None


# ----------------------------------------------------------------------------- numbers out of an eval result

def pgd_curve(evaluation: dict | None) -> dict:
    """{eps in 1/255: accuracy} for the main PGD L-inf runs (the configured step count)."""
    if not evaluation:
        return {}
    steps = evaluation.get("config", {}).get("pgd_steps")
    return {r["eps_255"]: r["accuracy"] for r in evaluation["rows"]
            if r["attack"] == "pgd" and r["norm"] == "linf" and r["params"].get("steps") == steps}


def _first(evaluation: dict | None, attack: str):
    if not evaluation:
        return None
    return next((r for r in evaluation["rows"] if r["attack"] == attack), None)


def clean_accuracy(run: dict):
    """(accuracy, n): on the whole set when the experiment measured it there, else the eval's."""
    if run["clean_all"]:
        return run["clean_all"]["clean_accuracy"], run["clean_all"]["n"]
    return (run["eval"]["clean_accuracy"], run["eval"].get("n")) if run["eval"] else (None, None)


def distortion_curves(evaluation: dict | None) -> dict:
    if not evaluation:
        return {}
    out = {}
    for r in evaluation["rows"]:
        if r["attack"] in LEVELS:
            out.setdefault(r["attack"], {})[r["level"]] = r["accuracy"]
    return out


def _pct(v) -> str:
    return "-" if v is None else f"{100 * v:.2f}"


def _num(v, fmt="{:.1f}") -> str:
    return "-" if v is None else fmt.format(v)


def eps_label(e) -> str:
    """eps in 1/255 as written in the tables: whole numbers as N/255, others in pixel units (25.5 -> 0.1)."""
    return f"{e:g}/255" if abs(e - round(e)) < 1e-9 else f"{e / 255:.3g}"


def _train_eps(run: dict) -> str:
    return "-" if run["eps"] is None else eps_label(round(run["eps"] * 255, 6))


def columns(runs: list[dict]) -> tuple[list[float], list[float]]:
    """(PGD eps, AutoAttack eps) over all runs, in 1/255."""
    eps = sorted({e for r in runs for e in pgd_curve(r["eval"])})
    aa = sorted({_first(r["eval"], "autoattack")["eps_255"] for r in runs if _first(r["eval"], "autoattack")})
    return eps, aa


def table_rows(runs: list[dict]) -> tuple[list[str], list[list[str]], list[float]]:
    eps, aa_eps = columns(runs)
    head = ["run", "method", "saliency source", "seed", "train eps", "clean"] + [f"PGD {eps_label(e)}" for e in eps]
    head += [f"AutoAttack {eps_label(e)}" for e in aa_eps] + ["CW-L2", "train time (s)", "images/s"]
    body = []
    for r in runs:
        ev, curve = r["eval"], pgd_curve(r["eval"])
        aa, cw = _first(ev, "autoattack"), _first(ev, "cw-l2")
        clean, n_clean = clean_accuracy(r)
        row = [r["name"], r["method"], r["saliency"] or "-", _num(r["seed"], "{}"), _train_eps(r),
               _pct(clean) + (f" (n={n_clean})" if ev and n_clean != ev.get("n") else "")]
        row += [_pct(curve.get(e)) for e in eps]
        row += [_pct(aa["accuracy"]) + f" (n={aa['n']})" if aa and aa["eps_255"] == e else "-" for e in aa_eps]
        cw_cell = "-" if not cw else _pct(cw["accuracy"]) + (f" (n={cw['n']})" if cw["n"] != ev.get("n") else "")
        row += [cw_cell, _num(r["train_time_s"]), _num(r["images_per_s"], "{:.0f}")]
        body.append(row)
    return head, body, eps


# ----------------------------------------------------------------------------- groups over seeds

def group_runs(runs: list[dict]) -> list[list[dict]]:
    """Runs whose configs differ only in seed and runtime fields, in first-seen order."""
    from sat_train.config import RESUMABLE_CHANGES

    ignore = (set(RESUMABLE_CHANGES) - {"epochs"}) | {"seed"}
    groups: dict = {}
    for r in runs:
        key = json.dumps({k: v for k, v in r["config"].items() if k not in ignore}, sort_keys=True)
        groups.setdefault((r["method"], r["saliency"], r["kind"], key), []).append(r)
    return list(groups.values())


def group_name(group: list[dict]) -> str:
    names = [r["name"] for r in group]
    stems = {n.rsplit("-s", 1)[0] for n in names}
    if len(stems) == 1 and all(n.rsplit("-s", 1)[-1].isdigit() for n in names):
        return f"{stems.pop()}-s{{{','.join(n.rsplit('-s', 1)[1] for n in names)}}}" if len(names) > 1 else names[0]
    return ", ".join(names)


def mean_std(values: list) -> tuple[float | None, float | None]:
    values = [v for v in values if v is not None]
    if not values:
        return None, None
    return statistics.fmean(values), statistics.stdev(values) if len(values) > 1 else 0.0


def _ms(values, scale=100.0, fmt="{:.1f}") -> str:
    m, s = mean_std(values)
    if m is None:
        return "-"
    n = len([v for v in values if v is not None])
    return fmt.format(scale * m) + (f" ± {fmt.format(scale * s)}" if n > 1 else "")


def group_table(groups: list[list[dict]]) -> tuple[list[str], list[list[str]], list[dict]]:
    runs = [r for g in groups for r in g]
    eps, aa_eps = columns(runs)
    n_clean = {clean_accuracy(r)[1] for r in runs if r["eval"]}
    n_pgd = {r["eval"].get("n") for r in runs if r["eval"]}
    head = ["runs", "method", "saliency source", "saliency kind", "curriculum", "train eps", "seeds",
            "clean" + (f" (n={n_clean.pop()})" if len(n_clean) == 1 else "")]
    head += [f"PGD {eps_label(e)}" + (f" (n={next(iter(n_pgd))})" if len(n_pgd) == 1 and i == 0 else "")
             for i, e in enumerate(eps)]
    head += [f"AutoAttack {eps_label(e)}" for e in aa_eps] + ["train time / epoch (s)", "images/s"]
    body, numbers = [], []
    for g in groups:
        r0, evaluated = g[0], [r for r in g if r["eval"]]
        aa = {e: [(_first(r["eval"], "autoattack") or {}).get("accuracy")
                  if (_first(r["eval"], "autoattack") or {}).get("eps_255") == e else None for r in evaluated]
              for e in aa_eps}
        aa_n = {e: {_first(r["eval"], "autoattack")["n"] for r in evaluated
                    if (_first(r["eval"], "autoattack") or {}).get("eps_255") == e} for e in aa_eps}
        row = [group_name(g), r0["method"], r0["saliency"] or "-", r0["kind"] or "-", r0["curriculum"] or "-",
               _train_eps(r0), f"{len(g)} ({', '.join(_num(r['seed'], '{}') for r in g)})",
               _ms([clean_accuracy(r)[0] for r in evaluated])]
        row += [_ms([pgd_curve(r["eval"]).get(e) for r in evaluated]) for e in eps]
        row += [_ms(aa[e]) + (f" (n={min(aa_n[e])})" if aa_n[e] else "") for e in aa_eps]
        row += [_ms([r["epoch_time_s"] for r in g], 1.0), _ms([r["images_per_s"] for r in g], 1.0, "{:.0f}")]
        body.append(row)
        numbers.append({"runs": [r["name"] for r in g], "method": r0["method"], "saliency": r0["saliency"],
                        "kind": r0["kind"], "curriculum": r0["curriculum"], "eps": r0["eps"],
                        "clean": mean_std([clean_accuracy(r)[0] for r in evaluated]),
                        "pgd": {str(e): mean_std([pgd_curve(r["eval"]).get(e) for r in evaluated]) for e in eps},
                        "autoattack": {str(e): mean_std(aa[e]) for e in aa_eps},
                        "epoch_time_s": mean_std([r["epoch_time_s"] for r in g]),
                        "images_per_s": mean_std([r["images_per_s"] for r in g])})
    return head, body, numbers


# ----------------------------------------------------------------------------- gradient-masking checks

def masking_rows(runs: list[dict]) -> tuple[list[str], list[list[str]], list[str]]:
    """One row per evaluated run trained against a perturbation (every method but standard): AutoAttack
    against PGD at the AutoAttack eps (the evaluation compares them on the same samples and warns when
    AutoAttack is more than its aa_gap below), accuracy falling as eps grows, the other eval warnings."""
    head = ["run", "AutoAttack eps", "PGD (n)", "AutoAttack (n)", "AA far below PGD, same samples",
            "falls with eps", "other eval warnings"]
    body, warnings = [], []
    for r in runs:
        if r["method"] == "standard" or not r["eval"]:
            continue
        curve, aa = pgd_curve(r["eval"]), _first(r["eval"], "autoattack")
        own = r["eval"].get("sanity", {}).get("warnings", [])
        aa_warned = [w for w in own if w.startswith("AutoAttack")]
        points = [r["eval"]["clean_accuracy"]] + [curve[e] for e in sorted(curve)]
        falls = all(b <= a for a, b in zip(points, points[1:]))
        pgd_at = curve.get(aa["eps_255"]) if aa else None
        body.append([r["name"], eps_label(aa["eps_255"]) if aa else "-",
                     "-" if pgd_at is None else f"{_pct(pgd_at)} ({r['eval'].get('n')})",
                     "-" if aa is None else f"{_pct(aa['accuracy'])} ({aa['n']})",
                     "-" if aa is None else ("WARNING" if aa_warned else "no"), "yes" if falls else "NO",
                     str(len(own) - len(aa_warned)) if len(own) > len(aa_warned) else "none"])
        if not falls:
            warnings.append(f"{r['name']}: accuracy does not fall monotonically with eps "
                            f"({', '.join(_pct(p) for p in points)}; possible gradient masking)")
        warnings += [f"{r['name']}: WARNING {w}" for w in own]
    return head, body, warnings


def markdown_table(head: list[str], body: list[list[str]]) -> str:
    lines = ["| " + " | ".join(head) + " |", "|" + "|".join("---" for _ in head) + "|"]
    return "\n".join(lines + ["| " + " | ".join(row) + " |" for row in body])


# ----------------------------------------------------------------------------- files

def write_report(runs: list[dict], out: Path, eval_name: str | None, notes: list[str]) -> Path:
    from sat_train.compare_plots import plot_all  # imports matplotlib (and this module)
    from shards.storage import atomic_write_bytes, atomic_write_json

    out.mkdir(parents=True, exist_ok=True)
    groups = group_runs(runs)
    ghead, gbody, gnumbers = group_table(groups)
    head, body, _ = table_rows(runs)
    mhead, mbody, mwarnings = masking_rows(runs)
    images = plot_all(runs, groups, out)
    parts = [f"# satpipe comparison ({len(runs)} runs in {len(groups)} groups, evaluation set: {eval_name or '-'})",
             "", "Accuracies in %; robust accuracy counts a sample only if it is right clean and under the attack. "
             "Groups: runs that differ only in the seed, mean ± std over seeds.", "",
             markdown_table(ghead, gbody), ""]
    if mbody:
        parts += ["## Gradient-masking checks", "",
                  "Every run trained against a perturbation. AutoAttack far below PGD on the same samples (the "
                  "evaluation's aa_gap, 5 points by default), or accuracy that does not fall as eps grows, suggests "
                  "gradient masking: PGD then overestimates robustness. PGD's n can exceed AutoAttack's: the "
                  "comparison itself uses AutoAttack's samples. Every evaluation warning is listed below the table.",
                  "",
                  markdown_table(mhead, mbody), ""]
        parts += [f"- {w}" for w in mwarnings] if mwarnings else ["All checks passed."]
        parts += [""]
    parts += ["## Runs", "", markdown_table(head, body), ""]
    dist = [r for r in runs if distortion_curves(r["eval"])]
    if dist:
        dhead = ["run"] + [f"{k} {lv:g}" for k in LEVELS for lv in sorted({lv for r in dist for lv in
                                                                             distortion_curves(r["eval"]).get(k, {})})]
        dbody = [[r["name"]] + [_pct(distortion_curves(r["eval"]).get(h.split()[0], {}).get(float(h.split()[1])))
                                for h in dhead[1:]] for r in dist]
        parts += ["## Natural distortions (accuracy %)", "", markdown_table(dhead, dbody), ""]
    parts += ["## Plots", ""] + [f"![{name}]({name})" for name in images] + [""]
    parts += ["## Provenance", ""] + provenance_lines() + [""]
    warned = [(r["name"], w) for r in runs if r["eval"] and r["method"] == "standard"
              for w in r["eval"].get("sanity", {}).get("warnings", [])]
    if warned or notes:
        parts += ["## Notes", ""] + [f"- {n}" for n in notes] + [f"- {name}: WARNING {w}" for name, w in warned] + [""]
    atomic_write_json(out / "report.json", {
        "eval_set": eval_name, "groups": {"columns": ghead, "rows": gbody, "numbers": gnumbers},
        "columns": head, "rows": body, "masking": {"columns": mhead, "rows": mbody, "warnings": mwarnings},
        "notes": notes, "runs": [{k: v for k, v in r.items() if k not in ("eval", "clean_all")} for r in runs],
        "provenance": provenance()})
    path = out / "report.md"
    atomic_write_bytes(path, "\n".join(parts).encode())  # last: its presence means the report is complete
    return path


def compare(run_dirs, out, eval_name=None) -> tuple[Path, list[dict], list[str]]:
    if not run_dirs:
        raise CompareError("give at least one run folder")
    name = pick_eval_name([Path(r) for r in run_dirs], eval_name)
    runs = [load_run(Path(r), name) for r in run_dirs]
    notes = [f"{r['name']}: no evaluation" + (f" on {name}" if name else "") + " (run `sat-train eval`); "
             "its robustness cells are empty" for r in runs if r["eval"] is None]
    return write_report(runs, Path(out), name, notes), runs, notes


def build_parser() -> CommandParser:
    p = CommandParser("sat-train compare", __doc__)
    p.add_argument("runs", nargs="+", help="run folders (written by sat-train fit, evaluated by sat-train eval): the "
                   "inputs")
    p.add_argument("--out", default="report", help="report folder to write (default: report)")
    p.add_argument("--eval", dest="eval_name", help="evaluation set name: RUN/eval/<NAME>.json (default: the one "
                   "every run has)")
    return p


def main(argv=None) -> int:
    args = build_parser().parse_args(sys.argv[1:] if argv is None else argv)
    try:
        path, runs, notes = compare(args.runs, args.out, args.eval_name)
    except CompareError as e:
        return fail("sat-train compare", str(e))
    print(path.read_text())
    print(f"report: {path}")
    return 0
