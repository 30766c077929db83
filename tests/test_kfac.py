"""The KFAC optimizer: preconditioned steps against dense scipy solves with factors built
independently in numpy (manual backprop, numpy im2col), telemetry against numpy's eigvalsh,
state_dict checks, argument validation."""

import copy
import io

import numpy as np
import pytest
import scipy.linalg
import torch
from torch import nn

import hooks
from optimizers import KFAC
from optimizers.kfac import choose_policy
from tests.helpers import Recorder

D = 1e-2  # damping in the reference tests: large enough to matter, small enough to test


def _kfac(model, **kw):
    args = dict(lr=1.0, momentum=0.0, kl_clip=None, max_condition=None, damping=D,
                bus=hooks.Bus())
    args.update(kw)
    return KFAC(model, **args)


def _eig_reference(V, A, G, d=D):
    F = np.kron(G, A) + d * np.eye(G.shape[0] * A.shape[0])
    return scipy.linalg.solve(F, V.ravel(), assume_a="pos").reshape(V.shape)


def _factored_reference(V, A, G, d=D):
    pi = np.sqrt((np.trace(A) / A.shape[0]) / (np.trace(G) / G.shape[0]))
    dA, dG = pi * np.sqrt(d), np.sqrt(d) / pi
    F = np.kron(G + dG * np.eye(G.shape[0]), A + dA * np.eye(A.shape[0]))
    return scipy.linalg.solve(F, V.ravel(), assume_a="pos").reshape(V.shape)


# path -> (KFAC arguments, dense reference): the low-rank path with exact damping is the eig
# path's step; with factored damping it is the factored Kronecker solve
PATHS = {"eig": (dict(policy="eig"), _eig_reference),
         "woodbury": (dict(policy="woodbury"), _eig_reference),
         "woodbury-factored": (dict(policy="woodbury", woodbury_damping="factored"),
                               _factored_reference)}


def _step_delta(model, opt, loss_fn):
    before = [p.detach().clone() for p in model.parameters()]
    loss = loss_fn()
    loss.backward()
    opt.step()
    return [b - p.detach() for b, p in zip(before, model.parameters())]  # = lr * direction


# -- Linear: a two-layer MLP, factors and gradients by manual backprop in numpy -----------

def _mlp_data(n=6):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(5, 7), nn.Tanh(), nn.Linear(7, 3)).double()
    x = torch.randn(n, 5, dtype=torch.float64)
    t = torch.randn(n, 3, dtype=torch.float64)
    return model, x, t


def _mlp_reference(model, x, t):
    W1, b1 = model[0].weight.detach().numpy(), model[0].bias.detach().numpy()
    W2, b2 = model[2].weight.detach().numpy(), model[2].bias.detach().numpy()
    x, t = x.numpy(), t.numpy()
    n = x.shape[0]
    h = np.tanh(x @ W1.T + b1)
    y = h @ W2.T + b2
    e2 = y - t                        # per-sample dℓ/dy for ℓ = ½‖y - t‖² (loss = mean ℓ)
    e1 = (e2 @ W2) * (1 - h ** 2)     # per-sample dℓ/dz1
    a1 = np.hstack([x, np.ones((n, 1))])
    a2 = np.hstack([h, np.ones((n, 1))])
    layers = []
    for a, e in ((a1, e1), (a2, e2)):
        A, G, V = a.T @ a / n, e.T @ e / n, e.T @ a / n
        layers.append((A, G, V))
    return layers


@pytest.mark.parametrize("path", sorted(PATHS))
def test_linear_step_equals_dense_kronecker_solve(path):
    model, x, t = _mlp_data()
    refs = _mlp_reference(model, x, t)
    kwargs, reference = PATHS[path]
    policy = kwargs["policy"]
    opt = _kfac(model, **kwargs)
    delta = _step_delta(model, opt, lambda: 0.5 * ((model(x) - t) ** 2).sum(1).mean())
    for k, (A, G, V) in enumerate(refs):
        ng = reference(V, A, G)
        got = torch.cat([delta[2 * k], delta[2 * k + 1][:, None]], 1).numpy()
        np.testing.assert_allclose(got, ng, rtol=1e-7, atol=1e-10)
    assert [layer.inverse_policy for layer in opt.layers] == [policy, policy]


def test_linear_sequence_input_rows_are_tokens():
    """[B, L, in] inputs: every position is a row of A; G sums over a sample's positions and
    averages over the B samples (KFAC-expand), its rows scaled by the batch size B."""
    torch.manual_seed(1)
    lin = nn.Linear(4, 3).double()
    x = torch.randn(2, 5, 4, dtype=torch.float64)
    t = torch.randn(2, 5, 3, dtype=torch.float64)
    opt = _kfac(lin, policy="eig")
    W, b = lin.weight.detach().numpy().copy(), lin.bias.detach().numpy().copy()
    delta = _step_delta(lin, opt, lambda: 0.5 * ((lin(x) - t) ** 2).sum(-1).sum(-1).mean())
    xs, ts = x.reshape(-1, 4).numpy(), t.reshape(-1, 3).numpy()
    e = xs @ W.T + b - ts  # B * dL/dy per row, L = mean over the batch of B = 2
    a = np.hstack([xs, np.ones((10, 1))])
    A, G, V = a.T @ a / 10, e.T @ e / 2, e.T @ a / 2
    got = torch.cat([delta[0], delta[1][:, None]], 1).numpy()
    np.testing.assert_allclose(got, _eig_reference(V, A, G), rtol=1e-7, atol=1e-10)
    assert opt.layers[0].tokens == 10


# -- Conv2d: numpy im2col --------------------------------------------------------------------

