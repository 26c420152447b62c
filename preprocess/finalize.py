"""Assemble manifest.json from the build state; `preprocess finalize DIR` for multi-node builds.

    preprocess finalize shards/coco/train

Each node of `build-shards --num-nodes K --node-rank R` writes its shards and sidecars into the
same (shared or later merged) folder; finalize checks that every planned shard is present and
intact, then writes the manifest. A single-node build calls the same `write_manifest`, so both
paths give byte-identical manifests. `provenance.json` (shards/provenance.py: satpipe version, git
commit, library versions) is written just before the manifest.
"""
from __future__ import annotations

import sys
from pathlib import Path

from shards.cli import CommandParser
from shards.format import FORMAT_NAME, FORMAT_VERSION, MANIFEST_NAME
from shards.provenance import satpipe_version, write_provenance
from shards.storage import atomic_write_json, is_url
from preprocess.plan import BuildError, read_json, shard_done, state_dir, ShardPlan

MAX_EXAMPLES = 5  # skipped ids kept per reason in the manifest (all are counted)


def merge_counts(parts: list[dict]) -> tuple[dict, dict]:
    """Sum {read, written, skipped{reason: n}, saliency_kinds{kind: n}} dicts in order; examples kept
    deterministically."""
    read = written = 0
    skipped: dict[str, int] = {}
    kinds: dict[str, int] = {}
    examples: dict[str, list] = {}
    for p in parts:
        read += p["counts"]["read"]
        written += p["counts"]["written"]
        for reason, n in p["counts"]["skipped"].items():
            skipped[reason] = skipped.get(reason, 0) + n
        for kind, n in p["counts"].get("saliency_kinds", {}).items():  # (plan-time skips have none)
            kinds[kind] = kinds.get(kind, 0) + n
        for reason, ex in p.get("examples", {}).items():
            room = MAX_EXAMPLES - len(examples.setdefault(reason, []))
            examples[reason].extend(ex[:max(room, 0)])
    counts = {"read": read, "written": written, "skipped": dict(sorted(skipped.items())),
              "saliency_kinds": dict(sorted(kinds.items()))}
    return counts, dict(sorted(examples.items()))


def saliency_block(header_saliency: dict, kinds: dict[str, int], written: int) -> dict:
    """The manifest's `saliency`: `kind` is what the samples' maps really show, one kind or `mixed`
    (counts.saliency_kinds has the numbers); `requested` what the build asked for (`auto` resolved
    from what the source *may* have). `unknown` when shards from a satpipe that did not count kinds
    were resumed into this build."""
    requested = header_saliency.get("requested", header_saliency.get("kind"))
    kind = "unknown" if sum(kinds.values()) != written else next(iter(kinds)) if len(kinds) == 1 else "mixed"
    rest = {k: v for k, v in header_saliency.items() if k not in ("kind", "requested")}
    return {"kind": kind, "requested": requested, **rest}


def collect(out: Path, header: dict, names: list[str]) -> tuple[list[dict], list[str]]:
    """Sidecars of all planned shards in order, plus one problem line per missing/damaged shard."""
    sides, problems = [], []
    for n, name in enumerate(names):
        side = shard_done(out, ShardPlan(n, name, []), header["plan"])
        if side is None:
            problems.append(f"{out / (name + '.tar')}: missing, damaged or from another build")
        else:
            sides.append(side)
    return sides, problems


def write_manifest(out: Path, header: dict, sides: list[dict]) -> dict:
    counts, examples = merge_counts([{"counts": header["plan_skips"], "examples": header["plan_examples"]}] + sides)
    if counts["read"] != counts["written"] + sum(counts["skipped"].values()):
        raise BuildError(f"{out}: counts do not add up ({counts}); this is a satpipe bug", code=1)
    if counts["written"] == 0:
        summary = ", ".join(f"{r}: {n}" for r, n in counts["skipped"].items())
        raise BuildError(f"{out}: no sample could be built ({counts['read']} read; skipped {summary})", code=1)
    manifest = {
        "format": FORMAT_NAME, "format_version": FORMAT_VERSION, "satpipe_version": satpipe_version(),
        "source": header["config"]["source"], "split": header["config"]["split"],
        "plan": header["plan"], "config": header["config"], "config_digest": header["config_digest"],
        "fingerprint": header["fingerprint"], "classes": header["classes"], "image": header["image"],
        "saliency": saliency_block(header["saliency"], counts["saliency_kinds"], counts["written"]),
        "shards": [s["shard"] for s in sides if s["shard"] is not None],
        "counts": counts, "skip_examples": examples,
    }
    write_provenance(out)  # which software assembled the set; beside the manifest, not part of its identity
    atomic_write_json(out / MANIFEST_NAME, manifest)
    return manifest


def summary_line(out: Path, manifest: dict) -> str:
    c = manifest["counts"]
    skipped = sum(c["skipped"].values())
    reasons = "".join(f"; {r}: {n}" for r, n in c["skipped"].items())
    return (f"{out}: {c['written']} samples in {len(manifest['shards'])} shards "
            f"(read {c['read']}, skipped {skipped}{reasons})")


def finalize(out: Path) -> dict:
    header = read_json(state_dir(out) / "plan.json")
    if header is None:
        raise BuildError(f"{out}: no build state ({state_dir(out) / 'plan.json'} missing); run build-shards first")
    sides, problems = collect(out, header, header["shard_names"])
    if problems:
        raise BuildError(f"{out}: {len(problems)} of {len(header['shard_names'])} shards not ready "
                         f"(a node not finished?):\n  " + "\n  ".join(problems), code=1)
    return write_manifest(out, header, sides)


def build_parser() -> CommandParser:
    ap = CommandParser("preprocess finalize", __doc__)
    ap.add_argument("dir", help="output folder that every node wrote into")
    return ap


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if is_url(args.dir):  # only --num-nodes builds need finalize, and those write to a shared folder
        print(f"preprocess finalize: {args.dir}: a build to a URL writes its own manifest (multi-node builds to "
              "object storage use --executor ray)", file=sys.stderr)
        return 2
    try:
        manifest = finalize(Path(args.dir))
    except BuildError as e:
        print(f"preprocess finalize: {e}", file=sys.stderr)
        return e.code
    print(summary_line(Path(args.dir), manifest))
    return 0
