"""della / della_linear, nuslerp, sce and `rescale` on the magnitude methods: closed forms and properties.
(Their agreement with mergekit 0.1.5 itself is in tests/test_mergekit_parity.py.)"""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from safemerge.config import load_config
from safemerge.engine import merge_tensor
from safemerge.errors import ConfigError
from safemerge.methods import breadcrumbs, della, della_linear, nuslerp, sce, slerp_merge, ties
from safemerge.methods.blocks import TaskVector
from safemerge.methods.task_arithmetic import MagPrune


def rand(shape, seed, n=1):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(shape, generator=g) for _ in range(n)]


def gen(seed=0):
    return torch.Generator().manual_seed(seed)


# -- della ----------------------------------------------------------------------------------------------
def _pruned(tau: torch.Tensor, density: float, epsilon: float, seed: int = 0, **kw) -> torch.Tensor:
    base = torch.zeros_like(tau)
    prune = MagPrune(base, TaskVector(delta=tau.reshape(-1)), density, epsilon, seed=seed,
                     rescale=kw.get("rescale", True), rescale_mode=kw.get("rescale_mode", "density"))
    flat = tau.reshape(-1).clone()
    parts = [prune(flat[s:s + 1000]) for s in range(0, flat.numel(), 1000)]  # blocks not aligned to rows
    return torch.cat(parts).view(tau.shape)


def test_magprune_keeps_larger_entries_more_often_and_keeps_the_mean():
    tau = rand((400, 500), 1)[0]
    out = _pruned(tau, 0.5, 0.2)
    kept = out != 0
    rank = tau.abs().argsort(dim=1, stable=True).argsort(dim=1)  # 0 = smallest of its row, ties in index order
    low, high = kept[rank < 50].float().mean(), kept[rank >= 450].float().mean()
    # p runs from 0.3 (smallest) to 0.7 (largest) in each row; 20k entries per group: sd of a share < 0.004
    assert 0.30 < low < 0.33 and 0.67 < high < 0.70
    assert kept.float().mean() == pytest.approx(0.5, abs=0.01)
    # survivors are rescaled by 1/p, so τ is kept in expectation: compare sums over many entries of one sign
    pos = tau > 0
    assert float(out[pos].sum()) == pytest.approx(float(tau[pos].sum()), rel=0.02)
    # the kept entries carry their 1/p factor exactly
    p = 0.3 + 0.4 * rank.float() / 499
    torch.testing.assert_close(out[kept], (tau / p)[kept], rtol=1e-6, atol=0)


def test_magprune_l1_mode_keeps_the_l1_norm_and_no_rescale_only_masks():
    tau = rand((64, 300), 2)[0]
    l1 = _pruned(tau, 0.4, 0.1, rescale_mode="l1")
    assert float(l1.abs().sum()) == pytest.approx(float(tau.abs().sum()), rel=1e-5)
    plain = _pruned(tau, 0.4, 0.1, rescale=False)
    assert torch.equal(plain != 0, l1 != 0)  # the same random stream: the same survivors
    torch.testing.assert_close(plain[plain != 0], tau[plain != 0])


def test_magprune_one_dimensional_tensor_is_one_row_and_seeded():
    tau = rand((5000,), 3)[0]
    a, b = _pruned(tau, 0.6, 0.3, seed=7), _pruned(tau, 0.6, 0.3, seed=7)
    assert torch.equal(a, b) and not torch.equal(a, _pruned(tau, 0.6, 0.3, seed=8))
    kept = a != 0
    order = tau.abs().argsort()
    assert kept[order[:1000]].float().mean() < 0.45 < 0.75 < kept[order[-1000:]].float().mean()


@settings(max_examples=15, deadline=None)
@given(seed=st.integers(0, 10_000), w=st.floats(0.1, 2))
def test_della_with_density_one_is_ties_without_trimming(seed, w):
    base, a, b = rand((6, 7), seed, 3)
    got = della(base, [a - base, b - base], weights=[w, 1.0], density=[1.0, 1.0], epsilon=[0.15, 0.15], generator=gen())
    want = ties(base, [a - base, b - base], weights=[w, 1.0], density=[1.0, 1.0])
    torch.testing.assert_close(got, want)
    lin = della_linear(base, [a - base], weights=[w], density=[1.0], epsilon=[0.15], generator=gen())
    torch.testing.assert_close(lin, base + w * (a - base), atol=1e-5, rtol=1e-5)


