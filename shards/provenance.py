"""Which software made an artifact: the version stamp and the provenance block of shard sets, runs and reports.

    from shards.provenance import provenance, satpipe_version
    provenance() -> {"satpipe": "0.1.0",
                     "git": {"commit": "6a43758...", "dirty": true} | null,
                     "python": "3.11.9",
                     "packages": {"torch": "2.13.0+cpu", "nvidia-dali-cuda130": "2.4.0", "numba": "0.68.1",
                                  "opencv-python-headless": "5.0.0.93", "pycocotools": "2.0.11", "numpy": "2.4.1"}}

Where it is recorded: a shard set's `provenance.json` beside its manifest (written just before the
manifest; not part of the set's identity, so two builds of the same config stay byte-identical in
every file the readers and the resume logic compare), a run's `summary.json` and every checkpoint
(`provenance`), and a report (`provenance_lines` for markdown, `provenance()` for JSON).

`git` is filled only when satpipe runs from a git checkout (an editable install): the commit of
the checkout and whether tracked files had uncommitted changes (`git status --porcelain
--untracked-files=no`, bounded by a short timeout). An installed copy gets null, never the commit of
some repository that merely contains the virtual environment. Versions are read from the installed
distributions' metadata (importlib.metadata), so nothing heavy is imported to learn its version.
Computed once per process: everything a process writes names the same software.
"""
from __future__ import annotations

import functools
import importlib.metadata as metadata
import platform
import subprocess
from pathlib import Path

from shards.format import PROVENANCE_NAME

GIT_TIMEOUT_S = 3.0
# distribution names per component: the first one installed is recorded (DALI's name carries its CUDA)
PACKAGES = {
    "torch": ("torch",),
    "dali": ("nvidia-dali-cuda130", "nvidia-dali-cuda120", "nvidia-dali-cuda110", "nvidia-dali"),
    "numba": ("numba",),
    "opencv": ("opencv-python-headless", "opencv-python", "opencv-contrib-python-headless", "opencv-contrib-python"),
    "pycocotools": ("pycocotools",),
    "numpy": ("numpy",),
}
UNKNOWN_VERSION = "0+unknown"


def satpipe_version() -> str:
    """The installed distribution's version (`0+unknown` when satpipe runs from a folder without being
    installed). The one version stamp of manifests, runs, checkpoints and reports."""
    try:
        return metadata.version("satpipe")
    except metadata.PackageNotFoundError:
        return UNKNOWN_VERSION


def package_versions() -> dict[str, str]:
    """{distribution name: version} of the libraries that decide the bytes and numbers we produce."""
    out = {}
    for names in PACKAGES.values():
        for name in names:
            try:
                out[name] = metadata.version(name)
                break
            except metadata.PackageNotFoundError:
                continue
    return out


def _git(root: Path, *args: str) -> str | None:
    try:
        r = subprocess.run(["git", "-C", str(root), *args], capture_output=True, text=True, timeout=GIT_TIMEOUT_S,
                           stdin=subprocess.DEVNULL)
    except (OSError, subprocess.SubprocessError):  # no git, or it hangs (a network file system)
        return None
    return r.stdout.strip() if r.returncode == 0 else None


def git_state(package_root: Path | None = None) -> dict | None:
    """{"commit", "dirty"} of the checkout satpipe runs from, or None when it is not one."""
    root = (package_root or Path(__file__).resolve().parent.parent).resolve()
    top = _git(root, "rev-parse", "--show-toplevel")
    if top is None or Path(top).resolve() != root:  # an install inside some other repository: not ours
        return None
    if _git(root, "ls-files", "--error-unmatch", "shards/format.py") is None:  # not a satpipe checkout
        return None
    commit = _git(root, "rev-parse", "HEAD")
    if commit is None:
        return None
    status = _git(root, "status", "--porcelain", "--untracked-files=no")
    return {"commit": commit, "dirty": None if status is None else bool(status)}


@functools.lru_cache(maxsize=1)
def _cached() -> dict:
    return {"satpipe": satpipe_version(), "git": git_state(), "python": platform.python_version(),
            "packages": package_versions()}


def provenance() -> dict:
    """The provenance block (a fresh copy; computed once per process)."""
    import copy

    return copy.deepcopy(_cached())


def describe(prov: dict | None) -> str:
    """`satpipe 0.1.0, git 6a43758 (uncommitted changes), python 3.11.9; torch 2.13.0+cpu, ...` (one line)."""
    if not prov:
        return "not recorded"
    git = prov.get("git")
    dirty = {True: " (uncommitted changes)", False: "", None: " (state unknown)"}
    where = f"git {str(git.get('commit'))[:12]}{dirty.get(git.get('dirty'), '')}" if git else "not a git checkout"
    libs = ", ".join(f"{k} {v}" for k, v in (prov.get("packages") or {}).items())
    return f"satpipe {prov.get('satpipe')}, {where}, python {prov.get('python')}; {libs}"


def provenance_lines(prov: dict | None = None) -> list[str]:
    """Markdown lines for a report (sat_train/compare.py's report.md)."""
    return [f"Made by {describe(prov or provenance())}."]


def read_provenance(folder) -> dict | None:
    """A shard set's provenance.json (local folder or URL), or None for sets built before it existed."""
    import json

    from shards.format import ShardFormatError
    from shards.storage import location, open_binary

    try:
        with open_binary(location(folder) / PROVENANCE_NAME) as f:
            prov = json.loads(f.read())
    except (OSError, ValueError, ShardFormatError):
        return None
    return prov if isinstance(prov, dict) else None


def write_provenance(folder, prov: dict | None = None) -> Path:
    """Write FOLDER/provenance.json atomically (a shard set's; readers ignore it)."""
    from shards.storage import atomic_write_json

    return atomic_write_json(Path(folder) / PROVENANCE_NAME, prov or provenance())