def _im2col(x, k, stride, pad, mode, dil=1):
    n, c, h, w = x.shape
    xp = np.pad(x, ((0, 0), (0, 0), pad[0], pad[1]), mode=mode)
    ext = dil * (k - 1) + 1
    ho = (xp.shape[2] - ext) // stride + 1
    wo = (xp.shape[3] - ext) // stride + 1
    rows = [xp[i, :, r * stride:r * stride + ext:dil, s * stride:s * stride + ext:dil].ravel()
            for i in range(n) for r in range(ho) for s in range(wo)]
    return np.array(rows), ho, wo


@pytest.mark.parametrize("path", sorted(PATHS))
@pytest.mark.parametrize("cfg", [
    dict(stride=1, padding=1, padding_mode="zeros", np_pad=((1, 1), (1, 1)), mode="constant"),
    dict(stride=2, padding=0, padding_mode="zeros", np_pad=((0, 0), (0, 0)), mode="constant"),
    dict(stride=1, padding=1, padding_mode="reflect", np_pad=((1, 1), (1, 1)), mode="reflect"),
    dict(stride=1, padding="same", padding_mode="zeros", np_pad=((1, 1), (1, 1)),
         mode="constant"),
    dict(stride=1, padding=(2, 1), padding_mode="zeros", np_pad=((2, 2), (1, 1)),
         mode="constant", dilation=2),
    dict(stride=1, padding="same", padding_mode="zeros", np_pad=((2, 2), (2, 2)),
         mode="constant", dilation=2),
])
def test_conv2d_step_equals_dense_kronecker_solve(path, cfg):
    torch.manual_seed(2)
    dil = cfg.get("dilation", 1)
    conv = nn.Conv2d(2, 3, 3, stride=cfg["stride"], padding=cfg["padding"], dilation=dil,
                     padding_mode=cfg["padding_mode"]).double()
    x = torch.randn(4, 2, 5, 5, dtype=torch.float64)
    with torch.no_grad():
        t = torch.randn_like(conv(x))
    W = conv.weight.detach().numpy().reshape(3, -1)
    b = conv.bias.detach().numpy()
    rows, ho, wo = _im2col(x.numpy(), 3, cfg["stride"], cfg["np_pad"], cfg["mode"], dil)
    a = np.hstack([rows, np.ones((rows.shape[0], 1))])
    y = a @ np.hstack([W, b[:, None]]).T                       # [N*L, out]
    e = y - t.numpy().transpose(0, 2, 3, 1).reshape(-1, 3)     # N * dL/dy per position
    T, N = a.shape[0], 4
    A, G, V = a.T @ a / T, e.T @ e / N, e.T @ a / N  # KFAC-expand: G sums over positions
    kwargs, reference = PATHS[path]
    opt = _kfac(conv, **kwargs)
    delta = _step_delta(conv, opt, lambda: 0.5 * ((conv(x) - t) ** 2).sum((1, 2, 3)).mean())
    got = torch.cat([delta[0].reshape(3, -1), delta[1][:, None]], 1).numpy()
    np.testing.assert_allclose(got, reference(V, A, G), rtol=1e-7, atol=1e-10)
    assert opt.layers[0].tokens == T == 4 * ho * wo


def test_layer_without_bias_has_no_ones_column():
    torch.manual_seed(3)
    lin = nn.Linear(4, 3, bias=False).double()
    x, t = torch.randn(5, 4, dtype=torch.float64), torch.randn(5, 3, dtype=torch.float64)
    opt = _kfac(lin, policy="eig")
    W0 = lin.weight.detach().numpy().copy()
    delta = _step_delta(lin, opt, lambda: 0.5 * ((lin(x) - t) ** 2).sum(1).mean())
    xs = x.numpy()
    e = xs @ W0.T - t.numpy()
    ref = _eig_reference(e.T @ xs / 5, xs.T @ xs / 5, e.T @ e / 5)
    np.testing.assert_allclose(delta[0].numpy(), ref, rtol=1e-7, atol=1e-10)
    assert opt.layers[0].A.shape == (4, 4)


# -- the update rule on top: KL clip, momentum, decoupled weight decay, SGD elsewhere -----

def test_kl_clip_momentum_and_weight_decay():
    model, x, t = _mlp_data()
    refs = _mlp_reference(model, x, t)
    lr, mom, wd, kl = 0.3, 0.9, 0.1, 1e-4
    opt = _kfac(model, policy="eig", lr=lr, momentum=mom, weight_decay=wd, kl_clip=kl)
    p0 = [p.detach().clone() for p in model.parameters()]
    loss = 0.5 * ((model(x) - t) ** 2).sum(1).mean()
    loss.backward()
    opt.step()
    ngs = [_eig_reference(V, A, G) for A, G, V in refs]
    vg = sum(float((ng * V).sum()) for ng, (_, _, V) in zip(ngs, refs)) * lr ** 2
    nu = min(1.0, np.sqrt(kl / vg))
    assert nu < 1.0  # the clip is active in this test
    for k, ng in enumerate(ngs):
        W0, b0 = p0[2 * k].numpy(), p0[2 * k + 1].numpy()
        W = W0 * (1 - lr * wd) - lr * nu * ng[:, :-1]
        b = b0 * (1 - lr * wd) - lr * nu * ng[:, -1]
        np.testing.assert_allclose(model[2 * k].weight.detach().numpy(), W, rtol=1e-9)
        np.testing.assert_allclose(model[2 * k].bias.detach().numpy(), b, rtol=1e-9)
    # second step: the momentum buffer holds the first direction
    buf = opt.state[model[0].weight]["momentum_buffer"]
    np.testing.assert_allclose(buf.numpy(), nu * ngs[0][:, :-1], rtol=1e-9)


