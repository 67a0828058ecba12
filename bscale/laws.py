"""Learning-rate and batch-size laws: optimal LR against batch, scaling rules, critical batch.

Plain functions of floats and numpy arrays; no torch. Each docstring gives its formula and the equation of the
source it comes from: McCandlish et al. 2018 ("An Empirical Model of Large-Batch Training"), Li et al. 2024
("Surge Phenomenon in Optimal Learning Rate and Batch Size Scaling"), Malladi et al. 2022 ("On the SDEs and
Scaling Rules for Adaptive Gradient Algorithms"), Li et al. 2021 ("On the Validity of Modeling SGD with
Stochastic Differential Equations").

Units: every batch size is a positive real number counted in the user's unit of "example" (samples, or
tokens for a language model). No law here needs a whole number: a step assembled from unequal microbatches
has a harmonic-mean batch (see :class:`bscale.NoiseScaleEstimator`) that is not one, so batch sizes are
accepted as any finite positive real.
Functions documented as vectorised take scalars or array-likes (broadcast together); scalars give a ``float``,
arrays a ``numpy.ndarray``.
"""

from __future__ import annotations

import math
import numbers
from dataclasses import dataclass
from typing import Any

import numpy as np

__all__ = [
    "AdamHyperparams",
    "CriticalBatchFit",
    "adam_law_from_moments",
    "adam_optimal_lr_exact",
    "cost_optimal_batch",
    "fit_critical_batch",
    "kaplan_critical_batch",
    "linear_rule",
    "linear_rule_max_kappa",
    "lr_max_from_reference",
    "lr_scale",
    "optimal_lr",
    "peak_batch",
    "sqrt_rule",
    "steps_examples_tradeoff",
]

# The fixed sets of names accepted for ``optimizer=`` and ``rule=``.
_OPTIMIZERS = ("adam", "sgd")
_RULES = ("linear", "sqrt", "noise")
_FIT_METHODS = ("linear", "hyperbola")

_BATCH = "a finite positive number of examples"
_NOISE = "a finite positive number of examples (a measured B_noise)"
_LR = "a finite positive learning rate"
_KAPPA = "a finite positive batch-size ratio (new batch / reference batch)"

Real = float | np.ndarray


# ----------------------------------------------------------------------------------------------- validation


def _as_real_array(value: Any, name: str, what: str) -> np.ndarray:
    """``value`` as a float64 array, refusing bools, strings, None and non-numeric objects."""
    if value is None or isinstance(value, (bool, np.bool_, str, bytes)):
        raise ValueError(f"{name} must be {what}, got {value!r}")
    if isinstance(value, numbers.Real):
        # Covers Fraction and other Real types that numpy would keep as dtype=object.
        return np.asarray(float(value), dtype=np.float64)
    try:
        arr = np.asarray(value)
    except (TypeError, ValueError) as exc:
        raise ValueError(f"{name} must be {what}, got {value!r}") from exc
    # numpy would parse strings ("64") and bools silently; only integer and real dtypes are numbers here.
    if arr.dtype.kind not in "iuf":
        raise ValueError(f"{name} must be {what}, got {value!r}")
    return arr.astype(np.float64)


def _first_bad(arr: np.ndarray, bad: np.ndarray, value: Any, name: str, what: str) -> None:
    if not bad.any():
        return
    if arr.ndim == 0:
        raise ValueError(f"{name} must be {what}, got {value!r}")
    idx = tuple(int(i) for i in np.argwhere(bad)[0])
    where = idx[0] if len(idx) == 1 else idx
    raise ValueError(f"{name} must be {what}, got {float(arr[idx])!r} at index {where}")


def _positive(value: Any, name: str, what: str, *, allow_inf: bool = False) -> np.ndarray:
    """Validated float64 array with every element > 0 and finite (or +inf where ``allow_inf``)."""
    arr = _as_real_array(value, name, what)
    ok = arr > 0 if allow_inf else np.isfinite(arr) & (arr > 0)
    _first_bad(arr, ~ok, value, name, what)
    return arr


def _finite(value: Any, name: str, what: str) -> np.ndarray:
    arr = _as_real_array(value, name, what)
    _first_bad(arr, ~np.isfinite(arr), value, name, what)
    return arr


def _positive_1d(value: Any, name: str, what: str) -> np.ndarray:
    arr = _positive(value, name, what)
    if arr.ndim != 1:
        raise ValueError(f"{name} must be a 1-D sequence (one value per run), got an array of shape {arr.shape}")
    return arr


def _out(x: np.ndarray | float) -> Real:
    """Python float for a 0-d result, the array otherwise."""
    arr = np.asarray(x)
    return float(arr) if arr.ndim == 0 else arr


