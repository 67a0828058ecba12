"""Per-coordinate mode through the wrapper, on linear regression where μ_i and σ_i are known in closed form.

Per-example loss ½(wᵀx − y)², x ~ N(0, I), y = w*ᵀx + ε, ε ~ N(0, s²), at a fixed point w = w* + δ: the per-example
gradient (δᵀx − ε)x has mean μ = δ and covariance Σ = (|δ|² + s²)I + δδᵀ (Isserlis), so σ_i² = |δ|² + s² + δ_i².
"""

from __future__ import annotations

import importlib
import math
import threading

import pytest
import torch

import bscale
from bscale.kernels import coord as coord_module

D, S, B_MICRO, K, STEPS = 16, 0.5, 32, 8, 60


def _run(loss_reduction: str = "mean", seed: int = 0):
    torch.manual_seed(seed)
    w_star = torch.randn(D)
    model = torch.nn.Linear(D, 1, bias=False)
    delta = 0.3 * torch.randn(D)
    with torch.no_grad():
        model.weight.copy_((w_star + delta)[None])
    opt = bscale.wrap(
        torch.optim.Adam(model.parameters(), lr=0.0),  # lr 0: the point stays fixed, Adam's v still updates
        microbatch_size=B_MICRO,
        per_coordinate=True,
        loss_reduction=loss_reduction,
    )
    gen = torch.Generator().manual_seed(seed + 1)
    rows = []
    for _ in range(STEPS):
        for _ in range(K):
            x = torch.randn(B_MICRO, D, generator=gen)
            y = x @ w_star + S * torch.randn(B_MICRO, generator=gen)
            loss = 0.5 * (model(x).squeeze(-1) - y).pow(2).mean()
            (loss / K if loss_reduction == "mean" else loss).backward()
        opt.step()
        opt.zero_grad()
        rows.append(opt.stats)
    return rows, delta.double()


def test_per_coordinate_sums_match_the_closed_form():
    rows, delta = _run()
    d2 = float(delta @ delta)
    sigma_sq = D * (d2 + S**2) + d2  # Σ_i σ_i² = tr Σ
    batch = K * B_MICRO
    mean = {key: sum(r[key] for r in rows) / len(rows) for key in rows[-1] if key.startswith("coord/")}
    # Unbiased per-example variance summed over coordinates.
    assert mean["coord/sum_sigma_sq"] == pytest.approx(sigma_sq, rel=0.05)
    # Σ μ̂_i² over the step's batch is |G|² plus the noise of a mean over B examples (σ²/B, 8% of it here): the
    # reported sum has that taken out, and so has Σ μ̂²/σ̂ its noise (coord_stats.py).
    assert batch * d2 < 16 * sigma_sq
    assert mean["coord/sum_mu_sq"] == pytest.approx(d2, rel=0.05)
    sigma_i = (d2 + S**2 + delta**2).sqrt()
    assert mean["coord/sum_mu_sq_over_sigma"] == pytest.approx(float((delta**2 / sigma_i).sum()), rel=0.05)
    assert 0.0 <= mean["coord/frac_small_batch"] <= 1.0
    assert rows[-1]["coord/frac_small_batch_noise_only"] == pytest.approx(0.7496697, abs=1e-6)  # P(F(1, 7) < π/2)
    hist = [v for k, v in rows[-1].items() if k.startswith("coord/snr_hist/")]
    assert len(hist) >= 3 and math.isclose(sum(hist), 1.0, rel_tol=1e-6)
    assert math.isfinite(rows[-1]["adam_preconditioned/noise_scale"])


