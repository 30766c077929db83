"""The probe's statistics core against a float64 numpy computation; the finiteness check."""

import math

import numpy as np
import pytest
import torch

from probe.stats import (
    STAT_ROWS,
    FiniteCheck,
    finish_stats,
    finish_stats_host,
    snapshot,
    step_norms,
)


def _case():
    gen = torch.Generator().manual_seed(3)
    params = [torch.randn(6, 5, generator=gen),
              torch.randn(4, 3, 3, 3, generator=gen).to(memory_format=torch.channels_last),
              torch.zeros(7),                                   # zero norm: ratio is NaN
              torch.randn(9, generator=gen, dtype=torch.float64),
              torch.randn(3, generator=gen)]                    # not moved: update 0
    grads = [torch.randn(p.shape, generator=gen, dtype=p.dtype) for p in params]
    steps = [torch.randn(p.shape, generator=gen, dtype=p.dtype) * 1e-3 for p in params]
    steps[-1].zero_()
    g = grads[0].reshape(-1)  # an update orthogonal to its gradient: cos 0 from a cancellation
    s = torch.randn(g.shape, generator=gen)
    steps[0] = ((s - (s @ g) / (g @ g) * g) * 1e-3).reshape(grads[0].shape)
    return params, grads, steps


def _reference(before, after, grads):
    rows = {t: [] for t in STAT_ROWS}
    for b, a, g in zip(before, after, grads):
        b, a, g = (x.double().numpy().ravel() for x in (b, a, g))
        u = a - b
        gn, wn, un = (float(np.linalg.norm(x)) for x in (g, b, u))
        rows["grad/norm"].append(gn)
        rows["param/norm"].append(wn)
        rows["update/norm"].append(un)
        rows["update/ratio"].append(un / wn if wn > 0 else math.nan)
        rows["update/cos_grad"].append(float(np.dot(-u, g)) / (un * gn) if un * gn else 0.0)
    totals = [math.sqrt(sum(x * x for x in rows[t])) for t in STAT_ROWS[:3]]
    return rows, totals


@pytest.mark.parametrize("finish", ["tensor", "host"])
def test_statistics_match_numpy(finish):
    params, grads, steps = _case()
    before = snapshot(params)
    originals = [p.clone() for p in params]
    for p, s in zip(params, steps):
        p.add_(s)
    ref, ref_totals = _reference(originals, params, grads)
    norms = step_norms(before, params, grads)
    assert norms.shape == (4, len(params)) and norms.dtype == torch.float64  # one is float64
    if finish == "tensor":
        table, totals = finish_stats(norms)
        table, totals = table.tolist(), totals.tolist()
    else:
        table, totals = finish_stats_host(norms.tolist())
    for k, topic in enumerate(STAT_ROWS):
        got = table[k]
        for i, (x, y) in enumerate(zip(got, ref[topic])):
            if math.isnan(y):
                assert math.isnan(x), (topic, i)
            else:
                assert x == pytest.approx(y, rel=1e-4, abs=1e-6), (topic, i)
    assert abs(ref["update/cos_grad"][0]) < 1e-6 and abs(table[4][0]) < 1e-5
    assert totals == pytest.approx(ref_totals, rel=1e-5)


def test_statistics_over_several_pass_groups_match_numpy():
    """A model-sized list (3.4M values: step_norms passes over it in groups that fit in
    cache) with a float64, a bfloat16, a channels-last and a transposed-gradient tensor in
    different groups: every column lands where its parameter is."""
    gen = torch.Generator().manual_seed(5)
    shapes = [(256, 256)] * 20 + [(600, 700), (33,), (128, 3, 3, 3), (9, 7), (300, 300)]
    params = [torch.randn(s, generator=gen) for s in shapes]
    params[3] = params[3].double()
    params[22] = params[22].to(memory_format=torch.channels_last)
    params[23] = params[23].bfloat16()
    grads = [torch.randn(p.shape, generator=gen).to(p.dtype) for p in params]
    grads[24] = torch.randn(300, 300, generator=gen).t()  # a non-contiguous gradient
    originals = [p.clone() for p in params]
    before = snapshot(params)
    for p in params:
        p.add_(torch.randn(p.shape, generator=gen).to(p.dtype) * 1e-3)
    ref, _ = _reference(originals, params, grads)
    table, _ = finish_stats_host(step_norms(before, params, grads).tolist())
    for k, topic in enumerate(STAT_ROWS):
        for i, (x, y) in enumerate(zip(table[k], ref[topic])):
            rel = 1e-2 if i == 23 else 1e-4  # bfloat16 values, float32 sums
            assert x == pytest.approx(y, rel=rel, abs=1e-6), (topic, i)



