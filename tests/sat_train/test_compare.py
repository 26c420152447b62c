"""`sat-train compare` on run folders with known numbers: the table carries them, plots hold every run."""
import json

import pytest

from sat_train.compare import (CompareError, compare, group_name, group_runs, load_run, main, pick_eval_name,
                               saliency_kind)
from sat_train.compare_plots import make_figures

EPS = [1, 2, 4, 8]


def write_run(root, name, *, method, saliency="gt-masks", seed=0, clean=0.9, drop=0.1, aa=None, evaluate=True,
              eval_name="test", losses=(2.0, 1.5, 1.1), eps=8 / 255, config=None, clean_all=None, aa_eps=8):
    run = root / name
    (run / "checkpoints").mkdir(parents=True)
    (run / "config.json").write_text(json.dumps({"method": method, "seed": seed, "arch": "cnn4", "eps": eps,
                                                 "sat_a": 0.6, "sat_tau": 10.0, "sat_final_p": None, "sat_p": None,
                                                 **(config or {})}))
    (run / "metrics.jsonl").write_text("".join(json.dumps({"epoch": i, "loss": v, "epoch_time_s": 10.0,
                                                           "images_per_s": 500.0}) + "\n"
                                               for i, v in enumerate(losses)))
    (run / "summary.json").write_text(json.dumps({"method": method, "saliency_source": saliency, "arch": "cnn4",
                                                  "train_time_s": 30.0 + seed, "images_per_s": 512.0,
                                                  "final_p": 0.17, "sat_tau": 10.0}))
    if evaluate:
        rows = [{"attack": "clean", "norm": None, "eps": None, "eps_255": None, "level": None, "params": {},
                 "n": 100, "accuracy": clean, "time_s": 0.1}]
        rows += [{"attack": "pgd", "norm": "linf", "eps": e / 255, "eps_255": e, "level": None,
                  "params": {"steps": 20}, "n": 100, "accuracy": round(clean - drop * e, 4), "time_s": 1.0}
                 for e in EPS]
        rows.append({"attack": "pgd", "norm": "linf", "eps": 8 / 255, "eps_255": 8, "level": None,
                     "params": {"steps": 5}, "n": 100, "accuracy": 0.99, "time_s": 0.3})  # sweep row: not in table
        if aa is not None:
            rows.append({"attack": "autoattack", "norm": "linf", "eps": aa_eps / 255, "eps_255": aa_eps, "level": None,
                         "params": {"stages": {}}, "n": 50, "accuracy": aa, "time_s": 9.0})
        rows += [{"attack": "low-pass", "norm": None, "eps": None, "eps_255": None, "level": s, "params": {},
                  "n": 100, "accuracy": 0.5, "time_s": 0.1} for s in (1.0, 2.0)]
        (run / "eval").mkdir()
        (run / "eval" / f"{eval_name}.json").write_text(json.dumps({
            "rows": rows, "clean_accuracy": clean, "n": 100, "config": {"pgd_steps": 20},
            "sanity": {"passed": True, "warnings": []}}))
        if clean_all is not None:
            (run / "eval" / "clean-all").mkdir()
            (run / "eval" / "clean-all" / f"{eval_name}.json").write_text(json.dumps({
                "rows": rows[:1], "clean_accuracy": clean_all, "n": 10000, "config": {"pgd_steps": 20}}))
    return run


def table(md, heading=None):
    """Rows (lists of cells) of the first markdown table after `heading` (or of the first table)."""
    lines = md.splitlines()
    start = lines.index(heading) if heading else 0
    rows = []
    for line in lines[start:]:
        if line.startswith("|"):
            rows.append([c.strip() for c in line.strip("|").split(" | ")])
        elif rows:
            break
    return rows


