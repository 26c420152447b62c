"""`sat-train` console script: one sub-command per module, each module owns its own flags.

    sat-train fit --shards shards/fashion-mnist/train --method sat --run runs/sat
    sat-train eval runs/sat --shards shards/fashion-mnist/test
    sat-train compare runs/* --out report/
    sat-train experiment grid.toml

Conventions shared by every command (sat-train and preprocess alike; shards/cli.py implements them):
    inputs are positional (run folders, shard sets; fit's training set is --shards, as in eval);
    what a command writes is --out: eval a results JSON file, compare a report folder, teacher-saliency
    a shard set folder; fit writes its run folder, --run (also spelled --out and, for torchrun, --run-dir).
    --config FILE.toml holds the command's flags as keys (shard_size for --shard-size; JSON is read too);
    flags override it; unknown keys are an error. eps and every pixel budget is in [0, 1] units, written
    8/255 or 0.0314. --progress/--no-progress on every command that draws a bar. A user error is one
    line, `sat-train COMMAND: message`, exit 2.
"""
from __future__ import annotations

import importlib
import sys

COMMANDS = {
    "fit": ("sat_train.fit", "train a model on shards (standard, sat, pgd, trades, fgsm-rs, sat+pgd, sat+trades)"),
    "eval": ("sat_train.evaluate", "robustness of a trained run on evaluation shards"),
    "compare": ("sat_train.compare", "markdown table and plots over several runs"),
    "experiment": ("sat_train.experiment", "run a grid of fits, evaluate and compare them"),
    "teacher-saliency": ("sat_train.teacher", "a shard set whose saliency maps come from a trained teacher model"),
}


def usage() -> str:
    lines = ["usage: sat-train COMMAND [options]   (sat-train COMMAND --help for its options)", "", "commands:"]
    width = max(map(len, COMMANDS))
    lines += [f"  {name:<{width}}  {help_}" for name, (_, help_) in COMMANDS.items()]
    return "\n".join(lines + ["", __doc__.split("\n\n", 2)[2].strip()])


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help"):
        print(usage())
        return 0
    name, rest = argv[0], argv[1:]
    if name not in COMMANDS:
        print(f"sat-train: unknown command {name!r}\n\n{usage()}", file=sys.stderr)
        return 2
    module = importlib.import_module(COMMANDS[name][0])
    return int(module.main(rest) or 0)
