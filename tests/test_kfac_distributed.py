"""Two ranks (torch.distributed, gloo, CPU) with batch B each give the same K-FAC factors and
preconditioned step as one process with batch 2B, on both the eig and the Woodbury path."""

import os

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn

import hooks
from optimizers import KFAC

B = 8


def _model() -> nn.Module:
    torch.manual_seed(0)
    # conv: T = 2B*25 rows > 4 outputs (eig); fc1: T = 2B = 16 <= 32 outputs (Woodbury);
    # fc2: T = 16 > 3 outputs (eig)
    return nn.Sequential(nn.Conv2d(2, 4, 3, padding=1), nn.ReLU(), nn.Flatten(),
                         nn.Linear(4 * 5 * 5, 32), nn.Tanh(), nn.Linear(32, 3)).double()


def _data():
    g = torch.Generator().manual_seed(1)
    return (torch.randn(2 * B, 2, 5, 5, generator=g, dtype=torch.float64),
            torch.randint(0, 3, (2 * B,), generator=g))


def _step(model, x, y, average_grads=False):
    opt = KFAC(model, lr=1.0, momentum=0.0, kl_clip=None, bus=hooks.Bus())
    before = [p.detach().clone() for p in model.parameters()]
    nn.functional.cross_entropy(model(x), y).backward()
    if average_grads:  # what DistributedDataParallel does to the gradients
        for p in model.parameters():
            dist.all_reduce(p.grad)
            p.grad /= dist.get_world_size()
    opt.step()
    delta = [b - p.detach() for b, p in zip(before, model.parameters())]
    factors = {layer.name: (layer.A, layer.G, layer.latest_rows(), layer.inverse_policy)
               for layer in opt.layers}
    return delta, factors


def _worker(rank: int, world: int, init_file: str, out_dir: str) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank,
                            world_size=world)
    try:
        x, y = _data()
        part = slice(rank * B, (rank + 1) * B)
        delta, factors = _step(_model(), x[part], y[part], average_grads=True)
        torch.save({"delta": delta, "factors": factors}, os.path.join(out_dir, f"{rank}.pt"))
    finally:
        dist.destroy_process_group()


@pytest.mark.slow
def test_two_ranks_of_b_equal_one_process_of_2b(tmp_path):
    ctx = mp.get_context("spawn")
    procs = [ctx.Process(target=_worker, args=(r, 2, str(tmp_path / "init"), str(tmp_path)))
             for r in range(2)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(timeout=120)
    assert [p.exitcode for p in procs] == [0, 0]

    x, y = _data()
    delta, factors = _step(_model(), x, y)
    assert [f[3] for f in factors.values()] == ["eig", "woodbury", "eig"]
    for r in range(2):
        got = torch.load(tmp_path / f"{r}.pt", weights_only=True)
        for d_rank, d_one in zip(got["delta"], delta):
            torch.testing.assert_close(d_rank, d_one, rtol=1e-9, atol=1e-12)
        for name, (A, G, U, policy) in factors.items():
            A_r, G_r, U_r, policy_r = got["factors"][name]
            assert policy_r == policy
            torch.testing.assert_close(A_r, A, rtol=1e-10, atol=1e-13)
            if G is not None:
                torch.testing.assert_close(G_r, G, rtol=1e-10, atol=1e-13)
            else:  # the gathered rows: rank 0's then rank 1's, as in the one big batch
                assert U_r.shape == U.shape == (32, 2 * B)
                torch.testing.assert_close(U_r, U, rtol=1e-10, atol=1e-13)