def test_report_groups_seeds_and_lists_every_run(tmp_path, capsys):
    runs = [write_run(tmp_path, "std", method="standard", clean=0.92, drop=0.1, clean_all=0.915),
            write_run(tmp_path, "sat-s0", method="sat", seed=0, clean=0.9, drop=0.05, aa=0.41),
            write_run(tmp_path, "sat-s1", method="sat", seed=1, clean=0.88, drop=0.05, aa=0.43),
            write_run(tmp_path, "pgd", method="pgd", clean=0.85, drop=0.02, evaluate=False)]
    out = tmp_path / "report"
    assert main([*map(str, runs), "--out", str(out)]) == 0
    md = (out / "report.md").read_text()
    groups = table(md)
    head = groups[0]
    for col in ["runs", "method", "saliency source", "saliency kind", "curriculum", "train eps", "seeds", "clean",
                "PGD 1/255", "PGD 8/255", "AutoAttack 8/255", "train time / epoch (s)", "images/s"]:
        assert any(h.startswith(col) for h in head), col
    assert [g[0] for g in groups[2:]] == ["std", "sat-s{0,1}", "pgd"]  # the two SAT seeds are one group
    sat = dict(zip(head, groups[3]))
    assert sat["method"] == "sat" and sat["saliency source"] == "gt-masks" and sat["seeds"] == "2 (0, 1)"
    assert sat["curriculum"] == "a=0.6 τ=10 → p=0.17" and sat["train eps"] == "8/255"
    assert sat[next(h for h in head if h.startswith("clean"))] == "89.0 ± 1.4"  # mean +- std over the seeds
    assert sat["AutoAttack 8/255"] == "42.0 ± 1.4 (n=50)" and sat["train time / epoch (s)"] == "10.2 ± 0.2"
    std = dict(zip(head, groups[2]))
    assert std["saliency source"] == "-" and std["train eps"] == "-" and std["curriculum"] == "-"
    assert std[next(h for h in head if h.startswith("clean"))] == "91.5"  # the whole-set clean accuracy
    assert std[next(h for h in head if h.startswith("PGD 8/255"))] == "12.0"  # the 20-step row, not the sweep
    assert "99.0" not in md
    per_run = table(md, "## Runs")
    assert [r[0] for r in per_run[2:]] == ["std", "sat-s0", "sat-s1", "pgd"]
    sat0 = dict(zip(per_run[0], per_run[3]))
    assert sat0["clean"] == "90.00" and sat0["AutoAttack 8/255"] == "41.00 (n=50)" and sat0["PGD 8/255"] == "50.00"
    assert dict(zip(per_run[0], per_run[2]))["clean"] == "91.50 (n=10000)"
    masking = table(md, "## Gradient-masking checks")
    assert [r[0] for r in masking[2:]] == ["sat-s0", "sat-s1"]  # trained against a perturbation and evaluated
    sat0 = dict(zip(masking[0], masking[2]))
    assert sat0["PGD (n)"] == "50.00 (100)" and sat0["AutoAttack (n)"] == "41.00 (50)"
    assert sat0["AA far below PGD, same samples"] == "no" and "All checks passed." in md
    assert "pgd: no evaluation on test" in md and "Natural distortions" in md
    for png in ("accuracy_vs_eps.png", "train_loss.png", "distortions.png"):
        data = (out / png).read_bytes()
        assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 5000
        assert f"![{png}]({png})" in md
    report = json.loads((out / "report.json").read_text())
    assert [r["name"] for r in report["runs"]] == ["std", "sat-s0", "sat-s1", "pgd"]
    assert report["groups"]["numbers"][1]["clean"] == pytest.approx([0.89, 0.01414], abs=1e-4)
    assert "report:" in capsys.readouterr().out
    assert not list(out.glob(".*tmp*"))


def test_masking_checks_flag_accuracy_rising_with_eps_and_eval_warnings(tmp_path):
    ok = write_run(tmp_path, "fgsm", method="fgsm-rs", drop=0.01, aa=0.79, config={"eps": 0.1})
    bad = write_run(tmp_path, "pgd", method="pgd", drop=-0.01, aa=0.5)  # accuracy grows with eps
    ev = json.loads((bad / "eval" / "test.json").read_text())
    ev["sanity"]["warnings"] = ["AutoAttack 50.00% is 48.0 points below PGD-20 eps=8/255 98.00% on the same 50 "
                                "samples: PGD overestimates robustness (possible gradient masking)",
                                "PGD weaker than FGSM: ..."]
    (bad / "eval" / "test.json").write_text(json.dumps(ev))
    path, runs, _ = compare([ok, bad], tmp_path / "r")
    md = path.read_text()
    rows = {r[0]: dict(zip(table(md, "## Gradient-masking checks")[0], r))
            for r in table(md, "## Gradient-masking checks")[2:]}
    assert rows["fgsm"]["falls with eps"] == "yes" and rows["fgsm"]["other eval warnings"] == "none"
    assert rows["fgsm"]["AA far below PGD, same samples"] == "no"
    assert rows["pgd"]["falls with eps"] == "NO" and rows["pgd"]["other eval warnings"] == "1"
    assert rows["pgd"]["AA far below PGD, same samples"] == "WARNING"
    assert "pgd: accuracy does not fall monotonically with eps" in md and "pgd: WARNING PGD weaker than FGSM" in md
    assert "pgd: WARNING AutoAttack 50.00% is 48.0 points below" in md
    groups = table(md)
    assert dict(zip(groups[0], groups[2]))["train eps"] == "0.1"