def test_skipped_and_unsupported_layers_get_plain_sgd():
    torch.manual_seed(4)
    model = nn.Sequential(nn.Conv2d(2, 4, 3, groups=2), nn.Flatten(), nn.Linear(4 * 9, 6),
                          nn.BatchNorm1d(6), nn.Linear(6, 2)).double()
    opt = _kfac(model, skip=["4"])
    assert [layer.name for layer in opt.layers] == ["2"]
    assert opt.excluded == {"0": "grouped convolution (groups=2)", "4": "in skip"}
    x = torch.randn(8, 2, 5, 5, dtype=torch.float64)
    loss = model(x).square().mean()
    loss.backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters()}
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    opt.step()
    for n, p in model.named_parameters():
        if not n.startswith("2."):
            torch.testing.assert_close(p.detach(), before[n] - grads[n], rtol=0, atol=1e-14)
        else:
            assert not torch.allclose(p.detach(), before[n] - grads[n])
    assert KFAC(model, skip=[nn.Conv2d, model[4]], bus=hooks.Bus()).excluded["0"] == "in skip"


def test_factors_only_in_training_mode_and_every_factor_every_steps():
    model, x, t = _mlp_data()
    opt = _kfac(model, policy="eig", factor_every=3, lr=0.0)
    seen = []
    for step in range(7):
        model.train(step != 3)  # step 3 would collect, but in eval mode it must not
        loss = 0.5 * ((model(x) - t) ** 2).sum(1).mean()
        loss.backward()
        A = opt.layers[0].A
        opt.step()
        opt.zero_grad()
        seen.append(A is not opt.layers[0].A)  # a new running average object: collected
    assert seen == [True, False, False, False, False, False, True]


def test_running_average_of_factors():
    model, x, t = _mlp_data()
    opt = _kfac(model, policy="eig", factor_every=1, factor_decay=0.75, lr=0.0)
    batches = [(x, t), (x * 2, t - 1)]
    for xb, tb in batches:
        (0.5 * ((model(xb) - tb) ** 2).sum(1).mean()).backward()
        opt.step()
        opt.zero_grad()
    A1, G1, _ = _mlp_reference(model, *batches[0])[1]
    A2, G2, _ = _mlp_reference(model, *batches[1])[1]
    np.testing.assert_allclose(opt.layers[1].A.numpy(), 0.75 * A1 + 0.25 * A2, rtol=1e-10)
    np.testing.assert_allclose(opt.layers[1].G.numpy(), 0.75 * G1 + 0.25 * G2, rtol=1e-10)


def test_forward_without_backward_leaves_factors_alone():
    model, x, t = _mlp_data()
    opt = _kfac(model, policy="eig")
    model(x * 100)  # an evaluation pass in training mode, no backward
    (0.5 * ((model(x) - t) ** 2).sum(1).mean()).backward()
    opt.step()
    A, _, _ = _mlp_reference(model, x, t)[0]  # layer 0's A depends on x only
    np.testing.assert_allclose(opt.layers[0].A.numpy(), A, rtol=1e-10)


# -- policy ----------------------------------------------------------------------------------

def test_choose_policy():
    assert choose_policy("auto", 128, 2048, 1.0, 8192)[0] == "woodbury"
    assert choose_policy("auto", 2049, 2048, 1.0, 8192)[0] == "eig"
    assert choose_policy("auto", 2048, 2048, 1.0, 8192)[0] == "woodbury"
    assert choose_policy("auto", 900, 2048, 0.25, 8192)[0] == "eig"
    assert choose_policy("auto", 8193, 100000, 1.0, 8192) == ("eig",
                                                               "T=8193 > auto_t_max=8192")
    assert choose_policy("eig", 1, 2048, 1.0, 8192)[0] == "eig"
    assert choose_policy("woodbury", 10 ** 6, 2, 1.0, 8192)[0] == "woodbury"


def test_auto_policy_is_emitted_when_it_changes():
    torch.manual_seed(5)
    lin = nn.Linear(3, 8)
    bus = hooks.Bus()
    rec = Recorder()
    bus.subscribe(rec, "kfac/*")
    opt = KFAC(lin, factor_every=1, inverse_every=1, bus=bus)
    for step, n in enumerate([4, 4, 16, 16, 4]):
        bus.begin_step(step)
        lin(torch.randn(n, 3)).square().mean().backward()
        opt.step()
        opt.zero_grad()
        bus.end_step()
    pol = [(e.step, e.value) for e in rec.events if e.topic == "kfac/policy"]
    wood = ("woodbury: T=4 <= auto_rho*out=1*8 and <= auto_t_max=8192; exact damping (the "
            "eig path's step, G's eigenpairs from the T x T Gram)")
    assert pol == [(0, wood), (2, "eig: T=16 > auto_rho*out=1*8"), (4, wood)]
    assert {e.tags["param"] for e in rec.events} == {"Linear"}  # a bare layer: its class
    assert [e.value for e in rec.events if e.topic == "kfac/tokens"] == [4, 4, 16, 16, 4]
    assert [layer.inverse_policy for layer in opt.layers] == ["woodbury"]


# -- telemetry against numpy's eigvalsh -------------------------------------------------

def _events(rec, topic):
    return {e.tags["param"]: e.value for e in rec.events if e.topic == topic}


def _clip(w, kappa):
    floor = w.max() / kappa
    return np.maximum(w, floor), int((w < floor).sum())


