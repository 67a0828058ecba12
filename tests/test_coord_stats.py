"""Unbiased per-coordinate sums from one step's plug-in statistics, and the noise-only regime share."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from bscale.coord_stats import chi_moments, noise_only_small_batch_fraction, size_moments, unbiased_coordinate_sums
from bscale.kernels.reference import coordinate_stats_reference


@pytest.mark.parametrize("nu", [1, 2, 3, 4, 7, 30, 200])
def test_chi_moments_match_the_gamma_closed_forms(nu):
    special = pytest.importorskip("scipy.special")
    c1, c2 = chi_moments(nu)
    # E[X^a] for X = χ²_ν/ν is (2/ν)^a Γ(ν/2 + a)/Γ(ν/2).
    assert c2 == pytest.approx((2 / nu) ** 0.5 * special.gamma((nu + 1) / 2) / special.gamma(nu / 2), rel=1e-12)
    if nu == 1:
        assert c1 == math.inf
    else:
        assert c1 == pytest.approx((2 / nu) ** -0.5 * special.gamma((nu - 1) / 2) / special.gamma(nu / 2), rel=1e-12)


@pytest.mark.parametrize("k", [2, 3, 4, 5, 8, 9, 16, 17, 64, 65])
def test_noise_only_fraction_is_the_f_distribution_at_pi_over_2(k):
    stats = pytest.importorskip("scipy.stats")
    assert noise_only_small_batch_fraction(k) == pytest.approx(stats.f.cdf(math.pi / 2, 1, k - 1), abs=1e-13)


@pytest.mark.parametrize("k", [3, 4, 8])
def test_step_sums_are_unbiased_for_known_means_and_spreads(k):
    # 20,000 coordinates with chosen μ_i, σ_i (SNRs from 0 to 3, some exactly 0); k microbatches of b examples,
    # so each microbatch mean is N(μ_i, σ_i²/b). The plug-in sums are biased by the step's own noise: Σμ̂² by
    # Σσ²/B, Σμ̂²/σ̂ by far more where the signal is weak; the corrected ones must hit the true sums within a
    # few of their standard errors, taken over repeated steps.
    b = 16.0
    g = torch.Generator().manual_seed(k)
    n = 20_000
    sigma = torch.exp(0.5 * torch.randn(n, generator=g, dtype=torch.float64))
    snr = torch.tensor([0.0, 0.02, 0.1, 0.5, 3.0], dtype=torch.float64).repeat(n // 5)
    mu = snr * sigma
    true_mu_sq, true_ratio = float((mu**2).sum()), float((mu**2 / sigma).sum())
    plug, fixed = [], []
    for _ in range(30):
        means = mu + sigma / math.sqrt(b) * torch.randn(k, n, generator=g, dtype=torch.float64)
        s = means.sum(0)
        c = (means**2).sum(0)
        r = coordinate_stats_reference([s], [c], k, b)
        values = {key: float(r[key]) for key in ("sum_mu_sq", "sum_sigma_sq", "sum_mu_sq_over_sigma", "sum_sigma")}
        plug.append((values["sum_mu_sq"], values["sum_mu_sq_over_sigma"]))
        fixed.append(unbiased_coordinate_sums(**values, k=k, big_batch=k * b))
    plug, fixed = np.array(plug), np.array(fixed)
    se = fixed.std(0, ddof=1) / math.sqrt(len(fixed))
    for i, truth in enumerate((true_mu_sq, true_ratio)):
        assert abs(fixed[:, i].mean() - truth) < 4 * se[i], (i, fixed[:, i].mean(), truth, se[i])
        assert plug[:, i].mean() - truth > 10 * se[i]  # the plug-in sum is off: the test can fail


@pytest.mark.parametrize("k", [2, 3, 4, 8, 31])
def test_size_moments_of_equal_sizes_are_the_chi_moments(k):
    c1, c2, c3 = size_moments((5.0,) * (k - 1) + (5.0 * (1 + 1e-12),))  # through the integrals, not the shortcut
    e1, e2 = chi_moments(k - 1)
    assert c2 == pytest.approx(e2, rel=1e-10)
    if k == 2:
        assert c1 == c3 == math.inf
    else:
        assert c1 == pytest.approx(e1, rel=1e-10) and c3 == pytest.approx(e1, rel=1e-10)
        assert noise_only_small_batch_fraction(k, (5.0,) * (k - 1) + (5.0 * (1 + 1e-12),)) == pytest.approx(
            noise_only_small_batch_fraction(k), abs=1e-10
        )


def _unequal_steps(sizes, steps, g, n=2000):
    """Per-coordinate plug-in sums of `steps` steps whose microbatch means are N(μ_i, σ_i²/b_j), and the truths."""
    k = len(sizes)
    b = torch.tensor(sizes, dtype=torch.float64)
    harmonic = k / float((1 / b).sum())
    sigma = torch.exp(0.5 * torch.randn(n, generator=g, dtype=torch.float64))
    mu = torch.tensor([0.0, 0.05, 0.2, 1.0], dtype=torch.float64).repeat(n // 4) * sigma
    rows = []
    for _ in range(steps):
        means = mu + sigma * torch.randn(k, n, generator=g, dtype=torch.float64) / b.sqrt()[:, None]
        r = coordinate_stats_reference([means.sum(0)], [(means**2).sum(0)], k, harmonic)
        rows.append({key: float(r[key]) for key in ("sum_mu_sq", "sum_sigma_sq", "sum_mu_sq_over_sigma", "sum_sigma")})
    return rows, k * harmonic, float((mu**2 / sigma).sum())


@pytest.mark.parametrize("sizes", [(1.0, 3.0, 8.0, 8.0), (16.0, 1.0, 1.0, 1.0), (32.0, 32.0, 32.0, 8.0)])
def test_ratio_sum_is_unbiased_for_unequal_microbatches(sizes):
    # Microbatches of unequal sizes: σ̂² is no longer a scaled χ² and is correlated with μ̂. Corrected for the
    # sizes, the sum hits the truth; with the equal-size constants it is far off.
    rows, big, truth = _unequal_steps(sizes, 400, torch.Generator().manual_seed(7))
    k = len(sizes)
    fixed = np.array([unbiased_coordinate_sums(**r, k=k, big_batch=big, sizes=sizes)[1] for r in rows])
    naive = np.array([unbiased_coordinate_sums(**r, k=k, big_batch=big)[1] for r in rows])
    se = fixed.std(ddof=1) / math.sqrt(len(fixed))
    assert abs(fixed.mean() - truth) < 4 * se, (fixed.mean(), truth, se)
    assert abs(naive.mean() - truth) > 10 * se  # the equal-size correction is off: the test can fail


@pytest.mark.parametrize("sizes", [(8.0, 8.0, 1.0), (16.0, 1.0, 1.0, 1.0), (12.0, 2.0, 1.0, 1.0, 4.0)])
def test_noise_only_fraction_for_unequal_microbatches(sizes):
    # Pure noise (μ = 0): the share of coordinates with 2Bμ̂² < πσ̂², by simulation, against the Imhof integral.
    k, n = len(sizes), 400_000
    b = torch.tensor(sizes, dtype=torch.float64)
    big = k * k / float((1 / b).sum())
    means = torch.randn(k, n, generator=torch.Generator().manual_seed(3), dtype=torch.float64) / b.sqrt()[:, None]
    mu = means.mean(0)
    sigma_sq = big / k / (k - 1) * ((means - mu) ** 2).sum(0)
    share = float((2 * big * mu**2 < math.pi * sigma_sq).double().mean())
    level = noise_only_small_batch_fraction(k, sizes)
    se = math.sqrt(level * (1 - level) / n)
    assert abs(share - level) < 4 * se, (share, level)
    assert abs(share - noise_only_small_batch_fraction(k)) > 8 * se  # the equal-size level is off: it can fail


def test_sizes_are_checked_and_taken_as_any_sequence():
    assert size_moments([1, 3, 8]) == size_moments((1.0, 3.0, 8.0)) == size_moments(np.array([1.0, 3.0, 8.0]))
    with pytest.raises(ValueError, match="sizes has 3 entries for k = 5"):
        unbiased_coordinate_sums(1.0, 2.0, 3.0, 4.0, k=5, big_batch=10.0, sizes=(1.0, 2.0, 3.0))
    with pytest.raises(ValueError, match="positive microbatch sizes"):
        size_moments([1.0, 0.0, 2.0])
    with pytest.raises(ValueError, match="positive microbatch sizes"):
        noise_only_small_batch_fraction(3, [1.0, 0.0, 2.0])


def test_many_microbatches_with_one_short_are_corrected_exactly():
    # An epoch's short last microbatch among many still carries much of σ̂²: the sizes' constants are used up
    # to MAX_EXACT_K (at k = 129 the equal-size ones were 5% off).
    sizes = [64.0] * 128 + [1.0]
    k, big = len(sizes), len(sizes) ** 2 / sum(1 / b for b in sizes)
    c1, c2, c3 = size_moments(sizes)
    assert c1 > 1.05 * chi_moments(k - 1)[0]
    got = unbiased_coordinate_sums(1.0, 2.0, 3.0, 4.0, k=k, big_batch=big, sizes=sizes)[1]
    assert got == pytest.approx((3.0 - c3 / c2 * 4.0 / big) / c1, rel=1e-12)


@pytest.mark.parametrize("k", [64, 256])
def test_noise_only_integral_stays_accurate_up_to_the_exact_limit(k):
    # Near-equal sizes through Imhof's integral against the F(1, k − 1) closed form, at the largest k it serves.
    sizes = [5.0] * (k - 1) + [5.0 * (1 + 1e-12)]
    assert noise_only_small_batch_fraction(k, sizes) == pytest.approx(noise_only_small_batch_fraction(k), abs=1e-8)


def test_no_unbiased_ratio_from_two_microbatches():
    mu_sq, ratio = unbiased_coordinate_sums(10.0, 40.0, 3.0, 5.0, k=2, big_batch=8.0)
    assert mu_sq == 10.0 - 40.0 / 8.0 and math.isnan(ratio)
