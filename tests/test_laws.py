"""Tests for bscale.laws: closed forms, limits, fits, properties and a table of bad inputs."""

from __future__ import annotations

import math
from fractions import Fraction

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from bscale.laws import (
    AdamHyperparams,
    CriticalBatchFit,
    adam_law_from_moments,
    adam_optimal_lr_exact,
    cost_optimal_batch,
    fit_critical_batch,
    kaplan_critical_batch,
    linear_rule,
    linear_rule_max_kappa,
    lr_max_from_reference,
    lr_scale,
    optimal_lr,
    peak_batch,
    sqrt_rule,
    steps_examples_tradeoff,
)

OPTIMIZERS = ["adam", "sgd"]
batches = st.floats(min_value=1e-2, max_value=1e9, allow_nan=False, allow_infinity=False)
noises = st.floats(min_value=1e-2, max_value=1e9, allow_nan=False, allow_infinity=False)
lrs = st.floats(min_value=1e-8, max_value=10.0, allow_nan=False, allow_infinity=False)


def golden_max(f, lo: float, hi: float, iters: int = 200) -> float:
    """Arg-max of a unimodal f on [lo, hi] by golden-section search."""
    inv_phi = (math.sqrt(5.0) - 1.0) / 2.0
    for _ in range(iters):
        m1, m2 = hi - inv_phi * (hi - lo), lo + inv_phi * (hi - lo)
        if f(m1) >= f(m2):
            hi = m2
        else:
            lo = m1
    return 0.5 * (lo + hi)


# ------------------------------------------------------------------------------------------ closed forms


@pytest.mark.parametrize(
    ("batch", "noise", "optimizer", "expected"),
    [
        (250.0, 1000.0, "sgd", 1.0 / (1.0 + 4.0)),  # McCandlish eq. 2.7
        (1000.0, 1000.0, "sgd", 0.5),
        (250.0, 1000.0, "adam", 1.0 / (0.5 * (2.0 + 0.5))),  # Surge eq. 2: 0.8
        (4000.0, 1000.0, "adam", 1.0 / (0.5 * (0.5 + 2.0))),  # symmetric in ln(B/B_noise)
        (1000.0, 1000.0, "adam", 1.0),  # the peak: ε_opt = ε_max
    ],
)
def test_optimal_lr_closed_form(batch, noise, optimizer, expected):
    assert optimal_lr(batch, noise, 1.0, optimizer) == pytest.approx(expected, rel=1e-14)
    assert optimal_lr(batch, noise, 3e-4, optimizer) == pytest.approx(3e-4 * expected, rel=1e-14)
    assert isinstance(optimal_lr(batch, noise, 1.0, optimizer), float)


def test_optimal_lr_default_optimizer_is_adam():
    assert optimal_lr(250, 1000, 1.0) == pytest.approx(0.8, rel=1e-14)


def test_optimal_lr_vectorised_matches_scalar():
    bs = np.array([1.0, 10.0, 100.0, 1e3, 1e4, 1e5])
    for opt in OPTIMIZERS:
        got = optimal_lr(bs, 1000.0, 2e-3, opt)
        assert isinstance(got, np.ndarray)
        np.testing.assert_allclose(got, [optimal_lr(float(b), 1000.0, 2e-3, opt) for b in bs], rtol=1e-15)


@pytest.mark.parametrize(
    ("optimizer", "expected"),
    [("adam", 1e-3), ("sgd", 0.8e-3 * (1.0 + 4.0))],  # Surge sec. 3.2 forms
)
def test_lr_max_from_reference_closed_form(optimizer, expected):
    assert lr_max_from_reference(0.8e-3, 250.0, 1000.0, optimizer) == pytest.approx(expected, rel=1e-14)


def test_lr_max_from_reference_adam_formula():
    eps, b, bn = 3e-4, 64.0, 5000.0
    expected = eps / 2 * (math.sqrt(bn / b) + math.sqrt(b / bn))
    assert lr_max_from_reference(eps, b, bn) == pytest.approx(expected, rel=1e-14)


def test_peak_batch():
    assert peak_batch(1234.5) == 1234.5
    assert peak_batch(1234.5, "adam") == 1234.5
    assert peak_batch(1234.5, "sgd") == math.inf


def test_lr_scale_closed_forms():
    assert lr_scale(256, 64, rule="linear") == 4.0
    assert lr_scale(256, 64, rule="sqrt") == 2.0
    assert lr_scale(256, 64, 1000, optimizer="sgd") == pytest.approx(4.0 * 1064 / 1256, rel=1e-14)
    assert lr_scale(256, 64, 1000, optimizer="adam") == pytest.approx(2.0 * 1064 / 1256, rel=1e-14)
    # The noise factor is the ratio of the optimal-LR laws at the two batch sizes.
    for opt in OPTIMIZERS:
        ratio = optimal_lr(256, 1000, 1.0, opt) / optimal_lr(64, 1000, 1.0, opt)
        assert lr_scale(256, 64, 1000, optimizer=opt) == pytest.approx(ratio, rel=1e-13)