def _optimizer(optimizer: Any) -> str:
    if isinstance(optimizer, str) and optimizer.lower() in _OPTIMIZERS:
        return optimizer.lower()
    raise ValueError(f"optimizer must be one of {', '.join(map(repr, _OPTIMIZERS))}, got {optimizer!r}")


def _rule(rule: Any) -> str:
    if isinstance(rule, str) and rule.lower() in _RULES:
        return rule.lower()
    raise ValueError(f"rule must be one of {', '.join(map(repr, _RULES))}, got {rule!r}")


def _noise_scale(noise_scale: Any) -> np.ndarray:
    return _positive(noise_scale, "noise_scale", _NOISE)


# ------------------------------------------------------------------------------ optimal LR against batch size


def _gain(b: np.ndarray, noise: np.ndarray, optimizer: str) -> np.ndarray:
    """The law's ε_opt(B)/ε_max."""
    # Written so that an extreme ratio that overflows to inf (or underflows to 0) still gives the limit, 0 or
    # 1, rather than inf/inf; the 1/0 = inf it may meet on the way is intended.
    with np.errstate(over="ignore", divide="ignore"):
        if optimizer == "sgd":
            return 1.0 / (1.0 + noise / b)  # McCandlish eq. 2.7
        root = np.sqrt(b / noise)
        return 2.0 / (root + 1.0 / root)  # 1/(½(√(B/B_noise) + √(B_noise/B))), Surge eq. 2


def optimal_lr(batch_size: Any, noise_scale: Any, lr_max: Any, optimizer: str = "adam") -> Real:
    r"""The optimal learning rate at batch size ``batch_size`` (vectorised).

    .. math::
        \text{SGD (McCandlish eq. 2.7):}\quad \epsilon_{opt}(B) = \frac{\epsilon_{max}}{1 + B_{noise}/B}

        \text{Adam (Surge eq. 2):}\quad
        \epsilon_{opt}(B) =
        \frac{\epsilon_{max}}{\tfrac12\left(\sqrt{B_{noise}/B} + \sqrt{B/B_{noise}}\right)}

    SGD's optimum rises monotonically to ``lr_max``; Adam's rises as √B, peaks at ``lr_max`` when
    B = B_noise and falls again (the surge). Adam's law is the small-SNR simplification of Surge eq. 9 (see
    :func:`adam_optimal_lr_exact`); its B_noise is best taken from a measurement (see :func:`adam_law_from_moments`).

    Args:
        batch_size: batch size B, in examples.
        noise_scale: the noise scale B_noise, in the same unit.
        lr_max: ε_max, the law's largest LR (see :func:`lr_max_from_reference`).
        optimizer: ``"adam"`` (Adam-style, sign-like updates) or ``"sgd"`` (default: ``"adam"``).

    Returns:
        ε_opt(B), a float (an array for array inputs).
    """
    opt = _optimizer(optimizer)
    b = _positive(batch_size, "batch_size", _BATCH)
    noise = _noise_scale(noise_scale)
    lr = _positive(lr_max, "lr_max", _LR)
    return _out(lr * _gain(b, noise, opt))


def lr_max_from_reference(ref_lr: Any, ref_batch_size: Any, noise_scale: Any, optimizer: str = "adam") -> Real:
    r"""ε_max from one tuned pair: the optimal LR ``ref_lr`` found at ``ref_batch_size`` (Surge sec. 3.2).

    .. math::
        \text{Adam:}\quad
        \epsilon_{max} = \frac{\epsilon^*}{2}\left(\sqrt{B_{noise}/B^*} + \sqrt{B^*/B_{noise}}\right)

        \text{SGD:}\quad \epsilon_{max} = \epsilon^*\,(1 + B_{noise}/B^*)

    It inverts :func:`optimal_lr`: ``optimal_lr(B*, B_noise, lr_max_from_reference(ε*, B*, B_noise)) == ε*``.

    Args:
        ref_lr: ε*, the tuned learning rate.
        ref_batch_size: B*, the batch size it was tuned at, in examples.
        noise_scale: B_noise, in the same unit.
        optimizer: ``"adam"`` or ``"sgd"`` (default: ``"adam"``).
    """
    opt = _optimizer(optimizer)
    lr = _positive(ref_lr, "ref_lr", _LR)
    b = _positive(ref_batch_size, "ref_batch_size", _BATCH)
    noise = _noise_scale(noise_scale)
    return _out(lr / _gain(b, noise, opt))


