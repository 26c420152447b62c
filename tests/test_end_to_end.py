"""End to end on a small slice of the real Fashion-MNIST: build-shards (foreground, foreground-box) and
shuffle-saliency -> `sat-train experiment` (standard, then SAT on every source including a teacher set
the experiment derives from the standard run; 2 short epochs) -> eval (FGSM, PGD, whole-set clean pass)
-> report. (AutoAttack is left out: its Square stage alone runs 5000 iterations whatever the batch size,
minutes on a CPU; tests/sat_train/test_autoattack.py covers it.) The commands run in-process, as their console scripts call them."""
import json
from pathlib import Path

import pytest

REAL = Path("/usr/share/datasets/fashion-mnist")
pytestmark = pytest.mark.skipif(not (REAL / "train-images-idx3-ubyte.gz").exists(),
                                reason=f"real Fashion-MNIST not installed in {REAL} (`make setup` installs the "
                                       "Debian package dataset-fashion-mnist)")

GRID = """
[experiment]
out = "{out}"
eval_shards = "{test}"
seeds = [0]
eps = ["8/255"]
clean_on_all = true

[sources]
foreground = "{fg}"
box = "{box}"
shuffled = "{shuffled}"
teacher = {{ shards = "{teacher}", teacher = "standard-s0", from = "foreground" }}

[fit]
arch = "tiny-cnn"
epochs = 2
limit_batches = 15
batch_size = 64
optimizer = "adam"
lr = 0.01
sat_final_p = 0.5
loader_backend = "torch"
num_workers = 0

[eval]
limit = 200
eps = ["2/255", "8/255"]
pgd_steps = 5
check_steps = []
l2_eps = []
cw = 0
distortions = false
loader_backend = "torch"

[[runs]]
method = "standard"

[[runs]]
method = "sat"
"""


def test_build_train_eval_report_on_real_fashion_mnist(tmp_path, capsys):
    from preprocess.cli import main as preprocess
    from sat_train.experiment import main as experiment

    s = {name: tmp_path / name for name in ("fg", "box", "shuffled", "teacher", "test")}
    common = ["fashion-mnist", "--shard-size", "500", "--no-progress"]
    assert preprocess(["build-shards", *common, "--split", "train", "--limit", "1000", "--out", str(s["fg"])]) == 0
    assert preprocess(["build-shards", *common, "--split", "train", "--limit", "1000", "--saliency", "foreground-box",
                       "--out", str(s["box"])]) == 0
    assert preprocess(["build-shards", *common, "--split", "test", "--limit", "600", "--out", str(s["test"])]) == 0
    assert preprocess(["shuffle-saliency", str(s["fg"]), "--out", str(s["shuffled"]), "--seed", "0",
                       "--no-progress"]) == 0
    grid = tmp_path / "grid.toml"
    grid.write_text(GRID.format(out=tmp_path / "exp", **{k: str(v) for k, v in s.items()}))
    assert experiment([str(grid)]) == 0
    exp = tmp_path / "exp"
    names = ["standard-s0"] + [f"sat-{src}-eps8_255-s0" for src in ("foreground", "box", "shuffled", "teacher")]
    record = json.loads((exp / "experiment.json").read_text())
    assert [r["name"] for r in record["runs"]] == names  # the teacher's student runs after its teacher
    teacher_manifest = json.loads((s["teacher"] / "manifest.json").read_text())
    assert teacher_manifest["saliency"]["kind"] == "teacher"
    for name in names:
        ev = json.loads((exp / "runs" / name / "eval" / "test.json").read_text())
        assert ev["n"] == 200 and {r["attack"] for r in ev["rows"]} == {"clean", "fgsm", "pgd"}
        assert ev["config"]["autoattack_eps"] == 8 / 255 or name == "standard-s0"
        clean = json.loads((exp / "runs" / name / "eval" / "clean-all" / "test.json").read_text())
        assert clean["n"] == 600 and [r["attack"] for r in clean["rows"]] == ["clean"]
        assert clean["clean_accuracy"] > 0.2  # 30 Adam steps of a tiny CNN: well above chance (10%)
    md = (exp / "report" / "report.md").read_text()
    assert "## Gradient-masking checks" in md and "(n=600)" in md
    for name in names[1:]:
        assert f"| {name} |" in md
    kinds = {g["saliency"]: g["kind"] for g in json.loads((exp / "report" / "report.json").read_text())
             ["groups"]["numbers"]}
    assert kinds["foreground"] == "foreground" and kinds["box"] == "foreground-box"
    assert kinds["teacher"] == "teacher (grad-sign)" and kinds["shuffled"] == "shuffled (foreground)"
    assert (exp / "report" / "accuracy_vs_eps.png").stat().st_size > 5000
    capsys.readouterr()
    # a rerun keeps everything: the teacher set too (same derivation of the same checkpoint)
    assert experiment([str(grid)]) == 0
    status = json.loads((exp / "experiment.json").read_text())["status"]
    assert all(v["fit"].startswith("skipped") and v["eval"].startswith("skipped") for v in status.values())