def test_groups_split_on_any_config_difference_but_the_seed(tmp_path):
    runs = [write_run(tmp_path, f"sat-{tag}-s{seed}", method="sat", seed=seed, config=cfg)
            for tag, cfg in (("a", {"sat_final_p": 0.9}), ("b", {"sat_final_p": 0.25})) for seed in (0, 1)]
    runs.append(write_run(tmp_path, "sat-c-s0", method="sat", config={"sat_final_p": 0.9, "lr": 0.05}))
    loaded = [load_run(r, "test") for r in runs]
    groups = group_runs(loaded)
    assert [group_name(g) for g in groups] == ["sat-a-s{0,1}", "sat-b-s{0,1}", "sat-c-s0"]
    assert groups[0][0]["curriculum"] == "a=0.6 τ=10 → p=0.9"


def test_saliency_kind_reads_the_training_manifest(tmp_path):
    shards = tmp_path / "shards"
    shards.mkdir()

    def manifest(saliency, kinds=None, config=None):
        (shards / "manifest.json").write_text(json.dumps({"config": config or {}, "saliency": saliency,
                                                          "counts": {"saliency_kinds": kinds or {}}}))
        return saliency_kind(str(shards), "fallback")

    assert manifest({"kind": "mixed", "requested": "auto"}, {"mask": 80, "box": 20}) == "mixed: mask 80, box 20"
    assert manifest({"kind": "box", "requested": "auto"}, {"box": 100}) == "box"  # auto on a mask-less set
    assert manifest({"kind": "teacher", "explainer": "grad-sign"}) == "teacher (grad-sign)"
    assert manifest({"kind": "shuffled", "source_kind": "foreground"}) == "shuffled (foreground)"
    assert manifest({"kind": "unknown", "requested": "mask"}) == "unknown (requested mask)"
    assert manifest(None, config={"saliency": "foreground-box"}) == "foreground-box"
    assert saliency_kind(str(tmp_path / "gone"), "box") == "box"


def test_figures_have_one_errorbar_line_per_group_and_a_panel_per_training_eps(tmp_path):
    runs = [load_run(write_run(tmp_path, n, method=m, seed=seed, clean=0.9 - 0.02 * seed, config=cfg), "test")
            for n, m, seed, cfg in [("a", "standard", 0, {}), ("b-s0", "sat", 0, {}), ("b-s1", "sat", 1, {}),
                                    ("c", "pgd", 0, {"eps": 0.1})]]
    figs = make_figures(runs)
    left, right = figs["accuracy_vs_eps.png"].axes
    # one panel per training eps; standard (no training eps) appears in both
    assert left.get_legend_handles_labels()[1] == ["a", "b-s{0,1}"]
    assert right.get_legend_handles_labels()[1] == ["a", "c"]
    data, caps, (bars,) = left.containers[1].lines[0], left.containers[1].lines[1], left.containers[1].lines[2]
    assert list(data.get_xdata()) == [0, 1, 2, 4, 8]  # eps 0 = clean
    assert data.get_ydata()[0] == pytest.approx(89.0)  # mean of the two seeds' clean accuracy
    segments = bars.get_segments()
    assert segments[0][1][1] - segments[0][0][1] == pytest.approx(2 * 100 * 0.0141421, rel=1e-3)  # +- one std
    assert figs["train_loss.png"].axes[0].get_legend_handles_labels()[1] == ["a", "b-s{0,1}", "c"]
    assert list(figs["train_loss.png"].axes[0].lines[0].get_ydata()) == [2.0, 1.5, 1.1]


def test_errors_are_one_line(tmp_path, capsys):
    assert main([str(tmp_path / "missing"), "--out", str(tmp_path / "r")]) == 2
    assert "no such run folder" in capsys.readouterr().err
    (tmp_path / "empty").mkdir()
    assert main([str(tmp_path / "empty"), "--out", str(tmp_path / "r")]) == 2
    assert "not a run folder" in capsys.readouterr().err
    a = write_run(tmp_path, "a", method="sat", eval_name="test")
    b = write_run(tmp_path, "b", method="sat", eval_name="val")
    with pytest.raises(CompareError, match="several evaluation sets"):
        pick_eval_name([a, b], None)
    path, runs, notes = compare([a, b], tmp_path / "r", "val")
    assert runs[0]["eval"] is None and runs[1]["eval"] is not None and len(notes) == 1
    (a / "metrics.jsonl").write_text("{not json\n")
    with pytest.raises(CompareError, match="metrics.jsonl:1"):
        load_run(a, "test")


def test_help_prints_the_opening_once(capsys):
    with pytest.raises(SystemExit):
        main(["--help"])
    out = capsys.readouterr().out
    assert out.count("`sat-train compare`: the report over several runs") == 1 and "--eval" in out
