"""DDP and FSDP2 (``torch.distributed.fsdp.fully_shard``) on 2 gloo ranks on CPU.

Each rank trains on its half of the same global batches; DDP averages the gradients and FSDP2
reduce-scatters them, so every step equals a single-process step on the whole batch. The
probe's per-parameter norms must be that single process's: global norms of the full
(unsharded) parameters and gradients, with ``reduce=None`` and with ``reduce="mean"``.
One spawn runs every phase; each phase records its result or its error."""

import json
import os
import socket
import sys
import time
import traceback
from datetime import timedelta

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn

from tests.compat import harness as h

STEPS = 3
WORLD = 2
REL, ABS = 1e-4, 1e-5  # an all-reduced float32 gradient against one computed whole


def even_mlp() -> nn.Module:  # every dim 0 divides by 2: FSDP2 shards it evenly
    return nn.Sequential(nn.Linear(6, 8), nn.Tanh(), nn.Linear(8, 4))


def even_batch(step: int) -> tuple:
    return h.batch(step, d_out=4)


def uneven_mlp() -> nn.Module:  # the last layer's 3 rows split 2 + 1
    return nn.Sequential(nn.Linear(6, 8), nn.Tanh(), nn.Linear(8, 3))


MODELS = {"even": (even_mlp, even_batch), "uneven": (uneven_mlp, h.batch)}


def _adamw(params) -> torch.optim.Optimizer:
    return torch.optim.AdamW(params, lr=1e-2, weight_decay=0.1)


def _full(t: torch.Tensor) -> list:
    t = t.detach()
    if hasattr(t, "full_tensor"):
        t = t.full_tensor()
    return t.reshape(-1).tolist()


def _strip(name: str | None) -> str | None:
    return name[len("module."):] if name and name.startswith("module.") else name


def _zero(params) -> torch.optim.Optimizer:
    from torch.distributed.optim import ZeroRedundancyOptimizer

    return ZeroRedundancyOptimizer(params, optimizer_class=torch.optim.AdamW, lr=1e-2,
                                   weight_decay=0.1)


def _phase(rank: int, wrap, make_model, data, reduce, probed: bool, make_opt=None) -> dict:
    import probe

    torch.manual_seed(0)
    model = wrap(make_model())
    opt = (make_opt or _adamw)(model.parameters())
    rec = h.Recorder()
    out: dict = {"error": None}
    p = None
    try:
        if probed:
            p = probe.attach(opt, model=model, every=1, collectors=[rec], reduce=reduce)
        for s in range(STEPS):
            x, y = data(s)
            half = slice(rank * len(x) // WORLD, (rank + 1) * len(x) // WORLD)
            opt.zero_grad()
            (model(x[half]) - y[half]).square().mean().backward()
            opt.step()
    except Exception as exc:
        out["error"] = f"{type(exc).__name__}: {exc}".splitlines()[0][:300]
        out["where"] = [f"{os.path.relpath(f.filename)}:{f.lineno}"
                        for f in traceback.extract_tb(exc.__traceback__)][-3:]
    finally:
        if p is not None:
            try:
                p.close()
            except Exception as exc:  # a crashed step may leave DTensors pending
                out.setdefault("close_error", f"{type(exc).__name__}: {exc}"[:300])
            out["steps"] = p.step
    out["params"] = {_strip(n): _full(t) for n, t in model.named_parameters()}
    out["stats"] = {f"{s}|{topic}|{_strip(name) or ''}": v
                    for (s, topic, name), v in h.probed_values(rec).items()}
    return out


def _worker(rank: int, port: int, root: str) -> None:
    os.environ["OPTPROBE_STRICT_TOPICS"] = "1"
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank,
                            world_size=WORLD, timeout=timedelta(seconds=30))
    results: dict = {}

    def save():
        with open(os.path.join(root, f"rank{rank}.json"), "w") as f:
            json.dump(results, f)

    from torch.nn.parallel import DistributedDataParallel as DDP

    for mode in ("plain", None, "mean"):
        results[f"ddp/{mode}"] = _phase(rank, DDP, even_mlp, even_batch, mode, mode != "plain")
        save()
    for mode in ("plain", None):  # ZeRO-1: each rank steps its share, then broadcasts
        results[f"zero/{mode}"] = _phase(rank, DDP, even_mlp, even_batch, mode,
                                         mode != "plain", make_opt=_zero)
        save()
    try:
        from torch.distributed.device_mesh import init_device_mesh
        from torch.distributed.fsdp import fully_shard

        mesh = init_device_mesh("cpu", (WORLD,))
    except Exception as exc:
        results["fsdp/unavailable"] = f"{type(exc).__name__}: {exc}"[:300]
        save()
    else:
        def shard(model):
            for layer in model:
                if isinstance(layer, nn.Linear):
                    fully_shard(layer, mesh=mesh)
            return fully_shard(model, mesh=mesh)

        for shape, (make_model, data) in MODELS.items():
            for mode in ("plain", None, "mean"):
                results[f"fsdp-{shape}/{mode}"] = _phase(rank, shard, make_model, data, mode,
                                                         mode != "plain")
                save()
    dist.barrier()
    dist.destroy_process_group()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def ranks(tmp_path_factory):
    if not dist.is_available() or not dist.is_gloo_available():
        pytest.skip("torch.distributed with gloo is not built")
    root = str(tmp_path_factory.mktemp("ddp_fsdp"))
    ctx = mp.start_processes(_worker, args=(_free_port(), root), nprocs=WORLD, join=False,
                             start_method="spawn")
    deadline = time.time() + 150
    try:
        while not ctx.join(timeout=1):
            if time.time() > deadline:
                break
    except mp.ProcessRaisedException as exc:
        print(exc, file=sys.stderr)
    finally:
        for proc in ctx.processes:
            if proc.is_alive():
                proc.kill()
    out = []
    for r in range(WORLD):
        path = os.path.join(root, f"rank{r}.json")
        out.append(json.load(open(path)) if os.path.exists(path) else {})
    return out


