"""`sat-train compare` on run folders with known numbers: the table carries them, plots hold every run."""
import json

import pytest

from sat_train.compare import CompareError, compare, load_run, main, make_figures, pick_eval_name

EPS = [1, 2, 4, 8]


def write_run(root, name, *, method, saliency="gt-masks", seed=0, clean=0.9, drop=0.1, aa=None, evaluate=True,
              eval_name="test", losses=(2.0, 1.5, 1.1)):
    run = root / name
    (run / "checkpoints").mkdir(parents=True)
    (run / "config.json").write_text(json.dumps({"method": method, "seed": seed, "arch": "cnn4"}))
    (run / "metrics.jsonl").write_text("".join(json.dumps({"epoch": i, "loss": v, "epoch_time_s": 10.0,
                                                           "images_per_s": 500.0}) + "\n"
                                               for i, v in enumerate(losses)))
    (run / "summary.json").write_text(json.dumps({"method": method, "saliency_source": saliency, "arch": "cnn4",
                                                  "train_time_s": 30.0 + seed, "images_per_s": 512.0}))
    if evaluate:
        rows = [{"attack": "clean", "norm": None, "eps": None, "eps_255": None, "level": None, "params": {},
                 "n": 100, "accuracy": clean, "time_s": 0.1}]
        rows += [{"attack": "pgd", "norm": "linf", "eps": e / 255, "eps_255": e, "level": None,
                  "params": {"steps": 20}, "n": 100, "accuracy": round(clean - drop * e, 4), "time_s": 1.0}
                 for e in EPS]
        rows.append({"attack": "pgd", "norm": "linf", "eps": 8 / 255, "eps_255": 8, "level": None,
                     "params": {"steps": 5}, "n": 100, "accuracy": 0.99, "time_s": 0.3})  # sweep row: not in table
        if aa is not None:
            rows.append({"attack": "autoattack", "norm": "linf", "eps": 8 / 255, "eps_255": 8, "level": None,
                         "params": {"stages": {}}, "n": 50, "accuracy": aa, "time_s": 9.0})
        rows += [{"attack": "low-pass", "norm": None, "eps": None, "eps_255": None, "level": s, "params": {},
                  "n": 100, "accuracy": 0.5, "time_s": 0.1} for s in (1.0, 2.0)]
        (run / "eval").mkdir()
        (run / "eval" / f"{eval_name}.json").write_text(json.dumps({
            "rows": rows, "clean_accuracy": clean, "config": {"pgd_steps": 20},
            "sanity": {"passed": True, "warnings": []}}))
    return run


def test_report_table_and_plots_contain_every_run(tmp_path, capsys):
    runs = [write_run(tmp_path, "std", method="standard", clean=0.92, drop=0.1),
            write_run(tmp_path, "sat-s0", method="sat", seed=0, clean=0.9, drop=0.05, aa=0.41),
            write_run(tmp_path, "sat-s1", method="sat", seed=1, clean=0.88, drop=0.05, aa=0.43),
            write_run(tmp_path, "pgd", method="pgd", clean=0.85, drop=0.02, evaluate=False)]
    out = tmp_path / "report"
    assert main([*map(str, runs), "--out", str(out)]) == 0
    md = (out / "report.md").read_text()
    table = [line for line in md.splitlines() if line.startswith("| ")]
    header = table[0]
    for col in ["method", "saliency source", "clean", "PGD 1/255", "PGD 8/255", "AutoAttack 8/255", "train time (s)",
                "images/s"]:
        assert col in header
    for name in ("std", "sat-s0", "sat-s1", "pgd"):
        assert any(line.startswith(f"| {name} |") for line in table), name
    sat0 = next(line for line in table if line.startswith("| sat-s0 |")).split(" | ")
    assert sat0[1:3] == ["sat", "gt-masks"] and "90.00" in sat0 and "50.00" in sat0 and "41.00 (n=50)" in sat0[-4]
    std = next(line for line in table if line.startswith("| std |")).split(" | ")
    assert std[2] == "-"  # standard training does not use saliency
    assert "12.00" in std  # 0.92 - 8 * 0.1, the 20-step row (the 5-step sweep row is not a column)
    assert "99.00" not in md
    assert "| sat | gt-masks | 2 | 89.00 ± 1.41 |" in md  # mean +- std over the two SAT seeds
    assert "pgd: no evaluation on test" in md and "Natural distortions" in md
    for png in ("accuracy_vs_eps.png", "train_loss.png", "distortions.png"):
        data = (out / png).read_bytes()
        assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 5000
        assert f"![{png}]({png})" in md
    report = json.loads((out / "report.json").read_text())
    assert [r["name"] for r in report["runs"]] == ["std", "sat-s0", "sat-s1", "pgd"]
    assert "report:" in capsys.readouterr().out
    assert not list(out.glob(".*tmp*"))


def test_figures_have_one_line_per_run(tmp_path):
    runs = [load_run(write_run(tmp_path, n, method=m), "test") for n, m in [("a", "standard"), ("b", "sat"), ("c", "pgd")]]
    figs = make_figures(runs)
    for name in ("accuracy_vs_eps.png", "train_loss.png"):
        labels = figs[name].axes[0].get_legend_handles_labels()[1]
        assert labels == ["a", "b", "c"]
    eps_line = figs["accuracy_vs_eps.png"].axes[0].lines[1]
    assert list(eps_line.get_xdata()) == [0, 1, 2, 4, 8]  # eps 0 = clean
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
