"""Two-batch estimators of |G|² and tr(Σ), and the smoothed noise-scale estimator with standard errors.

Everything here follows McCandlish et al. 2018 (arXiv 1812.06162), App. A.1: for batch sizes ``b < B``,

.. math::
    E|G_B|^2 = |G|^2 + tr(Σ)/B

so two squared norms at two batch sizes give unbiased estimates of both ``|G|²`` and ``tr(Σ)``, and their ratio is
the simple noise scale ``B_simple = tr(Σ)/|G|²`` (McCandlish eq. 2.9).
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Sequence
from dataclasses import dataclass, fields
from typing import Any

import torch

__all__ = [
    "NoiseEstimate",
    "NoiseReading",
    "NoiseScaleEstimator",
    "microbatch_batch_sizes",
    "microbatch_estimates",
    "two_batch_estimates",
]


class NoiseEstimate(tuple):
    """``(grad_sq, trace_sigma)``: one step's unbiased estimates of ``|G|²`` and ``tr(Σ)``."""

    __slots__ = ()

    def __new__(cls, grad_sq, trace_sigma):
        return super().__new__(cls, (grad_sq, trace_sigma))

    grad_sq = property(lambda self: self[0])
    trace_sigma = property(lambda self: self[1])

    def __repr__(self) -> str:
        return f"NoiseEstimate(grad_sq={self[0]!r}, trace_sigma={self[1]!r})"


def _check_batch(name: str, value: float) -> float:
    # numbers.Real admits numpy scalars (a size read from an array); bool is excluded: True is no batch size.
    ok = isinstance(value, numbers.Real) and not isinstance(value, bool)
    if not ok or not math.isfinite(value) or value <= 0:
        raise ValueError(f"{name} must be a positive, finite number of examples, got {value!r}")
    return float(value)


def two_batch_estimates(small_sq, big_sq, small_batch: float, big_batch: float) -> NoiseEstimate:
    r"""Unbiased estimates of ``|G|²`` and ``tr(Σ)`` from squared gradient norms at two batch sizes.

    McCandlish App. A.1:

    .. math::
        |G|^2_{est} = \frac{B |G_B|^2 - b |G_b|^2}{B - b}, \qquad
        tr(Σ)_{est} = \frac{|G_b|^2 - |G_B|^2}{1/b - 1/B}

    Args:
        small_sq: ``|G_b|²`` (float or tensor), the squared norm of a mean gradient over ``b`` examples (or the mean
            of several such squared norms).
        big_sq: ``|G_B|²``, the squared norm of a mean gradient over ``B`` examples.
        small_batch: ``b``, examples behind ``small_sq``.
        big_batch: ``B > b``, examples behind ``big_sq``.

    Returns:
        ``NoiseEstimate(grad_sq, trace_sigma)``, of the same type as the inputs. Either can be negative on one step:
        that is the price of being unbiased; average before taking a ratio.
    """
    b = _check_batch("small_batch", small_batch)
    B = _check_batch("big_batch", big_batch)
    if not B > b:
        raise ValueError(
            f"big_batch must exceed small_batch to separate signal from noise, got b={b!r}, B={B!r}; "
            "use at least 2 microbatches per step"
        )
    grad_sq = (B * big_sq - b * small_sq) / (B - b)
    trace_sigma = (small_sq - big_sq) / (1.0 / b - 1.0 / B)
    return NoiseEstimate(grad_sq, trace_sigma)


def microbatch_batch_sizes(sizes: Sequence[float]) -> tuple[float, float]:
    r"""The ``(b, B)`` pair that makes the microbatch estimator unbiased for unequal microbatch sizes.

    With k microbatches of ``b_j`` examples averaged with equal weight,
    ``E mean_j|g_j|² = |G|² + tr(Σ)·mean_j(1/b_j)`` and ``E|ḡ|² = |G|² + tr(Σ)·mean_j(1/b_j)/k``, so the two-batch
    formula applies with ``b`` the harmonic mean of the ``b_j`` and ``B = k·b``.

    Args:
        sizes: examples in each microbatch (at least 2 microbatches).
    """
    sizes = list(sizes)
    if len(sizes) < 2:
        raise ValueError(
            f"need at least 2 microbatches to estimate the noise scale, got {len(sizes)}; "
            "accumulate 2 or more microbatches per step, or train data-parallel"
        )
    for s in sizes:
        _check_batch("microbatch size", s)
    b = len(sizes) / math.fsum(1.0 / s for s in sizes)
    return b, len(sizes) * b