def peak_batch(noise_scale: Any, optimizer: str = "adam") -> float:
    """The batch size at which the optimal LR is largest.

    Adam: B_peak = B_noise, the top of the surge (Surge eq. 2); SGD: ``math.inf``, since McCandlish eq. 2.7
    rises monotonically towards ε_max. For both, B_noise is also the balance point between steps and examples
    (``S = 2 S_min``, ``E = 2 E_min``; McCandlish eq. 2.11, Surge thm. 5).

    Args:
        noise_scale: B_noise, in examples.
        optimizer: ``"adam"`` or ``"sgd"`` (default: ``"adam"``).
    """
    opt = _optimizer(optimizer)
    noise = float(_noise_scale(noise_scale))
    return noise if opt == "adam" else math.inf


# ---------------------------------------------------------------------------------------------- scaling rules


def lr_scale(
    batch_size: Any,
    ref_batch_size: Any,
    noise_scale: Any = None,
    *,
    rule: str = "noise",
    optimizer: str = "adam",
) -> Real:
    r"""The factor on the reference LR when the batch goes from ``ref_batch_size`` to ``batch_size``.

    With κ = B / B_ref (vectorised):

    .. math::
        \text{linear: } \kappa \qquad \text{sqrt: } \sqrt\kappa \qquad
        \text{noise: } \frac{f(B)}{f(B_{ref})} =
        \begin{cases}
            \kappa \, \dfrac{B_{noise} + B_{ref}}{B_{noise} + B} &
            \text{SGD, } f(B) = 1/(1 + B_{noise}/B)\\[1ex]
            \sqrt\kappa \, \dfrac{B_{noise} + B_{ref}}{B_{noise} + B} &
            \text{Adam, } f(B) = 1/(\sqrt{B_{noise}/B} + \sqrt{B/B_{noise}})
        \end{cases}

    The noise-aware factor is the ratio of the optimal-LR laws (McCandlish eq. 2.7, Surge eq. 2). For
    B, B_ref ≪ B_noise it reduces to the linear rule (SGD) or the square-root rule (Adam); near
    and past B_noise it bends away from them, and for Adam it is largest at B = B_noise. When ``noise_scale``
    is ``None`` or ``inf`` (not measured yet) the ``"noise"`` rule uses that B_noise → ∞ limit: linear for
    SGD, square root for Adam. ``rule="linear"`` and ``"sqrt"`` ignore ``optimizer`` and ``noise_scale``.

    Args:
        batch_size: the new batch size B, in examples.
        ref_batch_size: the batch size B_ref the reference LR belongs to.
        noise_scale: B_noise in the same unit, or ``None`` / ``math.inf`` when unknown (default: ``None``).
        rule: ``"noise"``, ``"linear"`` or ``"sqrt"`` (default: ``"noise"``).
        optimizer: ``"adam"`` or ``"sgd"``; picks the law for ``rule="noise"`` (default: ``"adam"``).
    """
    rule_ = _rule(rule)
    opt = _optimizer(optimizer)
    b = _positive(batch_size, "batch_size", _BATCH)
    b_ref = _positive(ref_batch_size, "ref_batch_size", _BATCH)
    kappa = b / b_ref
    if rule_ == "linear":
        return _out(kappa)
    if rule_ == "sqrt":
        return _out(np.sqrt(kappa))
    limit = kappa if opt == "sgd" else np.sqrt(kappa)
    if noise_scale is None:
        return _out(limit)
    noise = _positive(noise_scale, "noise_scale", _NOISE + " or None/inf when not measured yet", allow_inf=True)
    # Ratio of the two laws in closed form: B_noise cancels except in (B_noise + B_ref)/(B_noise + B), which
    # tends to 1 as B_noise → ∞; np.where keeps that limit exact instead of computing inf/inf.
    with np.errstate(invalid="ignore"):
        bend = np.where(np.isinf(noise), 1.0, (noise + b_ref) / (noise + b))
    return _out(limit * bend)


# ---- the same laws for one step's Python floats, already validated (the wrapper calls these every step: numpy's
# conversions and checks would cost more than the arithmetic). Same operations in the same order as above, so the
# results are bit-identical to the public functions'.


def _gain_float(b: float, noise: float, optimizer: str) -> float:
    if optimizer == "sgd":
        return 1.0 / (1.0 + noise / b)
    if optimizer != "adam" and _optimizer(optimizer) == "sgd":  # another spelling, or a ValueError
        return _gain_float(b, noise, "sgd")
    root = math.sqrt(b / noise)
    return 2.0 / (root + 1.0 / root)