@pytest.mark.parametrize("unmeasured", [None, math.inf, float("inf"), np.inf])
def test_lr_scale_unmeasured_noise_is_the_limit(unmeasured):
    # B_noise → ∞: linear for SGD, square root for Adam, exactly.
    assert lr_scale(300, 75, unmeasured, optimizer="sgd") == 4.0
    assert lr_scale(300, 75, unmeasured, optimizer="adam") == 2.0
    assert lr_scale(300, 75, unmeasured) == 2.0  # default rule "noise", default optimizer "adam"


def test_lr_scale_rules_ignore_optimizer():
    for opt in OPTIMIZERS:
        assert lr_scale(90, 10, 50, rule="linear", optimizer=opt) == pytest.approx(9.0, rel=1e-15)
        assert lr_scale(90, 10, 50, rule="sqrt", optimizer=opt) == pytest.approx(3.0, rel=1e-15)


def test_lr_scale_vectorised():
    got = lr_scale(np.array([64.0, 128.0, 256.0]), 64.0, 1000.0, optimizer="sgd")
    np.testing.assert_allclose(got, [1.0, 2 * 1064 / 1128, 4 * 1064 / 1256], rtol=1e-14)
    mixed = lr_scale(256.0, 64.0, np.array([1000.0, np.inf]), optimizer="adam")
    np.testing.assert_allclose(mixed, [2 * 1064 / 1256, 2.0], rtol=1e-14)


def test_sqrt_rule_closed_form():
    hp = sqrt_rule(4, 1e-3)
    assert isinstance(hp, AdamHyperparams)
    assert hp.lr == pytest.approx(2e-3, rel=1e-15)
    assert hp.betas == pytest.approx((0.6, 0.996), rel=1e-14)
    assert hp.eps == pytest.approx(5e-9, rel=1e-15)
    # Shrinking the batch (κ < 1) moves the betas towards 1.
    small = sqrt_rule(0.25, 1e-3, betas=(0.9, 0.99), eps=1e-6)
    assert small.lr == pytest.approx(5e-4, rel=1e-15)
    assert small.betas == pytest.approx((0.975, 0.9975), rel=1e-14)
    assert small.eps == pytest.approx(2e-6, rel=1e-15)
    assert sqrt_rule(9.99, 1.0).betas[0] == pytest.approx(1 - 0.999, rel=1e-9)  # just inside κ(1-β) < 1
    with pytest.raises(AttributeError):
        hp.lr = 1.0  # frozen


def test_sqrt_rule_identity_and_inverse():
    hp = sqrt_rule(1.0, 3e-4, betas=(0.8, 0.95), eps=1e-7)
    assert hp == AdamHyperparams(lr=3e-4, betas=(0.8, 0.95), eps=1e-7)
    up = sqrt_rule(3.0, 3e-4, betas=(0.8, 0.95), eps=1e-7)
    back = sqrt_rule(1 / 3, up.lr, betas=up.betas, eps=up.eps)
    assert back.lr == pytest.approx(3e-4, rel=1e-14)
    assert back.betas == pytest.approx((0.8, 0.95), rel=1e-14)
    assert back.eps == pytest.approx(1e-7, rel=1e-14)


def test_linear_rule():
    assert linear_rule(4, 0.1) == pytest.approx(0.4, rel=1e-15)
    assert linear_rule(0.5, 0.1) == pytest.approx(0.05, rel=1e-15)


def test_linear_rule_max_kappa():
    # G = 2, tr Σ = 1000, B = 50: N = 20, κ_max = (2 - 1)·20/2 = 10, i.e. κ·B = B_simple = 500.
    assert linear_rule_max_kappa(2.0, 1000.0, 50) == pytest.approx(10.0, rel=1e-15)
    assert linear_rule_max_kappa(2.0, 1000.0, 50) * 50 == pytest.approx(1000.0 / 2.0, rel=1e-15)
    # A stricter tolerance c shrinks the bound as c² - 1.
    assert linear_rule_max_kappa(2.0, 1000.0, 50, c=1.1) == pytest.approx(0.21 * 10.0, rel=1e-12)
    # Along a run: the minimum over the steps.
    assert linear_rule_max_kappa([2.0, 4.0, 1.0], [1000.0, 1000.0, 1000.0], 50) == pytest.approx(5.0, rel=1e-15)
    assert linear_rule_max_kappa([2.0, 2.0], 1000.0, [50, 100]) == pytest.approx(5.0, rel=1e-15)
    assert isinstance(linear_rule_max_kappa([2.0, 4.0], 1000.0, 50), float)