def microbatch_estimates(
    grads: torch.Tensor | Sequence[torch.Tensor],
    sizes: Sequence[float] | None = None,
) -> NoiseEstimate:
    """Estimates of ``|G|²`` and ``tr(Σ)`` from k per-microbatch mean gradients (the reference implementation).

    ``|G_b|² := mean_j |g_j|²`` and ``|G_B|² := |mean_j g_j|²`` with ``(b, B)`` from
    :func:`microbatch_batch_sizes`. Equivalently ``tr(Σ)_est = b/(k−1)·Σ_j |g_j − ḡ|²``. The result scales by ``c²``
    if every ``g_j`` is multiplied by ``c`` (a loss scale, ``1/accum``), so ratios of the two are unit free.

    Args:
        grads: a ``(k, ...)`` tensor or a sequence of k equally shaped tensors, each the mean gradient of one
            microbatch. Computed in float64.
        sizes: examples per microbatch (default: 1 each, so the result is per microbatch).
    """
    if not isinstance(grads, torch.Tensor):
        grads = list(grads)
        if not grads:  # torch.stack fails on an empty list with a message that names no fix
            microbatch_batch_sizes([])  # raises "need at least 2 microbatches"
        grads = torch.stack([torch.as_tensor(x) for x in grads])
    g = grads
    k = g.shape[0]
    if sizes is None:
        sizes = [1.0] * k
    if len(sizes) != k:
        raise ValueError(f"sizes has {len(sizes)} entries but there are {k} microbatch gradients; give one size each")
    b, B = microbatch_batch_sizes(sizes)
    g = g.reshape(k, -1).double()
    if not torch.isfinite(g).all():
        raise ValueError("gradients contain NaN or inf; skip this step (a GradScaler overflow) instead of estimating")
    small = g.pow(2).sum(1).mean().item()
    big = g.mean(0).pow(2).sum().item()
    return two_batch_estimates(small, big, b, B)


# The reason a reading gives while one step is in: no spread to take a standard error from yet.
NEED_TWO_STEPS = "standard errors need at least 2 steps"


@dataclass(frozen=True)
class NoiseReading:
    """A snapshot of :class:`NoiseScaleEstimator`.

    ``None`` marks a value that cannot be given yet; ``reason`` says why.
    """

    noise_scale: float | None
    noise_scale_stderr: float | None
    grad_sq: float | None
    grad_sq_stderr: float | None
    trace_sigma: float | None
    trace_sigma_stderr: float | None
    steps: int
    examples: float
    reason: str | None

    def as_dict(self) -> dict[str, float]:
        """Flat floats, ``nan`` where a value is missing (for loggers)."""
        # Field by field: dataclasses.asdict deep-copies, and this runs every step.
        return {
            f.name: (math.nan if (v := getattr(self, f.name)) is None else float(v))
            for f in fields(self)
            if f.name != "reason"
        }


_STATE_KEYS = (
    "beta",
    "ref_batch",
    "steps",
    "examples",
    "weight",
    "weight_sq",
    "m_g",
    "m_t",
    "m_gg",
    "m_tt",
    "m_gt",
    "last_grad_sq",
    "last_trace_sigma",
)