@pytest.mark.parametrize("last", [B_MICRO, 20, 4])
def test_unequal_microbatches_correct_for_their_sizes(last, monkeypatch):
    # The corrections of Σ μ̂²/σ̂ and of the noise-only level depend on the microbatch sizes (coord_stats.py,
    # held to simulations in test_coord_stats.py): the step's own sizes reach them.
    from bscale import coord_stats

    wrap_module = importlib.import_module("bscale.wrap")  # the module (bscale.wrap is also the function)

    seen = []

    def spy(*args):
        seen.append(args[-1])
        return coord_stats.unbiased_coordinate_sums(*args)

    monkeypatch.setattr(wrap_module, "unbiased_coordinate_sums", spy)
    torch.manual_seed(0)
    model = torch.nn.Linear(D, 1, bias=False)
    opt = bscale.wrap(torch.optim.Adam(model.parameters(), lr=0.0), microbatch_size=B_MICRO, per_coordinate=True)
    sizes = [B_MICRO] * (K - 1) + [last]
    for size in sizes:
        opt.microbatch_size = size
        x = torch.randn(size, D)
        (0.5 * (model(x).squeeze(-1) - x.sum(1) + torch.randn(size)).pow(2).mean() / K).backward()
    opt.step()
    stats = opt.stats
    assert seen == [tuple(float(b) for b in sizes)]
    assert stats["coord/frac_small_batch_noise_only"] == coord_stats.noise_only_small_batch_fraction(K, sizes)
    for key in ("coord/sum_mu_sq", "coord/sum_sigma_sq", "coord/sum_mu_sq_over_sigma", "coord/frac_small_batch"):
        assert math.isfinite(stats[key]), key


def test_coordinates_without_a_gradient_are_counted_apart():
    # A parameter whose gradient is exactly zero (an embedding's unused rows, units that never fire) adds 48
    # coordinates with no SNR: their share is reported, and the histogram and the regime share are the others'.
    def run(extra: bool, reached: bool = True):
        torch.manual_seed(0)
        model = torch.nn.Linear(D, 1, bias=False)
        unused = torch.nn.Parameter(torch.randn(48))
        params = [*model.parameters(), unused] if extra else list(model.parameters())
        opt = bscale.wrap(torch.optim.Adam(params, lr=0.0), microbatch_size=B_MICRO, per_coordinate=True)
        gen = torch.Generator().manual_seed(1)
        for _ in range(K):
            x = torch.randn(B_MICRO, D, generator=gen)
            loss = 0.5 * (model(x).squeeze(-1) - x.sum(1) + torch.randn(B_MICRO, generator=gen)).pow(2).mean()
            ((loss + 0.0 * unused.sum() if reached else loss) / K).backward()
        opt.step()
        return opt.stats

    with_unused, without = run(True), run(False)
    assert with_unused["coord/frac_no_grad"] == 48 / (48 + D) and without["coord/frac_no_grad"] == 0.0
    # A parameter no backward reached (its .grad None, as zero_grad leaves it) counts the same.
    assert run(True, reached=False)["coord/frac_no_grad"] == 48 / (48 + D)
    keys = ["coord/frac_small_batch", *(k for k in without if k.startswith("coord/snr_hist/"))]
    assert {k: with_unused[k] for k in keys} == pytest.approx({k: without[k] for k in keys}, rel=1e-6)
    assert math.isclose(sum(with_unused[k] for k in keys[1:]), 1.0, rel_tol=1e-6)


@pytest.mark.parametrize("set_to_none", [True, False])
def test_coordinates_without_a_gradient_do_not_depend_on_zero_grads_convention(set_to_none):
    # "a" is used every step, "b" at the first step only, "c" is frozen after the first step: at the third, b's
    # coordinates have no gradient (whether zero_grad left None or zeros in .grad), c's are not trained.
    torch.manual_seed(0)
    a, b, c = (torch.nn.Linear(D, 1, bias=False) for _ in range(3))
    params = [*a.parameters(), *b.parameters(), *c.parameters()]
    opt = bscale.wrap(torch.optim.Adam(params, lr=0.0), microbatch_size=B_MICRO, per_coordinate=True)
    for step in range(3):
        if step == 1:
            c.weight.requires_grad_(False)
        used = (a, b, c) if step == 0 else (a,)
        for _ in range(K):
            x = torch.randn(B_MICRO, D)
            loss = sum(0.5 * (m(x).squeeze(-1) - x.sum(1) + torch.randn(B_MICRO)).pow(2).mean() for m in used)
            (loss / K).backward()
        opt.step()
        opt.zero_grad(set_to_none=set_to_none)
    assert opt.stats["coord/frac_no_grad"] == 0.5  # b's D coordinates of a's and b's 2·D