def test_kaplan_critical_batch():
    assert kaplan_critical_batch(1.0) == pytest.approx(2e8, rel=1e-15)
    assert kaplan_critical_batch(2.0) == pytest.approx(2e8 / 2 ** (1 / 0.21), rel=1e-14)
    assert kaplan_critical_batch(3.0, b_star=1e6, alpha_b=0.5) == pytest.approx(1e6 / 9.0, rel=1e-14)
    # Lower loss, larger critical batch.
    assert kaplan_critical_batch(2.5) > kaplan_critical_batch(3.0)


def test_cost_optimal_batch():
    assert cost_optimal_batch(1000.0, 10.0) == pytest.approx(100.0, rel=1e-15)
    # It minimises r·S + E with S = S_min(1 + Bn/B), E = E_min(1 + B/Bn), E_min = Bn·S_min
    # (McCandlish App. D).
    bn, r, s_min = 2500.0, 37.0, 11.0
    bs = np.logspace(0, 6, 60001)
    cost = r * s_min * (1 + bn / bs) + bn * s_min * (1 + bs / bn)
    assert bs[np.argmin(cost)] == pytest.approx(cost_optimal_batch(bn, r), rel=2e-4)


def test_steps_examples_tradeoff():
    s_min, e_min = 500.0, 2e6
    b_crit = e_min / s_min
    s, e = steps_examples_tradeoff(b_crit, s_min, e_min)
    assert (s, e) == (pytest.approx(2 * s_min, rel=1e-15), pytest.approx(2 * e_min, rel=1e-15))
    s, e = steps_examples_tradeoff(np.array([1e-3, 1e12]), s_min, e_min)
    assert s[1] == pytest.approx(s_min, rel=1e-6) and e[0] == pytest.approx(e_min, rel=1e-6)
    # (S/S_min - 1)(E/E_min - 1) = 1 for every batch (McCandlish eq. 2.11).
    s, e = steps_examples_tradeoff(np.logspace(0, 7, 15), s_min, e_min)
    np.testing.assert_allclose((s / s_min - 1) * (e / e_min - 1), 1.0, rtol=1e-9)


def test_batch_sizes_need_not_be_whole():
    # A harmonic-mean batch of unequal microbatches is not a whole number; the laws take any positive real.
    assert optimal_lr(37.5, 150.0, 1.0, "sgd") == pytest.approx(0.2, rel=1e-15)
    assert optimal_lr(Fraction(75, 2), 150, 1, "sgd") == pytest.approx(0.2, rel=1e-15)
    assert lr_scale(np.float32(96.0), np.int64(24), rule="sqrt") == pytest.approx(2.0, rel=1e-7)


# ------------------------------------------------------------------------------------------------- limits


@pytest.mark.parametrize(("b", "b_ref"), [(100.0, 37.0), (37.0, 100.0), (1.0, 64.0), (64.0, 64.0)])
def test_small_batch_limit_is_linear_and_sqrt(b, b_ref):
    noise = 1e10  # B/B_noise ~ 1e-8
    kappa = b / b_ref
    assert lr_scale(b, b_ref, noise, optimizer="sgd") == pytest.approx(kappa, rel=1e-6)
    assert lr_scale(b, b_ref, noise, optimizer="adam") == pytest.approx(math.sqrt(kappa), rel=1e-6)
    # And the laws themselves: ε_opt ≈ ε_max·B/B_noise (SGD), 2ε_max·√(B/B_noise) (Adam).
    assert optimal_lr(b, noise, 1.0, "sgd") == pytest.approx(b / noise, rel=1e-6)
    assert optimal_lr(b, noise, 1.0, "adam") == pytest.approx(2 * math.sqrt(b / noise), rel=1e-6)


def test_noise_aware_bends_away_from_the_rules_near_b_noise():
    # At B = 4·B_ref = B_noise the noise-aware factor is well below the rules' (Surge eq. 2).
    assert lr_scale(1000, 250, 1000, optimizer="sgd") < 0.7 * 4.0
    assert lr_scale(1000, 250, 1000, optimizer="adam") < 0.7 * 2.0


@pytest.mark.parametrize("noise", [3.0, 1000.0, 2.5e7])
def test_adam_peak_is_at_b_noise(noise):
    # Golden-section search in ln B on the noise-aware factor (B_ref fixed) and on the law itself.
    def factor(t):
        return lr_scale(math.exp(t), noise / 10, noise, optimizer="adam")

    def law(t):
        return optimal_lr(math.exp(t), noise, 1.0, "adam")

    lo, hi = math.log(noise) - 8.0, math.log(noise) + 5.0
    for f in (factor, law):
        assert math.exp(golden_max(f, lo, hi)) == pytest.approx(noise, rel=1e-6)
    # A fine grid agrees: the grid point nearest B_noise carries the maximum.
    grid = np.logspace(math.log10(noise) - 3, math.log10(noise) + 3, 60001)
    vals = lr_scale(grid, noise / 10, noise, optimizer="adam")
    assert grid[np.argmax(vals)] == pytest.approx(noise, rel=2.5e-4)
    assert optimal_lr(noise, noise, 1.0, "adam") == pytest.approx(1.0, rel=1e-15)


