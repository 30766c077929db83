"""Third-party optimizers under the probe (the `compat` extras): schedule-free, heavyball,
pytorch-optimizer. Each case skips, naming its package, where that is not installed."""

import pytest
import torch
import torch.optim.optimizer as optimizer_module

import probe
from tests.compat import harness as h


def need(module: str):
    return pytest.importorskip(module, reason=f"{module} is not installed (pip install "
                                              f"'.[compat]')")


# -- schedule-free: train() before the loop, eval() after it (swaps y for x) ----------------
SCHEDULEFREE = {
    "AdamWScheduleFree": lambda sf, m: sf.AdamWScheduleFree(m.parameters(), lr=1e-2,
                                                            warmup_steps=2),
    "SGDScheduleFree": lambda sf, m: sf.SGDScheduleFree(m.parameters(), lr=0.1),
    "SGDScheduleFree-weight_decay": lambda sf, m: sf.SGDScheduleFree(m.parameters(), lr=0.1,
                                                                     weight_decay=0.1),
}


def _sf_case(name):
    sf = need("schedulefree")
    return (lambda m: SCHEDULEFREE[name](sf, m)), (lambda opt: opt.train())


@pytest.mark.parametrize("name", list(SCHEDULEFREE))
def test_schedulefree_training_is_unchanged(name):
    make_opt, train_mode = _sf_case(name)
    plain, probed = h.both(h.mlp, make_opt, on_train=train_mode)
    h.assert_same_params(plain.model, probed.model)
    assert probed.probe.step == h.STEPS
    for opt in (plain.optimizer, probed.optimizer):  # a name: test_security's eval scan
        opt.eval()  # the evaluation weights x, swapped in outside any step
    h.assert_same_params(plain.model, probed.model)
    assert probed.probe.step == h.STEPS  # train()/eval() are no steps


@pytest.mark.parametrize("name", list(SCHEDULEFREE))
def test_schedulefree_statistics(name):
    make_opt, train_mode = _sf_case(name)
    run = h.train(h.mlp, make_opt, probed=True, on_train=train_mode)
    h.check_stats(run.recorder, run.refs)


# -- heavyball (3.2.1): its step sets p.grad = None once it has used it -----------------------
HEAVYBALL = ["AdamW", "SGD"]


@pytest.fixture
def heavyball(monkeypatch):
    hb = need("heavyball")
    import heavyball.utils

    # its fused kernels go through torch.compile by default: minutes on a 2-core CPU
    monkeypatch.setattr(heavyball.utils, "compile_mode", None)
    return hb


def _hb_opt(hb, name):
    return lambda m: getattr(hb, name)(m.parameters(), lr=1e-2, compile_step=False)


@pytest.mark.parametrize("name", HEAVYBALL)
def test_heavyball_training_is_unchanged(heavyball, name):
    plain, probed = h.both(h.mlp, _hb_opt(heavyball, name))
    h.assert_same_params(plain.model, probed.model)
    assert probed.probe.step == h.STEPS


@pytest.mark.parametrize("name", HEAVYBALL)
def test_heavyball_statistics(heavyball, name):
    run = h.train(h.mlp, _hb_opt(heavyball, name), probed=True)
    h.check_stats(run.recorder, run.refs)


# -- pytorch-optimizer ----------------------------------------------------------------------
PYTORCH_OPTIMIZER = {
    "Ranger": lambda po, m: po.Ranger(m.parameters(), lr=1e-2),  # use_gc=True by default
    "Ranger-no-gc": lambda po, m: po.Ranger(m.parameters(), lr=1e-2, use_gc=False),
    "Lion": lambda po, m: po.Lion(m.parameters(), lr=1e-3, weight_decay=0.1),
}


def _po_opt(name):
    po = need("pytorch_optimizer")
    return lambda m: PYTORCH_OPTIMIZER[name](po, m)


@pytest.mark.parametrize("name", list(PYTORCH_OPTIMIZER))
def test_pytorch_optimizer_training_is_unchanged(name):
    plain, probed = h.both(h.mlp, _po_opt(name))
    h.assert_same_params(plain.model, probed.model)


@pytest.mark.parametrize("name", list(PYTORCH_OPTIMIZER))
def test_pytorch_optimizer_statistics(name):
    run = h.train(h.mlp, _po_opt(name), probed=True)
    h.check_stats(run.recorder, run.refs)


def _hooks_of(opt) -> dict:
    names = ("_optimizer_step_pre_hooks", "_optimizer_step_post_hooks",
             "_optimizer_state_dict_pre_hooks", "_optimizer_state_dict_post_hooks",
             "_optimizer_load_state_dict_pre_hooks", "_optimizer_load_state_dict_post_hooks")
    return {n: len(getattr(opt, n)) for n in names if hasattr(opt, n)}


def test_lookahead_wrapper_is_refused_and_leaves_no_hooks():
    po = need("pytorch_optimizer")
    model = h.mlp()
    inner = torch.optim.AdamW(model.parameters(), lr=1e-2)
    wrapper = po.Lookahead(inner, k=3)
    before = _hooks_of(wrapper), _hooks_of(inner)
    globals_before = (len(optimizer_module._global_optimizer_pre_hooks),
                      len(optimizer_module._global_optimizer_post_hooks))
    for _ in range(2):  # refused the same way twice: the failed attach registered nothing
        with pytest.raises(ValueError, match=r"attach to the inner optimizer.*opt\.optimizer"):
            probe.attach(wrapper, model=model, every=1, collectors=[])
    assert (_hooks_of(wrapper), _hooks_of(inner)) == before
    assert all(v == 0 for v in before[1].values())
    assert (len(optimizer_module._global_optimizer_pre_hooks),
            len(optimizer_module._global_optimizer_post_hooks)) == globals_before
    with probe.attach(inner, model=model, every=1, collectors=[]):  # the pointer works
        pass
    assert _hooks_of(inner) == before[1]


def test_lookahead_probe_on_the_inner_optimizer():
    """Attached as the error says, the probe sees the inner AdamW's steps: training unchanged,
    statistics exact on the steps where Lookahead does not pull the weights back (its slow-
    weight sync runs after the inner step, outside what the inner probe observes)."""
    po = need("pytorch_optimizer")

    def make(m):
        return po.Lookahead(torch.optim.AdamW(m.parameters(), lr=1e-2), k=3)

    kw = {"steps": 5, "attach_to": lambda opt: opt.optimizer}
    plain, probed = h.both(h.mlp, make, **kw)
    h.assert_same_params(plain.model, probed.model)
    assert probed.probe.step == 5
    h.check_stats(probed.recorder, probed.refs, steps=[0, 1, 3, 4])  # k=3: sync after 2


def test_timm_optimizer():
    timm = pytest.importorskip(
        "timm", reason="timm needs torchvision, whose wheels pin another torch than this "
                       "project's 2.13 CPU build: installing it would replace torch")
    from timm.optim import create_optimizer_v2

    make_opt = lambda m: create_optimizer_v2(m, opt="lamb", lr=1e-2)  # noqa: E731
    plain, probed = h.both(h.mlp, make_opt)
    h.assert_same_params(plain.model, probed.model)
    h.check_stats(probed.recorder, probed.refs)
    assert timm.__version__
