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

**Unequal microbatches.** With sizes b_j the microbatch means are N(μ, σ²/b_j), μ̂ is still their plain mean and
σ̂² = b/(k−1) Σ_j (g_j − μ̂)² with b the harmonic mean, so E[μ̂²] = μ² + σ²/B and E[σ̂²] = σ² still hold; but σ̂² is
no longer a scaled χ², and it is correlated with μ̂. The odd moments of μ̂ − μ vanish (reflect every g_j about μ),
so E[μ̂²/σ̂] = c1·μ²/σ + c3·σ/B and E[σ̂] = c2·σ, with c1, c2, c3 functions of the sizes alone
(:func:`size_moments`; c3 = c1 for equal sizes), and the same correction holds with c3/c2 in place of 1/c2.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Sequence

import numpy

# Up to this many microbatches the unequal-size corrections are exact (to ~1e-9) and cost under ~60 ms per new
# pattern of sizes. Beyond it the noise-only integral's oscillation outruns its grid and the cost grows as k³, so
# the equal-size constants (with the harmonic-mean batch) are used: with one microbatch much shorter than the
# others (1 example among 64s) that leaves Σ μ̂²/σ̂ ~2% off and the noise-only level ~3e-3 off at k ≈ 256, less as
# k grows.
MAX_EXACT_K = 256


def chi_moments(nu: int) -> tuple[float, float]:
    r"""``(c1, c2)`` = :math:`(E[(\chi^2_\nu/\nu)^{-1/2}], E[(\chi^2_\nu/\nu)^{1/2}])`; c1 is inf for ν ≤ 1."""
    if nu < 1:
        raise ValueError(f"nu must be a positive number of degrees of freedom, got {nu!r}")
    log_half = math.lgamma(nu / 2.0)
    c2 = math.sqrt(2.0 / nu) * math.exp(math.lgamma((nu + 1) / 2.0) - log_half)
    c1 = math.inf if nu <= 1 else math.sqrt(nu / 2.0) * math.exp(math.lgamma((nu - 1) / 2.0) - log_half)
    return c1, c2


def unbiased_coordinate_sums(
    sum_mu_sq: float,
    sum_sigma_sq: float,
    sum_mu_sq_over_sigma: float,
    sum_sigma: float,
    k: int,
    big_batch: float,
    sizes: Sequence[float] | None = None,
) -> tuple[float, float]:
    r"""Unbiased :math:`(\sum_i \mu_i^2, \sum_i \mu_i^2/\sigma_i)` from one step's plug-in sums (module docstring).

    Args:
        sum_mu_sq, sum_sigma_sq, sum_mu_sq_over_sigma, sum_sigma: :math:`\sum\hat\mu^2, \sum\hat\sigma^2,
            \sum\hat\mu^2/\hat\sigma, \sum\hat\sigma`, as the kernels return them.
        k: microbatches in the step (ν = k − 1).
        big_batch: B = k·b, the batch whose mean μ̂ is (b the harmonic mean of the sizes).
        sizes: the k microbatch sizes, when they may differ (default: None, equal sizes).

    Returns:
        The two sums; the second is NaN for k = 2, where no unbiased estimate exists.
    """
    mu_sq = sum_mu_sq - sum_sigma_sq / big_batch
    unequal = _unequal(k, sizes)
    if unequal is not None:
        c1, c2, c3 = _size_moments(unequal)
    else:
        c1, c2 = chi_moments(k - 1)
        c3 = c1
    ratio = math.nan if math.isinf(c1) else (sum_mu_sq_over_sigma - c3 / c2 * sum_sigma / big_batch) / c1
    return mu_sq, ratio


# The integrals below are taken over t = e^u on this grid: their integrands are smooth in u and fall off
# exponentially at both ends, where the trapezoidal rule converges geometrically.
# A step of 0.1 in u gives the moments to ~1e-13 relative (against steps of 0.02 and 0.2).
_U = numpy.linspace(-60.0, 120.0, 1801)
_T = numpy.exp(_U)
_DU = _U[1] - _U[0]


def _integral(values: numpy.ndarray) -> float:
    return float(numpy.sum(values[..., 1:-1], axis=-1) * _DU + 0.5 * _DU * (values[..., 0] + values[..., -1]))


def _standardised(sizes: tuple[float, ...]) -> tuple[numpy.ndarray, numpy.ndarray]:
    """Eigenvalues λ and the weight vector w (in the eigenbasis) of σ̂²/σ² = Σ_i λ_i z_i² and B(μ̂ − μ)²/σ² =
    (wᵀz)², with z standard normal: microbatch means y_j = z_j/√b_j about μ, in units of σ."""
    b = numpy.asarray(sizes, dtype=numpy.float64)
    k = b.size
    harmonic = k / numpy.sum(1.0 / b)
    root = 1.0 / numpy.sqrt(b)
    centring = numpy.eye(k) - 1.0 / k
    # σ̂²/σ² = harmonic/(k−1) · yᵀ(I − 11ᵀ/k)y with y = D^½ z, D = diag(1/b).
    m = harmonic / (k - 1.0) * (root[:, None] * centring * root[None, :])
    lam, vectors = numpy.linalg.eigh(m)
    lam = numpy.clip(lam, 0.0, None)  # the null direction comes out at rounding level
    w = vectors.T @ (root * math.sqrt(k * harmonic) / k)  # √B·(1ᵀy/k) = wᵀz
    return lam, w


