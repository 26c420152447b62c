"""`sat-train experiment`: a tiny real grid (fit -> eval -> compare in one command), reuse only of work
whose config matches, the [[runs]] / eps / sources grid format, bad grids."""
import json

import pytest
import torch

from sat_train.experiment import config_changes, fit_runtime, main, plan

FIT = """
[fit]
epochs = 1
arch = "tiny-cnn"
batch_size = 16
num_workers = 0
loader_backend = "torch"
optimizer = "adam"
lr = 0.01
"""
EVAL = """
[eval]
eps = ["2/255", "8/255"]
pgd_steps = 3
check_steps = [1]
l2_eps = []
cw = 0
distortions = false
batch_size = 32
loader_backend = "torch"
"""


def write_grid(tmp_path, train_a, train_b, test, extra="", fit=FIT):
    grid = tmp_path / "grid.toml"
    grid.write_text(f"""
[experiment]
out = "{tmp_path / 'exp'}"
eval_shards = "{test}"
methods = ["standard", "sat"]
seeds = [0]
{extra}
[sources]
masks = "{train_a}"
boxes = "{train_b}"
""" + fit + EVAL)
    return grid


def status(tmp_path):
    return json.loads((tmp_path / "exp" / "experiment.json").read_text())["status"]


def test_grid_runs_fit_eval_compare_and_reruns_only_what_changed(tiny_shards, tmp_path, capsys):
    a = tiny_shards(num_samples=32, size=16, channels=3, num_classes=4, seed=0)
    b = tiny_shards(num_samples=32, size=16, channels=3, num_classes=4, seed=5)
    test = tiny_shards(num_samples=24, size=16, channels=3, num_classes=4, seed=1, split="test")
    grid = write_grid(tmp_path, a, b, test)
    # standard ignores saliency: one run; sat: one run per saliency source
    assert [r.name for r in plan(grid).runs] == ["standard-s0", "sat-masks-s0", "sat-boxes-s0"]
    assert main([str(grid)]) == 0
    exp = tmp_path / "exp"
    md = (exp / "report" / "report.md").read_text()
    for name in ("standard-s0", "sat-masks-s0", "sat-boxes-s0"):
        assert f"| {name} |" in md
        result = json.loads((exp / "runs" / name / "eval" / f"{test.name}.json").read_text())
        assert result["n"] == 24 and result["config"]["eps"] == [2 / 255, 8 / 255] and len(result["checkpoint"]["sha256"]) == 64
    assert "| sat-masks-s0 | sat | masks |" in md
    assert (exp / "report" / "accuracy_vs_eps.png").exists() and (exp / "report" / "train_loss.png").exists()
    assert all(s["fit"] == "trained" and s["eval"] == "evaluated" for s in status(tmp_path).values())
    capsys.readouterr()

    # a second call keeps the finished work; a new checkpoint (same config) keeps its fit, redoes its eval
    ckpt_path = exp / "runs" / "sat-boxes-s0" / "checkpoints" / "last.pt"
    ckpt = torch.load(ckpt_path, weights_only=True)
    first = next(k for k, v in ckpt["model"].items() if v.is_floating_point())
    ckpt["model"][first] = ckpt["model"][first] + 0.01
    torch.save(ckpt, ckpt_path)
    assert main([str(grid)]) == 0
    st = status(tmp_path)
    assert all(s["fit"].startswith("skipped") for s in st.values())
    assert st["sat-boxes-s0"]["eval"] == "evaluated"
    assert st["sat-masks-s0"]["eval"].startswith("skipped") and st["standard-s0"]["eval"].startswith("skipped")
    out = capsys.readouterr().out
    assert "== eval sat-boxes-s0: the checkpoint changed since it was evaluated" in out and "report:" in out

    # runtime fields (progress, workers, loader) do not make a run stale
    grid.write_text(grid.read_text().replace("num_workers = 0", "num_workers = 1\nprogress = false"))
    assert main([str(grid), "--dry-run"]) == 0
    assert capsys.readouterr().out.count(": done (finished earlier with the same config)") == 3

    # lr edited in [fit]: every run is retrained from scratch (not resumed) and says why
    grid.write_text(grid.read_text().replace("lr = 0.01", "lr = 0.02"))
    assert main([str(grid), "--dry-run"]) == 0
    assert "fit sat-masks-s0: retrain (config changed since it was trained: lr 0.01 -> 0.02)" in capsys.readouterr().out
    assert main([str(grid)]) == 0
    st = status(tmp_path)
    assert all(s["fit"] == "retrained" and s["eval"] == "evaluated" for s in st.values())
    out = capsys.readouterr().out
    assert "== fit standard-s0: retraining from scratch (config changed since it was trained: lr 0.01 -> 0.02)" in out
    for name in st:
        assert json.loads((exp / "runs" / name / "config.json").read_text())["lr"] == 0.02
    record = json.loads((exp / "experiment.json").read_text())
    assert all(r["fit"]["lr"] == 0.02 for r in record["runs"])