def test_sgd_large_batch_tends_to_lr_max():
    assert optimal_lr(1e15, 1000.0, 0.5, "sgd") == pytest.approx(0.5, rel=1e-11)
    assert optimal_lr(1e6, 1000.0, 0.5, "sgd") < 0.5
    # Adam falls again past the peak, towards zero in the simplified law.
    assert optimal_lr(1e15, 1000.0, 0.5, "adam") < 1e-5


def test_extreme_ratios_do_not_overflow():
    assert optimal_lr(1e300, 1e-300, 1.0, "sgd") == 1.0
    assert optimal_lr(1e-300, 1e300, 1.0, "sgd") == 0.0
    assert optimal_lr(1e300, 1e-300, 1.0, "adam") == 0.0  # far past the peak
    assert optimal_lr(1e-300, 1e300, 1.0, "adam") == 0.0
    assert lr_scale(1e150, 1e-150, 1e300, optimizer="adam") == pytest.approx(1e150, rel=1e-12)


# --------------------------------------------------------------------------------------------- properties


@settings(max_examples=200, deadline=None)
@given(lr=lrs, b=batches, noise=noises, opt=st.sampled_from(OPTIMIZERS))
def test_round_trip_reference(lr, b, noise, opt):
    lr_max = lr_max_from_reference(lr, b, noise, opt)
    assert optimal_lr(b, noise, lr_max, opt) == pytest.approx(lr, rel=1e-12)
    # ε_max is an upper bound of the law everywhere.
    assert lr_max >= lr * (1 - 1e-12)


@settings(max_examples=200, deadline=None)
@given(
    b=batches,
    noise=st.one_of(st.none(), st.just(math.inf), noises),
    rule=st.sampled_from(["noise", "linear", "sqrt"]),
    opt=st.sampled_from(OPTIMIZERS),
)
def test_lr_scale_identity(b, noise, rule, opt):
    assert lr_scale(b, b, noise, rule=rule, optimizer=opt) == pytest.approx(1.0, rel=1e-14)


@settings(max_examples=200, deadline=None)
@given(
    b0=batches,
    b1=batches,
    b2=batches,
    noise=st.one_of(st.none(), noises),
    rule=st.sampled_from(["noise", "linear", "sqrt"]),
    opt=st.sampled_from(OPTIMIZERS),
)
def test_lr_scale_composes(b0, b1, b2, noise, rule, opt):
    step = lr_scale(b1, b0, noise, rule=rule, optimizer=opt) * lr_scale(b2, b1, noise, rule=rule, optimizer=opt)
    assert step == pytest.approx(lr_scale(b2, b0, noise, rule=rule, optimizer=opt), rel=1e-12)


@settings(max_examples=200, deadline=None)
@given(b0=batches, b1=batches, b2=batches, noise=st.one_of(st.none(), noises))
def test_lr_scale_sgd_monotone(b0, b1, b2, noise):
    lo, hi = sorted((b1, b2))
    assert lr_scale(lo, b0, noise, optimizer="sgd") <= lr_scale(hi, b0, noise, optimizer="sgd") * (1 + 1e-14)
    assert optimal_lr(lo, noise or 1.0, 1.0, "sgd") <= optimal_lr(hi, noise or 1.0, 1.0, "sgd")


@settings(max_examples=200, deadline=None)
@given(b=batches, b0=batches, noise=noises)
def test_lr_scale_adam_highest_at_peak(b, b0, noise):
    at_peak = lr_scale(noise, b0, noise, optimizer="adam")
    assert lr_scale(b, b0, noise, optimizer="adam") <= at_peak * (1 + 1e-14)


# ------------------------------------------------------------------------------------------ critical batch

B_GRID = np.array([2.0**k for k in range(4, 15)])  # 16 … 16384


@pytest.mark.parametrize("method", ["linear", "hyperbola"])
def test_fit_recovers_exact_hyperbola(method):
    s_min, b_crit = 5000.0, 1000.0
    steps = s_min * (1 + b_crit / B_GRID)
    fit = fit_critical_batch(B_GRID, steps, method=method)
    assert isinstance(fit, CriticalBatchFit)
    assert fit.method == method
    assert fit.s_min == pytest.approx(s_min, rel=1e-9)
    assert fit.b_crit == pytest.approx(b_crit, rel=1e-9)
    assert fit.e_min == pytest.approx(s_min * b_crit, rel=1e-9)
    assert fit.residual < 1e-9
    assert all(isinstance(v, float) for v in (fit.s_min, fit.e_min, fit.b_crit, fit.residual))


