"""The block schedule's pure math against numpy and hand computations."""

import math

import numpy as np
import pytest
import torch

from optimizers.block_relevance import (
    block_index,
    block_norms,
    block_relevance,
    ema_update,
    loss_stability,
    select_suffix,
)


def test_block_relevance_matches_numpy_concatenated_norms():
    rng = np.random.default_rng(1)
    shapes = [[(3, 4), (4,)], [(5, 5)], [(2, 3, 3), (3,), (7,)], [(6,)]]
    weights = [[rng.normal(size=s).astype(np.float32) for s in blk] for blk in shapes]
    grads = [[rng.normal(scale=0.1, size=s).astype(np.float32) for s in blk] for blk in shapes]
    grads[2][1] = None  # an unused parameter: no gradient, counts as zero
    flat_w = [torch.from_numpy(w) for blk in weights for w in blk]
    flat_g = [None if g is None else torch.from_numpy(g) for blk in grads for g in blk]
    index = block_index([len(b) for b in shapes])
    got = block_relevance(flat_g, flat_w, index, len(shapes), eps=1e-3).numpy()

    expected = []
    for ws, gs in zip(weights, grads):
        wn = np.linalg.norm(np.concatenate([w.ravel() for w in ws]).astype(np.float64))
        gn = np.linalg.norm(np.concatenate([g.ravel() for g in gs if g is not None])
                            .astype(np.float64))
        expected.append(gn / (wn + 1e-3))
    np.testing.assert_allclose(got, expected, rtol=1e-5)


def test_block_norms_bf16_and_sparse_tensors():
    dense = torch.randn(8, 4).to(torch.bfloat16)
    sparse = torch.sparse_coo_tensor([[0, 2, 4]], [3.0, 4.0, 12.0], (5,),
                                     check_invariants=True)
    got = block_norms([dense, sparse], block_index([1, 1]), 2)
    ref = np.linalg.norm(dense.float().numpy())
    np.testing.assert_allclose(got.numpy(), [ref, 13.0], rtol=1e-5)


def test_block_index_and_validation():
    assert block_index([2, 1, 3]).tolist() == [0, 0, 1, 2, 2, 2]
    with pytest.raises(ValueError, match="sizes"):
        block_index([2, 0])
    with pytest.raises(ValueError, match="same length"):
        block_relevance([None], [torch.ones(2), torch.ones(2)], block_index([2]), 1)
    with pytest.raises(ValueError, match="eps"):
        block_relevance([None], [torch.ones(2)], block_index([1]), 1, eps=0.0)


def test_ema_update_by_hand():
    nan = math.nan
    ema = torch.tensor([nan, 2.0, 4.0])
    s = torch.tensor([1.0, 4.0, math.inf])
    out = ema_update(ema, s, 0.75)
    # unseen entry takes s; seen entry 0.75*2 + 0.25*4 = 2.5; non-finite s leaves 4.0
    assert out.tolist() == [1.0, 2.5, 4.0]
    assert torch.isnan(ema_update(torch.tensor([nan]), torch.tensor([nan]), 0.9)).all()


@pytest.mark.parametrize("threshold,expected", [
    (0.4, 1),    # 4 of 10 from the back reaches 4.0
    (0.41, 2),   # needs 4 + 3 = 7
    (0.7, 2),    # 7 reaches 7.0 exactly
    (0.71, 3),   # needs 4 + 3 + 2 = 9
    (0.9, 3),
    (0.91, 4),
    (1.0, 4),
])
def test_select_suffix_hand_computation(threshold, expected):
    assert select_suffix([1.0, 2.0, 3.0, 4.0], threshold) == expected


def test_select_suffix_front_heavy_needs_everything():
    # relevance concentrated in the first block: the suffix must reach back to it
    assert select_suffix([10.0, 0.1, 0.1, 0.1], 0.5) == 4
    assert select_suffix([10.0, 0.1, 0.1, 0.1], 0.02) == 3  # needs 0.206: 0.3
    assert select_suffix([10.0, 0.1, 0.1, 0.1], 0.009) == 1  # 0.1 >= 0.0927


def test_select_suffix_clamps():
    rel = [1.0, 2.0, 3.0, 4.0]
    assert select_suffix(rel, 0.4, min_active=3) == 3
    assert select_suffix(rel, 1.0, max_active=2) == 2
    assert select_suffix(rel, 0.71, min_active=2, max_active=2) == 2


def test_select_suffix_without_information_keeps_all_allowed():
    assert select_suffix([0.0, 0.0, 0.0], 0.5) == 3
    assert select_suffix([1.0, math.nan, 1.0], 0.5) == 3
    assert select_suffix([1.0, math.inf, 1.0], 0.5, max_active=2) == 2


@pytest.mark.parametrize("kw,match", [
    ({"threshold": 0.0}, "threshold"),
    ({"threshold": 1.5}, "threshold"),
    ({"threshold": 0.5, "min_active": 0}, "min_active"),
    ({"threshold": 0.5, "min_active": 3, "max_active": 2}, "min_active"),
    ({"threshold": 0.5, "max_active": 5}, "max_active"),
])
def test_select_suffix_validation(kw, match):
    with pytest.raises(ValueError, match=match):
        select_suffix([1.0, 2.0, 3.0], **kw)
    with pytest.raises(ValueError, match="at least one"):
        select_suffix([], 0.5)


def test_loss_stability_matches_numpy():
    rng = np.random.default_rng(3)
    losses = (2.0 + 3.0 * np.exp(-np.arange(40) / 6.0) + rng.normal(scale=0.05, size=40))
    for w in (2, 5, 10, 20):
        rel, cv = loss_stability(losses.tolist(), w)
        prev, last = losses[-2 * w:-w], losses[-w:]
        assert rel == pytest.approx(abs(last.mean() - prev.mean()) / abs(prev.mean()),
                                    rel=1e-12)
        assert cv == pytest.approx(np.std(last) / abs(last.mean()), rel=1e-12)


def test_loss_stability_needs_two_windows_and_finite_values():
    assert loss_stability([1.0, 1.0, 1.0], 2) == (math.inf, math.inf)
    assert loss_stability([1.0, 1.0, math.nan, 1.0], 2) == (math.inf, math.inf)
    assert loss_stability([1.0, 1.0, 1.0, 1.0], 2) == (0.0, 0.0)
    with pytest.raises(ValueError, match="window"):
        loss_stability([1.0] * 10, 1)
