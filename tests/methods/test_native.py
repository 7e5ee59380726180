"""The fused C kernels (methods/native.py) give bit-identical results to the torch path, and everything
falls back to torch where they cannot run."""

from __future__ import annotations

import itertools
import os
import shutil
import subprocess
import sys

import pytest
import torch

from safemerge.methods import get_method, native
from safemerge.methods.blocks import TaskVector
from safemerge.methods.task_arithmetic import SAMPLE, TopK

NATIVE_ON = native.status().startswith("on")
needs_native = pytest.mark.skipif(not NATIVE_ON, reason=f"native kernels {native.status()}")


def test_kernels_build_where_there_is_a_compiler():
    """CI has a C compiler: a silent fall back to torch there would hide a broken kernel source."""
    if shutil.which((os.environ.get("CC") or "cc").split()[0]) is None or os.environ.get("SAFEMERGE_NATIVE") == "0":
        pytest.skip("no C compiler here (or SAFEMERGE_NATIVE=0)")
    assert NATIVE_ON, native.status()


def _run(method, base, others, *, use_native, out_dtype=None, **kw):
    """The method on (base, task vectors) or (a, b), with the kernels allowed or not."""
    original = native.usable
    if not use_native:
        native.usable = lambda *a: False
    try:
        out = None if out_dtype is None else torch.empty(base.shape, dtype=out_dtype)
        return get_method(method).fn(base, others, out=out, **kw)
    finally:
        native.usable = original


def _bits(x: torch.Tensor) -> torch.Tensor:
    return x.view({2: torch.int16, 4: torch.int32}[x.element_size()])


def _family(n, k, dtype, *, quantized, seed):
    g = torch.Generator().manual_seed(seed)
    base = 0.02 * torch.randn(n, generator=g)
    models = [base + 0.002 * torch.randn(n, generator=g) for _ in range(k)]
    if quantized:  # few distinct magnitudes: many ties at every top-k threshold
        base, models = (base * 512).round() / 512, [(m * 512).round() / 512 for m in models]
    return base.to(dtype), [m.to(dtype) for m in models]


CASES = list(itertools.product(
    [torch.bfloat16, torch.float16, torch.float32],  # input dtype
    [None, torch.bfloat16, torch.float16],  # output dtype (None: float32 result)
    [(1.0, 1.0), (0.7, 0.3, 1.2), (1.0, -0.5), (0.0, 1.0)],  # weights
    [False, True],  # quantized
))


@needs_native
@pytest.mark.parametrize("dtype,out_dtype,weights,quantized", CASES)
def test_ties_and_task_arithmetic_bit_identical(dtype, out_dtype, weights, quantized):
    n = 4 * SAMPLE + 4099  # above the sampled-bracket size, and not a multiple of the kernel's chunk
    base, models = _family(n, len(weights), dtype, quantized=quantized, seed=len(weights) + quantized)
    for method, kw in [("ties", {"density": [0.5] * len(weights)}),
                       ("ties", {"density": [0.2, 1.0, 0.7][:len(weights)], "normalize": False, "lambda_": 0.8}),
                       ("task_arithmetic", {}),
                       ("task_arithmetic", {"normalize": True, "lambda_": 1.3})]:
        got = [_run(method, base, [TaskVector(model=m) for m in models], use_native=flag, out_dtype=out_dtype,
                    weights=list(weights), **kw) for flag in (True, False)]
        assert torch.equal(_bits(got[0]), _bits(got[1])), (method, kw)


@needs_native
@pytest.mark.parametrize("n", [7, 1023, 5000])
def test_precomputed_deltas_and_small_tensors(n):
    g = torch.Generator().manual_seed(n)
    base = torch.randn(n, generator=g)
    deltas = [0.1 * torch.randn(n, generator=g) for _ in range(3)]
    for method, kw in [("ties", {"density": [0.3, 0.5, 1.0]}), ("task_arithmetic", {})]:
        a, b = (_run(method, base, deltas, use_native=flag, weights=[0.5, 1.0, 0.25], **kw) for flag in (True, False))
        assert torch.equal(_bits(a), _bits(b))


@needs_native
def test_threshold_ties_are_admitted_in_index_order():
    """Magnitudes from four values only: the threshold value is shared by many entries, and exactly k
    entries survive, the earliest of the tied ones, in both paths."""
    n = 4 * SAMPLE + 77
    g = torch.Generator().manual_seed(3)
    tau = torch.tensor([0.25, 0.5, 0.75, 1.0])[torch.randint(0, 4, (n,), generator=g)]
    tau *= torch.where(torch.rand(n, generator=g) < 0.5, -1.0, 1.0)
    base = torch.zeros(n)
    k = int(0.6 * n)
    top = TopK(base, TaskVector(delta=tau), k)
    assert not top.inclusive  # the test is about the counting path
    a, b = (_run("ties", base, [tau], use_native=flag, weights=[1.0], density=[0.6]) for flag in (True, False))
    assert torch.equal(_bits(a), _bits(b))
    assert int((a != 0).sum()) == k
    kept_at_threshold = (a.abs() == top.thr).nonzero().flatten()
    tied = (tau.abs() == top.thr).nonzero().flatten()
    assert torch.equal(kept_at_threshold, tied[: kept_at_threshold.numel()])


@needs_native
def test_bracket_overflow_falls_back():
    """When far more entries than the buffer holds sit inside the bracket, the torch loop takes over."""
    n = 4 * SAMPLE + 5
    tau = torch.full((n,), 0.5)
    tau[::7] = 2.0
    assert native.bracket(tau, None, 0.5, 0.5, cap=1000) is None
    above, inside = native.bracket(tau, None, 0.5, 0.5, cap=n)
    assert above == int((tau > 0.5).sum()) and inside.numel() == int((tau == 0.5).sum())
    a, b = (_run("ties", torch.zeros(n), [tau], use_native=flag, weights=[1.0], density=[0.5]) for flag in (True, False))
    assert torch.equal(a, b)