def test_della_density_and_epsilon_must_leave_probabilities_inside_zero_one():
    base, a = rand((4, 50), 0, 2)
    with pytest.raises(ValueError, match="density ± epsilon"):
        della_linear(base, [a - base], weights=[1.0], density=[0.9], epsilon=[0.15], generator=gen())
    cfg = {"merge_method": "della", "base_model": "b", "models": [{"model": "x", "parameters": {"weight": 1, "density": 0.5}}],
           "parameters": {"epsilon": 1.5}}
    with pytest.raises(ConfigError, match="epsilon"):
        load_config(cfg)


# -- rescale on the magnitude methods -----------------------------------------------------------------
def test_ties_rescale_keeps_each_trimmed_task_vectors_l1_norm():
    base, a = rand((30, 40), 4, 2)
    tau = a - base
    plain = ties(base, [tau.clone()], weights=[1.0], density=[0.3]) - base
    scaled = ties(base, [tau.clone()], weights=[1.0], density=[0.3], rescale=True) - base
    assert torch.equal(plain != 0, scaled != 0)
    factor = float(tau.abs().sum() / plain.abs().sum())
    torch.testing.assert_close(scaled, plain * factor, rtol=1e-5, atol=1e-6)
    crumbs = breadcrumbs(base, [tau.clone()], weights=[1.0], density=[0.5], gamma=[0.05], rescale=True) - base
    assert float(crumbs.abs().sum()) == pytest.approx(float(tau.abs().sum()), rel=1e-5)


def test_rescale_on_task_arithmetic_is_accepted_and_changes_nothing():
    base, a = rand((8, 9), 5, 2)
    cfg = {"merge_method": "task_arithmetic", "base_model": "b", "models": [{"model": "a", "parameters": {"weight": 0.5}}]}
    plain = merge_tensor(load_config(cfg), name="w", t=0, tensors={"b": base, "a": a})
    cfg["parameters"] = {"rescale": True}
    assert torch.equal(merge_tensor(load_config(cfg), name="w", t=0, tensors={"b": base, "a": a}), plain)


# -- nuslerp --------------------------------------------------------------------------------------------
@settings(max_examples=20, deadline=None)
@given(seed=st.integers(0, 10_000), t=st.floats(0.0, 1.0))
def test_nuslerp_without_base_flattened_is_slerp_at_t_equal_w2_over_the_sum(seed, t):
    a, b = rand((16, 20), seed, 2)  # random: far from parallel, both take the spherical branch
    got = nuslerp(None, [a, b], weights=[1.0 - t, t])
    torch.testing.assert_close(got, slerp_merge(a, b, t=t), atol=1e-5, rtol=1e-5)


def test_nuslerp_endpoints_weights_summing_to_zero_and_the_base():
    base, a, b = rand((6, 10), 6, 3)
    torch.testing.assert_close(nuslerp(None, [a, b], weights=[2.0, 0.0]), a)
    torch.testing.assert_close(nuslerp(base, [a, b], weights=[0.0, 3.0]), b, atol=1e-6, rtol=1e-6)
    torch.testing.assert_close(nuslerp(None, [a, b], weights=[1.0, -1.0]), nuslerp(None, [a, b], weights=[1.0, 1.0]))
    with_base = nuslerp(base, [a, b], weights=[1.0, 1.0])
    torch.testing.assert_close(with_base, base + nuslerp(None, [a - base, b - base], weights=[1.0, 1.0]))