def test_condition_and_clipped_telemetry_against_eigvalsh():
    model, x, t = _mlp_data(n=4)  # 4 rows < 6 inputs: A is rank deficient, some clipped
    kappa = 1e3
    refs = _mlp_reference(model, x, t)
    bus = hooks.Bus()
    rec = Recorder()
    bus.subscribe(rec, ["kfac/*", "time/kfac/*"])
    opt = KFAC(model, lr=0.1, damping=D, max_condition=kappa, policy="eig", bus=bus)
    bus.begin_step(0)
    (0.5 * ((model(x) - t) ** 2).sum(1).mean()).backward()
    opt.step()
    bus.end_step()
    for name, (A, G, _) in zip(["0", "2"], refs):
        wA, cA = _clip(np.linalg.eigvalsh(A), kappa)
        wG, cG = _clip(np.linalg.eigvalsh(G), kappa)
        pi = np.sqrt(wA.mean() / wG.mean())
        dA, dG = pi * np.sqrt(D), np.sqrt(D) / pi
        assert _events(rec, "kfac/clipped_A")[name] == cA
        assert _events(rec, "kfac/clipped_G")[name] == cG
        assert _events(rec, "kfac/cond_A")[name] == pytest.approx(
            (wA.max() + dA) / (wA.min() + dA), rel=1e-6)
        assert _events(rec, "kfac/cond_G")[name] == pytest.approx(
            (wG.max() + dG) / (wG.min() + dG), rel=1e-6)
        assert _events(rec, "kfac/tokens")[name] == 4
    assert _events(rec, "kfac/clipped_A")["0"] >= 2  # 6 columns (5 + ones), rank 4
    topics = {e.topic for e in rec.events}
    assert {"time/kfac/factors", "time/kfac/eigh", "time/kfac/precondition"} <= topics
    assert "kfac/jitter" not in topics  # eig layers have no Cholesky


def _woodbury_layer_step(damping, kappa, **kfac_kwargs):
    """One K-FAC step of a Linear(6, 20) on 5 samples (Woodbury: T=5 < 20) whose per-sample
    output gradients dℓ/dy are ``e``; returns (opt, rec, x, e)."""
    torch.manual_seed(6)
    lin = nn.Linear(6, 20).double()
    x = torch.randn(5, 6, dtype=torch.float64)
    bus = hooks.Bus()
    rec = Recorder()
    bus.subscribe(rec, ["kfac/*", "time/kfac/*"])
    opt = KFAC(lin, damping=damping, max_condition=kappa, bus=bus, **kfac_kwargs)
    bus.begin_step(0)
    y = lin(x)
    e = torch.randn_like(y)
    (y * e).sum(1).mean().backward()  # per-sample dℓ/dy = e
    opt.step()
    bus.end_step()
    return opt, rec, x, e


def test_woodbury_telemetry_against_eigvalsh():
    kappa = 50.0
    opt, rec, x, e = _woodbury_layer_step(1e-6, kappa, woodbury_damping="factored")
    a = np.hstack([x.numpy(), np.ones((5, 1))])
    wA, cA = _clip(np.linalg.eigvalsh(a.T @ a / 5), kappa)
    U = e.numpy().T
    G = U @ U.T / 5
    lmax = np.linalg.eigvalsh(G).max()
    pi = np.sqrt(wA.mean() / (np.trace(G) / 20))
    lam = max(np.sqrt(1e-6) / pi, lmax / (kappa - 1))
    assert lam > np.sqrt(1e-6) / pi  # the condition bound raised λ_G in this test
    assert _events(rec, "kfac/cond_G")["Linear"] == pytest.approx((lmax + lam) / lam, rel=1e-3)
    assert _events(rec, "kfac/clipped_A")["Linear"] == cA
    assert _events(rec, "kfac/jitter")["Linear"] == 0.0
    assert "kfac/clipped_G" not in {e.topic for e in rec.events}
    assert "time/kfac/woodbury" in {e.topic for e in rec.events}


def test_exact_woodbury_telemetry_is_the_eig_paths():
    """woodbury_damping="exact": cond_G and clipped_G as the eig path reports them for the
    dense G = U Uᵀ/T (numpy's eigvalsh), no Cholesky, hence no kfac/jitter."""
    kappa = 50.0
    opt, rec, x, e = _woodbury_layer_step(1e-4, kappa)
    a = np.hstack([x.numpy(), np.ones((5, 1))])
    wA, cA = _clip(np.linalg.eigvalsh(a.T @ a / 5), kappa)
    wG, cG = _clip(np.linalg.eigvalsh(e.numpy().T @ e.numpy() / 5), kappa)
    pi = np.sqrt(wA.mean() / wG.mean())
    dA, dG = pi * np.sqrt(1e-4), np.sqrt(1e-4) / pi
    assert opt.layers[0].inverse_policy == "woodbury"
    assert _events(rec, "kfac/clipped_G")["Linear"] == cG == 15  # 20 outputs, rank 5
    assert _events(rec, "kfac/clipped_A")["Linear"] == cA
    assert _events(rec, "kfac/cond_G")["Linear"] == pytest.approx(
        (wG.max() + dG) / (wG.min() + dG), rel=1e-6)
    assert _events(rec, "kfac/cond_A")["Linear"] == pytest.approx(
        (wA.max() + dA) / (wA.min() + dA), rel=1e-6)
    assert "kfac/jitter" not in {e.topic for e in rec.events}


def test_pinv_fallback_is_reported_and_the_step_stays_finite(monkeypatch):
    torch.manual_seed(7)
    lin = nn.Linear(4, 12)
    bus = hooks.Bus()
    rec = Recorder()
    bus.subscribe(rec, "kfac/jitter")

    real = torch.linalg.cholesky_ex

    def failing(m, *a, **k):  # every Cholesky attempt fails: backoff, then pinv
        L, info = real(m, *a, **k)
        return L, torch.ones_like(info)

    monkeypatch.setattr(torch.linalg, "cholesky_ex", failing)
    opt = KFAC(lin, policy="woodbury", woodbury_damping="factored", bus=bus)
    bus.begin_step(0)
    lin(torch.randn(3, 4)).square().mean().backward()
    opt.step()
    bus.end_step()
    assert [e.value for e in rec.events] == [-1.0]
    assert all(bool(torch.isfinite(p).all()) for p in lin.parameters())


