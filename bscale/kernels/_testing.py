"""Comparison helper for tests of numerical kernels: says where and by how much two tensors differ."""

from __future__ import annotations

import torch


def assert_close_verbose(
    actual: torch.Tensor,
    expected: torch.Tensor,
    *,
    rtol: float,
    atol: float,
    what: str = "",
    max_report: int = 5,
) -> None:
    """Raise AssertionError unless |actual - expected| <= atol + rtol·|expected| everywhere (NaN fails).

    The message names the worst elements (index, both values, absolute and relative error) and how many
    elements fail, so a failing kernel test shows its pattern (one slot, a block boundary, everything).
    """
    a = actual.detach().double().cpu().reshape(-1)
    e = expected.detach().double().cpu().reshape(-1)
    if a.shape != e.shape:
        raise AssertionError(f"{what}: {a.numel()} elements, expected {e.numel()}")
    err = (a - e).abs()
    bad = ~(err <= atol + rtol * e.abs())  # written so that NaN counts as a failure
    if not bool(bad.any()):
        return
    idx = torch.nonzero(bad).flatten()
    worst = idx[torch.argsort(torch.nan_to_num(err[idx], nan=float("inf")), descending=True)[:max_report]]
    lines = [
        f"  [{int(i)}] actual={a[i].item():.9g} expected={e[i].item():.9g} abs={err[i].item():.3g} "
        f"rel={(err[i] / e[i].abs().clamp_min(1e-300)).item():.3g}"
        for i in worst
    ]
    raise AssertionError(
        f"{what}: {idx.numel()} of {a.numel()} elements differ beyond atol={atol:g}, rtol={rtol:g}; worst:\n"
        + "\n".join(lines)
    )