def _lr_scale_float(batch: float, ref_batch: float, noise: float | None, rule: str, optimizer: str) -> float:
    """:func:`lr_scale` for positive floats (``noise`` > 0, ``inf`` or ``None``)."""
    kappa = batch / ref_batch
    if rule != "noise":
        if rule == "linear":
            return kappa
        if rule == "sqrt":
            return math.sqrt(kappa)
        if rule != _rule(rule):  # another spelling ("Sqrt"), or a ValueError naming the choices
            return _lr_scale_float(batch, ref_batch, noise, _rule(rule), optimizer)
    if optimizer != "sgd" and optimizer != "adam":
        optimizer = _optimizer(optimizer)
    limit = kappa if optimizer == "sgd" else math.sqrt(kappa)
    if noise is None or math.isinf(noise):
        return limit
    return limit * ((noise + ref_batch) / (noise + batch))


def _lr_max_float(ref_lr: float, ref_batch: float, noise: float, optimizer: str) -> float:
    """:func:`lr_max_from_reference` for positive finite floats and a valid optimizer."""
    return ref_lr / _gain_float(ref_batch, noise, optimizer)


@dataclass(frozen=True)
class AdamHyperparams:
    """Adam hyperparameters after a square-root-rule rescaling (see :func:`sqrt_rule`).

    Args:
        lr: the learning rate.
        betas: (β1, β2).
        eps: the denominator's ε.
    """

    lr: float
    betas: tuple[float, float]
    eps: float


def linear_rule(kappa: Any, lr: Any) -> float:
    """The linear scaling rule for SGD: ``lr → κ·lr`` when the batch is multiplied by κ (where it holds:
    :func:`linear_rule_max_kappa`).

    Args:
        kappa: κ = new batch / reference batch.
        lr: the reference learning rate.
    """
    k = float(_positive(kappa, "kappa", _KAPPA))
    return k * float(_positive(lr, "lr", _LR))


def sqrt_rule(kappa: Any, lr: Any, betas: tuple[float, float] = (0.9, 0.999), eps: Any = 1e-8) -> AdamHyperparams:
    r"""Malladi's square-root scaling rule for Adam / RMSprop when the batch is multiplied by κ.

    .. math::
        \eta \to \sqrt\kappa\,\eta, \qquad \beta_k \to 1 - \kappa(1 - \beta_k), \qquad
        \epsilon \to \epsilon/\sqrt\kappa

    It keeps the optimizer's SDE unchanged (Malladi et al. 2022). It cannot be applied once
    κ(1 − β) ≥ 1 for either beta (the new beta would be ≤ 0); the authors' advice is then to re-base the
    reference run at a larger batch, and this function raises ``ValueError`` saying so.

    Args:
        kappa: κ = new batch / reference batch.
        lr: the reference learning rate.
        betas: the reference (β1, β2), each in [0, 1) (default: ``(0.9, 0.999)``).
        eps: the reference ε, ≥ 0 (default: ``1e-8``).
    """
    k = float(_positive(kappa, "kappa", _KAPPA))
    lr_ = float(_positive(lr, "lr", _LR))
    beta_what = "a pair (beta1, beta2) of numbers in [0, 1)"
    if isinstance(betas, (str, bytes)) or not hasattr(betas, "__len__") or len(betas) != 2:
        raise ValueError(f"betas must be {beta_what}, got {betas!r}")
    b = _finite(betas, "betas", beta_what)
    if b.shape != (2,) or not ((b >= 0) & (b < 1)).all():
        raise ValueError(f"betas must be {beta_what}, got {betas!r}")
    eps_ = float(_finite(eps, "eps", "a finite number >= 0"))
    if eps_ < 0:
        raise ValueError(f"eps must be a finite number >= 0, got {eps!r}")
    new_betas = []
    for i, beta in enumerate(b, start=1):
        step = k * (1.0 - float(beta))
        # κ(1 − β) = 1 exactly in decimal (κ = 10, β = 0.9) rounds to 0.9999999999999998 in binary; a margin
        # far above rounding error and far below any usable β treats it as 1 (β = 1e-12 is no momentum).
        if step >= 1.0 - 1e-12:
            raise ValueError(
                f"the square-root rule does not apply: kappa*(1-beta{i}) = {k:g}*(1-{float(beta):g})"
                f" = {step:.6g} >= 1 would make beta{i} <= 0; re-base the reference run at a larger batch"
                f" (so that kappa is smaller than 1/(1-beta{i}) = {1.0 / (1.0 - float(beta)):.6g})"
            )
        new_betas.append(1.0 - step)
    root = math.sqrt(k)
    return AdamHyperparams(lr=lr_ * root, betas=(new_betas[0], new_betas[1]), eps=eps_ / root)