def _small_case(device="cpu"):
    """40 small tensors (biases, norms' scales: one batched pass) among three big ones:
    float32, float64, bfloat16, channels-last, transposed gradients, a zero-size one."""
    gen = torch.Generator().manual_seed(11)
    shapes = [(128,), (64, 3, 3, 3), (384,), (512,), (33, 7)] * 8
    shapes[5:5] = [(300, 300)]
    shapes[20:20] = [(0,), (70_000,)]
    params = [torch.randn(s, generator=gen) for s in shapes]
    params[2] = params[2].double()
    params[9] = params[9].bfloat16()
    params[1] = params[1].to(memory_format=torch.channels_last)
    grads = [torch.randn(p.shape, generator=gen).to(p.dtype) for p in params]
    grads[4] = torch.randn(7, 33, generator=gen).t()  # a non-contiguous gradient
    steps = [torch.randn(p.shape, generator=gen).to(p.dtype) * 1e-3 for p in params]
    return ([x.to(device) for x in params], [x.to(device) for x in grads],
            [x.to(device) for x in steps])


def test_many_small_tensors_take_one_batched_pass_and_match_numpy(monkeypatch):
    import probe.stats as S

    params, grads, steps = _small_case()
    # a sparse gradient (an embedding's) among them: the rest go one by one around it
    params.append(torch.randn(50, 4))
    grads.append(torch.sparse_coo_tensor([[3, 7, 7]], torch.randn(3, 4), (50, 4),
                                         check_invariants=True))
    steps.append(torch.randn(50, 4) * 1e-3)
    seen = []
    real = S._batched_norms
    monkeypatch.setattr(S, "_batched_norms", lambda b, a, g: seen.append(len(b)) or real(b, a, g))
    originals = [p.clone() for p in params]
    before = snapshot(params)
    for p, s in zip(params, steps):
        p.add_(s)
    ref, _ = _reference(originals, params, [g.to_dense() for g in grads])
    norms = step_norms(before, params, grads)
    assert seen == [40]  # the big ones and the zero-size one go their own way
    assert norms.shape == (4, len(params)) and norms.dtype == torch.float64
    table, _ = finish_stats_host(norms.tolist())
    for k, topic in enumerate(STAT_ROWS):
        for i, (x, y) in enumerate(zip(table[k], ref[topic])):
            if math.isnan(y):
                assert math.isnan(x), (topic, i)
                continue
            rel = 1e-2 if i == 9 else 1e-6  # bfloat16 values; float64 sums elsewhere
            assert x == pytest.approx(y, rel=rel, abs=1e-9), (topic, i)
    # |g| doubles as the finiteness check: a NaN and an Inf among the small ones show
    grads[3][5], grads[12][0, 1, 2, 0] = math.nan, math.inf
    seen.clear()
    g = step_norms(snapshot(params), params, grads)[0]
    assert seen == [40]
    assert [i for i, v in enumerate(g.tolist()) if not math.isfinite(v)] == [3, 12]


def test_segment_sums_on_the_host_equal_torchs_segment_reduce():
    """The batched pass sums runs with numpy on the host and segment_reduce on a device."""
    from probe.stats import _segment_sums

    gen = torch.Generator().manual_seed(2)
    sizes = [1, 128, 3, 4096, 7, 1]
    terms = torch.randn(4, sum(sizes), generator=gen, dtype=torch.float64)
    host = _segment_sums(terms, sizes, host=True)
    torch.testing.assert_close(host, _segment_sums(terms, sizes, host=False), rtol=1e-12, atol=0)
    want = torch.stack([c.sum(1) for c in terms.split(sizes, 1)], 1)
    torch.testing.assert_close(host, want, rtol=1e-12, atol=1e-12)


@pytest.mark.cuda
def test_cuda_batched_small_tensors_match_numpy():
    params, grads, steps = _small_case("cuda")
    originals = [p.cpu() for p in params]
    before = snapshot(params)
    for p, s in zip(params, steps):
        p.add_(s)
    ref, _ = _reference(originals, [p.cpu() for p in params], [g.cpu() for g in grads])
    table, _ = finish_stats_host(step_norms(before, params, grads).tolist())
    for k, topic in enumerate(STAT_ROWS[:3]):
        for i, (x, y) in enumerate(zip(table[k], ref[topic])):
            assert x == pytest.approx(y, rel=1e-2 if i == 9 else 1e-5, abs=1e-9), (topic, i)