def test_fit_two_points_is_exact():
    steps = 300.0 * (1 + 50.0 / np.array([10.0, 400.0]))
    for method in ("linear", "hyperbola"):
        fit = fit_critical_batch([10, 400], steps, method)
        assert (fit.s_min, fit.b_crit) == (pytest.approx(300.0, rel=1e-9), pytest.approx(50.0, rel=1e-9))


@pytest.mark.parametrize("method", ["linear", "hyperbola"])
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_fit_recovers_noisy_hyperbola(method, seed):
    rng = np.random.default_rng(seed)
    s_min, b_crit = 2000.0, 700.0
    b = np.repeat(B_GRID, 3)  # three runs (seeds) per batch size
    noise = 0.03
    steps = s_min * (1 + b_crit / b) * np.exp(noise * rng.standard_normal(b.size))
    fit = fit_critical_batch(b, steps, method=method)
    assert fit.s_min == pytest.approx(s_min, rel=0.08)
    assert fit.b_crit == pytest.approx(b_crit, rel=0.15)
    assert fit.e_min == pytest.approx(s_min * b_crit, rel=0.15)
    # The misfit is the injected noise, within sampling error.
    assert 0.5 * noise < fit.residual < 1.5 * noise


def test_fit_hyperbola_no_worse_than_linear_in_log_space():
    rng = np.random.default_rng(7)
    steps = 2000.0 * (1 + 700.0 / B_GRID) * np.exp(0.05 * rng.standard_normal(B_GRID.size))
    lin = fit_critical_batch(B_GRID, steps, "linear")
    hyp = fit_critical_batch(B_GRID, steps, "hyperbola")
    # The hyperbola fit minimises exactly the reported residual.
    assert hyp.residual <= lin.residual + 1e-12


@pytest.mark.parametrize("method", ["linear", "hyperbola"])
def test_fit_rejects_data_without_a_critical_batch(method):
    b = np.array([16.0, 64.0, 256.0, 1024.0])
    with pytest.raises(ValueError, match="non-positive S_min"):
        fit_critical_batch(b, 1e7 / b**2, method)  # steps fall faster than 1/B
    with pytest.raises(ValueError, match="non-positive S_min"):
        fit_critical_batch(b, 1e7 / b, method)  # perfect linear scaling everywhere: B_crit = ∞
    with pytest.raises(ValueError, match="non-positive E_min"):
        fit_critical_batch(b, np.array([100.0, 110.0, 120.0, 130.0]), method)  # steps grow with the batch


# -------------------------------------------------------------------------------- Adam's exact law (eq. 9)


def _surge_problem(n: int = 400, snr: float = 1e-3, seed: int = 0):
    """Moments in Surge thm. 3's small-SNR regime; a positive-definite Hessian with a signed rank-one part."""
    rng = np.random.default_rng(seed)
    signs = rng.choice([-1.0, 1.0], size=n)
    sigma = rng.uniform(0.5, 2.0, size=n)
    mu = signs * snr * sigma * rng.uniform(0.5, 1.5, size=n)
    # H = D + ρ s sᵀ: off-diagonal curvature aligned with the mean update makes Σ_{i≠j} u_i u_j H_ij > 0.
    hessian = np.diag(rng.uniform(0.5, 1.5, size=n)) + 0.5 * np.outer(signs, signs)
    return mu, sigma, hessian


def test_exact_one_coordinate_closed_form():
    # n = 1, μ = σ = 1, H = 2: ε_opt = E / ((1 - E²)·2 + E²·2) = E/2, E = erf(√(B/2)).
    for b in (0.5, 2.0, 8.0):
        assert adam_optimal_lr_exact([1.0], [1.0], [[2.0]], b) == pytest.approx(math.erf(math.sqrt(b / 2)) / 2)
        assert adam_optimal_lr_exact([1.0], [1.0], [2.0], b) == pytest.approx(math.erf(math.sqrt(b / 2)) / 2)


def test_exact_matches_monte_carlo_sign_update():
    # ε_opt = μᵀE[V] / tr(E[VVᵀ] H) with V = sign(G_B), G_B ~ N(μ, diag(σ²)/B): sampled, not derived.
    rng = np.random.default_rng(3)
    mu = np.array([0.3, -0.2, 0.05])
    sigma = np.array([1.0, 0.5, 2.0])
    h = np.array([[2.0, 0.3, 0.1], [0.3, 1.0, -0.2], [0.1, -0.2, 1.5]])
    b = 6.0
    v = np.sign(mu + sigma / math.sqrt(b) * rng.standard_normal((400_000, 3)))
    ev, evv = v.mean(axis=0), v.T @ v / v.shape[0]
    sampled = float(mu @ ev / np.trace(evv @ h))
    assert adam_optimal_lr_exact(mu, sigma, h, b) == pytest.approx(sampled, rel=0.01)


