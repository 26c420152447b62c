"""`sat-train experiment`: a tiny real grid (fit -> eval -> compare in one command), rerun skips, bad grids."""
import json

from sat_train.experiment import main, plan

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
eps = [2, 8]
pgd_steps = 3
check_steps = [1]
l2_eps = []
cw = 0
distortions = false
batch_size = 32
loader_backend = "torch"
"""


def write_grid(tmp_path, train_a, train_b, test, extra=""):
    grid = tmp_path / "grid.toml"
    grid.write_text(f"""
[experiment]
out = "{tmp_path / 'exp'}"
eval_shards = "{test}"
methods = ["standard", "sat"]
seeds = [0]
{extra}
[experiment.saliency]
masks = "{train_a}"
boxes = "{train_b}"
""" + FIT + EVAL)
    return grid


def test_grid_runs_fit_eval_compare_and_rerun_skips(tiny_shards, tmp_path, capsys):
    a = tiny_shards(num_samples=32, size=16, channels=3, num_classes=4, seed=0)
    b = tiny_shards(num_samples=32, size=16, channels=3, num_classes=4, seed=5)
    test = tiny_shards(num_samples=24, size=16, channels=3, num_classes=4, seed=1, split="test")
    grid = write_grid(tmp_path, a, b, test)
    _, runs, _ = plan(grid)
    # standard ignores saliency: one run; sat: one run per saliency source
    assert [r.name for r in runs] == ["standard-s0", "sat-masks-s0", "sat-boxes-s0"]
    assert main([str(grid)]) == 0
    exp = tmp_path / "exp"
    md = (exp / "report" / "report.md").read_text()
    for name in ("standard-s0", "sat-masks-s0", "sat-boxes-s0"):
        assert f"| {name} |" in md
        result = json.loads((exp / "runs" / name / "eval" / f"{test.name}.json").read_text())
        assert result["n"] == 24 and result["config"]["eps"] == [2, 8]
        assert (exp / "runs" / name / "summary.json").exists()
    assert "| sat-masks-s0 | sat | masks |" in md
    assert (exp / "report" / "accuracy_vs_eps.png").exists() and (exp / "report" / "train_loss.png").exists()
    record = json.loads((exp / "experiment.json").read_text())
    assert all(s["fit"] == "trained" and s["eval"] == "evaluated" for s in record["status"].values())
    capsys.readouterr()
    # a second call keeps the finished work and only rebuilds the report
    assert main([str(grid)]) == 0
    record = json.loads((exp / "experiment.json").read_text())
    assert all(s["fit"].startswith("skipped") and s["eval"].startswith("skipped") for s in record["status"].values())
    assert "report:" in capsys.readouterr().out


def test_bad_grids_are_one_line_errors(tiny_shards, tmp_path, capsys):
    a = tiny_shards(num_samples=16, size=16, channels=3, num_classes=4)
    grid = write_grid(tmp_path, a, a, a, extra='colour = "blue"')
    assert main([str(grid)]) == 2
    assert "unknown [experiment] key(s) colour" in capsys.readouterr().err
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
    assert main([str(tmp_path / "none.toml")]) == 2
    assert "no such grid file" in capsys.readouterr().err
    assert not (tmp_path / "exp" / "runs").exists()  # nothing ran