def linear_rule_max_kappa(grad_sq: Any, trace_sigma: Any, batch_size: Any, c: float = math.sqrt(2)) -> float:
    r"""The largest batch multiplier κ for which the linear scaling rule is expected to hold (Li21).

    With the baseline run's G = |∇L|² and N = tr(Σ)/B (the noise of one batch-B gradient):

    .. math::
        \kappa_{max} = (c^2 - 1)\,\frac{N}{G} = (c^2 - 1)\,\frac{\operatorname{tr}\Sigma}{B\,|\nabla L|^2}

    i.e. (with c = √2) the rule is expected to fail once κ·B ≳ B_simple. This κ form is reconstructed from the
    paper's theorem, code and blog. Pass one value each, or sequences measured along the
    baseline run (broadcast together); the rule must hold at every step of the run, so the **minimum** of the
    bound over the run is returned. Use smoothed estimates: a single step's |G|² estimate can be negative.

    Args:
        grad_sq: G = |∇L|² (scalar or sequence), > 0.
        trace_sigma: tr(Σ), the per-example gradient covariance trace (scalar or sequence), > 0.
        batch_size: the baseline batch size B, in examples (scalar or sequence).
        c: the tolerance constant C of Li21's test, > 1 (default: ``math.sqrt(2)``).
    """
    g = _positive(grad_sq, "grad_sq", "a finite positive |grad L|^2 (use a smoothed estimate)")
    tr = _positive(trace_sigma, "trace_sigma", "a finite positive tr(Sigma) (use a smoothed estimate)")
    b = _positive(batch_size, "batch_size", _BATCH)
    c_ = float(_finite(c, "c", "a finite number > 1"))
    if c_ <= 1.0:
        raise ValueError(f"c must be a finite number > 1, got {c!r}")
    try:
        bound = (c_ * c_ - 1.0) * (tr / b) / g
    except ValueError as exc:  # numpy's broadcast error
        raise ValueError(
            f"grad_sq, trace_sigma and batch_size must have matching lengths (one value per step of the"
            f" baseline run), got shapes {g.shape}, {tr.shape}, {b.shape}"
        ) from exc
    return float(np.min(bound))


# -------------------------------------------------------------------------------------------- critical batch


@dataclass(frozen=True)
class CriticalBatchFit:
    """The result of :func:`fit_critical_batch`.

    Args:
        s_min: S_min, the fewest steps to the target (infinite batch).
        e_min: E_min, the fewest examples to the target (tiny batch).
        b_crit: B_crit = E_min / S_min, in examples.
        method: ``"linear"`` or ``"hyperbola"``.
        residual: root-mean-square of ln(S_fit/S) over the runs (a relative misfit, comparable across
            methods).
    """

    s_min: float
    e_min: float
    b_crit: float
    method: str
    residual: float


def _log_residual(b: np.ndarray, s: np.ndarray, s_min: float, e_min: float) -> float:
    fitted = s_min + e_min / b
    return float(np.sqrt(np.mean((np.log(fitted) - np.log(s)) ** 2)))


_NO_SMIN = (
    "the critical-batch fit gave a non-positive S_min: the steps keep falling in proportion to the batch"
    " over the whole range, so every run lies below the critical batch; add runs at larger batch sizes"
)
_NO_EMIN = (
    "the critical-batch fit gave a non-positive E_min (B_crit <= 0): the steps do not fall as the batch"
    " grows; add runs at smaller batch sizes and check each run used its own best learning rate"
)


def _fit_linear(b: np.ndarray, s: np.ndarray) -> tuple[float, float]:
    # Surge eq. 22: 1/S = -B_crit·(1/E) + 1/S_min with E = B·S, ordinary least squares in (1/E, 1/S).
    x = 1.0 / (b * s)
    y = 1.0 / s
    # Every run used the same number of examples (S ∝ 1/B exactly): the line is vertical, B_crit → ∞.
    if np.ptp(x) <= 1e-12 * np.max(x):
        raise ValueError(_NO_SMIN)
    design = np.stack([x, np.ones_like(x)], axis=1)
    (slope, intercept), *_ = np.linalg.lstsq(design, y, rcond=None)
    if not intercept > 0:
        raise ValueError(_NO_SMIN + f" (1/S_min = {intercept:.6g})")
    if not slope < 0:
        raise ValueError(_NO_EMIN + f" (B_crit = {-slope:.6g})")
    s_min = 1.0 / float(intercept)
    return s_min, -float(slope) * s_min