def test_per_coordinate_values_do_not_depend_on_the_loss_convention():
    mean_rows, _ = _run("mean")
    sum_rows, _ = _run("sum")
    for key in ("coord/sum_sigma_sq", "coord/sum_mu_sq", "coord/sum_mu_sq_over_sigma", "coord/frac_small_batch"):
        assert sum_rows[-1][key] == pytest.approx(mean_rows[-1][key], rel=1e-4), key


def test_adam_preconditioned_scale_uses_the_optimizers_eps():
    # P = 1/(√v + ε): with ε far above √v, P is the same for every coordinate and cancels in the ratio, so the
    # preconditioned noise scale is the plain one (both from the same microbatches).
    torch.manual_seed(3)
    scales = torch.linspace(0.1, 3.0, D)  # coordinates of very different scales: v differs between them
    model = torch.nn.Linear(D, 1, bias=False)
    w_star = torch.randn(D) * scales
    adam = torch.optim.Adam(model.parameters(), lr=0.0, eps=1e6)
    model(torch.randn(4, D)).sum().backward()
    adam.step()  # Adam's v exists from the wrapper's first step on: both estimators see every step
    adam.zero_grad()
    opt = bscale.wrap(adam, microbatch_size=B_MICRO, per_coordinate=True)
    gen = torch.Generator().manual_seed(4)
    for _ in range(20):
        for _ in range(K):
            x = torch.randn(B_MICRO, D, generator=gen) * scales
            y = x @ w_star + S * torch.randn(B_MICRO, generator=gen)
            (0.5 * (model(x).squeeze(-1) - y).pow(2).mean() / K).backward()
        opt.step()
        opt.zero_grad()
    stats = opt.stats
    assert stats["adam_preconditioned/noise_scale"] == pytest.approx(stats["noise_scale"], rel=1e-4)


def _modified_grad_run(modify: str, seed: int = 5) -> dict[str, float]:
    """Per-coordinate readings of linear regression at a fixed point, with .grad changed in place before step():
    clipped, or unscaled by a GradScaler (the AMP recipe: unscale_, clip, step)."""
    torch.manual_seed(seed)
    model = torch.nn.Linear(D, 1, bias=False)
    w_star = torch.randn(D)
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**10) if modify == "unscale" else None
    opt = bscale.wrap(
        torch.optim.Adam(model.parameters(), lr=0.0), microbatch_size=B_MICRO, per_coordinate=True, grad_scaler=scaler
    )
    gen = torch.Generator().manual_seed(seed + 1)
    for _ in range(12):
        for _ in range(K):
            x = torch.randn(B_MICRO, D, generator=gen)
            y = x @ w_star + S * torch.randn(B_MICRO, generator=gen)
            loss = 0.5 * (model(x).squeeze(-1) - y).pow(2).mean() / K
            (loss if scaler is None else scaler.scale(loss)).backward()
        if scaler is not None:
            scaler.unscale_(opt)
            scaler.step(opt)
            scaler.update()
        else:
            if modify == "clip":
                torch.nn.utils.clip_grad_norm_(model.parameters(), 1e-3)
            opt.step()
        opt.zero_grad()
    return opt.stats


