"""Tests of ``bscale.estimate`` against closed forms.

Every statistical test draws synthetic per-example gradients ``x = G + L z`` with ``E z = 0`` and
``cov z = I``, so the true mean gradient ``G`` and covariance ``Σ = L Lᵀ`` (``L`` non-diagonal) are known
exactly, and with them ``|G|²``, ``tr(Σ)`` and ``B_simple = tr(Σ)/|G|²`` (McCandlish eq. 2.9).
"""

from __future__ import annotations

import io
import math
import re

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import bscale
from bscale import (
    NoiseEstimate,
    NoiseReading,
    NoiseScaleEstimator,
    microbatch_batch_sizes,
    microbatch_estimates,
    two_batch_estimates,
)

F64 = torch.float64


def _problem(dim: int, b_simple: float, seed: int) -> tuple[torch.Tensor, torch.Tensor, float, float]:
    """``(G, L, tr(Σ), |G|²)`` with ``Σ = L Lᵀ`` dense and ``|G|²`` set to make ``tr(Σ)/|G|² = b_simple``."""
    gen = torch.Generator().manual_seed(seed)
    L = torch.randn(dim, dim, generator=gen, dtype=F64) / math.sqrt(dim)
    trace = L.square().sum().item()  # tr(L Lᵀ) = Σ L_ij²
    G = torch.randn(dim, generator=gen, dtype=F64)
    G = G * math.sqrt(trace / b_simple) / G.norm()
    return G, L, trace, G.square().sum().item()


def _microbatch_means(G, L, shape: tuple[int, ...], b: float, gen: torch.Generator) -> torch.Tensor:
    """Means of microbatches of ``b`` Gaussian examples, drawn directly: ``G + L u, u ~ N(0, I/b)``."""
    z = torch.randn(*shape, G.numel(), generator=gen, dtype=F64) / math.sqrt(b)
    return G + z @ L.T


