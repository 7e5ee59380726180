"""Closed-form and property checks of each merge method on small random tensors."""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from safemerge.methods import (
    breadcrumbs, dare_linear, dare_ties, linear_merge, model_stock, slerp_merge, task_arithmetic_merge, ties,
)
from safemerge.methods.task_arithmetic import topk_mask, trim_magnitude

shapes = st.sampled_from([(7,), (4, 5), (3, 2, 6)])
seeds = st.integers(0, 10_000)


def rand(shape, seed, n=1):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(shape, generator=g) for _ in range(n)]


@settings(max_examples=25, deadline=None)
@given(shape=shapes, seed=seeds)
def test_mergealign_alpha_beta_one_is_expert_plus_aligned_minus_base(shape, seed):
    base, dom, ali = rand(shape, seed, 3)
    out = task_arithmetic_merge(base.clone(), [dom - base, ali - base], weights=[1.0, 1.0])
    torch.testing.assert_close(out, dom + ali - base, atol=1e-5, rtol=1e-5)


@settings(max_examples=25, deadline=None)
@given(shape=shapes, seed=seeds, alpha=st.floats(0, 2), beta=st.floats(0, 2))
def test_task_arithmetic_weights_and_lambda(shape, seed, alpha, beta):
    base, a, b = rand(shape, seed, 3)
    out = task_arithmetic_merge(base.clone(), [a.clone(), b.clone()], weights=[alpha, beta], lambda_=0.5)
    torch.testing.assert_close(out, base + 0.5 * (alpha * a + beta * b), atol=1e-5, rtol=1e-5)


@settings(max_examples=25, deadline=None)
@given(shape=shapes, seed=seeds, w=st.floats(0.1, 3))
def test_ties_density_one_single_model_equals_task_arithmetic(shape, seed, w):
    base, d = rand(shape, seed, 2)
    expected = task_arithmetic_merge(base.clone(), [d.clone()], weights=[w])
    out = ties(base.clone(), [d.clone()], weights=[w], density=[1.0], normalize=False)
    torch.testing.assert_close(out, expected)
    # normalised, one model: the disjoint mean of one vector is the vector itself
    out = ties(base.clone(), [d.clone()], weights=[w], density=[1.0], normalize=True)
    torch.testing.assert_close(out, base + d, atol=1e-5, rtol=1e-5)


def test_ties_closed_form():
    base = torch.zeros(4)
    d1 = torch.tensor([3.0, -1.0, 0.5, -2.0])
    d2 = torch.tensor([1.0, 2.0, -4.0, -1.0])
    # density 0.5 keeps the 2 largest |τ| of each: d1 -> [3, 0, 0, -2], d2 -> [0, 2, -4, 0]
    # elected signs of the sum [3, 2, -4, -2]: +, +, -, -; every kept entry agrees; disjoint mean
    out = ties(base, [d1.clone(), d2.clone()], weights=[1.0, 1.0], density=[0.5, 0.5])
    torch.testing.assert_close(out, torch.tensor([3.0, 2.0, -4.0, -2.0]))
    # conflicting signs: the minority entry is dropped, the mean is over agreeing models only
    a, b = torch.tensor([2.0, 1.0]), torch.tensor([-1.0, 3.0])
    out = ties(torch.ones(2), [a.clone(), b.clone()], weights=[1.0, 1.0], density=[1.0, 1.0])
    torch.testing.assert_close(out, torch.tensor([1 + 2.0, 1 + 2.0]))


@settings(max_examples=25, deadline=None)
@given(n=st.integers(1, 300), seed=seeds, data=st.data())
def test_topk_mask_keeps_exactly_k_and_nests(n, seed, data):
    k1 = data.draw(st.integers(0, n))
    k2 = data.draw(st.integers(k1, n))
    x = torch.randint(0, 5, (n,), generator=torch.Generator().manual_seed(seed)).float()  # many ties
    m1, m2 = topk_mask(x, k1), topk_mask(x, k2)
    assert int(m1.sum()) == k1 and int(m2.sum()) == k2
    assert not (m1 & ~m2).any()
    if 0 < k1 < n:
        assert x[m1].min() >= x[~m1].max()


def test_trim_magnitude_keeps_largest():
    d = torch.tensor([0.1, -5.0, 2.0, -0.3, 4.0])
    trim_magnitude(d, 0.4)
    torch.testing.assert_close(d, torch.tensor([0.0, -5.0, 0.0, 0.0, 4.0]))


@pytest.mark.parametrize("t", [0.0, 1.0])
@settings(max_examples=15, deadline=None)
@given(shape=shapes, seed=seeds)
def test_slerp_endpoints(t, shape, seed):
    a, b = rand(shape, seed, 2)
    torch.testing.assert_close(slerp_merge(a, b, t=t), a if t == 0 else b, atol=1e-5, rtol=1e-5)


