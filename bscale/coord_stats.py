r"""Per-coordinate readings of one step, from the plug-in sums the kernels return.

The kernels reduce plug-in estimates: :math:`\hat\mu_i` (the mean of k microbatch gradients of b examples, so
:math:`\hat\mu_i \sim N(\mu_i, \sigma_i^2/B)` with B = k·b) and the unbiased per-example variance
:math:`\hat\sigma_i^2 = \sigma_i^2 \chi^2_\nu/\nu` with ν = k − 1 degrees of freedom, independent of
:math:`\hat\mu_i` for Gaussian microbatch means. Sums of their ratios are biased by the noise of one step:

.. math::
    E[\hat\mu^2] = \mu^2 + \sigma^2/B, \qquad E[1/\hat\sigma] = c_1/\sigma, \qquad E[\hat\sigma] = c_2\,\sigma,
    \qquad c_1 = \sqrt{\nu/2}\,\frac{\Gamma((\nu-1)/2)}{\Gamma(\nu/2)}, \quad
    c_2 = \sqrt{2/\nu}\,\frac{\Gamma((\nu+1)/2)}{\Gamma(\nu/2)}

so that, coordinate by coordinate and hence summed,

.. math::
    E\Big[\hat\mu^2 - \frac{\hat\sigma^2}{B}\Big] = \mu^2, \qquad
    E\Big[\frac{1}{c_1}\frac{\hat\mu^2}{\hat\sigma} - \frac{\hat\sigma}{c_2 B}\Big] = \frac{\mu^2}{\sigma}

(the second needs ν ≥ 2: with k = 2, E[1/σ̂] is infinite). Ratios taken coordinate by coordinate, the share of
coordinates in Surge's small-batch regime and the SNR histogram, cannot be corrected this way: at one step
:math:`B\hat\mu^2/\hat\sigma^2` follows a noncentral F(1, ν) law, so even where every coordinate is pure noise
(μ = 0) only a share P(F(1, ν) < π/2) reads inside the regime; :func:`noise_only_small_batch_fraction` gives it,
the level to read that statistic against.
"""

from __future__ import annotations

import math


def chi_moments(nu: int) -> tuple[float, float]:
    r"""``(c1, c2)`` = :math:`(E[(\chi^2_\nu/\nu)^{-1/2}], E[(\chi^2_\nu/\nu)^{1/2}])`; c1 is inf for ν ≤ 1."""
    if nu < 1:
        raise ValueError(f"nu must be a positive number of degrees of freedom, got {nu!r}")
    log_half = math.lgamma(nu / 2.0)
    c2 = math.sqrt(2.0 / nu) * math.exp(math.lgamma((nu + 1) / 2.0) - log_half)
    c1 = math.inf if nu <= 1 else math.sqrt(nu / 2.0) * math.exp(math.lgamma((nu - 1) / 2.0) - log_half)
    return c1, c2


def unbiased_coordinate_sums(
    sum_mu_sq: float, sum_sigma_sq: float, sum_mu_sq_over_sigma: float, sum_sigma: float, k: int, big_batch: float
) -> tuple[float, float]:
    r"""Unbiased :math:`(\sum_i \mu_i^2, \sum_i \mu_i^2/\sigma_i)` from one step's plug-in sums (module docstring).

    Args:
        sum_mu_sq, sum_sigma_sq, sum_mu_sq_over_sigma, sum_sigma: :math:`\sum\hat\mu^2, \sum\hat\sigma^2,
            \sum\hat\mu^2/\hat\sigma, \sum\hat\sigma`, as the kernels return them.
        k: microbatches in the step (ν = k − 1).
        big_batch: B = k·b, the batch whose mean μ̂ is.

    Returns:
        The two sums; the second is NaN for k = 2, where no unbiased estimate exists.
    """
    c1, c2 = chi_moments(k - 1)
    mu_sq = sum_mu_sq - sum_sigma_sq / big_batch
    ratio = math.nan if math.isinf(c1) else sum_mu_sq_over_sigma / c1 - sum_sigma / (c2 * big_batch)
    return mu_sq, ratio


def noise_only_small_batch_fraction(k: int) -> float:
    r"""P(F(1, k − 1) < π/2): the expected share of coordinates that read inside Surge's small-batch regime at
    one step of k microbatches when no coordinate has any signal (μ = 0).

    F(1, ν) is the square of Student's t with ν degrees of freedom, whose two-sided probability has the closed
    forms of Abramowitz & Stegun 26.7.3-4 in θ = arctan(√(x/ν)).
    """
    nu = k - 1
    if nu < 1:
        raise ValueError(f"k must be at least 2 microbatches, got {k!r}")
    theta = math.atan(math.sqrt(math.pi / 2.0 / nu))
    s, c = math.sin(theta), math.cos(theta)
    if nu % 2 == 0:  # sinθ (1 + 1/2 cos²θ + 1·3/(2·4) cos⁴θ + ... up to cos^(ν−2)θ)
        term = total = 1.0
        for j in range(1, nu // 2):
            term *= (2 * j - 1) / (2 * j) * c * c
            total += term
        return s * total
    # (2/π)(θ + sinθ (cosθ + 2/3 cos³θ + ... up to cos^(ν−2)θ)); just 2θ/π for ν = 1
    total = 0.0
    if nu >= 3:
        term = total = c
        for j in range(1, (nu - 1) // 2):
            term *= (2 * j) / (2 * j + 1) * c * c
            total += term
    return 2.0 / math.pi * (theta + s * total)