@pytest.mark.parametrize("modify", ["clip", "unscale"])
def test_per_coordinate_readings_use_the_gradient_before_clipping_or_unscaling(modify):
    plain, modified = _modified_grad_run("none"), _modified_grad_run(modify)
    keys = ["coord/sum_mu_sq", "coord/sum_sigma_sq", "coord/sum_mu_sq_over_sigma", "coord/frac_small_batch"]
    keys += [k for k in plain if k.startswith("coord/snr_hist/")]
    if modify == "unscale":
        # A power-of-two loss scale is exact and unscaled before Adam sees it: its v, too, is the plain run's.
        keys += ["adam_preconditioned/noise_scale"]
    for key in keys:
        assert modified[key] == pytest.approx(plain[key], rel=1e-6), key


class _Mixed(torch.nn.Module):
    """A tensor large enough for slices of its own (>= 2^16 elements), small ones packed together, and a float64
    parameter (normed on its own path)."""

    def __init__(self) -> None:
        super().__init__()
        self.big = torch.nn.Linear(300, 256)
        self.small = torch.nn.Linear(256, 3)
        self.head = torch.nn.Parameter(torch.randn(3, dtype=torch.float64))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.small(torch.tanh(self.big(x))).double() @ self.head


def _mixed_run(per_coordinate: bool) -> dict[str, float]:
    torch.manual_seed(11)
    model = _Mixed()
    opt = bscale.wrap(
        torch.optim.Adam(model.parameters(), lr=1e-3),
        microbatch_size=8,
        per_coordinate=per_coordinate,
        named_parameters=model.named_parameters(),
    )
    gen = torch.Generator().manual_seed(12)
    for step in range(6):
        sizes = [8, 8, 8, 5] if step % 2 else [8, 8, 8]  # an unequal last microbatch on odd steps
        for size in sizes:
            opt.microbatch_size = size
            x = torch.randn(size, 300, generator=gen)
            y = torch.randn(size, generator=gen, dtype=torch.float64)
            (0.5 * (model(x) - y).pow(2).mean() / len(sizes)).backward()
        opt.step()
        opt.zero_grad()
    return opt.stats


def test_per_coordinate_mode_gives_the_default_modes_noise_scale():
    # On the CPU, per-coordinate mode takes the squared norms from its per-coordinate sums instead of norming the
    # gradients: the same quantities by another float32 route, so equal to float32 rounding.
    plain, coord = _mixed_run(False), _mixed_run(True)
    keys = [k for k in plain if k.split("/")[0] in ("noise_scale", "grad_sq", "trace_sigma", "layer")]
    assert len(keys) >= 6 and any(k.startswith("layer/big/") for k in keys)
    for key in keys:
        assert coord[key] == pytest.approx(plain[key], rel=1e-5, abs=1e-12), key


def _memory(model: torch.nn.Module) -> dict[bool, dict[str, int]]:
    opts = {
        mode: bscale.wrap(torch.optim.Adam(model.parameters()), microbatch_size=4, per_coordinate=mode)
        for mode in (False, True)
    }
    for opt in opts.values():
        for _ in range(2):
            model(torch.randn(4, 40)).pow(2).mean().backward()
        opt.step()
        opt.zero_grad()
    return {mode: opt.memory_bytes() for mode, opt in opts.items()}


def test_memory_bytes_counts_the_buffer_per_parameter_and_the_workspace():
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(40, 30), torch.nn.Linear(30, 2))
    n = sum(p.numel() for p in model.parameters())
    # A thread of its own: each thread keeps a scratch as wide as the widest slice it has seen, and the
    # workspace counts every live thread's (this one's, from earlier tests, included).
    before = coord_module.scratch_bytes()
    result = {}
    thread = threading.Thread(target=lambda: result.update(_memory(model)))
    thread.start()
    thread.join()
    plain, coord = result[False], result[True]
    assert plain["workspace"] == 0
    coord["workspace"] -= before
    assert coord["persistent"] - plain["persistent"] == 4 * n  # one float32 value per coordinate
    # The torch path's scratch, sized to this model (one slice): nine float32 rows and the int16 bin indices.
    assert 9 * 4 * n <= coord["workspace"] <= 9 * 4 * n + 4 * (n + 1)