def _profile_sse(t: np.ndarray, log_b: np.ndarray, log_s: np.ndarray) -> np.ndarray:
    # For a fixed t = ln B_crit, ln S = ln S_min + ln(1 + B_crit/B) is linear in ln S_min, whose best value is
    # the mean residual; what remains is the profile sum of squares in t alone. logaddexp(0, z) = ln(1 + e^z)
    # without overflow.
    r = log_s[None, :] - np.logaddexp(0.0, t[:, None] - log_b[None, :])
    r = r - r.mean(axis=1, keepdims=True)
    return (r * r).sum(axis=1)


def _fit_hyperbola(b: np.ndarray, s: np.ndarray) -> tuple[float, float]:
    # Least squares of ln S against ln(S_min(1 + B_crit/B)): multiplicative noise on step counts is the usual
    # case, and the log keeps every run's weight equal. One parameter (ln B_crit) is left after profiling out
    # ln S_min, so a dense grid then golden-section search finds the global minimum without a starting guess.
    log_b, log_s = np.log(b), np.log(s)
    # B_crit beyond 1e6 times the batch range is indistinguishable from 0 or ∞ on these runs.
    span = math.log(1e6)
    grid = np.linspace(log_b.min() - span, log_b.max() + span, 4001)
    sse = _profile_sse(grid, log_b, log_s)
    i = int(np.argmin(sse))
    if i == grid.size - 1:  # B_crit → ∞ means S ∝ 1/B: S_min → 0
        raise ValueError(_NO_SMIN)
    if i == 0:  # B_crit → 0 means S constant: E_min → 0
        raise ValueError(_NO_EMIN)
    lo, hi = grid[i - 1], grid[i + 1]
    inv_phi = (math.sqrt(5.0) - 1.0) / 2.0
    # 80 golden-section steps shrink the bracket by 0.618^80 ≈ 1e-17: past float64 resolution of ln B_crit.
    for _ in range(80):
        m1 = hi - inv_phi * (hi - lo)
        m2 = lo + inv_phi * (hi - lo)
        f1, f2 = _profile_sse(np.array([m1, m2]), log_b, log_s)
        if f1 <= f2:
            hi = m2
        else:
            lo = m1
    t = 0.5 * (lo + hi)
    b_crit = math.exp(t)
    s_min = math.exp(float(np.mean(log_s - np.logaddexp(0.0, t - log_b))))
    return s_min, s_min * b_crit


def fit_critical_batch(batch_sizes: Any, steps: Any, method: str = "linear") -> CriticalBatchFit:
    r"""Fit S_min, E_min and B_crit from steps-to-target measured at several batch sizes
    (McCandlish eq. 2.11 and App. D, Surge eq. 22).

    Each run trains at batch B (at its own best LR) until a fixed target loss, taking S steps and E = B·S
    examples. The model (McCandlish eq. 2.11):

    .. math::
        S = S_{min}\,(1 + B_{crit}/B), \qquad E = E_{min}\,(1 + B/B_{crit}), \qquad B_{crit} = E_{min}/S_{min}

    ``method="linear"`` solves Surge eq. 22 by ordinary least squares:

    .. math::
        \frac1S = -B_{crit}\,\frac1E + \frac1{S_{min}}

    ``method="hyperbola"`` fits S = S_min(1 + B_crit/B) directly, by least squares in ln S (relative errors);
    it is the better choice when step counts carry multiplicative noise, since eq. 22's axes weight the
    largest batches most.

    Args:
        batch_sizes: batch sizes of the runs, in examples (at least two distinct values).
        steps: steps each run took to reach the target, > 0 (real numbers: interpolated counts are fine).
        method: ``"linear"`` or ``"hyperbola"`` (default: ``"linear"``).

    Raises:
        ValueError: mismatched lengths, fewer than 2 runs or 2 distinct batch sizes, non-positive or
            non-finite values, or data for which the fit gives a non-positive S_min or E_min.
    """
    if not (isinstance(method, str) and method.lower() in _FIT_METHODS):
        raise ValueError(f"method must be one of {', '.join(map(repr, _FIT_METHODS))}, got {method!r}")
    method = method.lower()
    b = _positive_1d(batch_sizes, "batch_sizes", "a sequence of finite positive numbers of examples")
    s = _positive_1d(steps, "steps", "a sequence of finite positive step counts")
    if b.shape != s.shape:
        raise ValueError(
            f"batch_sizes and steps must have the same length (one step count per run), got {b.size} and {s.size}"
        )
    if b.size < 2 or np.unique(b).size < 2:
        raise ValueError(
            f"a critical-batch fit needs runs at 2 or more distinct batch sizes, got {np.unique(b).size}"
            f" distinct of {b.size}; add runs at other batch sizes"
        )
    s_min, e_min = _fit_linear(b, s) if method == "linear" else _fit_hyperbola(b, s)
    return CriticalBatchFit(
        s_min=s_min,
        e_min=e_min,
        b_crit=e_min / s_min,
        method=method,
        residual=_log_residual(b, s, s_min, e_min),
    )