def test_config_changes_ignores_runtime_fields_and_fills_defaults():
    saved = {"lr": 0.1, "progress": True, "milestones": [0.5, 0.75]}
    planned = {"lr": 0.1, "progress": False, "milestones": (0.5, 0.75), "sat_tau": 10.0}
    assert config_changes(saved, planned, {"progress"}, defaults={"sat_tau": 10.0}) == []
    assert config_changes(saved, {**planned, "sat_tau": 2.0}, {"progress"}, defaults={"sat_tau": 10.0}) == \
        ["sat_tau 10.0 -> 2.0"]
    assert config_changes(saved, planned, set()) == ["progress True -> False", "sat_tau '(unset)' -> 10.0"]
    runtime = fit_runtime()
    assert {"progress", "num_workers", "loader_backend", "device", "run", "shards"} <= runtime
    assert not {"epochs", "lr", "seed", "method", "eps", "sat_final_p", "arch"} & runtime


STUDY = """
[experiment]
out = "{out}"
eval_shards = "{test}"
seeds = [0, 1]
eps = ["8/255", 0.1]
autoattack_seeds = [0]
[sources]
fg = "{a}"
shuffled = "{b}"
teacher = {{ shards = "{out}/teacher", teacher = "standard-s0", from = "fg" }}
[fit]
epochs = 3
sat_final_p = 0.9
pgd_alpha = "eps/2"
[eval]
eps = ["2/255", "8/255", "25.5/255"]
autoattack = 10
[[runs]]
method = "sat"
[[runs]]
method = "standard"
[[runs]]
methods = ["pgd", "fgsm-rs"]
seeds = [0]
eps = [0.1]
fit = {{ pgd_steps = 2 }}
[[runs]]
method = "sat"
sources = ["fg", "shuffled"]
seeds = [0]
eps = ["8/255"]
tag = "p0.25"
fit = {{ sat_final_p = 0.25 }}
eval = {{ autoattack = 0 }}
"""


def test_plan_blocks_eps_axis_names_and_derived_sources_last(tiny_shards, tmp_path):
    a, b, test = tiny_shards(num_samples=16), tiny_shards(num_samples=16, seed=3), tiny_shards(num_samples=16, seed=1)
    grid = tmp_path / "study.toml"
    grid.write_text(STUDY.format(out=tmp_path / "exp", test=test, a=a, b=b))
    g = plan(grid)
    names = [r.name for r in g.runs]
    assert names[:4] == ["sat-fg-eps8_255-s0", "sat-fg-eps8_255-s1", "sat-fg-eps0.1-s0", "sat-fg-eps0.1-s1"]
    assert "standard-s0" in names and "standard-s1" in names and not any(n.startswith("standard-eps") for n in names)
    assert {"pgd-eps0.1-s0", "fgsm-rs-eps0.1-s0", "sat-fg-p0.25-eps8_255-s0", "sat-shuffled-p0.25-eps8_255-s0"} <= set(names)
    assert len(names) == 3 * 2 * 2 + 2 + 2 + 2
    # a run on a derived source declared before its teacher run moves to just after it (not to the end,
    # so a long grid reaches the teacher's students early); the other runs keep the grid's order
    teacher_runs = [n for n in names if n.startswith("sat-teacher-")]
    i = names.index("standard-s0")
    assert names[i + 1:i + 1 + len(teacher_runs)] == teacher_runs and len(teacher_runs) == 4
    assert names[i + 1 + len(teacher_runs)] == "standard-s1"
    by = {r.name: r for r in g.runs}
    r = by["sat-fg-eps0.1-s1"]
    assert r.fit_values["eps"] == 0.1 and r.eval_values["autoattack_eps"] == 0.1 and r.train_shards == str(a)
    assert by["sat-fg-eps8_255-s0"].eval_values["autoattack_eps"] == 8 / 255
    assert by["pgd-eps0.1-s0"].fit_values["pgd_steps"] == 2 and by["pgd-eps0.1-s0"].train_shards == str(a)
    assert by["pgd-eps0.1-s0"].fit_values["pgd_alpha"] == pytest.approx(0.05)  # "eps/2" of each run's eps
    assert by["sat-fg-eps8_255-s0"].fit_values["pgd_alpha"] == pytest.approx(4 / 255)
    assert by["sat-fg-p0.25-eps8_255-s0"].fit_values["sat_final_p"] == 0.25
    assert by["sat-fg-p0.25-eps8_255-s0"].eval_values["autoattack"] == 0 and by["sat-fg-eps8_255-s0"].eval_values["autoattack"] == 10
    assert by["sat-fg-eps8_255-s0"].fit_values["sat_final_p"] == 0.9
    assert by["standard-s0"].eps is None and "autoattack_eps" not in by["standard-s0"].eval_values
    assert by["sat-fg-eps0.1-s0"].eval_values["autoattack"] == 10 and by["sat-fg-eps0.1-s1"].eval_values["autoattack"] == 0
    assert main([str(grid), "--dry-run"]) == 0


