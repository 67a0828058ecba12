r"""Per-coordinate gradient statistics at the optimizer step (the inputs of the Surge analysis).

From k microbatch gradients g_j of b examples each, kept as S = Σ_j g_j and C = Σ_j g_j², every coordinate
gets

.. math::
    \hat\mu = S/k, \quad m_2 = C/k, \quad
    \hat\sigma^2 = b \cdot \max(m_2 - \hat\mu^2, 0) \cdot \frac{k}{k-1}

(:math:`\hat\sigma^2` is the unbiased per-example variance: the microbatch means have variance σ²/b).
The torch path here is also the CPU path in production; the Triton path (`coord_triton`) is imported only
when chosen. `coordinate_stats_reference` is the float64 definition the tests hold both to.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Sequence

import torch

from ._layout import flat_like, is_dense, to_device
from .dispatch import resolve_backend

# Default SNR histogram edges: 10^-3 .. 10^1, four bins per decade. Surge thm. 3 needs |μ|/σ ≪ √(π/2B),
# i.e. SNRs well under 0.1 at B ~ 100, so the range spans the regime boundary at every practical batch size.
DEFAULT_SNR_EDGES: tuple[float, ...] = tuple(10.0 ** (-3.0 + 4.0 * i / 16) for i in range(17))

# Scalars of the output vector, in order; the histogram follows them.
SLOTS: tuple[str, ...] = (
    "sum_mu_sq",
    "sum_sigma_sq",
    "sum_mu_sq_over_sigma",
    "num_coords",
    "precond_small",
    "precond_big",
    "frac_small_batch",
)

# Elements per slice of the torch path: its ~10 float32 temporaries (2.5 MiB) stay in cache, so memory sees
# each input about once, as the fused kernel does.
_TORCH_CHUNK = 1 << 16

_EDGE_CACHE: dict[tuple[tuple[float, ...], torch.device], torch.Tensor] = {}


def _geometric(values: Sequence[float] | None) -> tuple[float, float] | None:
    """(log10 of the first edge, log10 step) when the edges are positive and evenly spaced in log10."""
    if values is None or len(values) < 2 or values[0] <= 0:
        return None
    logs = [math.log10(e) for e in values]
    step = (logs[-1] - logs[0]) / (len(logs) - 1)
    if step <= 0 or any(abs(x - (logs[0] + i * step)) > 1e-9 * (1 + abs(x)) for i, x in enumerate(logs)):
        return None
    return logs[0], step


def _host_edges(snr_edges: Sequence[float] | torch.Tensor | None) -> tuple[float, ...] | None:
    if snr_edges is None:
        return DEFAULT_SNR_EDGES
    if isinstance(snr_edges, torch.Tensor):
        return tuple(snr_edges.tolist()) if snr_edges.device.type == "cpu" else None
    return tuple(float(e) for e in snr_edges)


def _edges_tensor(snr_edges: Sequence[float] | torch.Tensor | None, device: torch.device) -> torch.Tensor:
    if isinstance(snr_edges, torch.Tensor):
        if snr_edges.dim() != 1 or snr_edges.numel() == 0:
            raise ValueError(
                f"snr_edges must be a non-empty 1-D sequence, got shape {tuple(snr_edges.shape)}"
            )
        if snr_edges.device.type != "cpu":
            # Already on the device: used as given (checking monotonicity would need a host sync).
            return snr_edges.to(device=device, dtype=torch.float32).contiguous()
        snr_edges = snr_edges.tolist()
    values = DEFAULT_SNR_EDGES if snr_edges is None else tuple(float(e) for e in snr_edges)
    if not values:
        raise ValueError("snr_edges must hold at least one edge")
    if any(not math.isfinite(e) for e in values) or any(b <= a for a, b in itertools.pairwise(values)):
        raise ValueError(f"snr_edges must be finite and strictly increasing, got {values}")
    key = (values, device)
    edges = _EDGE_CACHE.get(key)
    if edges is None:
        edges = to_device(torch.tensor(values, dtype=torch.float32), device)
        if len(_EDGE_CACHE) >= 32:
            _EDGE_CACHE.clear()
        _EDGE_CACHE[key] = edges
    return edges


def _validate(
    grad_sums: Sequence[torch.Tensor],
    coord_sq: Sequence[torch.Tensor],
    exp_avg_sq: Sequence[torch.Tensor] | None,
    num_microbatches: int,
    microbatch_size: float,
    eps: float,
) -> None:
    if (
        isinstance(num_microbatches, bool)
        or int(num_microbatches) != num_microbatches
        or num_microbatches < 2
    ):
        raise ValueError(
            f"num_microbatches must be an integer >= 2, got {num_microbatches}; a variance needs at least "
            "two "
            "microbatches (use gradient accumulation or data-parallel ranks)"
        )
    if not (math.isfinite(microbatch_size) and microbatch_size > 0):
        raise ValueError(f"microbatch_size must be a positive number of examples, got {microbatch_size}")
    if not (math.isfinite(eps) and eps >= 0):
        raise ValueError(f"eps must be a finite number >= 0, got {eps}")
    if len(coord_sq) != len(grad_sums):
        raise ValueError(
            f"coord_sq has {len(coord_sq)} tensors for {len(grad_sums)} grad_sums; pass one each"
        )
    if exp_avg_sq is not None and len(exp_avg_sq) != len(grad_sums):
        raise ValueError(
            f"exp_avg_sq has {len(exp_avg_sq)} tensors for {len(grad_sums)} grad_sums; pass one each"
        )
    device = coord_sq[0].device if coord_sq else None
    for i, (s, c) in enumerate(zip(grad_sums, coord_sq, strict=True)):
        if c.dtype != torch.float32 or not is_dense(c):
            raise ValueError(
                f"coord_sq[{i}] must be a dense float32 tensor, got {c.dtype}; allocate it with "
                "torch.zeros_like(param, dtype=torch.float32)"
            )
        others = [("grad_sums", s)] + ([("exp_avg_sq", exp_avg_sq[i])] if exp_avg_sq is not None else [])
        for name, t in others:
            if t.shape != c.shape or t.device != device or not t.is_floating_point():
                raise ValueError(
                    f"{name}[{i}] must be a floating tensor of shape {tuple(c.shape)} on {device}, got "
                    f"{t.dtype} {tuple(t.shape)} on {t.device}"
                )


def _pack(out: torch.Tensor, precond: bool) -> dict[str, torch.Tensor]:
    stats = {name: out[i] for i, name in enumerate(SLOTS) if precond or not name.startswith("precond")}
    stats["snr_hist"] = out[len(SLOTS) :]
    return stats


def coordinate_stats(
    grad_sums: Sequence[torch.Tensor],
    coord_sq: Sequence[torch.Tensor],
    num_microbatches: int,
    microbatch_size: float,
    *,
    exp_avg_sq: Sequence[torch.Tensor] | None = None,
    eps: float = 1e-8,
    snr_edges: Sequence[float] | torch.Tensor | None = None,
    reset: bool = True,
    backend: str | None = None,
) -> dict[str, torch.Tensor]:
    r"""Per-coordinate noise statistics of one optimizer step, reduced over every coordinate, in float32.

    With :math:`\hat\mu, m_2, \hat\sigma^2` per coordinate as in the module docstring, B = k·b, and
    :math:`P = 1/(\sqrt{v} + \epsilon)` from Adam's second moment v:

    .. math::
        \texttt{sum\_mu\_sq} = \sum \hat\mu^2, \quad
        \texttt{sum\_sigma\_sq} = \sum \hat\sigma^2, \quad
        \texttt{sum\_mu\_sq\_over\_sigma} = \sum_{\hat\sigma > 0} \hat\mu^2 / \hat\sigma, \\
        \texttt{precond\_small} = \sum P^2 m_2, \quad \texttt{precond\_big} = \sum P^2 \hat\mu^2, \quad
        \texttt{frac\_small\_batch} = \frac{1}{N}\#\{B < \pi\hat\sigma^2 / (2\hat\mu^2)\}

    `sum_mu_sq_over_sigma` is the numerator of the small-batch Surge law (eq. 16: erf(x) ≈ 2x/√π turns
    Σ E_i μ_i into √(2B/π) Σ μ_i²/σ_i); `frac_small_batch` is the share of coordinates inside the regime of
    Surge thm. 3 (μ̂ = 0 counts as inside); `precond_small`/`precond_big` are |P g|² averaged over microbatches
    and |P ḡ|², the two batch sizes of McCandlish App. A.1 for the preconditioned gradient. `snr_hist` counts
    |μ̂|/σ̂ in `len(snr_edges) + 1` bins: bin 0 below the first edge, bin i in [edge[i-1], edge[i]), the last
    bin at or above the last edge together with every coordinate where σ̂ = 0.

    Precision: float32 throughout. σ̂² comes from m2 − μ̂², so a coordinate with |μ̂|/σ̂ beyond ~10³ has a
    variance at the level of float32 rounding (clamped at 0). Counts above 2^24 round to float32.

    Args:
        grad_sums (sequence of Tensor): S = Σ_j g_j per parameter (the accumulated `.grad` in sum units)
        coord_sq (sequence of Tensor): Σ_j g_j² per parameter, dense float32 (filled by
            :func:`accumulate_sq_norms`)
        num_microbatches (int): k >= 2
        microbatch_size (float): b, examples per microbatch (the harmonic mean when they differ)
        exp_avg_sq (sequence of Tensor, optional): Adam's v per parameter; adds the `precond_*` keys
            (default: None)
        eps (float, optional): Adam's epsilon in P (default: 1e-8)
        snr_edges (sequence of float or Tensor, optional): increasing histogram edges (default: 17 edges
            10^linspace(-3, 1, 17))
        reset (bool, optional): zero `coord_sq` in the same pass, ready for the next step (default: True)
        backend (str, optional): "auto", "torch" or "triton", see :func:`resolve_backend` (default: None)

    Returns:
        dict[str, Tensor]: 0-d float32 tensors `sum_mu_sq`, `sum_sigma_sq`, `sum_mu_sq_over_sigma`,
        `num_coords`, `frac_small_batch` (and `precond_small`, `precond_big` with `exp_avg_sq`), and the
        float32 vector `snr_hist`; all are views of one buffer on the tensors' device. No host sync.
    """
    grad_sums, coord_sq = list(grad_sums), list(coord_sq)
    exp_avg_sq = None if exp_avg_sq is None else list(exp_avg_sq)
    _validate(grad_sums, coord_sq, exp_avg_sq, num_microbatches, microbatch_size, eps)
    device = coord_sq[0].device if coord_sq else torch.device("cpu")
    edges = _edges_tensor(snr_edges, device)
    every = [*grad_sums, *coord_sq, *(exp_avg_sq or [])]
    if every and resolve_backend(backend, every) == "triton":
        from .coord_triton import coordinate_stats_triton

        out = coordinate_stats_triton(
            grad_sums, coord_sq, exp_avg_sq, int(num_microbatches), float(microbatch_size), eps, edges, reset
        )
    else:
        out = _coordinate_stats_torch(
            grad_sums,
            coord_sq,
            exp_avg_sq,
            int(num_microbatches),
            float(microbatch_size),
            eps,
            edges,
            _geometric(_host_edges(snr_edges)),
            reset,
        )
    return _pack(out, exp_avg_sq is not None)


def _flat(t: torch.Tensor) -> torch.Tensor:
    # A dense tensor in any dimension order is one run of memory from its first element.
    return t.as_strided((t.numel(),), (1,), t.storage_offset())


def _coordinate_stats_torch(
    grad_sums: list[torch.Tensor],
    coord_sq: list[torch.Tensor],
    exp_avg_sq: list[torch.Tensor] | None,
    k: int,
    b: float,
    eps: float,
    edges: torch.Tensor,
    log_edges: tuple[float, float] | None,
    reset: bool,
) -> torch.Tensor:
    device = edges.device
    nbins = edges.numel() + 1
    inv_k = 1.0 / k
    var_scale = b * k / (k - 1.0)  # σ̂² = b·(m2 − μ̂²)·k/(k−1): unbiased, per example
    two_big_b = 2.0 * k * b
    # Chunk partial sums are float32; adding ~10³ of them in float64 keeps the total at float32 accuracy.
    sums = torch.zeros(6, dtype=torch.float32 if device.type == "mps" else torch.float64, device=device)
    hist = torch.zeros(nbins, dtype=torch.int64, device=device)
    total = 0
    for i, c_full in enumerate(coord_sq):
        s_all = _flat(flat_like(grad_sums[i], c_full))
        v_all = None if exp_avg_sq is None else _flat(flat_like(exp_avg_sq[i], c_full))
        c_all = _flat(c_full)
        n = c_all.numel()
        total += n
        for lo in range(0, n, _TORCH_CHUNK):
            hi = min(lo + _TORCH_CHUNK, n)
            c = c_all[lo:hi]
            mu = s_all[lo:hi].to(torch.float32, copy=True).mul_(inv_k)
            m2 = c.mul(inv_k)
            if reset:
                c.zero_()  # the slice is still in cache: zeroing here costs no extra read
            mu2 = mu * mu
            sig2 = m2.sub(mu2).clamp_min_(0.0).mul_(var_scale)  # clamp: rounding can go below 0
            zero = sig2 == 0
            inv_sig = sig2.rsqrt().masked_fill_(zero, 0.0)  # one division for both μ̂²/σ̂ and |μ̂|/σ̂
            mu.abs_()
            inside = (mu == 0).logical_or_(mu2 * two_big_b < sig2 * math.pi)  # Surge thm. 3, μ̂ = 0 inside
            snr = mu.mul_(inv_sig).masked_fill_(zero, math.inf)  # σ̂ = 0 goes to the overflow bin
            parts = [mu2.sum(), sig2.sum(), torch.dot(mu2, inv_sig), torch.count_nonzero(inside)]
            if v_all is not None:
                p2 = v_all[lo:hi].to(torch.float32, copy=True).sqrt_().add_(eps).reciprocal_().square_()
                parts += [torch.dot(p2, m2), torch.dot(p2, mu2)]
            sums[: len(parts)] += torch.stack(parts)
            if log_edges is not None:
                # Evenly spaced log edges (the default): the bin is arithmetic, several times faster than a
                # binary search; a value within float32 rounding of an edge may land one bin over.
                first, step = log_edges
                index = (
                    snr.log10_().sub_(first).mul_(1.0 / step).floor_().clamp_(-1.0, nbins - 2).add_(1).long()
                )
            else:
                index = torch.bucketize(snr, edges, right=True)
            if device.type == "cpu":
                hist += torch.bincount(index, minlength=nbins)
            else:  # bincount sizes its output from the data on CUDA (a host sync); index_add_ does not
                hist.index_add_(0, index, torch.ones((), dtype=torch.int64, device=device).expand_as(index))
    out = torch.empty(len(SLOTS) + nbins, dtype=torch.float32, device=device)
    out[0:3] = sums[0:3]
    out[3] = float(total)
    out[4:6] = sums[4:6]
    out[6] = sums[3] / max(total, 1)
    out[len(SLOTS) :] = hist
    return out