@pytest.fixture(scope="module")
def single():
    """The single-process runs on the whole batches: float64 references per step."""
    return {shape: h.train(make, _adamw_of, probed=False, data=data)
            for shape, (make, data) in MODELS.items()}


def _adamw_of(model: nn.Module) -> torch.optim.Optimizer:
    return _adamw(model.parameters())


def _result(ranks, key: str) -> list[dict]:
    res = [r.get(key) for r in ranks]
    if any(r is None for r in res):
        unavailable = next((r.get("fsdp/unavailable") for r in ranks
                            if r.get("fsdp/unavailable")), None)
        if unavailable and key.startswith("fsdp"):
            pytest.skip(f"FSDP2 unavailable on CPU/gloo: {unavailable}")
        pytest.fail(f"phase {key} did not finish on every rank (hang or crash of a rank)")
    for r, one in enumerate(res):
        if one["error"]:
            msg = f"rank {r}: {one['error']} at {one.get('where')}"
            if one["error"].startswith("RuntimeError"):
                raise RuntimeError(msg)
            pytest.fail(msg)
    return res


def _check_global(res: list[dict], run: h.Run) -> None:
    bad = []
    for r, one in enumerate(res):
        assert one["steps"] == STEPS
        for s, ref in enumerate(run.refs):
            for (topic, name), want in ref.items():
                have = one["stats"].get(f"{s}|{topic}|{name or ''}")
                if have is None or not h.close(have, want, REL, ABS):
                    bad.append(f"rank {r} step {s} {topic}[{name or 'total'}]: "
                               f"probe {have}, want {want:.7g}")
    assert not bad, f"{len(bad)} statistics differ:\n" + "\n".join(bad[:12])


def _check_unchanged(plain: list[dict], probed: list[dict]) -> None:
    for r in range(WORLD):
        assert probed[r]["params"] == plain[r]["params"], f"rank {r}: parameters differ"
    assert plain[0]["params"] == plain[1]["params"]


@pytest.mark.parametrize("reduce", [None, "mean"], ids=["reduce=None", "reduce=mean"])
def test_ddp_training_is_unchanged(ranks, reduce):
    _check_unchanged(_result(ranks, "ddp/plain"), _result(ranks, f"ddp/{reduce}"))


@pytest.mark.parametrize("reduce", [None, "mean"], ids=["reduce=None", "reduce=mean"])
def test_ddp_norms_are_the_single_process_norms(ranks, single, reduce):
    _check_global(_result(ranks, f"ddp/{reduce}"), single["even"])


def test_zero_redundancy_optimizer_training_is_unchanged(ranks):
    _check_unchanged(_result(ranks, "zero/plain"), _result(ranks, "zero/None"))


def test_zero_redundancy_optimizer_norms_are_the_single_process_norms(ranks, single):
    _check_global(_result(ranks, "zero/None"), single["even"])


@pytest.mark.parametrize("reduce", [None, "mean"], ids=["reduce=None", "reduce=mean"])
def test_fsdp2_training_is_unchanged(ranks, reduce):
    _check_unchanged(_result(ranks, "fsdp-even/plain"), _result(ranks, f"fsdp-even/{reduce}"))


@pytest.mark.parametrize("reduce", [None, "mean"], ids=["reduce=None", "reduce=mean"])
def test_fsdp2_norms_are_global_norms_of_the_unsharded_params(ranks, single, reduce):
    _check_global(_result(ranks, f"fsdp-even/{reduce}"), single["even"])


def test_fsdp2_uneven_shards_training_is_unchanged(ranks):
    _check_unchanged(_result(ranks, "fsdp-uneven/plain"), _result(ranks, "fsdp-uneven/None"))


def test_fsdp2_uneven_shards_norms_are_global_norms(ranks, single):
    _check_global(_result(ranks, "fsdp-uneven/None"), single["uneven"])