@pytest.mark.parametrize("policy", ["eig", "woodbury"])
def test_tiny_damping_does_not_crash(policy):
    torch.manual_seed(8)
    model = nn.Sequential(nn.Conv2d(1, 4, 3), nn.Flatten(), nn.Linear(4 * 4 * 4, 40))
    opt = KFAC(model, damping=1e-10, max_condition=None, policy=policy, bus=hooks.Bus())
    for _ in range(3):
        model(torch.randn(2, 1, 6, 6)).square().mean().backward()
        opt.step()
        opt.zero_grad()
    assert all(bool(torch.isfinite(p).all()) for p in model.parameters())


# -- state_dict ---------------------------------------------------------------------------

def _train(model, opt, steps, seed=0):
    g = torch.Generator().manual_seed(seed)
    for _ in range(steps):
        x = torch.randn(8, 5, generator=g, dtype=torch.float64)
        opt.zero_grad()
        model(x).square().mean().backward()
        opt.step()


@pytest.mark.parametrize("policy", ["eig", "woodbury"])
def test_state_dict_round_trip_continues_identically(policy):
    model, _, _ = _mlp_data()
    # saved mid-interval: the inverse in use is older than the factors, and must come back
    opt = _kfac(model, policy=policy, lr=0.05, momentum=0.9, factor_every=2, inverse_every=3)
    _train(model, opt, 5)
    twin = copy.deepcopy(model)
    opt2 = _kfac(twin, policy=policy, lr=0.05, momentum=0.9, factor_every=2, inverse_every=3)
    buf = io.BytesIO()  # through a file, as a checkpoint goes
    torch.save(opt.state_dict(), buf)
    buf.seek(0)
    opt2.load_state_dict(torch.load(buf, weights_only=True))
    assert opt2.steps == 5
    _train(model, opt, 5, seed=1)
    _train(twin, opt2, 5, seed=1)
    for p, q in zip(model.parameters(), twin.parameters()):
        assert torch.equal(p, q)


def test_state_dict_with_bias_that_disappeared_raises_naming_the_layer():
    torch.manual_seed(9)
    a = nn.Sequential(nn.Linear(3, 4), nn.Linear(4, 2))
    b = nn.Sequential(nn.Linear(3, 4), nn.Linear(4, 2, bias=False))
    opt = KFAC(a, bus=hooks.Bus())
    a(torch.randn(5, 3)).sum().backward()
    opt.step()
    with pytest.raises(ValueError, match=r"layer '1'.*had a bias column.*has no"):
        KFAC(b, bus=hooks.Bus()).load_state_dict(opt.state_dict())
    opt_b = KFAC(b, bus=hooks.Bus())
    with pytest.raises(ValueError, match=r"layer '1'.*had no bias column.*has a trainable"):
        KFAC(a, bus=hooks.Bus()).load_state_dict(opt_b.state_dict())


def test_state_dict_with_changed_shape_raises_naming_the_layer():
    a = nn.Sequential(nn.Linear(3, 4), nn.Linear(4, 2))
    b = nn.Sequential(nn.Linear(3, 4), nn.Linear(4, 5))
    with pytest.raises(ValueError, match=r"layer '1'.*weight \(2, 4\).*weight \(5, 4\)"):
        KFAC(b, bus=hooks.Bus()).load_state_dict(KFAC(a, bus=hooks.Bus()).state_dict())
    c = nn.Sequential(nn.Linear(3, 4), nn.Linear(4, 2), nn.Linear(2, 2))
    with pytest.raises(ValueError, match=r"layer '2'"):
        KFAC(c, bus=hooks.Bus()).load_state_dict(KFAC(a, bus=hooks.Bus()).state_dict())


# -- arguments ------------------------------------------------------------------------------

@pytest.mark.parametrize("kwargs,match", [
    (dict(model="net"), "model"),
    (dict(lr=-0.1), "lr"),
    (dict(momentum=1.0), "momentum"),
    (dict(weight_decay=-1.0), "weight_decay"),
    (dict(damping=0.0), "damping"),
    (dict(damping=float("inf")), "damping"),
    (dict(factor_decay=1.0), "factor_decay"),
    (dict(factor_every=0), "factor_every"),
    (dict(inverse_every=2.5), "inverse_every"),
    (dict(kl_clip=0.0), "kl_clip"),
    (dict(max_condition=1.0), "max_condition"),
    (dict(policy="cholesky"), "policy"),
    (dict(auto_rho=0.0), "auto_rho"),
    (dict(auto_t_max=0), "auto_t_max"),
    (dict(woodbury_store="disk"), "woodbury_store"),
    (dict(woodbury_dtype=torch.float64), "woodbury_dtype"),
    (dict(skip=["nope"]), "skip"),
    (dict(skip="0"), "skip"),
    (dict(skip=[3]), "skip"),
    (dict(bus="bus"), "bus"),
])
def test_invalid_arguments_raise_value_error(kwargs, match):
    args = dict(model=nn.Sequential(nn.Linear(2, 2)))
    args.update(kwargs)
    with pytest.raises(ValueError, match=match):
        KFAC(**args)


def test_model_without_layers_raises():
    with pytest.raises(ValueError, match="model"):
        KFAC(nn.Sequential(nn.ReLU()))
    with pytest.raises(ValueError, match="model"):
        KFAC(nn.Sequential(nn.Linear(2, 2)), skip=["0"])


# -- Woodbury storage -------------------------------------------------------------------

