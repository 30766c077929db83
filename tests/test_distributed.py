"""torch.distributed: rank tags, per-rank files, cross-rank reductions, no deadlock (2 gloo
processes on CPU)."""

import json
import os
import socket
import time
from datetime import timedelta

import numpy as np
import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn

from dashboards import read_events

STEPS, EVERY, NAN_STEP = 6, 2, 3


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _worker(rank: int, port: int, root: str) -> None:
    os.environ["OPTPROBE_STRICT_TOPICS"] = "1"
    import hooks
    import probe

    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank,
                            world_size=2, timeout=timedelta(seconds=30))
    local = {}
    lonely = torch.optim.SGD(nn.Linear(2, 2).parameters(), lr=0.1)
    try:  # different sampling periods would hang the first reduction: both ranks refuse
        probe.attach(lonely, every=2 + rank, reduce="mean", collectors=[], bus=hooks.Bus())
    except ValueError as exc:
        local["mismatch"] = str(exc)
    for reduce in ("mean", "max"):
        torch.manual_seed(0)
        model = nn.Sequential(nn.Linear(5, 4), nn.Tanh(), nn.Linear(4, 3))
        opt = torch.optim.SGD(model.parameters(), lr=0.1)
        # the ranks listen differently: rank 1 skips histograms and logs an extra topic
        with probe.attach(opt, model=model, logdir=os.path.join(root, reduce), every=EVERY,
                          bus=hooks.Bus(), reduce=reduce, on_nonfinite="skip",
                          histograms=rank == 0) as p:
            for s in range(STEPS):
                g = torch.Generator().manual_seed(100 * rank + s)
                model(torch.randn(8, 5, generator=g)).square().mean().backward()
                if rank == 1 and s == NAN_STEP:
                    model[2].weight.grad[0, 0] = float("nan")  # rank 1 alone skips a step
                local[f"{reduce}/{s}"] = {n: float(np.linalg.norm(t.grad.numpy()))
                                          for n, t in model.named_parameters()}
                opt.step()
                opt.zero_grad()
                if rank == 1 and s == NAN_STEP:
                    p.log("user/rank1_only", 1.0)
    with open(os.path.join(root, f"local-rank{rank}.json"), "w") as f:
        json.dump(local, f)
    dist.barrier()
    dist.destroy_process_group()


@pytest.mark.skipif(not dist.is_available(), reason="torch.distributed not built")
def test_two_gloo_ranks_tag_write_reduce_and_never_deadlock(tmp_path):
    root = str(tmp_path)
    ctx = mp.start_processes(_worker, args=(_free_port(), root), nprocs=2, join=False,
                             start_method="spawn")
    deadline = time.time() + 90
    try:
        while not ctx.join(timeout=1):
            assert time.time() < deadline, "ranks deadlocked"
    finally:
        for proc in ctx.processes:
            if proc.is_alive():
                proc.kill()
    local = [json.load(open(tmp_path / f"local-rank{r}.json")) for r in (0, 1)]
    for r in (0, 1):
        assert local[r]["mismatch"].startswith("every must be the same on every rank")
    for reduce in ("mean", "max"):
        run = tmp_path / reduce
        files = sorted(os.listdir(run))
        assert "events-rank0.jsonl" in files and "events-rank1.jsonl" in files
        assert "events.jsonl" not in files
        assert len([f for f in files if f.startswith("events.out.tfevents")]) == 1  # rank 0
        recs = {}
        for r in (0, 1):
            recs[r] = read_events(run / f"events-rank{r}.jsonl")[0]
            assert recs[r] and all(e["tags"]["rank"] == str(r) for e in recs[r])
        for r in (0, 1):
            got = {(e["step"], e["tags"]["param"]): e["value"] for e in recs[r]
                   if e["topic"] == "grad/norm" and e["tags"].get("param")}
            assert sorted({s for s, _ in got}) == list(range(0, STEPS, EVERY))
            for (s, name), value in got.items():
                assert e_tags_reduced(recs[r], s, name) == reduce
                a, b = local[0][f"{reduce}/{s}"][name], local[1][f"{reduce}/{s}"][name]
                want = (a + b) / 2 if reduce == "mean" else max(a, b)
                assert value == pytest.approx(want, rel=1e-5), (reduce, r, s, name)
        named = [(e["step"], e["tags"]["param"]) for e in recs[1]
                 if e["topic"] == "anomaly/nonfinite" and e["tags"].get("param")]
        assert named == [(NAN_STEP, "2.weight")]
        assert not [e for e in recs[0] if e["topic"] == "anomaly/nonfinite" and e["value"]]
        assert [e["step"] for e in recs[1] if e["topic"] == "user/rank1_only"] == [NAN_STEP]


def e_tags_reduced(records, step, name):
    (rec,) = [e for e in records if e["topic"] == "grad/norm" and e["step"] == step
              and e["tags"].get("param") == name]
    return rec["tags"].get("reduced")
