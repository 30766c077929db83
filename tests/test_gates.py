"""The gate callables of probe.gates: one real training step, checked against numpy."""

import numpy as np
import pytest
import torch
from torch import nn

import hooks
from probe.gates import probed_step_callable, step_callable, synchronized
from tests.helpers import Recorder


def _linear_problem():
    torch.manual_seed(0)
    model = nn.Linear(5, 3).double()
    x = torch.randn(8, 5, dtype=torch.float64)
    y = torch.randn(8, 3, dtype=torch.float64)
    return model, x, y


def test_step_callable_does_one_sgd_step_like_numpy():
    model, x, y = _linear_problem()
    w, b = model.weight.detach().numpy().copy(), model.bias.detach().numpy().copy()
    lr = 0.1
    step = step_callable(model, torch.optim.SGD(model.parameters(), lr=lr), x, y,
                         loss_fn=nn.functional.mse_loss)
    step()
    xn, yn = x.numpy(), y.numpy()
    r = xn @ w.T + b - yn  # mse_loss averages over all N * out elements
    gw, gb = 2 * r.T @ xn / r.size, 2 * r.sum(0) / r.size
    np.testing.assert_allclose(model.weight.detach().numpy(), w - lr * gw, rtol=1e-12)
    np.testing.assert_allclose(model.bias.detach().numpy(), b - lr * gb, rtol=1e-12)
    assert all(p.grad is None for p in model.parameters())  # zero_grad ran


def test_probed_step_callable_attaches_a_probe_that_sees_each_step():
    model, x, y = _linear_problem()
    rec = Recorder()
    step, p = probed_step_callable(model, torch.optim.SGD(model.parameters(), lr=0.1), x, y,
                                   loss_fn=nn.functional.mse_loss, every=1, collectors=[rec],
                                   bus=hooks.Bus())
    try:
        step()
        step()
    finally:
        p.close()
    steps = {e.step for e in rec.events if e.topic == "grad/norm"}
    assert len(steps) == 2
    assert rec.closed


@pytest.mark.parametrize("bad,match", [
    (dict(model="m"), "model"), (dict(optimizer=object()), "optimizer"),
    (dict(inputs=[1.0]), "inputs"), (dict(loss_fn=3), "loss_fn"),
])
def test_step_callable_rejects_bad_arguments(bad, match):
    model, x, y = _linear_problem()
    kw = dict(model=model, optimizer=torch.optim.SGD(model.parameters(), lr=0.1), inputs=x,
              targets=y, loss_fn=nn.functional.mse_loss)
    kw.update(bad)
    with pytest.raises(ValueError, match=match):
        step_callable(**kw)


def test_synchronized_is_the_callable_itself_off_cuda():
    def f():
        return None

    assert synchronized(f, None) is f
    assert synchronized(f, "cpu") is f
    with pytest.raises(ValueError, match="fn"):
        synchronized(3, "cpu")


@pytest.mark.cuda
def test_cuda_step_returns_with_the_device_work_done():
    torch.manual_seed(0)
    dev = torch.device("cuda")
    model = nn.Sequential(nn.Linear(2048, 2048), nn.ReLU(), nn.Linear(2048, 10)).to(dev)
    x, y = torch.randn(4096, 2048, device=dev), torch.randint(0, 10, (4096,), device=dev)
    step = step_callable(model, torch.optim.AdamW(model.parameters()), x, y)
    for _ in range(3):
        step()
        # the timed region must cover the kernels: nothing left queued on the stream
        assert torch.cuda.current_stream(dev).query()
    a = torch.randn(4096, 4096, device=dev)
    synchronized(lambda: [a @ a for _ in range(8)], dev)()
    assert torch.cuda.current_stream(dev).query()
