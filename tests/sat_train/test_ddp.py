"""DistributedDataParallel with 2 gloo processes started by torchrun: same weights and BatchNorm stats on both ranks."""
import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import torch

from sat_train.checkpoint import load_checkpoint
from sat_train.models import build_model

ROOT = Path(__file__).resolve().parents[2]
WORKER = textwrap.dedent("""
    import sys, torch
    from sat_train import distributed as D
    from sat_train.config import parse_args
    from sat_train.fit import fit
    out = sys.argv[1]
    cfg = parse_args(sys.argv[2:])
    info = D.setup(cfg.device)
    assert info.world_size == 2 and info.backend == "gloo", info
    model, summary = fit(cfg, info, return_model=True)
    torch.save({k: v.detach().clone() for k, v in model.state_dict().items()}, f"{out}/rank{info.rank}.pt")
    D.teardown(info)
""")


def test_two_gloo_processes_end_with_the_same_weights(tiny_shards, tmp_path):
    shards = tiny_shards(num_samples=64, per_shard=16)
    run = tmp_path / "run"
    script = tmp_path / "worker.py"
    script.write_text(WORKER)
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")])))
    # sat+trades: two forwards through DDP per step (TRADES) and the per-batch coin shared by the ranks
    # the documented command line (torchrun == python -m torch.distributed.run), with a worker that keeps
    # each rank's final weights; sat_train.fit.main runs exactly this setup -> fit -> teardown
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", str(script),
           str(tmp_path), "--shards", str(shards), "--run-dir", str(run), "--arch", "tiny-cnn", "--epochs", "1",
           "--batch-size", "8", "--loader-backend", "torch", "--num-workers", "0", "--no-progress", "--device", "cpu",
           "--method", "sat+trades", "--trades-steps", "2", "--lr", "0.05"]
    proc = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "Warning" not in proc.stderr, proc.stderr[-3000:]  # a multi-GPU log holds only the run's lines
    w0, w1 = torch.load(tmp_path / "rank0.pt"), torch.load(tmp_path / "rank1.pt")
    assert w0.keys() == w1.keys() and any("running_mean" in k for k in w0)  # BatchNorm buffers included
    for k in w0:
        assert torch.equal(w0[k], w1[k]), k
    # training moved the weights, rank 0's checkpoint holds them, and each rank saw half of the 64 samples
    ckpt = load_checkpoint(run)
    assert all(torch.equal(ckpt["model"][k], w0[k]) for k in w0)
    row = json.loads((run / "metrics.jsonl").read_text().splitlines()[0])
    assert row["images"] == 64 and sum(row["perturbations"].values()) == 4  # 32 per rank / batch 8
    torch.manual_seed(0)  # fit's seed: the initial weights
    init = dict(build_model("tiny-cnn", 4, 3, 16).named_parameters())
    assert not torch.equal(init["body.0.weight"], w0["body.0.weight"])
