"""Float64 definitions of the kernel statistics, written for clarity, not speed. Tests hold both backends to
them; nothing on a training path calls them.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch

from .coord import DEFAULT_SNR_EDGES


def sq_norms_reference(tensors: Sequence[torch.Tensor]) -> torch.Tensor:
    """Float64 squared L2 norm of each tensor (on the CPU)."""
    return torch.tensor([t.detach().double().square().sum().item() for t in tensors], dtype=torch.float64)


def coordinate_stats_reference(
    grad_sums: Sequence[torch.Tensor],
    coord_sq: Sequence[torch.Tensor],
    num_microbatches: int,
    microbatch_size: float,
    *,
    exp_avg_sq: Sequence[torch.Tensor] | None = None,
    eps: float = 1e-8,
    snr_edges: Sequence[float] | torch.Tensor | None = None,
) -> dict[str, torch.Tensor]:
    """Float64 (CPU) version of :func:`coordinate_stats` with the same keys; never modifies `coord_sq`."""
    k, b = float(num_microbatches), float(microbatch_size)
    s = torch.cat([t.detach().double().cpu().reshape(-1) for t in grad_sums])
    c = torch.cat([t.detach().double().cpu().reshape(-1) for t in coord_sq])
    mu = s / k
    m2 = c / k
    sigma_sq = b * (m2 - mu**2).clamp_min(0.0) * k / (k - 1.0)
    sigma = sigma_sq.sqrt()
    pos = sigma > 0
    safe = torch.where(pos, sigma, torch.ones_like(sigma))
    # No gradient in the step (μ̂ = σ̂ = 0), or NaN: counted apart, in neither the histogram nor the regime share.
    none = ((mu**2 == 0) & (sigma_sq == 0)) | mu.isnan() | sigma_sq.isnan()
    snr = torch.where(pos, mu.abs() / safe, torch.full_like(mu, math.inf))  # σ̂ = 0 < |μ̂|: infinite
    edges = torch.as_tensor(DEFAULT_SNR_EDGES if snr_edges is None else snr_edges, dtype=torch.float64).cpu()
    # Bin i holds edges[i-1] <= snr < edges[i]: the number of edges at or below snr.
    bins = (snr[~none, None] >= edges[None, :]).sum(dim=1)
    big_b = k * b
    inside = ((mu == 0) | (big_b < math.pi * sigma_sq / (2.0 * mu**2)))[~none]
    live = int((~none).sum())
    stats = {
        "sum_mu_sq": (mu**2).sum(),
        "sum_sigma_sq": sigma_sq.sum(),
        "sum_mu_sq_over_sigma": torch.where(pos, mu**2 / safe, torch.zeros_like(mu)).sum(),
        "num_coords": torch.tensor(float(mu.numel()), dtype=torch.float64),
        "frac_small_batch": (
            inside.double().mean() if live else torch.tensor(math.nan if mu.numel() else 0.0, dtype=torch.float64)
        ),
        "sum_sigma": sigma.sum(),
        "num_no_grad": none.double().sum(),
        "snr_hist": torch.bincount(bins, minlength=edges.numel() + 1).double(),
    }
    if exp_avg_sq is not None:
        v = torch.cat([t.detach().double().cpu().reshape(-1) for t in exp_avg_sq])
        p = 1.0 / (v.sqrt() + eps)
        stats["precond_small"] = (p**2 * m2).sum()
        stats["precond_big"] = (p**2 * mu**2).sum()
    return stats
