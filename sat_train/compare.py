"""`sat-train compare`: one markdown table and a few plots over several runs.

    sat-train compare runs/standard runs/sat runs/pgd --out report/
    sat-train compare runs/* --out report/ --eval test      # pick the evaluation set when runs have several

Reads each run's summary.json (method, saliency source, train time, images/s), config.json (seed),
experiment.json when `sat-train experiment` made the run (its saliency-source label),
metrics.jsonl (loss per epoch) and RUN/eval/<set>.json (from `sat-train eval`), and writes
report/report.md (table: method, saliency source, clean, PGD at each eps, AutoAttack, CW, train time,
images/s; mean +- std over seeds when a (method, saliency) pair has several runs; distortions),
report/accuracy_vs_eps.png (every run on one figure), report/train_loss.png, report/distortions.png
and report/report.json. Every file is written under a temporary name and renamed when complete.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
from pathlib import Path

from sat_train.distortions import LEVELS


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


def load_run(run: Path, eval_name: str | None) -> dict:
    run = Path(run)
    if not run.is_dir():
        raise CompareError(f"{run}: no such run folder")
    summary = _read_json(run / "summary.json") if (run / "summary.json").exists() else {}
    config = _read_json(run / "config.json") if (run / "config.json").exists() else {}
    if not summary and not config:
        raise CompareError(f"{run}: not a run folder (no summary.json or config.json)")
    metrics = _read_jsonl(run / "metrics.jsonl") if (run / "metrics.jsonl").exists() else []
    evaluation = None
    if eval_name is not None and (run / "eval" / f"{eval_name}.json").exists():
        evaluation = _read_json(run / "eval" / f"{eval_name}.json")
        if "rows" not in evaluation:
            raise CompareError(f"{run / 'eval' / (eval_name + '.json')}: not a sat-train eval result (no rows)")
    method = summary.get("method") or config.get("method", "?")
    # `sat-train experiment` labels each run with its grid's saliency-source name; else the shard set's own
    label = _read_json(run / "experiment.json").get("saliency") if (run / "experiment.json").exists() else None
    train_time = summary.get("train_time_s", sum(m.get("epoch_time_s", 0.0) for m in metrics) or None)
    ips = summary.get("images_per_s")
    if ips is None and metrics:
        ips = statistics.fmean(m.get("images_per_s", 0.0) for m in metrics)
    return {"run": str(run), "name": run.name, "method": method,
            "saliency": (label or summary.get("saliency_source")) if "sat" in method else None,
            "seed": config.get("seed"), "arch": summary.get("arch") or config.get("arch"), "epochs": len(metrics),
            "train_time_s": train_time, "images_per_s": ips, "metrics": metrics, "eval": evaluation}


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


def _eps_label(e) -> str:
    return f"{e:g}/255"


def table_rows(runs: list[dict]) -> tuple[list[str], list[list[str]], list[float]]:
    eps = sorted({e for r in runs for e in pgd_curve(r["eval"])})
    aa_eps = sorted({_first(r["eval"], "autoattack")["eps_255"] for r in runs if _first(r["eval"], "autoattack")})
    head = ["run", "method", "saliency source", "seed", "clean"] + [f"PGD {_eps_label(e)}" for e in eps]
    head += [f"AutoAttack {_eps_label(e)}" for e in aa_eps] + ["CW-L2", "train time (s)", "images/s"]
    body = []
    for r in runs:
        ev, curve = r["eval"], pgd_curve(r["eval"])
        aa, cw = _first(ev, "autoattack"), _first(ev, "cw-l2")
        row = [r["name"], r["method"], r["saliency"] or "-", _num(r["seed"], "{}"),
               _pct(ev["clean_accuracy"]) if ev else "-"]
        row += [_pct(curve.get(e)) for e in eps]
        row += [_pct(aa["accuracy"]) + f" (n={aa['n']})" if aa and aa["eps_255"] == e else "-" for e in aa_eps]
        cw_cell = "-" if not cw else _pct(cw["accuracy"]) + (f" (n={cw['n']})" if cw["n"] != ev.get("n") else "")
        row += [cw_cell, _num(r["train_time_s"]), _num(r["images_per_s"], "{:.0f}")]
        body.append(row)
    return head, body, eps


def seed_means(runs: list[dict], eps: list[float]) -> tuple[list[str], list[list[str]]] | None:
    groups = {}
    for r in runs:
        if r["eval"]:
            groups.setdefault((r["method"], r["saliency"] or "-"), []).append(r)
    if not any(len(g) > 1 for g in groups.values()):
        return None

    def ms(values):
        values = [v for v in values if v is not None]
        if not values:
            return "-"
        sd = statistics.stdev(values) if len(values) > 1 else 0.0
        return f"{100 * statistics.fmean(values):.2f} ± {100 * sd:.2f}"

    head = ["method", "saliency source", "runs", "clean"] + [f"PGD {_eps_label(e)}" for e in eps]
    body = [[m, s, str(len(g)), ms([r["eval"]["clean_accuracy"] for r in g])]
            + [ms([pgd_curve(r["eval"]).get(e) for r in g]) for e in eps] for (m, s), g in groups.items()]
    return head, body


def markdown_table(head: list[str], body: list[list[str]]) -> str:
    lines = ["| " + " | ".join(head) + " |", "|" + "|".join("---" for _ in head) + "|"]
    return "\n".join(lines + ["| " + " | ".join(row) + " |" for row in body])


# ----------------------------------------------------------------------------- files

def _atomic_savefig(fig, path: Path) -> None:
    tmp = path.with_name(f".{path.stem}.tmp-{os.getpid()}{path.suffix}")
    fig.savefig(tmp, dpi=120, bbox_inches="tight")
    os.replace(tmp, path)


def make_figures(runs: list[dict]) -> dict:
    """{file name: matplotlib figure}: accuracy vs eps, training loss, distortions (when evaluated)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figs = {}
    fig, ax = plt.subplots(figsize=(6.5, 4.5))
    for r in runs:
        curve = pgd_curve(r["eval"])
        if curve:
            xs = [0.0] + sorted(curve)  # eps 0 = clean accuracy
            ys = [100 * r["eval"]["clean_accuracy"]] + [100 * curve[e] for e in sorted(curve)]
            ax.plot(xs, ys, marker="o", label=r["name"])
    ax.set(xlabel="eps (x/255, L-inf)", ylabel="accuracy under PGD (%)", title="Robust accuracy vs eps")
    figs["accuracy_vs_eps.png"] = fig

    fig, ax = plt.subplots(figsize=(6.5, 4.5))
    for r in runs:
        pts = [(m["epoch"], m["loss"]) for m in r["metrics"] if "epoch" in m and m.get("loss") is not None]
        if pts:
            ax.plot([p[0] + 1 for p in pts], [p[1] for p in pts], marker=".", label=r["name"])
    ax.set(xlabel="epoch", ylabel="training loss", title="Training loss")
    figs["train_loss.png"] = fig

    if any(distortion_curves(r["eval"]) for r in runs):
        fig, axes = plt.subplots(1, 3, figsize=(13, 4))
        for ax, kind in zip(axes, LEVELS):
            for r in runs:
                c = distortion_curves(r["eval"]).get(kind)
                if c:
                    ax.plot(list(c), [100 * v for v in c.values()], marker="o", label=r["name"])
            ax.set(xlabel="contrast" if kind == "contrast" else "sigma", ylabel="accuracy (%)", title=kind)
            if kind == "low-pass":
                ax.set_xscale("log", base=2)
        figs["distortions.png"] = fig
    for fig in figs.values():
        for ax in fig.axes:
            ax.grid(alpha=0.3)
            if ax.lines:
                ax.legend(fontsize=8)
    return figs