def test_exact_agrees_with_simplified_law_in_its_regime():
    mu, sigma, h = _surge_problem()
    lr_max, noise = adam_law_from_moments(mu, sigma, h)
    u = mu / sigma
    assert noise == pytest.approx(math.pi * np.trace(h) / (2 * (u @ h @ u - u**2 @ np.diag(h))), rel=1e-12)
    regime = math.pi / (2 * np.max(u**2))  # B ≪ π σ²/(2μ²) for every coordinate (Surge thm. 3)
    assert noise < 0.05 * regime
    bs = noise * np.logspace(-3, 0.5, 15)
    exact = adam_optimal_lr_exact(mu, sigma, h, bs)
    simple = optimal_lr(bs, noise, lr_max, "adam")
    np.testing.assert_allclose(exact, simple, rtol=0.01)
    # Deep inside the regime the agreement tightens, as erf(x) = 2x/√π·(1 - x²/3 + …) says.
    np.testing.assert_allclose(exact[:3], simple[:3], rtol=1e-4)


def test_exact_law_shows_the_surge():
    mu, sigma, h = _surge_problem()
    _, noise = adam_law_from_moments(mu, sigma, h)
    bs = noise * np.logspace(-2, 2, 801)
    lr = adam_optimal_lr_exact(mu, sigma, h, bs)
    top = int(np.argmax(lr))
    assert 0 < top < bs.size - 1  # rise, peak, fall
    assert bs[top] == pytest.approx(noise, rel=0.05)
    assert np.all(np.diff(lr[: top + 1]) > 0) and np.all(np.diff(lr[top:]) < 0)


def test_exact_large_batch_limit_theorem_4():
    mu, sigma, h = _surge_problem(n=50, seed=5)
    s = np.sign(mu)
    limit = np.abs(mu).sum() / (s @ h @ s)
    assert adam_optimal_lr_exact(mu, sigma, h, 1e16) == pytest.approx(limit, rel=1e-12)


def test_exact_diagonal_hessian_has_no_surge():
    mu, sigma, h = _surge_problem(n=30)
    lr = adam_optimal_lr_exact(mu, sigma, np.diag(h), np.logspace(0, 12, 50))
    # Rises, then saturates at thm. 4's constant once every erf is 1 (diffs of rounding size only).
    assert np.all(np.diff(lr) > -1e-12 * lr.max())
    assert np.all(np.diff(lr[:20]) > 0)
    assert lr[-1] == pytest.approx(np.abs(mu).sum() / np.diag(h).sum(), rel=1e-12)
    with pytest.raises(ValueError, match="off-diagonal"):
        adam_law_from_moments(mu, sigma, np.diag(h))


def test_exact_vectorised_matches_scalar():
    mu, sigma, h = _surge_problem(n=20)
    bs = np.array([1.0, 1e3, 1e6])
    np.testing.assert_allclose(
        adam_optimal_lr_exact(mu, sigma, h, bs),
        [adam_optimal_lr_exact(mu, sigma, h, b) for b in bs],
        rtol=1e-14,
    )


# ------------------------------------------------------------------------------------------- bad inputs

NAN, INF = float("nan"), float("inf")
GOOD_B = np.array([16.0, 64.0, 256.0])
GOOD_S = np.array([900.0, 300.0, 150.0])