def size_moments(sizes: Sequence[float]) -> tuple[float, float, float]:
    r"""``(c1, c2, c3)`` = :math:`(E[X^{-1/2}],\ E[X^{1/2}],\ E[n^2 X^{-1/2}])` for microbatches of these sizes, with
    :math:`X = \hat\sigma^2/\sigma^2` and :math:`n = \sqrt B(\hat\mu - \mu)/\sigma`; for equal sizes c1, c2 are
    :func:`chi_moments` and c3 = c1. From the Laplace transform of the quadratic form X:

    .. math::
        X^{-1/2} = \frac{1}{\sqrt\pi}\int_0^\infty t^{-1/2} e^{-tX} dt, \quad
        X^{1/2} = \frac{1}{2\sqrt\pi}\int_0^\infty t^{-3/2} (1 - e^{-tX}) dt, \quad
        E[e^{-tX}] = \prod_i (1 + 2t\lambda_i)^{-1/2}, \quad
        E[(w^T z)^2 e^{-tX}] = \prod_i (1 + 2t\lambda_i)^{-1/2} \sum_i \frac{w_i^2}{1 + 2t\lambda_i}

    c1 and c3 are infinite for k = 2.
    """
    return _size_moments(_checked_sizes(sizes))


def _unequal(k: int, sizes: Sequence[float] | None) -> tuple[float, ...] | None:
    """The checked sizes when they differ and the exact corrections apply (k ≤ MAX_EXACT_K), else None."""
    if sizes is None:
        return None
    if len(sizes) != k:
        raise ValueError(f"sizes has {len(sizes)} entries for k = {k} microbatches; pass one size per microbatch")
    return _checked_sizes(sizes) if len(set(sizes)) > 1 and k <= MAX_EXACT_K else None


def _checked_sizes(sizes: Sequence[float]) -> tuple[float, ...]:
    """The sizes as a tuple of floats (the caches' key); at least two, each positive and finite."""
    values = tuple(float(b) for b in sizes)
    if len(values) < 2 or not all(math.isfinite(b) and b > 0 for b in values):
        raise ValueError(f"sizes must be at least two positive microbatch sizes, got {sizes!r}")
    return values


@functools.lru_cache(maxsize=64)
def _size_moments(sizes: tuple[float, ...]) -> tuple[float, float, float]:
    lam, w = _standardised(sizes)
    log_laplace = -0.5 * numpy.sum(numpy.log1p(2.0 * _T[:, None] * lam[None, :]), axis=1)
    c2 = _integral(-numpy.expm1(log_laplace) / numpy.sqrt(_T)) / (2.0 * math.sqrt(math.pi))
    if len(sizes) == 2:  # X is one scaled χ²₁: E[X^{-1/2}] diverges
        return math.inf, c2, math.inf
    laplace = numpy.exp(log_laplace)
    c1 = _integral(numpy.sqrt(_T) * laplace) / math.sqrt(math.pi)
    one_plus = 1.0 + 2.0 * _T[:, None] * lam[None, :]
    c3 = _integral(numpy.sqrt(_T) * laplace * numpy.sum(w**2 / one_plus, axis=1)) / math.sqrt(math.pi)
    return c1, c2, c3


def noise_only_small_batch_fraction(k: int, sizes: Sequence[float] | None = None) -> float:
    r"""P(F(1, k − 1) < π/2): the expected share of coordinates that read inside Surge's small-batch regime at
    one step of k microbatches when no coordinate has any signal (μ = 0).

    F(1, ν) is the square of Student's t with ν degrees of freedom, whose two-sided probability has the closed
    forms of Abramowitz & Stegun 26.7.3-4 in θ = arctan(√(x/ν)). For microbatches of unequal `sizes` it is
    P(2B μ̂² < π σ̂²) of the module docstring's model, by :func:`_imhof_negative`.
    """
    unequal = _unequal(k, sizes)
    if unequal is not None:
        return _noise_only_unequal(unequal)
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


@functools.lru_cache(maxsize=64)
def _noise_only_unequal(sizes: tuple[float, ...]) -> float:
    lam, w = _standardised(sizes)
    # Inside ⇔ 2(wᵀz)² − π Σ λ_i z_i² < 0: a quadratic form in standard normals.
    form = 2.0 * numpy.outer(w, w) - math.pi * numpy.diag(lam)
    return _imhof_negative(numpy.linalg.eigvalsh(form))


def _imhof_negative(nu: numpy.ndarray) -> float:
    r"""P(Σ_i ν_i z_i² < 0) for standard normal z_i (Imhof 1961, eq. 3.2):

    .. math::
        P(Q < 0) = \frac12 - \frac1\pi \int_0^\infty \frac{\sin\theta(x)}{x\,\rho(x)}\,dx, \quad
        \theta(x) = \frac12 \sum_i \arctan(\nu_i x), \quad \rho(x) = \prod_i (1 + \nu_i^2 x^2)^{1/4}

    taken over x = e^u (the integrand, sin θ/ρ in u, is smooth and falls off at both ends)."""
    nu = nu[numpy.abs(nu) > 1e-12 * numpy.abs(nu).max()]
    x = _T[:, None] * nu[None, :]
    theta = 0.5 * numpy.sum(numpy.arctan(x), axis=1)
    log_rho = 0.25 * numpy.sum(numpy.log1p(x * x), axis=1)
    return 0.5 - _integral(numpy.sin(theta) * numpy.exp(-log_rho)) / math.pi