def _squared_norms(g: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``(mean_j |g_j|², |mean_j g_j|²)`` over the microbatch axis -2 of ``(..., k, d)`` gradients."""
    return g.square().sum(-1).mean(-1), g.mean(-2).square().sum(-1)


def _z_score(values: torch.Tensor, truth: float) -> float:
    """How many standard errors (from the spread of the trials) the trial mean lies from ``truth``."""
    return (values.mean().item() - truth) / (values.std().item() / math.sqrt(values.numel()))


# ---- the two-batch estimates -------------------------------------------------------------------------------


def test_two_batch_estimates_invert_the_expected_norms_exactly():
    # E|G_b|² = |G|² + tr(Σ)/b (McCandlish App. A.1): fed the expectations, the estimator must return the truth.
    grad_sq, trace = 3.0, 700.0
    for b, B in ((1.0, 2.0), (4.0, 32.0), (7.0, 7.5), (3.0, 1000.0)):
        est = two_batch_estimates(grad_sq + trace / b, grad_sq + trace / B, b, B)
        assert isinstance(est, NoiseEstimate)
        assert est.grad_sq == pytest.approx(grad_sq, rel=1e-9)
        assert est.trace_sigma == pytest.approx(trace, rel=1e-12)
        assert est == (est.grad_sq, est.trace_sigma)


def test_two_batch_estimates_accept_tensors_elementwise():
    small, big = torch.tensor([5.0, 2.0, 9.0], dtype=F64), torch.tensor([1.0, 1.5, 0.5], dtype=F64)
    est = two_batch_estimates(small, big, 4, 16)
    for i in range(3):
        one = two_batch_estimates(small[i].item(), big[i].item(), 4, 16)
        assert est.grad_sq[i].item() == pytest.approx(one.grad_sq, rel=1e-15)
        assert est.trace_sigma[i].item() == pytest.approx(one.trace_sigma, rel=1e-15)


def test_batch_sizes_accept_numpy_scalars():
    # A batch size read from an array is a numpy scalar; it must work like the equal Python number.
    assert two_batch_estimates(5.0, 1.0, np.int64(4), np.float32(16)) == two_batch_estimates(5.0, 1.0, 4, 16)
    assert microbatch_batch_sizes(np.array([2, 6])) == microbatch_batch_sizes([2, 6])


def test_microbatch_batch_sizes_is_the_harmonic_mean():
    assert microbatch_batch_sizes([4, 4, 4]) == (4.0, 12.0)
    b, B = microbatch_batch_sizes([1, 3])
    assert b == pytest.approx(1.5, rel=1e-15)  # 2 / (1 + 1/3)
    assert B == pytest.approx(3.0, rel=1e-15)
    b, B = microbatch_batch_sizes([2, 4, 8, 8])
    assert b == pytest.approx(4 / (1 / 2 + 1 / 4 + 1 / 8 + 1 / 8), rel=1e-15)
    assert B == pytest.approx(4 * b, rel=1e-15)


def test_microbatch_trace_is_the_scaled_spread_of_the_microbatches():
    # McCandlish App. A.1 with equal sizes: tr(Σ)_est = b/(k−1) · Σ_j |g_j − ḡ|².
    gen = torch.Generator().manual_seed(3)
    for k, b in ((2, 1), (5, 8), (16, 3)):
        g = torch.randn(k, 7, 3, generator=gen, dtype=F64) + 2.0
        est = microbatch_estimates(g, [b] * k)
        spread = (g - g.mean(0)).square().sum().item()
        assert est.trace_sigma == pytest.approx(b / (k - 1) * spread, rel=1e-12)
        # The list-of-tensors form and the stacked form agree.
        assert microbatch_estimates(list(g), [b] * k) == est


# Each case: microbatch sizes (equal ones, then unequal ones that need the harmonic-mean rule).
_SIZES = [(1, 1), (4, 4, 4, 4), (3,) * 8, (32, 32), (1, 2, 5), (3, 16), (1, 1, 4, 10)]


@pytest.mark.parametrize("sizes", _SIZES, ids=lambda s: "-".join(map(str, s)))
def test_microbatch_estimates_are_unbiased(sizes):
    dim, trials = 5, 20_000
    G, L, trace, grad_sq = _problem(dim, b_simple=6.0, seed=len(sizes) + sum(sizes))
    gen = torch.Generator().manual_seed(11)
    # Skewed per-example noise (a centred exponential, variance 1): unbiasedness needs no Gaussian gradients.
    z = torch.empty(trials, sum(sizes), dim, dtype=F64).exponential_(generator=gen) - 1.0
    x = G + z @ L.T  # (trials, examples, dim) per-example gradients
    g = torch.stack([part.mean(1) for part in x.split(list(sizes), dim=1)], dim=1)  # (trials, k, dim)
    small, big = _squared_norms(g)
    b, B = microbatch_batch_sizes(sizes)
    est = two_batch_estimates(small, big, b, B)
    for t in range(3):  # the vectorised path is the public per-step function, trial by trial
        one = microbatch_estimates(g[t], sizes)
        assert one.grad_sq == pytest.approx(est.grad_sq[t].item(), rel=1e-12, abs=1e-12 * trace)
        assert one.trace_sigma == pytest.approx(est.trace_sigma[t].item(), rel=1e-12)
    # 4 standard errors: a false alarm once in ~16 000 cases. The standard errors are below 1% of tr(Σ) and 3%
    # of |G|² (checked: the test has power), so a bias of a few percent fails.
    assert abs(_z_score(est.grad_sq, grad_sq)) < 4.0
    assert abs(_z_score(est.trace_sigma, trace)) < 4.0
    assert est.trace_sigma.std().item() / math.sqrt(trials) < 0.01 * trace
    assert est.grad_sq.std().item() / math.sqrt(trials) < 0.03 * grad_sq
    if len(set(sizes)) > 1:
        # The arithmetic mean in place of the harmonic one is biased, and this test must see it.
        b_arith = sum(sizes) / len(sizes)
        wrong = two_batch_estimates(small, big, b_arith, len(sizes) * b_arith)
        assert abs(_z_score(wrong.trace_sigma, trace)) > 10.0


# ---- properties --------------------------------------------------------------------------------------------

# Dyadic gradients (integers / 64) keep every sum, square and power-of-2 scaling exact in float64, so the
# properties below can be checked bitwise; general floats are checked to rounding error.
_dyadic = st.integers(-4096, 4096).map(lambda i: i / 64.0)
_sizes = st.floats(0.5, 512.0, allow_nan=False)
# General floats, kept out of the range whose squares are subnormal (where rounding is no longer relative).
_floats = st.floats(-1e3, 1e3, allow_nan=False).map(lambda x: 0.0 if abs(x) < 1e-100 else x)


@st.composite
def _microbatches(draw, elements=_dyadic):
    k = draw(st.integers(2, 6))
    dim = draw(st.integers(1, 4))
    rows = draw(st.lists(st.lists(elements, min_size=dim, max_size=dim), min_size=k, max_size=k))
    sizes = draw(st.lists(_sizes, min_size=k, max_size=k))
    return torch.tensor(rows, dtype=F64), sizes


@settings(max_examples=60, deadline=None)
@given(_microbatches(), st.integers(-40, 40))
def test_scale_by_power_of_two_is_exact(case, e):
    g, sizes = case
    c = 2.0**e
    est, scaled = microbatch_estimates(g, sizes), microbatch_estimates(c * g, sizes)
    assert scaled.grad_sq == c * c * est.grad_sq
    assert scaled.trace_sigma == c * c * est.trace_sigma
    if est.grad_sq != 0:
        assert scaled.trace_sigma / scaled.grad_sq == est.trace_sigma / est.grad_sq


@settings(max_examples=60, deadline=None)
@given(_microbatches(_floats), st.floats(1e-3, 1e3))
def test_scale_invariance_to_rounding(case, c):
    g, sizes = case
    est, scaled = microbatch_estimates(g, sizes), microbatch_estimates(c * g, sizes)
    b, B = microbatch_batch_sizes(sizes)
    small = g.square().sum(1).mean().item()
    # Bounds on the terms each formula subtracts, so the tolerance is relative to what cancels.
    tol = 1e-12 * c * c * small
    assert scaled.grad_sq == pytest.approx(c * c * est.grad_sq, abs=tol * (B + b) / (B - b))
    assert scaled.trace_sigma == pytest.approx(c * c * est.trace_sigma, abs=tol * b * B / (B - b))


@settings(max_examples=60, deadline=None)
@given(_microbatches(), st.randoms(use_true_random=False))
def test_microbatch_order_changes_nothing(case, rnd):
    g, sizes = case
    order = list(range(len(sizes)))
    rnd.shuffle(order)
    permuted = microbatch_estimates(g[order], [sizes[i] for i in order])
    assert permuted == microbatch_estimates(g, sizes)  # bitwise: exact sums, fsum for the harmonic mean


@settings(max_examples=40, deadline=None)
@given(_microbatches(_floats), st.randoms(use_true_random=False))
def test_microbatch_order_changes_nothing_to_rounding(case, rnd):
    g, sizes = case
    order = list(range(len(sizes)))
    rnd.shuffle(order)
    est, permuted = microbatch_estimates(g, sizes), microbatch_estimates(g[order], [sizes[i] for i in order])
    b, B = microbatch_batch_sizes(sizes)
    tol = 1e-12 * g.square().sum(1).mean().item()
    assert permuted.grad_sq == pytest.approx(est.grad_sq, abs=tol * (B + b) / (B - b))
    assert permuted.trace_sigma == pytest.approx(est.trace_sigma, abs=tol * b * B / (B - b))


@settings(max_examples=30, deadline=None)
@given(
    st.lists(st.tuples(_dyadic, _dyadic.map(abs)), min_size=1, max_size=12),
    st.integers(-20, 20),
    st.sampled_from([0.0, 0.5, 0.9, 0.99]),
)
def test_estimator_readings_scale_with_the_gradients(steps, e, beta):
    # Gradients × c (c a power of 2, so exact): |G|², tr(Σ) and their errors × c²; the noise scale unchanged.
    c2 = 4.0**e
    plain, scaled = NoiseScaleEstimator(beta), NoiseScaleEstimator(beta)
    for g, t in steps:
        plain.add(g, t, 8)
        scaled.add(c2 * g, c2 * t, 8)
    a, s = plain.reading(), scaled.reading()
    assert s.noise_scale == a.noise_scale
    assert s.noise_scale_stderr == a.noise_scale_stderr
    for name in ("grad_sq", "grad_sq_stderr", "trace_sigma", "trace_sigma_stderr"):
        va, vs = getattr(a, name), getattr(s, name)
        assert (va is None and vs is None) or vs == c2 * va
    assert s.reason == a.reason


# ---- the smoothed estimator --------------------------------------------------------------------------------


def test_smoothed_noise_scale_converges_to_the_truth():
    # B_simple = 200 with k = 8 microbatches of b = 32: the batch (256) is near B_simple, as in practice.
    G, L, trace, grad_sq = _problem(64, b_simple=200.0, seed=0)
    k, b, steps = 8, 32, 5000
    g = _microbatch_means(G, L, (steps, k), b, torch.Generator().manual_seed(100))
    small, big = _squared_norms(g)
    est = NoiseScaleEstimator(beta=0.999)  # a horizon of ~1000 steps
    for s, bg in zip(small.tolist(), big.tolist(), strict=True):
        est.update(s, bg, b, k * b)
    r = est.reading()
    truth = trace / grad_sq
    assert r.reason is None
    assert r.noise_scale_stderr < 0.01 * truth  # 3% below is 4 or more standard errors
    assert r.noise_scale == pytest.approx(truth, rel=0.03)
    assert r.grad_sq == pytest.approx(grad_sq, rel=0.05)
    assert r.trace_sigma == pytest.approx(trace, rel=0.03)
    assert (r.steps, r.examples) == (steps, steps * k * b)


@pytest.mark.parametrize("batches", [[32] * 3, [32] * 10, [16, 64, 32, 8, 8, 128, 32]])
def test_standard_errors_match_the_weighted_closed_form(batches):
    # Normalised weights a_s ∝ β^(examples after step s / ref) · (1 − β^(B_s/ref)); the error of the mean is
    # √(Σa² · s²) with s² = Σ a (x − x̄)² / (1 − Σa²), and the ratio's by the delta method.
    beta, ref = 0.8, 32
    gen = torch.Generator().manual_seed(len(batches))
    xs = (torch.rand(len(batches), 2, generator=gen, dtype=F64) * torch.tensor([2.0, 50.0], dtype=F64) + 1).tolist()
    est = NoiseScaleEstimator(beta, ref_batch=ref)
    for (g, t), B in zip(xs, batches, strict=True):
        est.add(g, t, B)
    after = np.cumsum(batches[::-1])[::-1] - np.array(batches)  # examples seen after each step
    a = beta ** (after / ref) * (1 - beta ** (np.array(batches) / ref))
    a = a / a.sum()
    x = np.array(xs)
    mean = a @ x
    dev = x - mean
    cov = (a[:, None] * dev).T @ dev / (1 - a @ a) * (a @ a)  # 2×2 covariance of the two weighted means
    r = est.reading()
    assert (r.grad_sq, r.trace_sigma) == (
        pytest.approx(mean[0], rel=1e-12),
        pytest.approx(mean[1], rel=1e-12),
    )
    assert r.grad_sq_stderr == pytest.approx(math.sqrt(cov[0, 0]), rel=1e-9)
    assert r.trace_sigma_stderr == pytest.approx(math.sqrt(cov[1, 1]), rel=1e-9)
    R = mean[1] / mean[0]
    # The delta method for the ratio R = T/G.
    var_r = (cov[1, 1] - 2 * R * cov[0, 1] + R * R * cov[0, 0]) / mean[0] ** 2
    assert r.noise_scale == pytest.approx(R, rel=1e-12)
    assert r.noise_scale_stderr == pytest.approx(math.sqrt(var_r), rel=1e-9)


@pytest.fixture(scope="module")
def coverage_runs():
    """Readings of 2000 independent estimators after 200 steps, and the truth."""
    G, L, trace, grad_sq = _problem(16, b_simple=32.0, seed=7)
    runs, steps, k, b = 2000, 200, 4, 16
    gen = torch.Generator().manual_seed(8)
    readings = []
    for _ in range(runs // 250):  # 250 runs at a time keeps the draws to ~25 MB
        g = _microbatch_means(G, L, (250, steps, k), b, gen)
        est = two_batch_estimates(*_squared_norms(g), b, k * b)
        for gs, ts in zip(est.grad_sq.tolist(), est.trace_sigma.tolist(), strict=True):
            e = NoiseScaleEstimator(beta=0.98)  # ~100 effective steps, enough for the normal approximation
            for g_s, t_s in zip(gs, ts, strict=True):
                e.add(g_s, t_s, k * b)
            readings.append(e.reading())
    return readings, {"noise_scale": trace / grad_sq, "grad_sq": grad_sq, "trace_sigma": trace}


@pytest.mark.parametrize("name", ["noise_scale", "grad_sq", "trace_sigma"])
def test_standard_errors_cover_the_truth_at_the_nominal_rate(coverage_runs, name):
    readings, truth = coverage_runs

    def column(field: str) -> torch.Tensor:  # a missing value (None) counts as a miss
        values = [getattr(r, field) for r in readings]
        return torch.tensor([math.nan if v is None else v for v in values], dtype=F64)

    values, se = column(name), column(name + "_stderr")
    miss = (values - truth[name]).abs()

    def coverage(factor: float) -> float:
        return (miss < 1.96 * factor * se).double().mean().item()

    # Over 2000 runs the binomial sd of a 95% coverage is 0.5%, so [0.92, 0.975] holds a correct error with
    # ~5 sd to spare on each side. A standard error off by ×2 covers ~99.99% (1.96·2 = 3.9 sd), one off by ×½
    # covers ~67%: both fall outside the band, which the last two lines check on these very runs.
    lo, hi = 0.92, 0.975
    assert lo < coverage(1.0) < hi
    assert coverage(2.0) > hi
    assert coverage(0.5) < lo


# ---- forgetting per example --------------------------------------------------------------------------------


@pytest.mark.parametrize("m", [1, 3, 5])
def test_forgetting_is_per_example_not_per_step(m):
    # Feed 1 for the first 2·m·B examples and 0 after. Forgetting β per B examples, the bias-corrected mean is
    # the weight of those examples, (β^(E_after/B) − β^(E/B)) / (1 − β^(E/B)), the same at batch B and at 2B.
    beta, B, n = 0.9, 8, 12  # n steps at 2B, 2n steps at B: E = 2nB examples each
    at_b = NoiseScaleEstimator(beta, ref_batch=B)
    at_2b = NoiseScaleEstimator(beta, ref_batch=B)
    for s in range(2 * n):
        at_b.add(1.0 if s < 2 * m else 0.0, 1.0, B)
    for s in range(n):
        at_2b.add(1.0 if s < m else 0.0, 1.0, 2 * B)
    expected = (beta ** (2 * n - 2 * m) - beta ** (2 * n)) / (1 - beta ** (2 * n))
    assert at_b.raw["grad_sq"] == pytest.approx(expected, rel=1e-12)
    assert at_2b.raw["grad_sq"] == pytest.approx(expected, rel=1e-12)
    assert at_b.examples == at_2b.examples == 2 * n * B


def test_default_reference_batch_is_the_first_step():
    # Without ref_batch the first step's batch decays by beta per step: a run at 2B forgets per 2B examples.
    beta, B, n, m = 0.9, 8, 12, 3
    est = NoiseScaleEstimator(beta)
    for s in range(n):
        est.add(1.0 if s < m else 0.0, 1.0, 2 * B)
    assert est.ref_batch == 2 * B
    assert est.raw["grad_sq"] == pytest.approx((beta ** (n - m) - beta**n) / (1 - beta**n), rel=1e-12)


def test_total_weight_follows_the_examples_when_the_batch_changes():
    beta, ref = 0.97, 16
    est = NoiseScaleEstimator(beta, ref_batch=ref)
    for B in (16, 32, 8, 8, 64, 4, 16, 128):
        est.add(1.0, 2.0, B)
        # W = 1 − β^(examples/ref): the bias correction is the same as after examples/ref steps at ref.
        assert est.state_dict()["weight"] == pytest.approx(1 - beta ** (est.examples / ref), rel=1e-12)
    assert est.raw["grad_sq"] == pytest.approx(1.0, rel=1e-12)  # a constant stays constant
    assert est.steps == 8


# ---- readings when nothing can be said yet -----------------------------------------------------------------


def test_reading_before_any_step():
    est = NoiseScaleEstimator()
    r = est.reading()
    assert isinstance(r, NoiseReading)
    assert (r.noise_scale, r.noise_scale_stderr, r.grad_sq, r.grad_sq_stderr) == (None,) * 4
    assert (r.trace_sigma, r.trace_sigma_stderr, r.steps, r.examples) == (None, None, 0, 0.0)
    assert r.reason
    assert est.noise_scale is None and est.noise_scale_stderr is None
    assert all(math.isnan(v) for v in est.raw.values())
    assert all(math.isnan(v) for k, v in r.as_dict().items() if k not in ("steps", "examples"))
    assert "None" in repr(est)


def test_reading_after_one_step_has_values_but_no_errors():
    est = NoiseScaleEstimator()
    est.add(2.0, 300.0, 64)
    r = est.reading()
    assert r.noise_scale == pytest.approx(150.0, rel=1e-15)
    assert (r.grad_sq, r.trace_sigma) == (pytest.approx(2.0), pytest.approx(300.0))
    assert (r.noise_scale_stderr, r.grad_sq_stderr, r.trace_sigma_stderr) == (None, None, None)
    assert "2 steps" in r.reason
    assert math.isnan(r.as_dict()["noise_scale_stderr"])
    est.add(4.0, 200.0, 64)
    r = est.reading()
    assert r.reason is None
    assert r.noise_scale_stderr > 0 and r.grad_sq_stderr > 0 and r.trace_sigma_stderr > 0


def test_reading_with_a_non_positive_grad_sq_is_none_and_raw_keeps_it():
    est = NoiseScaleEstimator()
    for g, t in ((-3.0, 50.0), (1.0, 70.0), (-1.0, 60.0)):
        est.add(g, t, 32)
    r = est.reading()
    assert r.noise_scale is None and r.noise_scale_stderr is None and r.grad_sq is None
    assert "not positive" in r.reason
    assert r.trace_sigma > 0 and r.trace_sigma_stderr > 0
    raw = est.raw
    assert raw["grad_sq"] < 0  # unclamped
    assert raw["ratio"] == pytest.approx(raw["trace_sigma"] / raw["grad_sq"], rel=1e-15) and raw["ratio"] < 0
    assert (raw["last_grad_sq"], raw["last_trace_sigma"]) == (-1.0, 60.0)
    assert "None" in repr(est)


def test_a_ratio_that_overflows_gives_no_noise_scale():
    est = NoiseScaleEstimator(0.9)
    for _ in range(2):
        est.add(1e-300, 1e10, 8)
    r = est.reading()
    assert r.noise_scale is None and r.noise_scale_stderr is None and "overflows" in r.reason
    assert r.grad_sq == pytest.approx(1e-300) and r.trace_sigma == pytest.approx(1e10)


def test_reading_stays_finite_when_the_averages_decay_to_tiny_values():
    # Steps of zero gradient shrink both averages by beta each, their ratio fixed; after ~37,000 of them at 0.99
    # |G|² is ~1e-162, and its square underflows to 0 (the standard error once divided by it).
    est = NoiseScaleEstimator(0.99)
    for g, t in ((1.0, 50.0), (1.2, 52.0), (0.8, 49.0)):
        est.add(g, t, 16)
    ratio = est.reading().noise_scale
    for _ in range(37_000):
        est.add(0.0, 0.0, 16)
    r = est.reading()
    assert 0.0 < r.grad_sq < 1e-150 and r.grad_sq**2 == 0.0
    assert r.noise_scale == pytest.approx(ratio, rel=1e-6)
    assert r.noise_scale_stderr is not None and math.isfinite(r.noise_scale_stderr)


def test_negative_trace_is_clamped_in_the_reading_only():
    est = NoiseScaleEstimator()
    est.add(1.0, -5.0, 16)
    est.add(1.0, -3.0, 16)
    assert est.reading().trace_sigma == 0.0
    assert est.reading().noise_scale == 0.0
    assert est.raw["trace_sigma"] < 0


def test_beta_zero_keeps_one_step_and_says_why_there_is_no_error():
    est = NoiseScaleEstimator(beta=0.0)
    for g, t in ((1.0, 10.0), (2.0, 50.0), (4.0, 60.0)):
        est.add(g, t, 8)
    r = est.reading()
    assert (r.noise_scale, r.grad_sq, r.trace_sigma) == (15.0, 4.0, 60.0)
    assert r.noise_scale_stderr is None and r.grad_sq_stderr is None
    assert r.reason  # a missing value always comes with its reason


# ---- checkpoints -------------------------------------------------------------------------------------------


def _through_torch_save(state):
    buf = io.BytesIO()
    torch.save(state, buf)
    buf.seek(0)
    return torch.load(buf)  # weights_only by default: the state must be plain Python values


def test_state_dict_round_trip_is_exact_and_continues_bitwise():
    G, L, _, _ = _problem(6, b_simple=20.0, seed=4)
    gen = torch.Generator().manual_seed(5)
    batches = [(4, 16), (8, 32), (2, 16)] * 20  # (b, B) varying: exercises per-example forgetting
    stats = [_squared_norms(_microbatch_means(G, L, (B // b,), b, gen)) for b, B in batches]

    empty = NoiseScaleEstimator(0.9)
    assert repr(_through_torch_save(empty.state_dict())) == repr(empty.state_dict())

    whole, first = NoiseScaleEstimator(0.95), NoiseScaleEstimator(0.95)
    for (b, B), (s, bg) in zip(batches[:30], stats[:30], strict=True):
        whole.update(s.item(), bg.item(), b, B)
        first.update(s.item(), bg.item(), b, B)
    state = _through_torch_save(first.state_dict())
    assert state == whole.state_dict()
    assert all(v is None or type(v) in (int, float) for v in state.values())
    resumed = NoiseScaleEstimator(0.5)  # beta comes from the state
    resumed.load_state_dict(state)
    assert resumed.beta == 0.95 and resumed.reading() == whole.reading()
    for (b, B), (s, bg) in zip(batches[30:], stats[30:], strict=True):
        assert resumed.update(s.item(), bg.item(), b, B) == whole.update(s.item(), bg.item(), b, B)
        assert resumed.reading() == whole.reading()
        assert resumed.raw == whole.raw
    assert resumed.state_dict() == whole.state_dict()


def test_reset_forgets_everything_but_the_settings():
    est = NoiseScaleEstimator(0.9, ref_batch=8)
    est.add(1.0, 2.0, 16)
    est.reset()
    assert est.steps == 0 and est.reading().noise_scale is None
    assert (est.beta, est.ref_batch) == (0.9, 8.0)


# ---- bad input ---------------------------------------------------------------------------------------------

_NAN, _INF = math.nan, math.inf


def _estimator_with_a_step():
    est = NoiseScaleEstimator()
    est.add(1.0, 10.0, 8)
    return est


_BAD_INPUTS = [
    ("b zero", lambda: two_batch_estimates(2.0, 1.0, 0, 8), "small_batch must be a positive, finite number"),
    (
        "b negative",
        lambda: two_batch_estimates(2.0, 1.0, -4, 8),
        "small_batch must be a positive, finite number",
    ),
    (
        "b nan",
        lambda: two_batch_estimates(2.0, 1.0, _NAN, 8),
        "small_batch must be a positive, finite number",
    ),
    (
        "b string",
        lambda: two_batch_estimates(2.0, 1.0, "4", 8),
        "small_batch must be a positive, finite number",
    ),
    (
        "b bool",
        lambda: two_batch_estimates(2.0, 1.0, True, 8),
        "small_batch must be a positive, finite number",
    ),
    ("b tensor", lambda: two_batch_estimates(2.0, 1.0, torch.tensor(4), 8), "small_batch must be a positive"),
    ("B inf", lambda: two_batch_estimates(2.0, 1.0, 4, _INF), "big_batch must be a positive, finite number"),
    ("B None", lambda: two_batch_estimates(2.0, 1.0, 4, None), "big_batch must be a positive, finite number"),
    ("B equal b", lambda: two_batch_estimates(2.0, 1.0, 8, 8), "big_batch must exceed small_batch"),
    ("B below b", lambda: two_batch_estimates(2.0, 1.0, 8, 4), "big_batch must exceed small_batch"),
    ("one size", lambda: microbatch_batch_sizes([4]), "need at least 2 microbatches"),
    ("no sizes", lambda: microbatch_batch_sizes([]), "need at least 2 microbatches"),
    (
        "size zero",
        lambda: microbatch_batch_sizes([4, 0]),
        "microbatch size must be a positive, finite number",
    ),
    (
        "size nan",
        lambda: microbatch_batch_sizes([4, _NAN]),
        "microbatch size must be a positive, finite number",
    ),
    ("size string", lambda: microbatch_batch_sizes([4, "4"]), "microbatch size must be a positive, finite"),
    ("k=1 tensor", lambda: microbatch_estimates(torch.ones(1, 3)), "need at least 2 microbatches"),
    ("k=1 list", lambda: microbatch_estimates([torch.ones(3)]), "need at least 2 microbatches"),
    ("k=0 list", lambda: microbatch_estimates([]), "need at least 2 microbatches"),
    (
        "sizes length",
        lambda: microbatch_estimates(torch.ones(2, 3), [4, 4, 4]),
        "sizes has 3 entries but there are 2",
    ),
    (
        "size in list",
        lambda: microbatch_estimates(torch.ones(2, 3), [4, -1]),
        "microbatch size must be a positive",
    ),
    (
        "grad nan",
        lambda: microbatch_estimates(torch.tensor([[1.0, _NAN], [0.0, 1.0]])),
        "gradients contain NaN or inf",
    ),
    (
        "grad inf",
        lambda: microbatch_estimates(torch.tensor([[1.0, 2.0], [_INF, 1.0]])),
        "gradients contain NaN or inf",
    ),
    ("beta one", lambda: NoiseScaleEstimator(1.0), "Invalid beta: 1.0; it must be in [0, 1)"),
    ("beta above", lambda: NoiseScaleEstimator(1.5), "Invalid beta: 1.5"),
    ("beta negative", lambda: NoiseScaleEstimator(-0.1), "Invalid beta: -0.1"),
    ("beta nan", lambda: NoiseScaleEstimator(_NAN), "Invalid beta: nan"),
    ("beta string", lambda: NoiseScaleEstimator("0.9"), "Invalid beta: '0.9'"),
    ("beta bool", lambda: NoiseScaleEstimator(False), "Invalid beta: False"),
    ("ref zero", lambda: NoiseScaleEstimator(ref_batch=0), "ref_batch must be a positive, finite number"),
    (
        "update nan",
        lambda: _estimator_with_a_step().update(_NAN, 1.0, 4, 8),
        "non-finite gradient statistics",
    ),
    (
        "update inf",
        lambda: _estimator_with_a_step().update(2.0, _INF, 4, 8),
        "non-finite gradient statistics",
    ),
    (
        "update B<=b",
        lambda: _estimator_with_a_step().update(2.0, 1.0, 8, 8),
        "big_batch must exceed small_batch",
    ),
    (
        "update b<=0",
        lambda: _estimator_with_a_step().update(2.0, 1.0, 0, 8),
        "small_batch must be a positive",
    ),
    ("add nan", lambda: _estimator_with_a_step().add(_NAN, 1.0, 8), "non-finite estimates"),
    ("add inf", lambda: _estimator_with_a_step().add(1.0, -_INF, 8), "non-finite estimates"),
    ("add B<=0", lambda: _estimator_with_a_step().add(1.0, 1.0, -8), "batch_size must be a positive, finite"),
    (
        "load junk",
        lambda: NoiseScaleEstimator().load_state_dict({"beta": 0.9}),
        "not a NoiseScaleEstimator state",
    ),
]


@pytest.mark.parametrize(("call", "message"), [c[1:] for c in _BAD_INPUTS], ids=[c[0] for c in _BAD_INPUTS])
def test_bad_input_raises_value_error_naming_the_fix(call, message):
    with pytest.raises(ValueError, match=re.escape(message)):
        call()


def test_rejected_step_leaves_the_estimator_unchanged():
    est = _estimator_with_a_step()
    before = est.state_dict()
    for bad in (
        lambda: est.update(_NAN, 1.0, 4, 8),
        lambda: est.update(2.0, 1.0, 8, 4),
        lambda: est.add(1.0, _INF, 8),
        lambda: est.add(1.0, 1.0, 0),
    ):
        with pytest.raises(ValueError):
            bad()
    assert repr(est.state_dict()) == repr(before)


def test_names_are_exported_flat():
    for name in (
        "NoiseEstimate",
        "NoiseReading",
        "NoiseScaleEstimator",
        "microbatch_batch_sizes",
        "microbatch_estimates",
        "two_batch_estimates",
    ):
        assert name in bscale.__all__
        assert getattr(bscale, name) is getattr(bscale.estimate, name)