def test_nuslerp_rows_and_columns_are_interpolated_on_their_own():
    a, b = rand((5, 8), 7, 2)
    rows = nuslerp(None, [a, b], weights=[0.3, 0.7], nuslerp_flatten=False)
    cols = nuslerp(None, [a, b], weights=[0.3, 0.7], nuslerp_flatten=False, nuslerp_row_wise=True)
    for i in range(5):
        torch.testing.assert_close(rows[i], slerp_merge(a[i], b[i], t=0.7), atol=1e-5, rtol=1e-5)
    for j in range(8):
        torch.testing.assert_close(cols[:, j], slerp_merge(a[:, j], b[:, j], t=0.7), atol=1e-5, rtol=1e-5)
    same = nuslerp(None, [a, a * 2], weights=[1.0, 1.0], nuslerp_flatten=False)  # parallel rows: linear
    torch.testing.assert_close(same, 1.5 * a)


def test_nuslerp_config_takes_exactly_two_models_and_an_optional_base():
    two = [{"model": m, "parameters": {"weight": 0.5}} for m in ("x", "y")]
    load_config({"merge_method": "nuslerp", "models": two})
    load_config({"merge_method": "nuslerp", "base_model": "b", "models": two})
    with pytest.raises(ConfigError, match="exactly 2 models"):
        load_config({"merge_method": "nuslerp", "models": two + [{"model": "z", "parameters": {"weight": 1}}]})


# -- sce ------------------------------------------------------------------------------------------------
def test_sce_weights_by_mean_square_and_erases_disagreeing_signs():
    base, tau = rand((10, 12), 8, 2)
    tau = tau.abs()
    out = sce(base, [tau, 2 * tau])  # weights 1/5 and 4/5, every sign agrees
    torch.testing.assert_close(out, base + 1.8 * tau, rtol=1e-5, atol=1e-6)
    out = sce(base, [tau, -0.5 * tau])  # Σ > 0: the second always disagrees and is erased
    torch.testing.assert_close(out, base + tau, rtol=1e-5, atol=1e-6)


def test_sce_select_topk_keeps_the_elements_of_largest_variance():
    base = torch.zeros(100)
    a = torch.zeros(100)
    b = torch.zeros(100)
    a[:10], b[:10] = 1.0, 3.0  # variance 1 on the first 10 elements
    a[10:], b[10:] = 0.5, 0.5  # variance 0 elsewhere (and not counted in k)
    out = sce(base, [a, b], select_topk=0.5)  # k = int(10 · 0.5) = 5 of the varying elements, the first five (ties in index order)
    assert torch.count_nonzero(out) == 5 and torch.count_nonzero(out[:5]) == 5


def test_a_methods_parameter_error_names_the_method_and_tensor():
    base, a = rand((4, 50), 9, 2)
    cfg = {"merge_method": "della_linear", "base_model": "b",
           "models": [{"model": "a", "parameters": {"weight": 1.0, "density": 0.9}}]}
    with pytest.raises(ConfigError, match=r"della_linear, tensor model\.norm\.weight: density ± epsilon"):
        merge_tensor(load_config(cfg), name="model.norm.weight", t=0, tensors={"b": base, "a": a})


def test_sce_counts_k_as_mergekit_does():
    # 90 · 0.7 is 62.99999999999999 in float64 but 63.0 in float32, mergekit's arithmetic (a tensor times a float)
    base = torch.zeros(90)
    a, b = torch.zeros(90), torch.arange(1, 91, dtype=torch.float32)  # 90 distinct non-zero variances
    assert torch.count_nonzero(sce(base, [a, b], select_topk=0.7)) == 63