BAD_INPUTS = [
    # batch sizes
    (optimal_lr, (0, 1000, 1e-3), {}, r"batch_size must be a finite positive number of examples, got 0"),
    (optimal_lr, (-64, 1000, 1e-3), {}, r"batch_size must be .* got -64"),
    (optimal_lr, (NAN, 1000, 1e-3), {}, r"batch_size must be .* got nan"),
    (optimal_lr, (INF, 1000, 1e-3), {}, r"batch_size must be .* got inf"),
    (optimal_lr, (True, 1000, 1e-3), {}, r"batch_size must be .* got True"),
    (optimal_lr, ("64", 1000, 1e-3), {}, r"batch_size must be .* got '64'"),
    (optimal_lr, (None, 1000, 1e-3), {}, r"batch_size must be .* got None"),
    (optimal_lr, ([64, 0, 8], 1000, 1e-3), {}, r"batch_size must be .* got 0.0 at index 1"),
    (lr_scale, (256, 0), {}, r"ref_batch_size must be a finite positive number of examples, got 0"),
    (lr_max_from_reference, (1e-3, -1, 1000), {}, r"ref_batch_size must be .* got -1"),
    (steps_examples_tradeoff, (0, 100, 1000), {}, r"batch_size must be .* got 0"),
    (linear_rule_max_kappa, (2.0, 1000.0, 0), {}, r"batch_size must be .* got 0"),
    # noise scale
    (optimal_lr, (64, 0, 1e-3), {}, r"noise_scale must be .*B_noise.* got 0"),
    (optimal_lr, (64, INF, 1e-3), {}, r"noise_scale must be .* got inf"),
    (peak_batch, (NAN,), {}, r"noise_scale must be .* got nan"),
    (lr_scale, (256, 64, -5.0), {}, r"noise_scale must be .* or None/inf when not measured yet, got -5.0"),
    (lr_scale, (256, 64, NAN), {}, r"noise_scale must be .* got nan"),
    (lr_scale, (256, 64, -INF), {}, r"noise_scale must be .* got -inf"),
    (cost_optimal_batch, (-1.0, 10.0), {}, r"noise_scale must be .* got -1.0"),
    # learning rates and ratios
    (optimal_lr, (64, 1000, 0), {}, r"lr_max must be a finite positive learning rate, got 0"),
    (lr_max_from_reference, (NAN, 64, 1000), {}, r"ref_lr must be a finite positive learning rate, got nan"),
    (linear_rule, (0, 0.1), {}, r"kappa must be a finite positive batch-size ratio"),
    (linear_rule, (2, -0.1), {}, r"lr must be a finite positive learning rate, got -0.1"),
    (sqrt_rule, (INF, 1e-3), {}, r"kappa must be .* got inf"),
    (sqrt_rule, (4, 0.0), {}, r"lr must be a finite positive learning rate, got 0.0"),
    # the square-root rule's limit κ(1 - β) >= 1
    (
        sqrt_rule,
        (10, 1e-3),
        {},
        r"kappa\*\(1-beta1\) = 10\*\(1-0.9\) = 1 >= 1.*re-base the reference run at a larger batch",
    ),
    (sqrt_rule, (16, 1e-3), {}, r"beta1 <= 0; re-base the reference run at a larger batch"),
    (sqrt_rule, (2000, 1e-3), {"betas": (0.0, 0.999)}, r"kappa\*\(1-beta1\)"),
    (sqrt_rule, (5, 1e-3), {"betas": (0.5, 0.9)}, r"kappa\*\(1-beta1\) = 5\*\(1-0.5\) = 2.5 >= 1"),
    (sqrt_rule, (2000, 1e-3), {"betas": (0.9999, 0.999)}, r"beta2 <= 0; re-base the reference run"),
    (
        sqrt_rule,
        (2, 1e-3),
        {"betas": (1.0, 0.999)},
        r"betas must be a pair \(beta1, beta2\) of numbers in \[0, 1\)",
    ),
    (sqrt_rule, (2, 1e-3), {"betas": (0.9,)}, r"betas must be a pair"),
    (sqrt_rule, (2, 1e-3), {"betas": (NAN, 0.9)}, r"betas must be a pair"),
    (sqrt_rule, (2, 1e-3), {"eps": -1e-8}, r"eps must be a finite number >= 0, got -1e-08"),
    # names from a fixed set
    (
        optimal_lr,
        (64, 1000, 1e-3),
        {"optimizer": "adamw"},
        r"optimizer must be one of 'adam', 'sgd', got 'adamw'",
    ),
    (peak_batch, (1000,), {"optimizer": None}, r"optimizer must be one of"),
    (lr_scale, (256, 64), {"rule": "cubic"}, r"rule must be one of 'linear', 'sqrt', 'noise', got 'cubic'"),
    (
        fit_critical_batch,
        (GOOD_B, GOOD_S),
        {"method": "spline"},
        r"method must be one of 'linear', 'hyperbola'",
    ),
    # critical-batch fits
    (fit_critical_batch, (GOOD_B, GOOD_S[:2]), {}, r"same length \(one step count per run\), got 3 and 2"),
    (fit_critical_batch, ([64.0], [100.0]), {}, r"needs runs at 2 or more distinct batch sizes"),
    (
        fit_critical_batch,
        ([64.0, 64.0], [100.0, 90.0]),
        {},
        r"2 or more distinct batch sizes, got 1 distinct of 2",
    ),
    (fit_critical_batch, (GOOD_B, [900.0, -1.0, 150.0]), {}, r"steps must be .* got -1.0 at index 1"),
    (fit_critical_batch, (GOOD_B, [900.0, NAN, 150.0]), {}, r"steps must be .* got nan at index 1"),
    (fit_critical_batch, ([16.0, INF, 256.0], GOOD_S), {}, r"batch_sizes must be .* got inf at index 1"),
    (fit_critical_batch, (64.0, 100.0), {}, r"batch_sizes must be a 1-D sequence"),
    (
        fit_critical_batch,
        (GOOD_B, 1e7 / GOOD_B**2),
        {},
        r"non-positive S_min.*add runs at larger batch sizes",
    ),
    (
        fit_critical_batch,
        (GOOD_B, [100.0, 110.0, 120.0]),
        {},
        r"non-positive E_min.*add runs at smaller batch",
    ),
    # Li21 bound
    (linear_rule_max_kappa, (0.0, 1000.0, 50), {}, r"grad_sq must be a finite positive .*smoothed estimate"),
    (linear_rule_max_kappa, (2.0, [1000.0, -3.0], 50), {}, r"trace_sigma must be .* got -3.0 at index 1"),
    (linear_rule_max_kappa, (2.0, 1000.0, 50), {"c": 1.0}, r"c must be a finite number > 1, got 1.0"),
    (
        linear_rule_max_kappa,
        ([2.0, 3.0], [1.0, 2.0, 3.0], 50),
        {},
        r"matching lengths .* shapes \(2,\), \(3,\)",
    ),
    # other laws
    (kaplan_critical_batch, (0.0,), {}, r"loss must be a finite positive loss in nats per token, got 0.0"),
    (kaplan_critical_batch, (2.0,), {"alpha_b": -0.2}, r"alpha_b must be a finite positive exponent"),
    (cost_optimal_batch, (1000.0, 0.0), {}, r"step_cost must be a finite positive cost of one step"),
    (steps_examples_tradeoff, (64, 0, 1000), {}, r"s_min must be a finite positive step count, got 0"),
    # Adam's exact law
    (adam_optimal_lr_exact, ([1.0, 2.0], [1.0], [1.0, 1.0], 4), {}, r"sigma must have the shape of mu"),
    (adam_optimal_lr_exact, ([1.0], [0.0], [1.0], 4), {}, r"sigma must be a finite positive"),
    (
        adam_optimal_lr_exact,
        ([1.0, 2.0], [1.0, 1.0], np.eye(3), 4),
        {},
        r"hessian must be an \(2, 2\) matrix",
    ),
    (adam_optimal_lr_exact, ([NAN], [1.0], [1.0], 4), {}, r"mu must be a finite 1-D array"),
    (adam_optimal_lr_exact, ([1.0], [1.0], [1.0], 0), {}, r"batch_size must be .* got 0"),
    (adam_optimal_lr_exact, ([1.0, 1.0], [1.0, 1.0], [[1.0, 0.0], [0.0, -3.0]], 4), {}, r"not positive"),
    (adam_law_from_moments, ([1.0, -1.0], [1.0, 1.0], [[1.0, 0.5], [0.5, 1.0]]), {}, r"has no peak"),
]