def test_slerp_midpoint_of_orthogonal_unit_vectors_is_on_the_sphere():
    a, b = torch.tensor([1.0, 0.0]), torch.tensor([0.0, 1.0])
    out = slerp_merge(a, b, t=0.5)
    torch.testing.assert_close(out, torch.tensor([math.sqrt(0.5), math.sqrt(0.5)]))
    # nearly parallel: falls back to linear interpolation
    c = a + 1e-4 * b
    torch.testing.assert_close(slerp_merge(a, c, t=0.3), torch.lerp(a, c, 0.3))


def test_dare_keeps_the_mean_in_expectation():
    torch.manual_seed(0)
    delta = torch.randn(200_000) + 0.5
    base = torch.zeros_like(delta)
    g = torch.Generator().manual_seed(1)
    out = dare_linear(base, [delta.clone()], weights=[1.0], density=[0.3], generator=g)
    assert abs(float(out.mean()) - float(delta.mean())) < 0.02
    kept = (out != 0).float().mean()
    assert abs(float(kept) - 0.3) < 0.01
    nz = out != 0
    torch.testing.assert_close(out[nz], delta[nz] / 0.3)


def test_dare_l1_rescale_keeps_the_l1_norm():
    delta = torch.randn(10_000)
    out = dare_linear(torch.zeros_like(delta), [delta.clone()], weights=[1.0], density=[0.5],
                      generator=torch.Generator().manual_seed(0), rescale_mode="l1")
    assert math.isclose(float(out.abs().sum()), float(delta.abs().sum()), rel_tol=1e-4)


def test_dare_ties_is_deterministic_for_a_generator_seed():
    base, a, b = rand((50, 20), 3, 3)
    run = lambda s: dare_ties(base.clone(), [a.clone(), b.clone()], weights=[1.0, 0.5], density=[0.5, 0.5],
                              generator=torch.Generator().manual_seed(s))
    torch.testing.assert_close(run(7), run(7))
    assert not torch.equal(run(7), run(8))


@settings(max_examples=20, deadline=None)
@given(shape=shapes, seed=seeds, w=st.lists(st.floats(0.1, 2), min_size=2, max_size=4))
def test_linear_is_a_weighted_average(shape, seed, w):
    xs = rand(shape, seed, len(w))
    expected = sum(wi * x for wi, x in zip(w, xs)) / sum(w)
    torch.testing.assert_close(linear_merge(xs, weights=w), expected, atol=1e-5, rtol=1e-5)


def test_breadcrumbs_drops_outliers_and_small_entries():
    d = torch.arange(1.0, 101.0)  # magnitudes 1..100
    out = breadcrumbs(torch.zeros(100), [d.clone()], weights=[1.0], density=[0.5], gamma=[0.1])
    kept = out.nonzero().squeeze(1) + 1
    assert kept.tolist() == list(range(41, 91))  # top 10 (91..100) dropped, then the 40 smallest


def test_model_stock_closed_form():
    base = torch.zeros(2)
    w1, w2 = torch.tensor([1.0, 0.0]), torch.tensor([0.0, 1.0])  # orthogonal task vectors: cos = 0
    torch.testing.assert_close(model_stock(base, [w1, w2]), base)  # t = 0
    w3 = torch.tensor([2.0, 0.0])  # parallel: cos = 1, t = 1, the plain average
    torch.testing.assert_close(model_stock(base, [w1, w3]), (w1 + w3) / 2)


@pytest.mark.parametrize("filter_wise", [False, True])
def test_model_stock_keeps_the_base_where_task_vectors_cancel(filter_wise):
    """Review: at cos = −1/(N−1), t = N·cos / (1 + (N−1)·cos) has no finite value: τ and −τ gave NaN (blamed on a
    weight too large), and nearly opposite ones an update amplified a hundredfold; mergekit keeps the base there."""
    g = torch.Generator().manual_seed(0)
    base, tau = torch.randn(3, 8, generator=g), torch.randn(3, 8, generator=g)
    torch.testing.assert_close(model_stock(base, [base + tau, base - tau], filter_wise=filter_wise), base)
    near = base - tau * (1 + 1e-7)
    assert torch.equal(model_stock(base, [base + tau, near], filter_wise=filter_wise), base)