# -- ram, ramplus_tl ----------------------------------------------------------------------------------------
def test_ram_keeps_a_lone_change_whole_and_averages_shared_ones():
    from safemerge.methods import ram_merge, ramplus_tl

    base = torch.full((6,), 10.0)
    a = base + torch.tensor([1.0, 0.0, 2.0, 0.0, 4.0, 0.0])
    b = base + torch.tensor([0.0, 3.0, 4.0, 0.0, 1e-6, 0.0])
    c = base + torch.tensor([0.0, 0.0, 0.0, 0.0, 2.0, 0.0])
    got = ram_merge(base, [a - base, b - base, c - base])
    # alone: kept whole; shared: the mean of the changes only (b's 1e-6 is below epsilon, not a change); none: base
    assert torch.allclose(got, base + torch.tensor([1.0, 3.0, 3.0, 0.0, 3.0, 0.0]), atol=1e-6)
    # RAM+: a has 1 lone change and 2 shared, so its lone one is boosted by 1 + r·min(2/1, alpha) = 1 + 0.5·1.5;
    # b: 1 lone, 1 shared: 1 + 0.5·1; c: no lone change to boost. Shared entries as in RAM.
    plus = ramplus_tl(base, [a - base, b - base, c - base], r=0.5, alpha=1.5)
    assert torch.allclose(plus, base + torch.tensor([1.75, 4.5, 3.0, 0.0, 3.0, 0.0]), atol=1e-6)
    assert torch.equal(ram_merge(base, []), base)


# -- nearswap, multislerp, karcher ----------------------------------------------------------------------
def test_nearswap_takes_near_values_and_moves_far_ones_by_t():
    from safemerge.methods import nearswap

    a = torch.zeros(1000)
    b = torch.linspace(-1, 1, 1000)
    out = nearswap(a, b, t=0.25)
    near = b.abs() <= 0.25
    assert torch.allclose(out[near], b[near], atol=1e-7)  # within t: the other model's value
    assert torch.allclose(out[~near], 0.25 * b[~near].sign(), atol=1e-6)  # beyond: t toward it
    assert torch.equal(nearswap(a, b, t=0.0), a)


def test_multislerp_is_the_normalised_direction_at_the_mean_norm():
    from safemerge.methods import multislerp

    x, y = torch.zeros(2, 50), torch.zeros(2, 50)
    x[0, 0], y[1, 3] = 2.0, 4.0  # orthogonal, norms 2 and 4
    out = multislerp(None, [x, y], weights=[1.0, 1.0])
    want = torch.zeros(2, 50)
    want[0, 0] = want[1, 3] = 3.0 / 2**0.5  # the bisector, at the mean norm 3
    assert torch.allclose(out, want, atol=1e-6)
    base = torch.randn(2, 50, generator=gen())
    assert torch.allclose(multislerp(base, [base + x, base + y], weights=[3.0, 3.0]), base + want, atol=1e-6)
    unnormalised = multislerp(None, [x, y], weights=[1.0, 1.0], normalize_weights=False)
    assert torch.allclose(unnormalised, 2 * want, atol=1e-6)  # at Σ w_i‖x_i‖ = 6
    assert torch.equal(multislerp(None, [x], weights=[0.3]), x)  # one model: as it is
    assert torch.allclose(multislerp(None, [x, -x], weights=[1.0, 1.0]), torch.zeros_like(x))  # antipodal: linear
    with pytest.raises(ConfigError, match="multislerp, tensor w: the weighted sum of the models' directions is zero"):
        cfg = load_config({"merge_method": "multislerp", "models": [
            {"model": m, "parameters": {"weight": w}} for m, w in (("a", 1.0), ("b", 1.0), ("c", 0.0))]})
        merge_tensor(cfg, name="w", t=0.0, tensors={"a": x, "b": -x, "c": y})


def test_karcher_mean_is_a_stationary_point_at_the_mean_norm():
    from safemerge.methods import karcher

    xs = rand((30, 40), 3, n=3)
    xs = [x + 0.8 * xs[0] for x in xs]  # correlated, as fine-tunes of one base are
    out = karcher(xs, max_iter=200, tol=1e-12)
    norms = [float(x.norm()) for x in xs]
    assert float(out.norm()) == pytest.approx(sum(norms) / 3, rel=1e-5)
    m = (out / out.norm()).double().flatten()
    grad = torch.zeros_like(m)  # Σ log_m(u_i) vanishes at the Karcher mean
    for x in xs:
        u = (x / x.norm()).double().flatten()
        cos = float(m @ u)
        theta = torch.acos(torch.tensor(cos)).item()
        grad += theta / torch.sin(torch.tensor(theta)).item() * (u - cos * m)
    assert float(grad.norm()) < 1e-5
    # two points: the midpoint of the arc; one: as it is; all zero: zero
    a, b = torch.zeros(10), torch.zeros(10)
    a[0], b[1] = 1.0, 3.0
    assert torch.allclose(karcher([a, b]), 2.0 * torch.tensor([1, 1] + [0] * 8) / 2**0.5, atol=1e-6)
    assert torch.equal(karcher([a]), a)
    assert not karcher([torch.zeros(5), torch.zeros(5)]).any()