@pytest.mark.parametrize(
    ("fn", "args", "kwargs", "message"),
    BAD_INPUTS,
    ids=[f"{i}-{row[0].__name__}" for i, row in enumerate(BAD_INPUTS)],
)
def test_bad_inputs(fn, args, kwargs, message):
    with pytest.raises(ValueError, match=message):
        fn(*args, **kwargs)


_pos = st.floats(min_value=1e-6, max_value=1e9, allow_nan=False, allow_infinity=False)


@settings(max_examples=300, deadline=None)
@given(b=_pos, ref=_pos, noise=st.one_of(_pos, st.just(math.inf), st.none()), lr=_pos)
def test_float_forms_are_bit_identical_to_the_public_laws(b, ref, noise, lr):
    """The wrapper's per-step float forms give exactly the public, validated functions' values."""
    from bscale import laws

    for opt in ("adam", "sgd"):
        for rule in ("noise", "linear", "sqrt"):
            want = lr_scale(b, ref, noise, rule=rule, optimizer=opt)
            assert laws._lr_scale_float(b, ref, noise, rule, opt) == want
        if noise is not None and math.isfinite(noise):
            assert laws._lr_max_float(lr, ref, noise, opt) == lr_max_from_reference(lr, ref, noise, optimizer=opt)


def test_float_forms_take_the_public_spellings():
    from bscale import laws

    assert laws._lr_scale_float(2.0, 1.0, 3.0, "Sqrt", "ADAM") == lr_scale(2.0, 1.0, 3.0, rule="sqrt")
    assert laws._lr_max_float(1.0, 2.0, 3.0, "SGD") == lr_max_from_reference(1.0, 2.0, 3.0, optimizer="sgd")
    with pytest.raises(ValueError, match="rule must be one of"):
        laws._lr_scale_float(2.0, 1.0, 3.0, "cubic", "adam")
    with pytest.raises(ValueError, match="optimizer must be one of"):
        laws._lr_scale_float(2.0, 1.0, 3.0, "noise", "lamb")
    with pytest.raises(ValueError, match="optimizer must be one of"):
        laws._lr_max_float(1.0, 2.0, 3.0, "lamb")