def plot_all(runs: list[dict], out: Path) -> list[str]:
    import matplotlib.pyplot as plt

    figs = make_figures(runs)
    for name, fig in figs.items():
        _atomic_savefig(fig, out / name)
        plt.close(fig)
    return list(figs)


def write_report(runs: list[dict], out: Path, eval_name: str | None, notes: list[str]) -> Path:
    from shards.format import atomic_write_bytes, atomic_write_json

    out.mkdir(parents=True, exist_ok=True)
    head, body, eps = table_rows(runs)
    images = plot_all(runs, out)
    parts = [f"# satpipe comparison ({len(runs)} runs, evaluation set: {eval_name or '-'})", "",
             "Accuracies in %; robust accuracy counts a sample only if it is right clean and under the attack.", "",
             markdown_table(head, body), ""]
    means = seed_means(runs, eps)
    if means:
        parts += ["## Mean ± std over seeds", "", markdown_table(*means), ""]
    dist = [r for r in runs if distortion_curves(r["eval"])]
    if dist:
        dhead = ["run"] + [f"{k} {lv:g}" for k in LEVELS for lv in sorted({lv for r in dist for lv in
                                                                             distortion_curves(r["eval"]).get(k, {})})]
        dbody = [[r["name"]] + [_pct(distortion_curves(r["eval"]).get(h.split()[0], {}).get(float(h.split()[1])))
                                for h in dhead[1:]] for r in dist]
        parts += ["## Natural distortions (accuracy %)", "", markdown_table(dhead, dbody), ""]
    parts += ["## Plots", ""] + [f"![{name}]({name})" for name in images] + [""]
    warned = [(r["name"], w) for r in runs if r["eval"] for w in r["eval"].get("sanity", {}).get("warnings", [])]
    if warned or notes:
        parts += ["## Notes", ""] + [f"- {n}" for n in notes] + [f"- {name}: WARNING {w}" for name, w in warned] + [""]
    atomic_write_json(out / "report.json", {"eval_set": eval_name, "columns": head, "rows": body, "notes": notes,
                                            "runs": [{k: v for k, v in r.items() if k != "eval"} for r in runs]})
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


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="sat-train compare", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    p.add_argument("runs", nargs="+", help="run folders (written by sat-train fit, evaluated by sat-train eval)")
    p.add_argument("--out", default="report", help="report folder (default report/)")
    p.add_argument("--eval", dest="eval_name", help="evaluation set name: RUN/eval/<NAME>.json")
    args = p.parse_args(sys.argv[1:] if argv is None else argv)
    try:
        path, runs, notes = compare(args.runs, args.out, args.eval_name)
    except CompareError as e:
        print(f"sat-train compare: error: {e}", file=sys.stderr)
        return 2
    print(path.read_text())
    print(f"report: {path}")
    return 0
