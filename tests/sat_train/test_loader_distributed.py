"""Two real processes (gloo, torchrun-style environment) read disjoint parts that cover the set."""
import json
import os
import socket
import subprocess
import sys
import textwrap

WORKER = textwrap.dedent("""
    import json, os, sys
    import torch.distributed as dist
    from sat_train.loader import LoaderError, make_loader

    root, out = sys.argv[1], sys.argv[2]
    dist.init_process_group("gloo", init_method="env://")  # RANK, WORLD_SIZE, MASTER_* from the environment
    result = {}
    for backend in ("dali", "torch", "device"):
        for name, kw in (("train", dict(train=True, drop_last=False)), ("train_drop", dict(train=True)),
                         ("eval", dict(train=False))):
            workers = 0 if backend == "device" else 1  # device: the one-off decode in-process (no worker start)
            loader = make_loader(root, 8, backend=backend, device="cpu", num_workers=workers, with_keys=True, **kw)
            for epoch in (0, 1):
                loader.set_epoch(epoch)
                batches = [keys for x, s, y, keys in loader]
                result[f"{backend}/{name}/{epoch}"] = {"keys": [k for b in batches for k in b], "batches": len(batches),
                                                       "len": len(loader), "num_samples": loader.num_samples}
    try:
        make_loader(root, 64, train=True, backend="dali", device="cpu")  # 35 per rank < one batch of 64
        result["too_few"] = None
    except LoaderError as e:
        result["too_few"] = str(e)
    gathered = [None] * dist.get_world_size()
    dist.all_gather_object(gathered, result)  # also proves both ranks got here: no hang
    if dist.get_rank() == 0:
        with open(out, "w") as f:
            json.dump(gathered, f)
    dist.destroy_process_group()
""")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_two_ranks_cover_every_sample_exactly_once_per_epoch(tiny_shards, tmp_path):
    root = tiny_shards(num_samples=70, per_shard=16)  # 5 shards, the last one short
    script, out = tmp_path / "worker.py", tmp_path / "result.json"
    script.write_text(WORKER)
    env_base = {**os.environ, "WORLD_SIZE": "2", "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(free_port()),
                "OMP_NUM_THREADS": "1"}
    procs = [subprocess.Popen([sys.executable, str(script), str(root), str(out)],
                              env={**env_base, "RANK": str(r), "LOCAL_RANK": str(r)},
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True) for r in range(2)]
    logs = [p.communicate(timeout=180)[0] for p in procs]
    assert [p.returncode for p in procs] == [0, 0], "\n".join(log[-2000:] for log in logs)
    r0, r1 = json.loads(out.read_text())
    everything = sorted(f"s{i:06d}" for i in range(70))
    for backend in ("dali", "torch", "device"):
        for epoch in ("0", "1"):
            a, b = r0[f"{backend}/train/{epoch}"], r1[f"{backend}/train/{epoch}"]
            assert not set(a["keys"]) & set(b["keys"])  # disjoint
            assert sorted(a["keys"] + b["keys"]) == everything  # together: every sample exactly once
            assert a["batches"] == b["batches"] == a["len"] == 5  # 35 each -> same number of steps
            da, db = r0[f"{backend}/train_drop/{epoch}"], r1[f"{backend}/train_drop/{epoch}"]
            assert da["batches"] == db["batches"] == 4 and len(set(da["keys"] + db["keys"])) == 64
            ea, eb = r0[f"{backend}/eval/{epoch}"], r1[f"{backend}/eval/{epoch}"]
            assert ea["keys"] + eb["keys"] == everything  # eval: in order, contiguous halves
        assert r0[f"{backend}/train/0"]["keys"] != r0[f"{backend}/train/1"]["keys"]  # reshuffled per epoch
    for r in (r0, r1):  # one plan for every backend
        for name in ("train/0", "train/1", "train_drop/1", "eval/0"):
            assert r[f"dali/{name}"]["keys"] == r[f"torch/{name}"]["keys"] == r[f"device/{name}"]["keys"]
    for r in (r0, r1):
        assert r["too_few"] and "rank 0 would get 35 sample(s) and no batch" in r["too_few"]
