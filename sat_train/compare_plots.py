"""`sat-train compare`'s figures: accuracy vs eps (group means ± std, one panel per training eps),
training loss (group means) and natural distortions (per run). The numbers come from sat_train.compare's
helpers; this module only draws and writes PNGs (matplotlib is imported when a report is written).
"""
from __future__ import annotations

import statistics
from pathlib import Path

from sat_train.compare import distortion_curves, eps_label, group_name, group_runs, mean_std, pgd_curve
from sat_train.distortions import LEVELS


def make_figures(runs: list[dict], groups: list[list[dict]] | None = None) -> dict:
    """{file name: matplotlib figure}: accuracy vs eps (group means ± std, one panel per training eps),
    training loss (group means), distortions (per run, when evaluated)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    groups = groups if groups is not None else group_runs(runs)
    figs = {}
    panels = sorted({g[0]["eps"] for g in groups if g[0]["eps"] is not None}) or [None]
    fig, axes = plt.subplots(len(panels), 1, figsize=(9.5, 5 * len(panels)), squeeze=False)  # panels stacked
    colors, markers = plt.cm.tab20.colors, "osD^vPX<>*"  # distinct styles for up to 20 groups per panel
    for ax, panel in zip(axes[:, 0], panels):
        for i, g in enumerate(g for g in groups if g[0]["eps"] in (panel, None)):
            evaluated = [r for r in g if pgd_curve(r["eval"])]
            if not evaluated:
                continue
            xs = [0.0] + sorted({e for r in evaluated for e in pgd_curve(r["eval"])})  # eps 0 = clean accuracy
            stats = [mean_std([r["eval"]["clean_accuracy"] if x == 0 else pgd_curve(r["eval"]).get(x)
                               for r in evaluated]) for x in xs]
            ax.errorbar(xs, [100 * m for m, _ in stats], yerr=[100 * s for _, s in stats], capsize=3,
                        color=colors[i % len(colors)], marker=markers[i % len(markers)], label=group_name(g))
        title = "Robust accuracy vs eps" + (f" (trained at eps {eps_label(round(panel * 255, 6))})" if panel else "")
        ax.set(xlabel="eps (x/255, L-inf)", ylabel="accuracy under PGD (%)", title=title)
    figs["accuracy_vs_eps.png"] = fig

    fig, ax = plt.subplots(figsize=(9.5, 5))
    ax.set_prop_cycle(color=colors)
    for g in groups:
        by_epoch = {}
        for r in g:
            for m in r["metrics"]:
                if "epoch" in m and m.get("loss") is not None:
                    by_epoch.setdefault(m["epoch"], []).append(m["loss"])
        if by_epoch:
            epochs = sorted(by_epoch)
            ax.plot([e + 1 for e in epochs], [statistics.fmean(by_epoch[e]) for e in epochs], marker=".",
                    label=group_name(g))
    ax.set(xlabel="epoch", ylabel="training loss (mean over seeds)", title="Training loss")
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
            if ax.lines:  # beside the plot: with a dozen groups a legend inside hides the curves
                ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1.0))
    return figs


def plot_all(runs: list[dict], groups: list[list[dict]], out: Path) -> list[str]:
    import matplotlib.pyplot as plt

    from shards.storage import atomic_write

    figs = make_figures(runs, groups)
    for name, fig in figs.items():
        atomic_write(out / name, lambda f: fig.savefig(f, format="png", dpi=120, bbox_inches="tight"))  # noqa: B023
        plt.close(fig)
    return list(figs)