@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_woodbury_dtype_storage_close_to_fp32(dtype):
    torch.manual_seed(10)
    base = nn.Linear(8, 64)
    x = torch.randn(6, 8)
    deltas = []
    for dt in (torch.float32, dtype):
        lin = copy.deepcopy(base)
        opt = KFAC(lin, lr=1.0, momentum=0.0, kl_clip=None, woodbury_dtype=dt,
                   woodbury_store="cpu", bus=hooks.Bus())
        w0 = lin.weight.detach().clone()
        lin(x).square().mean().backward()
        opt.step()
        assert opt.layers[0].wood.U.dtype == dt
        deltas.append(w0 - lin.weight.detach())
    rel = (deltas[0] - deltas[1]).norm() / deltas[0].norm()
    assert rel < (2e-2 if dtype == torch.bfloat16 else 3e-3)


@pytest.mark.cuda
@pytest.mark.parametrize("store,dtype", [("auto", torch.bfloat16), ("cpu", torch.float16),
                                         ("device", torch.float32)])
def test_cuda_woodbury_storage(store, dtype):
    torch.manual_seed(11)
    lin = nn.Linear(16, 256).cuda()
    cpu_twin = copy.deepcopy(lin).cpu()
    opt = KFAC(lin, lr=1.0, momentum=0.0, kl_clip=None, woodbury_store=store,
               woodbury_dtype=dtype, bus=hooks.Bus(device="cuda"))
    if store == "auto":
        opt.woodbury_device_budget = 1  # nothing fits: pinned host memory
    x = torch.randn(32, 16)
    w0 = lin.weight.detach().clone()
    lin(x.cuda()).square().mean().backward()
    opt.step()
    wood = opt.layers[0].wood
    if store in ("auto", "cpu"):
        assert wood.device.type == "cpu" and wood.U.is_pinned()
    else:
        assert wood.device.type == "cuda"
    ref_opt = KFAC(cpu_twin, lr=1.0, momentum=0.0, kl_clip=None, bus=hooks.Bus())
    cw0 = cpu_twin.weight.detach().clone()
    cpu_twin(x).square().mean().backward()
    ref_opt.step()
    got, ref = (w0 - lin.weight.detach()).cpu(), cw0 - cpu_twin.weight.detach()
    assert (got - ref).norm() / ref.norm() < 3e-2


@pytest.mark.parametrize("k", [7, 128, 131])
def test_blocked_gram_equals_numpy(k):
    from optimizers.kfac_layers import gram

    c = np.random.default_rng(k).standard_normal((k, 40))
    np.testing.assert_allclose(gram(torch.tensor(c)).numpy(), c @ c.T, rtol=1e-12, atol=1e-12)


def test_a_zero_size_linear_gets_plain_sgd_and_the_rest_is_preconditioned():
    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc = nn.Linear(4, 3)
            self.empty = nn.Linear(4, 0)  # a layer pruned to nothing

        def forward(self, x):
            return self.fc(x) + self.empty(x).sum(-1, keepdim=True)

    torch.manual_seed(0)
    net = Net()
    opt = KFAC(net, lr=0.1, bus=hooks.Bus())
    assert opt.excluded == {"empty": "zero-size weight"}
    before = net.fc.weight.detach().clone()
    x = torch.randn(8, 4)
    net(x).square().sum().backward()
    opt.step()
    assert torch.isfinite(net.fc.weight).all() and not torch.equal(net.fc.weight, before)
    assert net.empty.weight.shape == (0, 4)
    with pytest.raises(ValueError, match="at least one trainable"):
        KFAC(nn.Sequential(nn.Linear(4, 0), nn.Linear(0, 3)), bus=hooks.Bus())


# -- the scale of A ⊗ G against the exact per-sample empirical Fisher ------------------------

class _SeqCNN(nn.Module):
    """Strided/padded/dilated convs, then a Linear over the 16 positions as a sequence."""

    def __init__(self):
        super().__init__()
        self.c1 = nn.Conv2d(3, 6, 3, stride=2, padding=1)            # 8x8 -> 4x4
        self.c2 = nn.Conv2d(6, 6, 3, padding=2, dilation=2)          # 4x4 -> 4x4
        self.seq = nn.Linear(6, 8)                                   # on [N, 16, 6]
        self.head = nn.Linear(16 * 8, 5)

    def forward(self, x):
        h = torch.relu(self.c2(torch.relu(self.c1(x))))
        h = torch.tanh(self.seq(h.flatten(2).mT))
        return self.head(h.flatten(1))


def _per_sample_grads(model, x, y):
    from torch.func import functional_call, grad, vmap

    params = {k: v.detach() for k, v in model.named_parameters()}

    def loss1(p, xi, yi):
        return nn.functional.cross_entropy(functional_call(model, p, (xi[None],)), yi[None])

    return vmap(grad(loss1), in_dims=(None, 0, 0))(params, x, y)


def fisher_scale_ratios(n=32, seed=0):
    """Per layer: tr(A)·tr(G) / tr(F) and mean vᵀ(G⊗A)v / mean vᵀFv over 32 random v, F the
    exact per-sample empirical Fisher (1/N) Σ ∇ℓ_n ∇ℓ_nᵀ of the layer's [W, b]."""
    torch.manual_seed(seed)
    model = _SeqCNN().double()
    x = torch.randn(n, 3, 8, 8, dtype=torch.float64)
    y = torch.randint(0, 5, (n,))
    opt = _kfac(model, policy="eig", lr=0.0)
    nn.functional.cross_entropy(model(x), y).backward()  # mean-reduced: G is rescaled by N
    opt.step()
    grads = _per_sample_grads(model, x, y)
    out = {}
    for layer in opt.layers:
        gw = grads[layer.name + ".weight"].reshape(n, layer.out_dim, -1)
        gb = grads[layer.name + ".bias"][:, :, None]
        per = torch.cat([gw, gb], 2)                                  # [N, out, in + 1]
        F = per.reshape(n, -1).mT @ per.reshape(n, -1) / n
        trace = float(layer.A.trace() * layer.G.trace() / F.trace())
        V = torch.randn(32, layer.out_dim, layer.in_dim, dtype=torch.float64,
                        generator=torch.Generator().manual_seed(seed))
        vKv = (V * (layer.G @ V @ layer.A)).sum((1, 2))            # vec(V)ᵀ (G ⊗ A) vec(V)
        vFv = (V.reshape(32, -1) @ F * V.reshape(32, -1)).sum(1)
        out[layer.name] = (layer.kind, trace, float(vKv.mean() / vFv.mean()))
    return out