# -- arcee_fusion ---------------------------------------------------------------------------------------
def _fusion_reference(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """The rule written out on whole tensors: importance per element, quantiles from one full sort."""
    p = torch.softmax(b, dim=-1) + 1e-8
    q = torch.softmax(a, dim=-1) + 1e-8
    importance = (b - a).abs() * (p * (p / q).log()).sum(-1, keepdim=True)
    s = importance.flatten().sort().values
    n = s.numel()
    q1, med, q3 = (s[int(f * (n - 1))] for f in (0.25, 0.5, 0.75))
    return torch.where(importance >= med + 1.5 * (q3 - q1), b, a)


def test_arcee_fusion_keeps_the_outlier_changes_of_the_rows_that_moved_most():
    from safemerge.methods import arcee_fusion

    a = torch.randn(3000, 100, generator=gen())  # more rows than one block: the importance is built in blocks
    b = a + 0.01 * torch.randn(3000, 100, generator=gen(1))
    b[7] += torch.linspace(-2, 2, 100)  # one row with a large, row-wide change
    out = arcee_fusion(a, b)
    kept = out != a
    assert torch.allclose(out[kept], b[kept], atol=1e-6)
    assert torch.allclose(out, _fusion_reference(a, b), atol=1e-6)
    assert kept[7].float().mean() > 0.5  # the row whose softmax moved keeps most of its change
    assert kept.float().mean() < 0.1  # an outlier rule: most elements stay the base's
    one_d = arcee_fusion(a[0], b[0])  # a vector is one row
    assert torch.allclose(one_d, _fusion_reference(a[0], b[0]), atol=1e-6)
    assert torch.equal(arcee_fusion(a, a.clone()), a)  # no change: the base


def test_arcee_fusion_takes_a_base_and_exactly_one_model():
    with pytest.raises(ConfigError, match="arcee_fusion"):
        load_config({"merge_method": "arcee_fusion", "base_model": "b",
                     "models": [{"model": "x"}, {"model": "y"}]})
    with pytest.raises(ConfigError, match="base_model"):
        load_config({"merge_method": "arcee_fusion", "models": [{"model": "x"}, {"model": "y"}]})
    assert load_config({"merge_method": "arcee_fusion", "base_model": "b", "models": [{"model": "x"}]}).merge_method \
        == "arcee_fusion"


def test_arcee_fusion_quantiles_are_the_sorted_elements_at_every_rank():
    from safemerge.methods.fusion import _kth_values

    cases = [torch.randn(1001, generator=gen()), torch.tensor([0.0, -0.0, 1.0, -2.0, 5.0, 5.0]),
             torch.randn(300_000, generator=gen(2)) * 1e-39,  # subnormals, both signs
             torch.randint(0, 3, (5000,), generator=gen(3)).float(), torch.tensor([3.0]),  # ties; one element
             torch.cat([torch.arange(10.0), torch.softmax(torch.tensor([1.0, float("nan")]), -1),  # NaN, sign bit set
                        torch.tensor([float("inf"), -float("inf")])])]
    for x in cases:
        ranks = sorted({0, (x.numel() - 1) // 4, (x.numel() - 1) // 2, 3 * (x.numel() - 1) // 4, x.numel() - 1})
        want = x.sort().values[ranks]
        torch.testing.assert_close(torch.stack(_kth_values(x, ranks)), want, rtol=0, atol=0, equal_nan=True)
    from safemerge.methods import arcee_fusion

    assert arcee_fusion(torch.zeros(0, 8), torch.zeros(0, 8)).shape == (0, 8)