def steps_examples_tradeoff(batch_size: Any, s_min: Any, e_min: Any) -> tuple[Real, Real]:
    r"""Steps S and examples E to reach a target at batch B (McCandlish eq. 2.11; vectorised).

    .. math::
        S = S_{min}\,(1 + B_{crit}/B) = S_{min} + E_{min}/B, \qquad E = B\,S = E_{min} + B\,S_{min}

    with B_crit = E_min/S_min; at B = B_crit, S = 2 S_min and E = 2 E_min. The same trade-off holds for Adam
    (Surge thm. 5).

    Args:
        batch_size: B, in examples.
        s_min: S_min, > 0.
        e_min: E_min, > 0, in examples.

    Returns:
        ``(S, E)``.
    """
    b = _positive(batch_size, "batch_size", _BATCH)
    sm = _positive(s_min, "s_min", "a finite positive step count")
    em = _positive(e_min, "e_min", "a finite positive number of examples")
    steps = sm + em / b
    return _out(steps), _out(b * steps)


def kaplan_critical_batch(loss: Any, b_star: Any = 2e8, alpha_b: Any = 0.21) -> Real:
    r"""The critical batch of a language model at loss L (Kaplan eq. 1.4; vectorised).

    .. math::
        B_{crit}(L) \approx \frac{B^*}{L^{1/\alpha_B}}

    Args:
        loss: the loss L in nats per token, > 0.
        b_star: B*, in tokens (default: ``2e8``, Kaplan's fit).
        alpha_b: α_B (default: ``0.21``, Kaplan's fit).

    Returns:
        B_crit in tokens.
    """
    loss_ = _positive(loss, "loss", "a finite positive loss in nats per token")
    bs = _positive(b_star, "b_star", "a finite positive number of tokens")
    a = _positive(alpha_b, "alpha_b", "a finite positive exponent")
    return _out(bs / loss_ ** (1.0 / a))


def cost_optimal_batch(noise_scale: Any, step_cost: Any) -> Real:
    r"""The cheapest batch when one step costs as much as ``step_cost`` examples (vectorised).

    Minimising r·S + E over B with S = S_min(1 + B_noise/B), E = E_min(1 + B/B_noise), E_min = B_noise·S_min
    (McCandlish App. D):

    .. math::
        B_{opt} = \sqrt{r\,B_{noise}}

    Args:
        noise_scale: B_noise, in examples.
        step_cost: r, the fixed cost of one step counted in examples, > 0.
    """
    noise = _noise_scale(noise_scale)
    r = _positive(step_cost, "step_cost", "a finite positive cost of one step, counted in examples")
    return _out(np.sqrt(r * noise))


# --------------------------------------------------------------------------------- Adam's exact one-step law


def _erf(x: np.ndarray) -> np.ndarray:
    # numpy has no erf and the laws avoid scipy/torch; math.erf is exact to double precision, and the arrays
    # here are small (coordinates × batch sizes in a test or a diagnostic).
    return np.vectorize(math.erf, otypes=[np.float64])(x)


def _moments(mu: Any, sigma: Any, hessian: Any) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    m = _finite(mu, "mu", "a finite 1-D array of per-coordinate gradient means")
    sd = _positive(sigma, "sigma", "a finite positive 1-D array of per-example gradient standard deviations")
    h = _finite(hessian, "hessian", "a finite (n, n) Hessian or its 1-D diagonal")
    if m.ndim != 1 or m.size == 0:
        raise ValueError(f"mu must be a non-empty 1-D array of per-coordinate means, got shape {m.shape}")
    n = m.size
    if sd.shape != (n,):
        raise ValueError(f"sigma must have the shape of mu, {(n,)}, got {sd.shape}")
    if h.shape not in ((n,), (n, n)):
        raise ValueError(f"hessian must be an ({n}, {n}) matrix or its diagonal of shape ({n},), got {h.shape}")
    return m, sd, h