def test_kronecker_factors_have_the_scale_of_the_per_sample_fisher():
    """KFAC-expand: tr(A)tr(G) ≈ tr(F) for convs (stride, padding, dilation) and a Linear
    on sequence inputs, as for a plain Linear (the old per-position G was 1/16 of it)."""
    ratios = fisher_scale_ratios()
    assert [k for k, _, _ in ratios.values()] == ["conv2d", "conv2d", "linear", "linear"]
    for name, (_, trace, quad) in ratios.items():
        assert 0.5 <= trace <= 1.5, (name, trace)
        assert 0.5 <= quad <= 1.5, (name, quad)


# -- GradScaler: G from unscaled output gradients ---------------------------------------------

def _scaled_run(init_scale=None, growth_interval=2000, pass_scaler=True, steps=5):
    torch.manual_seed(0)
    # conv (T = 16*36 > 8: eig), fc (T = 16 <= 32: Woodbury under auto), head (eig)
    model = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.Flatten(),
                          nn.Linear(8 * 36, 32), nn.Tanh(), nn.Linear(32, 4))
    scaler = None if init_scale is None else torch.amp.GradScaler(
        "cpu", init_scale=init_scale, growth_interval=growth_interval)
    opt = KFAC(model, lr=0.1, factor_every=1, inverse_every=2, bus=hooks.Bus(),
               grad_scaler=scaler if pass_scaler else None)
    g = torch.Generator().manual_seed(1)
    for _ in range(steps):
        x, y = torch.randn(16, 3, 6, 6, generator=g), torch.randint(0, 4, (16,), generator=g)
        loss = nn.functional.cross_entropy(model(x), y)
        if scaler is None:
            loss.backward()
            opt.step()
        else:
            scaler.scale(loss).backward()
            scaler.step(opt)  # unscale_ on the parameters' grads, then opt.step()
            scaler.update()
        opt.zero_grad()
    assert [layer.inverse_policy for layer in opt.layers] == ["eig", "woodbury", "eig"]
    return [p.detach().clone() for p in model.parameters()], scaler


@pytest.mark.parametrize("init_scale, growth_interval", [(1024.0, 2000), (65536.0, 1)])
def test_grad_scaler_run_equals_the_unscaled_run(init_scale, growth_interval):
    """With grad_scaler=, the factors come from output gradients divided by the scale of
    their backward, so a scaled run (the scale growing every step, too) is the unscaled run."""
    ref, _ = _scaled_run()
    got, scaler = _scaled_run(init_scale, growth_interval)
    if growth_interval == 1:
        assert scaler.get_scale() == init_scale * 2 ** 5  # the scale moved between steps
    for a, b in zip(ref, got):
        torch.testing.assert_close(b, a, rtol=1e-5, atol=1e-7)
    # without it, G is scale² too large and the run is a different one
    off, _ = _scaled_run(init_scale, growth_interval, pass_scaler=False)
    assert max(float((a - b).abs().max()) for a, b in zip(ref, off)) > 0.1


def test_grad_scaler_must_be_a_grad_scaler():
    with pytest.raises(ValueError, match="grad_scaler must be a torch.amp.GradScaler"):
        KFAC(nn.Linear(2, 2), grad_scaler=1024.0, bus=hooks.Bus())


# -- factors out of float32 range (issue 19.1) -------------------------------------------------

def _overflow_net():
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(3, 6, 3), nn.ReLU(), nn.Flatten(), nn.Linear(6 * 16, 8),
                         nn.Tanh(), nn.Linear(8, 4))


def _overflow_run(policy, scales):
    """Steps with the loss multiplied by ``scales[s]``: per step the update norm and each
    layer's kfac/overflow, on a model whose every parameter K-FAC preconditions."""
    model = _overflow_net()
    bus = hooks.Bus()
    rec = Recorder()
    bus.subscribe(rec, "kfac/overflow")
    opt = KFAC(model, lr=0.05, factor_every=1, inverse_every=1, policy=policy, bus=bus)
    g = torch.Generator().manual_seed(0)
    steps = []
    for s, scale in enumerate(scales):
        bus.begin_step(s)
        (model(torch.randn(8, 3, 6, 6, generator=g)).square().mean() * scale).backward()
        before = [p.detach().clone() for p in model.parameters()]
        opt.step()
        opt.zero_grad()
        bus.end_step()
        assert all(bool(torch.isfinite(p).all()) for p in model.parameters()), (s, scale)
        norm = float(sum(((p.detach() - b) ** 2).sum()
                         for p, b in zip(model.parameters(), before)))
        steps.append((norm ** 0.5, {e.tags["param"]: e.value for e in rec.events
                                    if e.step == s}))
    return steps, opt


@pytest.mark.parametrize("policy", ["eig", "woodbury"])
@pytest.mark.parametrize("scale", [1e21, 1e30])
def test_gradients_out_of_factor_range_keep_the_factors_and_are_reported(policy, scale):
    """Gradients of ~1e20-1e29 (their outer products overflow float32): the out-of-range G
    is not folded in, kfac/overflow says so, the layers step on their last inverse with a
    KL-clipped (bounded) step, and training goes on with finite factors."""
    steps, opt = _overflow_run(policy, [1.0, 1.0, 1.0, scale, scale, 1.0, 1.0])
    normal = max(n for n, _ in steps[:3])
    for s in (3, 4):
        norm, overflow = steps[s]
        assert set(overflow) == {"0", "3", "5"} and sum(overflow.values()) >= 2, overflow
        assert norm <= 3 * normal, (s, norm, normal)
    for s in (0, 1, 2, 6):
        assert set(steps[s][1].values()) == {0.0}
    for layer in opt.layers:  # the factors kept (or restarted) are finite
        assert bool(torch.isfinite(layer.A).all())
        assert bool(torch.isfinite(layer.G if layer.policy == "eig"
                                   else layer.latest_rows()).all())
    assert sum(int(layer.overflows) for layer in opt.layers) >= 4


