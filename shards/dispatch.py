"""One console script = a table of sub-commands, each a module with `main(argv) -> int` (`preprocess`,
`sat-train`). Shared here so both scripts print the same usage, the same conventions block and the same
one-line errors."""
from __future__ import annotations

import importlib
import sys
from typing import Callable

from shards.cli import CONVENTIONS


def usage(prog: str, commands: dict) -> str:
    lines = [f"usage: {prog} COMMAND [options]   ({prog} COMMAND --help for its options)", "", "commands:"]
    width = max(map(len, commands))
    lines += [f"  {name:<{width}}  {help_}" for name, (_, help_) in commands.items()]
    return "\n".join(lines + ["", CONVENTIONS])


def dispatch(prog: str, commands: dict, argv: list[str] | None = None,
             before: Callable[[str, list[str]], None] | None = None) -> int:
    """Run `prog COMMAND ARGS`: commands maps a name to (module, one-line help); `before(name, args)` runs
    ahead of the command's import (preprocess starts its forkserver there, before the heavy imports)."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help"):
        print(usage(prog, commands))
        return 0
    name, rest = argv[0], argv[1:]
    if name not in commands:
        print(f"{prog}: unknown command {name!r}\n\n{usage(prog, commands)}", file=sys.stderr)
        return 2
    if before is not None:
        before(name, rest)
    try:
        module = importlib.import_module(commands[name][0])
    except ModuleNotFoundError as e:
        print(f"{prog}: command {name!r} is not available in this install ({e})", file=sys.stderr)
        return 2
    return int(module.main(rest) or 0)