def adam_optimal_lr_exact(mu: Any, sigma: Any, hessian: Any, batch_size: Any) -> Real:
    r"""Adam's optimal LR for one sign-like step, without the small-SNR simplification (Surge eq. 9).

    Per-example gradients have coordinates ~ N(μ_i, σ_i²); a batch-B gradient's coordinate then has mean μ_i
    and standard deviation σ_i/√B, and the update sign(G_B) has E[sign] = E_i, Var = 1 − E_i², independent
    across coordinates. Maximising the expected quadratic decrease ε μᵀE[V] − ½ε² E[VᵀHV] gives

    .. math::
        E_i(B) = \operatorname{erf}\!\left(\sqrt{B/2}\,\frac{\mu_i}{\sigma_i}\right), \qquad
        \epsilon_{opt}(B) = \frac{\sum_i E_i \mu_i}{\sum_i (1 - E_i^2) H_{ii} + \sum_{ij} E_i E_j H_{ij}}

    For B ≪ π σ_i²/(2 μ_i²) it reduces to Surge eq. 2 (see :func:`adam_law_from_moments`); for B → ∞ it tends
    to Σ|μ_i| / Σ_ij sign(μ_i) sign(μ_j) H_ij (Surge thm. 4).

    Args:
        mu: per-coordinate gradient means μ, shape (n,).
        sigma: per-example standard deviations σ > 0, shape (n,).
        hessian: the Hessian, an (n, n) matrix or its diagonal (n,) (then off-diagonal terms are zero).
        batch_size: B in examples; a scalar, or a 1-D array of batch sizes (vectorised).

    Raises:
        ValueError: bad shapes or values, or a Hessian whose curvature along the expected update is not
            positive (no finite optimum).
    """
    m, sd, h = _moments(mu, sigma, hessian)
    b = _positive(batch_size, "batch_size", _BATCH)
    if b.ndim > 1:
        raise ValueError(f"batch_size must be a scalar or a 1-D array, got shape {b.shape}")
    bb = np.atleast_1d(b)
    e = _erf(np.sqrt(bb[:, None] / 2.0) * (m / sd)[None, :])  # (batches, n)
    diag = h if h.ndim == 1 else np.diagonal(h)
    numer = e @ m
    # Σ_i (1 − E_i²) H_ii + EᵀHE: the variance of each coordinate's sign plus the mean update's curvature.
    quad = (e * e) @ diag if h.ndim == 1 else np.einsum("bi,ij,bj->b", e, h, e)
    denom = (1.0 - e * e) @ diag + quad
    if not (denom > 0).all():
        raise ValueError(
            "the Hessian's curvature along the expected Adam update is not positive, so no finite optimal LR"
            " exists; pass a positive semi-definite Hessian (or its positive diagonal)"
        )
    lr = numer / denom
    return float(lr[0]) if b.ndim == 0 else lr


def adam_law_from_moments(mu: Any, sigma: Any, hessian: Any) -> tuple[float, float]:
    r"""ε_max and B_noise of Surge eq. 2, from per-coordinate moments and the Hessian (Surge thm. 3, eq. 14).

    Expanding erf(x) ≈ 2x/√π in Surge eq. 9 (valid for B ≪ π σ_i²/(2 μ_i²)) with u_i = μ_i/σ_i:

    .. math::
        \epsilon_{opt}(B) \approx \frac{a\sqrt B}{c + dB}, \quad
        a = \sqrt{2/\pi}\,\sum_i \mu_i u_i, \quad c = \sum_i H_{ii}, \quad
        d = \frac2\pi \sum_{i \ne j} u_i u_j H_{ij}

    which is eq. 2 with B_noise = c/d (eq. 14) and ε_max = a / (2√(cd)). Measured on a small transformer,
    many coordinates lie outside this regime and eq. 14 comes out far too small, so this is a
    diagnostic; the laws take B_noise from a measurement.

    Args:
        mu: per-coordinate gradient means μ, shape (n,).
        sigma: per-example standard deviations σ > 0, shape (n,).
        hessian: an (n, n) Hessian (a diagonal alone has no off-diagonal terms, hence no surge).

    Returns:
        ``(lr_max, noise_scale)``.

    Raises:
        ValueError: when Σ_{i≠j} u_i u_j H_ij ≤ 0 or Σ H_ii ≤ 0: the law then has no peak.
    """
    m, sd, h = _moments(mu, sigma, hessian)
    if h.ndim != 2:
        raise ValueError("hessian must be the full (n, n) matrix: eq. 14 needs its off-diagonal terms")
    u = m / sd
    diag = np.diagonal(h)
    a = math.sqrt(2.0 / math.pi) * float(m @ u)
    c = float(diag.sum())
    d = 2.0 / math.pi * float(u @ h @ u - (u * u) @ diag)
    if not (c > 0 and d > 0 and a > 0):
        raise ValueError(
            f"the small-SNR law has no peak for these moments (sum H_ii = {c:.6g}, off-diagonal"
            f" u^T H u = {d * math.pi / 2:.6g}, both must be > 0, and mu must not be all zero);"
            " measure B_noise instead"
        )
    return a / (2.0 * math.sqrt(c * d)), c / d