@pytest.mark.parametrize("good, bad, message", [
    ('eps = ["2/255", "8/255", "25.5/255"]', 'eps = ["2/255", "8/255"]', "must include the training eps 0.1"),
    ('eps = ["2/255", "8/255", "25.5/255"]', 'eps = [2, 8, 25.5]', "eps = 2 is over 1"),
    ('sources = ["fg", "shuffled"]', 'sources = ["fg", "nope"]', "unknown source(s) nope"),
    ('tag = "p0.25"', 'tag = ""', "planned twice"),
    ('teacher = "standard-s0"', 'teacher = "standard-s7"', "is not a run of this grid"),
    ('from = "fg"', 'from = "teacher"', "must name a source on disk"),
    ('eps = ["8/255", 0.1]', 'eps = ["8/256", 0.1]', "neither"),
    ('methods = ["pgd", "fgsm-rs"]', 'methods = ["pgd", "fgsm-rs"]\nsources = ["fg"]', "uses no saliency"),
    ('fit = { pgd_steps = 2 }', 'fit = { pgd_steps = 2, eps = 0.3 }', "fit must not set eps"),
    ('method = "standard"', 'method = "standard"\ncolour = 1', "unknown key(s) colour"),
    ('sat_final_p = 0.9', 'sat_final_p = 1.5', "sat_final_p=1.5"),
    ('eval = { autoattack = 0 }', 'eval = { autoattack = -1 }', "autoattack and limit must be >= 0"),
    ('pgd_alpha = "eps/2"', 'pgd_alpha = "eps/two"', "pgd_alpha = 'eps/two' is not a valid float"),
])
def test_bad_study_grids_name_the_problem(tiny_shards, tmp_path, capsys, good, bad, message):
    a = tiny_shards(num_samples=16)
    text = STUDY.format(out=tmp_path / "exp", test=a, a=a, b=a)
    assert good in text
    grid = tmp_path / "study.toml"
    grid.write_text(text.replace(good, bad, 1))
    assert main([str(grid), "--dry-run"]) == 2
    err = capsys.readouterr().err
    assert message in err and len(err.strip().splitlines()) == 1


def test_bad_grids_are_one_line_errors(tiny_shards, tmp_path, capsys):
    a = tiny_shards(num_samples=16, size=16, channels=3, num_classes=4)
    grid = write_grid(tmp_path, a, a, a, extra='colour = "blue"')
    assert main([str(grid)]) == 2
    assert "[experiment]: unknown key(s) colour" in capsys.readouterr().err
    grid = write_grid(tmp_path, a, a, a)
    grid.write_text(grid.read_text().replace("epochs = 1", "epochz = 1"))
    assert main([str(grid), "--dry-run"]) == 2
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1 and "epochz" in err
    grid.write_text(grid.read_text().replace("epochz = 1", "epochs = 1\nmethod = \"pgd\""))
    assert main([str(grid)]) == 2
    assert "[fit] must not set method" in capsys.readouterr().err
    grid.write_text(grid.read_text().replace('method = "pgd"', "").replace("pgd_steps = 3", "pgd_steps = 0"))
    assert main([str(grid)]) == 2
    assert "PGD steps" in capsys.readouterr().err
    grid.write_text(grid.read_text().replace("pgd_steps = 0", "pgd_steps = 3").replace(str(a), str(tmp_path / "gone"), 1))
    assert main([str(grid)]) == 2
    assert "gone/manifest.json: no shard set" in capsys.readouterr().err
    assert main([str(tmp_path / "none.toml")]) == 2
    assert "no such grid file" in capsys.readouterr().err
    assert not (tmp_path / "exp" / "runs").exists()  # nothing ran


def test_help_prints_the_opening_once(capsys):
    with pytest.raises(SystemExit):
        main(["--help"])
    out = capsys.readouterr().out
    assert out.count("`sat-train experiment`: a grid of runs") == 1 and "[[runs]]" in out