def test_snapshot_is_a_detached_copy():
    p = torch.nn.Parameter(torch.randn(4, 3))
    (s,) = snapshot([p])
    assert not s.requires_grad and s.data_ptr() != p.data_ptr() and torch.equal(s, p)


def test_finite_check_resets_its_flag_after_firing():
    check = FiniteCheck()
    clean = [torch.randn(5), torch.randn(2, 3)]
    dirty = [torch.randn(5), torch.tensor([[1.0, float("inf"), 0.0]])]
    assert check.mask(clean) == [False, False]
    assert check.mask(dirty) == [False, True]
    assert check.mask(clean) == [False, False]  # the kept flag tensor was cleared
    assert check.all_finite(clean)


@pytest.mark.cuda
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_cuda_statistics_match_the_host_finish(dtype):
    params, grads, steps = _case()
    keep = [0, 1, 2, 4]  # float32 ones, so one dtype runs through the fused lists
    params, grads, steps = ([x[i].to("cuda", dtype) for i in keep] for x in (params, grads, steps))
    before = snapshot(params)
    originals = [p.float().cpu() for p in params]
    for p, s in zip(params, steps):
        p.add_(s)
    ref, ref_totals = _reference(originals, [p.float().cpu() for p in params],
                                 [g.float().cpu() for g in grads])
    norms = step_norms(before, params, grads)
    assert norms.device.type == "cuda" and norms.dtype == torch.float32
    table, totals = finish_stats(norms)
    assert table.device.type == "cuda"
    host_table, host_totals = finish_stats_host(norms.tolist())
    torch.testing.assert_close(table.cpu(), torch.tensor(host_table), equal_nan=True)
    tol = 1e-4 if dtype == torch.float32 else 2e-2
    for k, topic in enumerate(STAT_ROWS[:3]):
        assert host_table[k] == pytest.approx(ref[topic], rel=tol, abs=1e-6)
    assert totals.cpu().tolist() == pytest.approx(ref_totals, rel=tol)


def test_big_tensors_norms_and_dots_are_float64_accurate():
    """A float32 sum over 16M values is off by ~1e-4 (torch's own norm too); the row-wise
    float64 sums hold the norms to float32 rounding and the dot to ~1e-9 of |a||b|."""
    from probe.stats import step_norms

    g = torch.Generator().manual_seed(0)
    n = 16_000_000 + 123  # a tail past the last full row
    before = torch.rand(n, generator=g) + 1.0
    after = before - 1e-3 * torch.randn(n, generator=g)
    grad = torch.rand(n, generator=g) + 0.5
    small = torch.randn(7, 3, generator=g)
    ref_before = [before.double(), small.double()]
    upd = before.double() - after.double()
    got = step_norms([before.clone(), small.clone()], [after, small], [grad, small])
    assert got[0, 0].item() == pytest.approx(grad.double().norm().item(), rel=2e-7)
    assert got[1, 0].item() == pytest.approx(ref_before[0].norm().item(), rel=2e-7)
    assert got[2, 0].item() == pytest.approx(upd.norm().item(), rel=2e-7)
    dot = (upd @ grad.double()).item()
    assert abs(got[3, 0].item() - dot) < 1e-7 * upd.norm().item() * grad.double().norm().item()
    assert got[1, 1].item() == pytest.approx(ref_before[1].norm().item(), rel=1e-6)
    # torch's float32 norm alone is far off on the same tensor: the test can fail
    assert abs(before.norm().item() - ref_before[0].norm().item()) > 1e-5 * \
        ref_before[0].norm().item()


def test_histogram_samples_keep_to_a_budget_per_step():
    """1,024 values per tensor up to 1,024 tensors, then fewer (never under 64), so the
    values a histogram step hands the writers stay near 2**20 however many tensors."""
    from probe.stats import SAMPLE_BUDGET, sample_size, value_sample

    assert [sample_size(n) for n in (1, 150, 1024)] == [1024] * 3
    assert sample_size(5000) == SAMPLE_BUDGET // 5000 == 209
    assert sample_size(10**6) == 64
    t = torch.arange(100_000.0)
    for n in (64, 209, 1024):
        s = value_sample(t, n)
        assert len(s) <= n and s[0] == 0 and s[1] - s[0] == -(-100_000 // n)