class NoiseScaleEstimator:
    r"""Smoothed estimates of ``|G|²``, ``tr(Σ)`` and ``B_simple = tr(Σ)/|G|²``, each with a standard error.

    Each step's two-batch estimates are unbiased but very noisy (``|G|²`` is often negative), so the estimator keeps
    **separate** exponential moving averages of the two and reports their ratio; averaging per-step ratios would be
    strongly biased (McCandlish App. A.1). The averages forget **per example seen**: a step of ``n`` examples
    discounts the past by ``beta ** (n / ref_batch)``, so the smoothing horizon stays fixed in examples when the
    batch size changes. (``n`` is the step's batch ``B`` unless given: with unequal microbatches the two-batch
    formula's ``B = k·b`` is below the examples seen.) They are bias-corrected like Adam's moments:

    .. math::
        W_t = β_t W_{t-1} + (1 - β_t), \quad m_t = β_t m_{t-1} + (1-β_t) x_t, \quad \hat x = m_t / W_t

    Standard errors treat successive steps as independent draws (true for i.i.d. batches at slowly moving
    parameters): with normalised weights ``a_s`` (``Σ a_s = 1``), ``Var(\hat x) = Σ a_s² · s²`` where ``s²`` is the
    weighted sample variance made unbiased by ``1/(1 − Σ a_s²)``. The ratio's error follows by the delta method:

    .. math::
        Var(T/G) ≈ \frac{Var(T) - 2R\,Cov(T, G) + R^2 Var(G)}{G^2}

    Args:
        beta: per-step decay at the reference batch size (default: 0.99, a horizon of about 100 steps).
        ref_batch: batch size at which one step decays by ``beta`` (default: the first step's examples).
    """

    def __init__(self, beta: float = 0.99, *, ref_batch: float | None = None):
        if isinstance(beta, bool) or not (isinstance(beta, numbers.Real) and 0.0 <= beta < 1.0):
            raise ValueError(f"Invalid beta: {beta!r}; it must be in [0, 1) (0.99 averages over about 100 steps)")
        if ref_batch is not None:
            _check_batch("ref_batch", ref_batch)
        self.beta = float(beta)
        self.ref_batch = None if ref_batch is None else float(ref_batch)
        self.reset()

    def reset(self) -> None:
        """Forget every step seen (keeps ``beta`` and ``ref_batch``)."""
        self.steps = 0
        self.examples = 0.0
        self.weight = 0.0  # W: total EMA weight, 1 − Π β (the bias correction)
        self.weight_sq = 0.0  # Q: Σ of squared unnormalised weights, for the effective sample size
        self.m_g = self.m_t = self.m_gg = self.m_tt = self.m_gt = 0.0
        self.last_grad_sq = math.nan
        self.last_trace_sigma = math.nan

    def update(
        self, small_sq: float, big_sq: float, small_batch: float, big_batch: float, examples: float | None = None
    ) -> NoiseEstimate:
        """Add one step's squared norms (see :func:`two_batch_estimates`); returns that step's raw estimates.

        ``examples``: the examples the step saw, by which the averages forget (default: ``big_batch``)."""
        small_sq, big_sq = float(small_sq), float(big_sq)
        if not (math.isfinite(small_sq) and math.isfinite(big_sq)):
            raise ValueError(
                f"non-finite gradient statistics (small={small_sq}, big={big_sq}); skip steps with inf/NaN gradients "
                "(as GradScaler does) instead of feeding them to the estimator"
            )
        est = two_batch_estimates(small_sq, big_sq, small_batch, big_batch)
        return self.add(est.grad_sq, est.trace_sigma, big_batch if examples is None else examples)

    def add(self, grad_sq: float, trace_sigma: float, batch_size: float) -> NoiseEstimate:
        """Add one step's already-computed unbiased estimates, made from ``batch_size`` examples."""
        g, t = float(grad_sq), float(trace_sigma)
        if not (math.isfinite(g) and math.isfinite(t)):
            raise ValueError(f"non-finite estimates (grad_sq={g}, trace_sigma={t}); skip this step instead")
        B = _check_batch("batch_size", batch_size)
        if self.ref_batch is None:
            self.ref_batch = B
        # Forget per example: B examples discount by beta^(B/ref), the same as B/ref steps at the reference batch.
        decay = self.beta ** (B / self.ref_batch)
        w = 1.0 - decay
        self.weight = decay * self.weight + w
        self.weight_sq = decay * decay * self.weight_sq + w * w
        self.m_g = decay * self.m_g + w * g
        self.m_t = decay * self.m_t + w * t
        self.m_gg = decay * self.m_gg + w * g * g
        self.m_tt = decay * self.m_tt + w * t * t
        self.m_gt = decay * self.m_gt + w * g * t
        self.steps += 1
        self.examples += B
        self.last_grad_sq, self.last_trace_sigma = g, t
        return NoiseEstimate(g, t)

    # ---- readings -------------------------------------------------------------------------------------------------

    def _moments(self) -> tuple[float, float, float, float, float]:
        """Bias-corrected means of G and T, and the variances/covariance of those means (nan if unknown)."""
        W = self.weight
        G, T = self.m_g / W, self.m_t / W
        frac = self.weight_sq / (W * W)  # Σ a_s², 1/n_eff
        if self.steps < 2 or frac >= 1.0 - 1e-12:
            return G, T, math.nan, math.nan, math.nan
        # Weighted sample (co)variances, made unbiased by 1/(1 − Σa²), then scaled by Σa² to the variance of the mean.
        k = frac / (1.0 - frac)
        var_g = max(self.m_gg / W - G * G, 0.0) * k
        var_t = max(self.m_tt / W - T * T, 0.0) * k
        cov = (self.m_gt / W - G * T) * k
        return G, T, var_g, var_t, cov

    @property
    def raw(self) -> dict[str, float]:
        """Unclamped smoothed estimates (``grad_sq`` may be negative) and the last step's raw estimates."""
        if self.steps == 0:
            return {
                "grad_sq": math.nan,
                "trace_sigma": math.nan,
                "ratio": math.nan,
                "last_grad_sq": math.nan,
                "last_trace_sigma": math.nan,
            }
        G, T, *_ = self._moments()
        return {
            "grad_sq": G,
            "trace_sigma": T,
            "ratio": T / G if G != 0 else math.nan,
            "last_grad_sq": self.last_grad_sq,
            "last_trace_sigma": self.last_trace_sigma,
        }

    def reading(self) -> NoiseReading:
        """The current smoothed values with their standard errors, or ``None`` and a reason."""
        if self.steps == 0:
            return NoiseReading(None, None, None, None, None, None, 0, 0.0, "no step with 2 or more microbatches yet")
        G, T, var_g, var_t, cov = self._moments()
        se_g = math.sqrt(var_g) if math.isfinite(var_g) else None
        se_t = math.sqrt(var_t) if math.isfinite(var_t) else None
        reason = None
        if self.steps < 2:
            reason = NEED_TWO_STEPS
        elif se_g is None or se_t is None:
            # beta = 0 keeps one step only (no spread to measure); an overflowed second moment has none either.
            reason = "standard errors are unavailable: beta = 0 keeps one step, or the squares overflowed"
        # Clamp only what is reported: tr(Σ) ≥ 0 always; |G|² ≤ 0 means the signal is not resolved yet.
        trace = max(T, 0.0)
        R = trace / G if G > 0.0 else math.nan
        if not math.isfinite(R):
            # |G|² not positive (the signal not resolved yet), or so small next to tr(Σ) that the ratio overflows:
            # no noise scale for the laws to use.
            why = (
                "the |G|² estimate is not positive yet: noise dominates the signal at this horizon "
                "(B_noise is far above the batch size); keep training or raise beta"
                if G <= 0.0
                else "tr(Σ)/|G|² overflows: the |G|² estimate is too small next to tr(Σ) to divide by (or tr(Σ) "
                "itself overflowed)"
            )
            return NoiseReading(
                None, None, G if G > 0.0 else None, se_g, trace, se_t, self.steps, self.examples, why
            )  # fmt: skip
        se_r = None
        if se_g is not None and se_t is not None:
            # Divided by G twice, not by G²: a tiny G (an estimator fed only zeros for a long time) would underflow G².
            var_r = ((var_t / G) - 2.0 * R * (cov / G) + R * R * (var_g / G)) / G
            se_r = math.sqrt(max(var_r, 0.0)) if math.isfinite(var_r) else None
        return NoiseReading(R, se_r, G, se_g, trace, se_t, self.steps, self.examples, reason)

    @property
    def noise_scale(self) -> float | None:
        """Smoothed ``B_simple = tr(Σ)/|G|²`` in examples, or ``None`` while it cannot be estimated."""
        return self.reading().noise_scale

    @property
    def noise_scale_stderr(self) -> float | None:
        """Standard error of :attr:`noise_scale`, or ``None`` while unknown."""
        return self.reading().noise_scale_stderr

    # ---- checkpointing --------------------------------------------------------------------------------------------

    def state_dict(self) -> dict[str, Any]:
        """Plain Python floats and ints: an exact round trip through ``torch.save``/``torch.load``."""
        return {k: getattr(self, k) for k in _STATE_KEYS}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        missing = [k for k in _STATE_KEYS if k not in state]
        if missing:
            raise ValueError(f"not a NoiseScaleEstimator state dict: missing {missing}")
        for k in _STATE_KEYS:
            setattr(self, k, state[k])

    def __repr__(self) -> str:
        r = self.reading()
        if r.noise_scale is None:
            return f"NoiseScaleEstimator(steps={self.steps}, noise_scale=None: {r.reason})"
        se = "?" if r.noise_scale_stderr is None else f"{r.noise_scale_stderr:.4g}"
        return f"NoiseScaleEstimator(steps={self.steps}, noise_scale={r.noise_scale:.4g} ± {se})"
