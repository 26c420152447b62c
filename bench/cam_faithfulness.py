"""Faithfulness of the Grad-CAM family by teacher and CAM layer (issue 11's deletion check).

    python bench/cam_faithfulness.py                     # Adam teachers of 120, 400, 1200 steps + the recipe's
    python bench/cam_faithfulness.py --steps 120 --layers auto body.11 --recipe-epochs 0

Teachers, all cnn4 on the first 1700 real Fashion-MNIST train images, the next 96 held out:
  - plain Adam (2e-3, batches of 32, no augmentation) for each of --steps: the teacher the faithfulness
    test trained before 2026-12-02;
  - the README's recipe, `sat-train fit --method standard` (SGD, weight decay, random crop and flip) for
    --recipe-epochs epochs: the teacher the test trains now.
For every CAM
explainer and layer: the mean drop of the true class's probability when the 20% most salient pixels are
set to 0 (the background), against 20% random pixels and against the same maps misplaced onto other
images (sat_train.explain.deletion_check). Layers: `auto` (the last block: cnn4's final max-pool, 7x7
at 28 px) and `body.11` (cnn4's last conv layer after its ReLU, 14x14). Not a speed benchmark: no
baseline ratio; it records the figures the README's teacher section quotes. Writes
bench/results/cam_faithfulness.md.
"""
from __future__ import annotations

import argparse
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).parent))
from teacher import build_shards, load_images, train_teacher as fit_teacher  # noqa: E402  (bench/teacher.py's)

from sat_train.checkpoint import load_model  # noqa: E402
from sat_train.explain import ExplainConfig, deletion_check, explain  # noqa: E402
from sat_train.models import build_model  # noqa: E402
from shards.storage import atomic_write_bytes  # noqa: E402

RESULTS = Path(__file__).parent / "results" / "cam_faithfulness.md"
CAM_EXPLAINERS = ("gradcam", "gradcam++", "guided-gradcam++")


def train_adam_teacher(x, y, steps: int):
    """cnn4, Adam 2e-3, `steps` batches of 32 from the first 1700 images, no augmentation."""
    torch.manual_seed(0)
    model = build_model("cnn4", 10, 1, 28)
    opt = torch.optim.Adam(model.parameters(), 2e-3)
    draw = torch.Generator().manual_seed(0)
    for _ in range(steps):
        i = torch.randint(0, 1700, (32,), generator=draw)
        loss = F.cross_entropy(model(x[i]), y[i])
        opt.zero_grad()
        loss.backward()
        opt.step()
    return model.eval().requires_grad_(False)


def train_recipe_teacher(work: Path, epochs: int):
    """`sat-train fit --method standard` for `epochs` on the first 1700 train images (the test's teacher)."""
    run = fit_teacher(work, build_shards(work, "train", 1700), epochs=epochs, limit_batches=0)
    return load_model(run)[0].eval().requires_grad_(False)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--steps", type=int, nargs="+", default=[120, 400, 1200], help="Adam teachers' training lengths")
    ap.add_argument("--recipe-epochs", type=int, default=12, help="epochs of the recipe's teacher (0: none)")
    ap.add_argument("--layers", nargs="+", default=["auto", "body.11"], help="CAM layers (module names)")
    ap.add_argument("--work", default=None, help="where the shard slices and the run go (default: a temp folder)")
    args = ap.parse_args(argv)
    lines = ["| teacher | held-out acc | layer | explainer | 20% most salient | 20% random | salient masks misplaced "
             "| salient > random |", "|---|---:|---|---|---:|---:|---:|---|"]
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(args.work or tmp)
        x, y, _ = load_images(build_shards(work, "train", 1796), "cpu")  # the first 1700 train, 96 held out
        held_x, held_y = x[1700:], y[1700:]
        teachers = [(f"Adam, {steps} steps", lambda steps=steps: train_adam_teacher(x, y, steps)) for steps in args.steps]
        if args.recipe_epochs:
            teachers.append((f"sat-train fit, {args.recipe_epochs} epochs",
                             lambda: train_recipe_teacher(work, args.recipe_epochs)))
        for label, make in teachers:
            model = make()
            acc = float((model(held_x).argmax(1) == held_y).float().mean())
            for layer in args.layers:
                for name in CAM_EXPLAINERS:
                    maps = explain(model, held_x, held_y, ExplainConfig(explainer=name, cam_layer=layer),
                                   keys=[str(i) for i in range(len(held_x))])
                    d = deletion_check(model, held_x, held_y, maps)
                    row = (f"| {label} | {100 * acc:.1f}% | {layer} | {name} | {d['salient']:.3f} | {d['random']:.3f} "
                           f"| {d['misaligned']:.3f} | {'yes' if d['salient'] > d['random'] else 'no'} |")
                    print(row, flush=True)
                    lines.append(row)
    command = " ".join(["python bench/cam_faithfulness.py", *(sys.argv[1:] if argv is None else argv)])
    text = (f"# bench/cam_faithfulness.py\n\n`{command}` on {time.strftime('%Y-%m-%d', time.gmtime())}, "
            f"{platform.machine()} CPU, {os.cpu_count()} cores"
            f" ({len(held_x)} held-out Fashion-MNIST train images; one seed (0) per teacher; true-class probability "
            "drop when 20% of the pixels are set to 0; random: mean of 5 draws)\n\n" + "\n".join(lines) + "\n")
    print(text)
    atomic_write_bytes(RESULTS, text.encode())
    return 0


if __name__ == "__main__":
    sys.exit(main())