def test_what_the_kernels_cannot_read_takes_the_torch_path():
    assert not native.usable(torch.randn(32, 64).t())  # not contiguous
    assert not native.usable(torch.zeros(3, dtype=torch.float64))
    assert not native.usable(torch.zeros(3, device="meta"))
    base = torch.randn(300, dtype=torch.float64)
    out = _run("ties", base, [0.1 * torch.randn(300, dtype=torch.float64)], use_native=True, weights=[1.0], density=[0.5])
    assert out.dtype == torch.float32 and torch.isfinite(out).all()


@pytest.mark.parametrize("env,expected", [({"SAFEMERGE_NATIVE": "0"}, "off (SAFEMERGE_NATIVE=0)"),
                                          ({"CC": "no-such-compiler"}, "off (no C compiler"),
                                          ({"CC": "false"}, "off (false failed")])
def test_status_says_why_it_is_off(env, expected):
    code = "from safemerge.methods import native; print(native.status())"
    done = subprocess.run([sys.executable, "-c", code], env={**os.environ, **env}, capture_output=True, text=True,
                          timeout=120)
    assert done.returncode == 0, done.stderr
    assert done.stdout.startswith(expected)


@needs_native
@pytest.mark.parametrize("dtype,out_dtype", [(torch.bfloat16, torch.bfloat16), (torch.float32, None),
                                             (torch.float16, torch.float32)])
def test_slerp_combination_bit_identical_and_sums_agree(dtype, out_dtype):
    from safemerge.methods.slerp import _dots

    g = torch.Generator().manual_seed(5)
    a, b = (torch.randn(100_003, generator=g).to(dtype) for _ in range(2))
    got = native.dots(a, b)
    ref = _dots(a, b)
    assert all(abs(x - y) <= 1e-12 * abs(y) for x, y in zip(got, ref))
    fused = torch.empty(a.shape, dtype=out_dtype or torch.float32)
    native.lerp(a, b, 0.3123456789, 0.7234567891, fused)
    plain = a.to(torch.float32, copy=True).mul_(0.3123456789).add_(b.to(torch.float32, copy=True).mul_(0.7234567891))
    assert torch.equal(_bits(fused), _bits(plain.to(fused.dtype)))


@pytest.mark.parametrize("use_native", [True, False])
def test_slerp_does_not_depend_on_alignment_or_threads(use_native):
    """BLAS dot products change with the memory alignment and the thread count; SLERP's sums must not,
    or the same config would give different bits from one run (or reader) to the next."""
    if use_native and not NATIVE_ON:
        pytest.skip(native.status())
    g = torch.Generator().manual_seed(6)
    a = torch.randn(300_001, generator=g)
    b = a + 0.04 * torch.randn(300_001, generator=g)  # cos Ω ≈ 0.999: the coefficients are sensitive to it
    outs = set()
    threads = torch.get_num_threads()
    try:
        for shift in (0, 1, 3, 5):
            for n_threads in (1, 2):
                torch.set_num_threads(n_threads)
                pa, pb = torch.empty(a.numel() + 8), torch.empty(b.numel() + 8)
                pa[shift:shift + a.numel()], pb[shift:shift + b.numel()] = a, b
                x, y = pa[shift:shift + a.numel()], pb[shift:shift + b.numel()]
                out = _run("slerp", x, y, use_native=use_native, t=0.4)
                outs.add(hash(out.numpy().tobytes()))
    finally:
        torch.set_num_threads(threads)
    assert len(outs) == 1


@needs_native
def test_edge_cases_match_or_fall_back():
    """Found in review: each of these once made the two paths differ (or the kernel read out of bounds)."""
    g = torch.Generator().manual_seed(7)
    # sizes that do not match: the kernels are not called, and torch's own error comes out
    with pytest.raises(RuntimeError):
        get_method("task_arithmetic").fn(torch.zeros(5000), [torch.ones(10)], weights=[1.0])
    with pytest.raises(RuntimeError):
        get_method("slerp").fn(torch.randn(1000), torch.randn(10), t=0.5)
    # a positive weight that rounds to 0 in float32: the same divisor rule in both paths
    base, models = _family(5000, 2, torch.float32, quantized=False, seed=7)
    a, b = (_run("ties", base, [TaskVector(model=m) for m in models], use_native=flag, weights=[1e-46, 1.0],
                 density=[0.5, 0.5]) for flag in (True, False))
    torch.testing.assert_close(a, b, rtol=0, atol=0, equal_nan=True)
    # a task vector given both ways: the precomputed delta wins in both paths
    tv = TaskVector(model=torch.randn(5000, generator=g), delta=torch.randn(5000, generator=g))
    a, b = (_run("ties", torch.zeros(5000), [tv], use_native=flag, weights=[1.0], density=[0.3]) for flag in (True, False))
    assert torch.equal(a, b)
    # the last, partial chunk's padding is not counted, whatever the bracket
    above, inside = native.bracket(torch.ones(5), None, 0.0, float("nan"), cap=5)
    assert above == 5 and inside.numel() == 0


def test_slerp_with_nan_input_gives_nan_not_an_exception():
    a, b = torch.randn(100), torch.randn(100)
    a[3] = float("nan")
    assert torch.isnan(get_method("slerp").fn(a, b, t=0.5)).any()