def test_a_first_collection_out_of_range_leaves_the_layer_on_sgd():
    """No previous factor to keep: the layer takes plain SGD (finite) and reports; the next
    ordinary step starts the factors afresh."""
    steps, opt = _overflow_run("eig", [1e21, 1.0])
    assert sum(steps[0][1].values()) >= 1 and set(steps[1][1].values()) == {0.0}
    assert all(layer.ready for layer in opt.layers)


def test_range_safe_g_sum_matches_float64():
    """G of per-sample gradients ~4e18 (products ~1e37, a diagonal entry's sum over the 64
    rows past float32's 3.4e38, the average not) equals the float64 factor: the sum is kept
    max-abs-normalised."""
    torch.manual_seed(1)
    lin = nn.Linear(5, 4)
    x = torch.randn(64, 5)
    opt = KFAC(lin, policy="eig", bus=hooks.Bus())
    y = lin(x)
    e = torch.randn_like(y) * 4e18
    (y * e).sum(1).mean().backward()  # per-sample dℓ/dy = e
    opt.step()
    ref = e.double().mT @ e.double() / 64
    assert float((e.double() ** 2).sum(0).max()) > torch.finfo(torch.float32).max  # raw sum
    assert float(ref.abs().max()) < torch.finfo(torch.float32).max / 10
    torch.testing.assert_close(opt.layers[0].G.double(), ref, rtol=1e-5, atol=0)


# -- the auto policy's Woodbury layers against the exact Tikhonov solve ----------------------

def woodbury_vs_exact_tikhonov(woodbury_damping="exact", damping=1e-3, seed=0):
    """Default policy ("auto") at batch 16 on an MLP whose two hidden layers (out 32, 24 >=
    T = 16) go the Woodbury way and whose head (out 10) the eig way: per layer, the path taken
    and ‖step - (G ⊗ A + damping I)⁻¹ g‖ / ‖(G ⊗ A + damping I)⁻¹ g‖, the reference a dense
    scipy solve of the layer's own factors."""
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Linear(12, 32), nn.ReLU(), nn.Linear(32, 24), nn.ReLU(),
                          nn.Linear(24, 10)).double()
    x = torch.randn(16, 12, dtype=torch.float64)
    y = torch.randint(0, 10, (16,))
    opt = KFAC(model, lr=1.0, momentum=0.0, kl_clip=None, damping=damping,
               woodbury_damping=woodbury_damping, bus=hooks.Bus())
    before = [p.detach().clone() for p in model.parameters()]
    nn.functional.cross_entropy(model(x), y).backward()
    grads = [p.grad.clone() for p in model.parameters()]
    opt.step()
    out = []
    for k, layer in enumerate(opt.layers):
        V = torch.cat([grads[2 * k], grads[2 * k + 1][:, None]], 1).numpy()
        step = torch.cat([before[2 * k] - model[2 * k].weight.detach(),
                          (before[2 * k + 1] - model[2 * k].bias.detach())[:, None]], 1).numpy()
        U = layer.latest_rows()
        G = (layer.G if layer.G is not None else U @ U.mT / layer.tokens).numpy()
        exact = _eig_reference(V, layer.A.numpy(), G, damping)
        out.append((layer.inverse_policy,
                    float(np.linalg.norm(step - exact) / np.linalg.norm(exact))))
    return out


def test_auto_woodbury_layers_take_the_exact_tikhonov_step():
    """The default (woodbury_damping="exact") gives the Woodbury layers the eig path's step;
    the factored split, the old default, is far from it (the figures in docs/kfac.md)."""
    got = woodbury_vs_exact_tikhonov()
    assert [p for p, _ in got] == ["woodbury", "woodbury", "eig"]
    assert all(rel < 1e-6 for _, rel in got), got  # max_condition=1e6 floors G's zeros
    factored = woodbury_vs_exact_tikhonov("factored")
    assert all(rel > 0.3 for _, rel in factored[:2]), factored


def test_a_step_the_grad_scaler_skips_leaves_the_factors_finite():
    """An inf input: the scaler skips opt.step() and halves its scale; the collection that
    step left (inf rows) is dropped at the next step and counted, the factors stay finite."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.Flatten(),
                          nn.Linear(8 * 36, 32), nn.Tanh(), nn.Linear(32, 4))
    scaler = torch.amp.GradScaler("cpu", init_scale=1024.0)
    opt = KFAC(model, lr=0.1, factor_every=1, inverse_every=2, grad_scaler=scaler,
               bus=hooks.Bus())
    g = torch.Generator().manual_seed(1)
    for s in range(5):
        x, y = torch.randn(16, 3, 6, 6, generator=g), torch.randint(0, 4, (16,), generator=g)
        if s == 2:
            x[0, 0, 0, 0] = float("inf")
        scaler.scale(nn.functional.cross_entropy(model(x), y)).backward()
        scaler.step(opt)
        scaler.update()
        opt.zero_grad()
    assert opt.steps == 4 and scaler.get_scale() == 512.0
    assert [int(layer.overflows) for layer in opt.layers] == [2, 2, 2]
    assert all(bool(torch.isfinite(p).all()) for p in model.parameters())
    assert all(bool(torch.isfinite(layer.A).all()) for layer in opt.layers)