def _magnitudes_of_kind(kind: str, n: int, *, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    if kind == "gaussian":
        return torch.randn(n, generator=g).abs()
    if kind == "few_values":
        return torch.randint(0, 7, (n,), generator=g).float()
    return (torch.randn(n, generator=g).bfloat16().float() - torch.randn(n, generator=g).bfloat16().float()).abs()


@pytest.mark.parametrize("kind", ["gaussian", "few_values", "bf16_differences"])
def test_topk_select_equals_kthvalue_on_large_tensors(kind):
    from safemerge.methods.task_arithmetic import kth_smallest

    n = 1_200_007  # large enough for the sampled bracket
    x = _magnitudes_of_kind(kind, n, seed=0)
    for rank in (1, 2, n // 3, n // 2, n - 1, n):
        assert float(kth_smallest(x, rank)) == float(x.kthvalue(rank).values)


@pytest.mark.parametrize("kind", ["gaussian", "few_values", "bf16_differences"])
def test_radix_fallback_equals_kthvalue(kind):
    """The radix select (the sampled bracket's fallback) alone, on the same inputs."""
    from safemerge.methods.task_arithmetic import kth_smallest_radix

    n = 400_003
    x = _magnitudes_of_kind(kind, n, seed=1)
    for rank in (1, n // 2, n):
        assert float(kth_smallest_radix(x, rank)) == float(x.kthvalue(rank).values)


@pytest.mark.parametrize("kind", ["gaussian", "few_values", "bf16_differences"])
@pytest.mark.parametrize("n", [1, 97, 1 << 14, 300_007])
def test_every_threshold_select_gives_the_same_triple(kind, n):
    """(threshold, entries above, entries equal) decide the trim's mask: the direct select (small tensors), the
    sorted magnitudes (the in-memory search) and the sampled bracket give the radix select's."""
    from safemerge.methods import task_arithmetic as ta

    g = torch.Generator().manual_seed(n)
    base = torch.randn(n, generator=g)
    sign = torch.where(torch.rand(n, generator=g) < 0.5, -1.0, 1.0)
    model = base + sign * _magnitudes_of_kind(kind, n, seed=4)
    tv = ta.TaskVector(model=model)
    memo = ta.TrimMemo([base, model], budget=4 * n)
    for rank in sorted({1, min(2, n), n // 3 + 1, n // 2 + 1, max(n - 1, 1), n}):
        want = ta._radix_select(base, tv, rank)
        assert ta._direct_select(base, tv, rank) == want
        assert memo.select(base, tv, rank) == want
        if n > 4 * ta.SAMPLE:
            assert ta._bracket_select(base, tv, rank) in (want, None)
    assert memo.left == 0 and len(memo._sorted) == 1


def test_nan_in_a_task_vector_ranks_above_every_magnitude_in_each_select(monkeypatch):
    """As the radix select (NaN's bits order above inf's) and torch's kthvalue have it; the memo keeps no order with
    NaN in it and leaves such a vector to the selects."""
    from safemerge.methods import task_arithmetic as ta

    base, model = torch.zeros(4), torch.tensor([float("nan"), 1.0, 1.0, 1.0])
    tv = ta.TaskVector(model=model)
    assert ta._direct_select(base, tv, 3) == ta._radix_select(base, tv, 3) == (1.0, 1, 3)
    memo = ta.TrimMemo([base, model], budget=1 << 20)
    assert memo.select(base, tv, 3) is None and memo.left == 1 << 20 and list(memo._sorted.values()) == [None]
    monkeypatch.setattr(ta, "_magnitudes", lambda *a: 1 / 0)  # refused once: not sorted again
    assert memo.select(base, tv, 2) is None


def test_sorted_magnitudes_keep_only_held_tensors_within_their_budget():
    from safemerge.methods import task_arithmetic as ta

    base, a, b = torch.zeros(10), torch.arange(10.0), torch.arange(10.0).flip(0)
    memo = ta.TrimMemo([base, a], budget=40)
    assert memo.select(base, ta.TaskVector(model=b), 3) is None  # b is not held: its address could be reused
    assert memo.select(base, ta.TaskVector(model=a), 3) == (2.0, 7, 1) and memo.left == 0
    small = ta.TrimMemo([base, a], budget=39)
    assert small.select(base, ta.TaskVector(model=a), 3) is None and not small._sorted
    capped = ta.TrimMemo([base, a], budget=1 << 20, tensor_cap=9)  # a tensor too large to sort at once: to the selects
    assert capped.select(base, ta.TaskVector(model=a), 3) is None and not capped._sorted
    assert ta.TrimMemo([base, a], budget=1 << 20, tensor_cap=10).select(base, ta.TaskVector(model=a), 3) == (2.0, 7, 1)
    assert capped.draws(base, 0) is not None  # draws need no sort: only the budget limits them
    # in use: a trim inside remembering() reads the memo; outside it does not
    with ta.remembering(memo):
        assert ta.TopK(base, ta.TaskVector(model=a), 4).thr == 6.0
    memo._sorted[next(iter(memo._sorted))] = torch.full((10,), 5.0)  # a planted memo shows which path ran
    with ta.remembering(memo):
        assert ta.TopK(base, ta.TaskVector(model=a), 4).thr == 5.0
    assert ta.TopK(base, ta.TaskVector(model=a), 4).thr == 6.0


def test_topk_bracket_miss_falls_back(monkeypatch):
    """A sample that brackets the wrong place (forced here) still gives the exact top-k."""
    from safemerge.methods import task_arithmetic as ta

    g = torch.Generator().manual_seed(2)
    x = torch.randn(1_000_003, generator=g).abs()
    calls = []
    real = ta._radix_select
    monkeypatch.setattr(ta, "_radix_select", lambda *a: calls.append(1) or real(*a))
    monkeypatch.setattr(ta.TaskVector, "gather", lambda self, base, idx: torch.zeros(idx.numel()))
    k = 1000
    m = topk_mask(x, k)
    assert calls and int(m.sum()) == k and x[m].min() >= x[~m].max()
