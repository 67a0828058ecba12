"""Per-coordinate statistics (`coordinate_stats`): against the float64 reference, against closed forms built
from explicit microbatch gradients, and against the exact sampling distribution on synthetic Gaussian data.
"""

from __future__ import annotations

import math
import os

import pytest
import torch

import bscale.kernels as K
from bscale.kernels import dispatch
from bscale.kernels._testing import assert_close_verbose

HAS_TRITON = dispatch.triton_available()
BACKENDS = [
    "torch",
    pytest.param("triton", marks=[pytest.mark.triton, pytest.mark.skipif(not HAS_TRITON, reason="no triton")]),
]
SCALARS = [
    "sum_mu_sq",
    "sum_sigma_sq",
    "sum_mu_sq_over_sigma",
    "num_coords",
    "num_no_grad",
    "frac_small_batch",
    "sum_sigma",
]


@pytest.fixture
def seed() -> int:
    value = int.from_bytes(os.urandom(4), "little")
    torch.manual_seed(value)
    return value


def _microbatches(shapes, k: int) -> list[torch.Tensor]:
    """k microbatch gradients per parameter, float64, stacked on dim 0; SNRs spread over e^-7..e^1.

    Not higher: at |μ|/σ ≫ 1, m2 − μ̂² cancels, and for a bf16 sum (rounded 2^-9 against an exact Σ g²) σ̂²
    becomes rounding noise, where float32 and float64 legitimately disagree.
    """
    grads = []
    for shape in shapes:
        sigma = torch.exp(torch.randn(shape, dtype=torch.float64))
        mu = sigma * torch.exp(torch.empty(shape, dtype=torch.float64).uniform_(-7, 1.0)) * torch.randn(shape).sign()
        grads.append(mu + sigma * torch.randn((k, *shape), dtype=torch.float64))
    return grads


def _mu_sq_over_sigma_atol(sums, coord, k: int, b: float) -> float:
    """How far float32 arithmetic may legitimately move Σ μ̂²/σ̂ on these inputs.

    σ̂² = b·(m2 − μ̂²)·k/(k−1) cancels: m2 and μ̂² each carry a float32 rounding (relative 2^-24), so the variance
    carries an absolute error of about ε·(m2 + μ̂²) and μ̂²/σ̂ half of that relative to the variance. A coordinate
    whose k microbatches happen to agree closely has a tiny σ̂ and dominates; its bound grows with it (×4 margin).
    """
    s = torch.cat([t.double().reshape(-1) for t in sums])
    c = torch.cat([t.double().reshape(-1) for t in coord])
    mu, m2 = s / k, c / k
    var = m2 - mu**2
    pos = var > 0
    term = mu[pos] ** 2 / (b * var[pos] * k / (k - 1)).sqrt()
    eps = torch.finfo(torch.float32).eps
    return float((term * 0.5 * 4 * eps * (m2[pos] + mu[pos] ** 2) / var[pos]).sum())


def _sigma_atol(sums, coord, k: int, b: float) -> float:
    """How far float32 arithmetic may move Σ σ̂: the variance m2 − μ̂² carries an absolute error of about
    ε·(m2 + μ̂²) (×4 margin), and a square root moves by at most the root of an absolute error."""
    s = torch.cat([t.double().reshape(-1) for t in sums])
    c = torch.cat([t.double().reshape(-1) for t in coord])
    mu, m2 = s / k, c / k
    eps = torch.finfo(torch.float32).eps
    return float((b * k / (k - 1) * 4 * eps * (m2 + mu**2)).sqrt().sum())


def _check_against(stats, expected, *, rtol, what, hist_slack=0, inputs=None):
    """`inputs` = (sums, coord_sq, k, b): bound Σ μ̂²/σ̂ by its float32 conditioning on them (else rtol alone)."""
    n = float(expected["num_coords"])
    for key in SCALARS + [key for key in ("precond_small", "precond_big") if key in expected]:
        assert stats[key].dtype == torch.float32 and stats[key].dim() == 0, key
        # Fractions are counts: a coordinate sitting on the regime boundary may flip under float32 rounding.
        atol = (hist_slack + 0.5) / n if key == "frac_small_batch" else 0.0
        if key == "sum_mu_sq_over_sigma" and inputs is not None:
            atol = _mu_sq_over_sigma_atol(*inputs)
        if key == "sum_sigma" and inputs is not None:
            atol = _sigma_atol(*inputs)
        assert_close_verbose(stats[key], expected[key], rtol=rtol, atol=atol, what=f"{what} {key}")
    hist, ref_hist = stats["snr_hist"].double(), expected["snr_hist"]
    live = n - float(expected["num_no_grad"])  # coordinates without a gradient are counted apart
    assert hist.shape == ref_hist.shape and float(hist.sum()) == live, f"{what} snr_hist {hist} vs {ref_hist}"
    assert float((hist - ref_hist).abs().sum()) <= 2 * hist_slack, f"{what} snr_hist {hist} vs {ref_hist}"


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("precond", [False, True])
def test_matches_float64_reference(backend, dtype, precond, seed):
    k, b = 8, 3.0
    shapes = [(1,), (7,), (4097,), (33, 65)]
    gs = _microbatches(shapes, k)
    gs[2][:, :5] = 0.25  # σ̂ = 0 exactly (constant across microbatches): overflow bin, outside the regime
    gs[2][:, 5:8] = 0.0  # μ̂ = σ̂ = 0 (no gradient): num_no_grad, in neither the histogram nor the share
    # Sums in the gradient dtype (as `.grad` holds them); the transposed one is dense but non-contiguous.
    sums = [g.sum(0).to(dtype) for g in gs]
    sums[3] = gs[3].sum(0).t().contiguous().t().to(dtype)
    coord = [(g**2).sum(0).float() for g in gs]
    v = [torch.rand(s, dtype=torch.float64).to(dtype) for s in shapes] if precond else None
    inputs = ([t.clone() for t in sums], [t.clone() for t in coord], k, b)
    expected = K.coordinate_stats_reference(sums, coord, k, b, exp_avg_sq=v, eps=1e-3)
    stats = K.coordinate_stats(sums, coord, k, b, exp_avg_sq=v, eps=1e-3, backend=backend)
    assert set(stats) == set(expected)
    what = f"{backend} {dtype} seed={seed}"
    _check_against(stats, expected, rtol=2e-4, what=what, hist_slack=3, inputs=inputs)
    assert all(bool((c == 0).all()) for c in coord), "reset=True must zero coord_sq"


@pytest.mark.parametrize("backend", BACKENDS)
def test_closed_form_from_microbatch_gradients(backend, seed):
    # The whole per-coordinate pipeline: accumulate Σ g_j² per microbatch, then the step statistics, held to
    # the McCandlish App. A.1 form σ̂² = b/(k−1) Σ_j (g_j − ḡ)² computed from the g_j themselves.
    k, b = 6, 4.0
    shapes = [(7,), (300,), (20, 31)]
    gs = [g.float() for g in _microbatches(shapes, k)]
    coord = [torch.zeros(s) for s in shapes]
    out = torch.randn(3)
    out_start = out.clone()
    for j in range(k):
        K.accumulate_sq_norms([g[j] for g in gs], out, [2, 0, 1], coord_sq=coord, backend=backend)
    sums = [g.sum(0) for g in gs]
    v = [torch.rand(s) + 0.01 for s in shapes]
    stats = K.coordinate_stats(sums, coord, k, b, exp_avg_sq=v, eps=1e-8, reset=False, backend=backend)

    gd = [g.double() for g in gs]
    mean = [g.mean(0) for g in gd]
    p2 = [1.0 / (x.double().sqrt() + 1e-8) ** 2 for x in v]
    sigma_sq = torch.cat([(b / (k - 1) * ((g - m) ** 2).sum(0)).flatten() for g, m in zip(gd, mean, strict=True)])
    mu = torch.cat([m.flatten() for m in mean])
    closed = {
        "sum_mu_sq": (mu**2).sum(),
        "sum_sigma_sq": sigma_sq.sum(),
        "sum_mu_sq_over_sigma": (mu**2 / sigma_sq.sqrt()).sum(),
        "sum_sigma": sigma_sq.sqrt().sum(),
        "precond_small": sum((p * (g**2).mean(0)).sum() for p, g in zip(p2, gd, strict=True)),
        "precond_big": sum((p * m**2).sum() for p, m in zip(p2, mean, strict=True)),
    }
    what = f"closed form {backend} seed={seed}"
    for key, value in closed.items():
        assert_close_verbose(stats[key], value, rtol=2e-4, atol=0, what=f"{what} {key}")
    # reset=False leaves the buffers exactly as accumulated: Σ_j g_j² per coordinate.
    for c, g in zip(coord, gd, strict=True):
        assert_close_verbose(c, (g**2).sum(0), rtol=1e-5, atol=0, what=f"{what} coord_sq")
    small = torch.stack([(g.flatten(1) ** 2).sum(1).sum() for g in gd])
    assert_close_verbose(out, out_start.double() + small[[1, 2, 0]], rtol=1e-5, atol=1e-5, what=f"{what} out")


@pytest.mark.parametrize("backend", BACKENDS)
def test_synthetic_gaussian_coordinates(backend, seed):
    """Known μ_i, σ_i; k microbatches of b examples each drawn from N(μ_i, σ_i²).

    With B = k·b, μ̂ ~ N(μ, σ²/B) and σ̂²/σ² ~ χ²_{k−1}/(k−1) independently, so μ̂²/σ̂² = F/B with
    F ~ noncentral F(1, k−1, λ = B μ²/σ²): every histogram bin and the in-regime fraction have an exact
    expected value, and Σσ̂² has mean Σσ² and variance Σ 2σ⁴/(k−1).
    """
    stats_mod = pytest.importorskip("scipy.stats")
    k, b = 16, 8
    big_b = k * b
    group_snr = [0.0, 0.03, 0.1, 0.4, 3.0]
    per_group = 4000
    sigma = torch.exp(0.5 * torch.randn(len(group_snr) * per_group, dtype=torch.float64))
    snr = torch.tensor(group_snr, dtype=torch.float64).repeat_interleave(per_group)
    mu = snr * sigma * torch.randn(sigma.shape).sign()
    # Two deterministic groups: constant nonzero gradients (σ = 0) and all-zero gradients.
    const = torch.full((500,), 0.375, dtype=torch.float64)
    zeros = torch.zeros(300, dtype=torch.float64)
    examples = mu + sigma * torch.randn(k, b, mu.numel(), dtype=torch.float64)
    micro = torch.cat([examples.mean(1), const.expand(k, -1), zeros.expand(k, -1)], dim=1).float()
    params = [micro[:, :7000], micro[:, 7000:].reshape(k, 50, -1)]  # two parameters of different shapes
    coord = [torch.zeros(p.shape[1:]) for p in params]
    out = torch.zeros(2)
    for j in range(k):
        K.accumulate_sq_norms([p[j] for p in params], out, [0, 1], coord_sq=coord, backend=backend)
    stats = K.coordinate_stats([p.sum(0) for p in params], coord, k, float(b), backend=backend)
    what = f"synthetic {backend} seed={seed}"
    n = mu.numel() + 800
    assert float(stats["num_coords"]) == n

    se = math.sqrt(float((2 * sigma**4 / (k - 1)).sum()))
    err = float(stats["sum_sigma_sq"]) - float((sigma**2).sum())
    assert abs(err) < 5 * se, f"{what}: Σσ̂² off by {err:.4g}, {err / se:.2f} standard errors"
    # σ̂ = σ √(χ²_ν/ν): mean c2·σ, variance (1 − c2²)σ² per coordinate (σ = 0 coordinates add 0).
    c2 = math.sqrt(2 / (k - 1)) * math.exp(math.lgamma(k / 2) - math.lgamma((k - 1) / 2))
    se = math.sqrt(float(((1 - c2**2) * sigma**2).sum()))
    err = float(stats["sum_sigma"]) - c2 * float(sigma.sum())
    assert abs(err) < 5 * se, f"{what}: Σσ̂ off by {err:.4g}, {err / se:.2f} standard errors"

    # P(snr̂ < e) for every edge, per group (λ is a group constant); bin probabilities are differences.
    lam = [big_b * r**2 for r in group_snr]
    cdf = torch.tensor([[stats_mod.ncf.cdf(big_b * e**2, 1, k - 1, x) for e in K.DEFAULT_SNR_EDGES] for x in lam])
    cdf = torch.cat([torch.zeros(len(lam), 1), cdf, torch.ones(len(lam), 1)], dim=1).double()
    p_bin = cdf.diff(dim=1).clamp_min(0)
    expected = per_group * p_bin.sum(0)
    expected[-1] += 500  # σ̂ = 0 < |μ̂|: the overflow bin (no gradient, μ̂ = σ̂ = 0: counted apart)
    var = per_group * (p_bin * (1 - p_bin)).sum(0)
    got = stats["snr_hist"].double()
    bad = (got - expected).abs() > 5 * var.sqrt() + 1
    assert not bool(bad.any()), f"{what}: snr_hist {got.tolist()} vs expected {expected.round().tolist()}"

    p_inside = torch.tensor([stats_mod.ncf.cdf(math.pi / 2, 1, k - 1, x) for x in lam], dtype=torch.float64)
    # A share of the n − 300 coordinates with a gradient; σ̂ = 0 < |μ̂| is outside.
    assert float(stats["num_no_grad"]) == 300
    exp_inside = per_group * float(p_inside.sum()) / (n - 300)
    sd = math.sqrt(per_group * float((p_inside * (1 - p_inside)).sum())) / (n - 300)
    got_inside = float(stats["frac_small_batch"])
    assert abs(got_inside - exp_inside) < 5 * sd + 1 / n, f"{what}: frac {got_inside:.5f} vs {exp_inside:.5f}"


@pytest.mark.parametrize("backend", BACKENDS)
def test_custom_edges_and_reset_false(backend, seed):
    k, b = 3, 2.0
    gs = _microbatches([(500,)], k)
    sums, coord = [gs[0].sum(0).float()], [(gs[0] ** 2).sum(0).float()]
    before = coord[0].clone()
    for edges in ([0.5], torch.tensor([0.01, 0.1, 1.0])):
        expected = K.coordinate_stats_reference(sums, coord, k, b, snr_edges=edges)
        stats = K.coordinate_stats(sums, coord, k, b, snr_edges=edges, reset=False, backend=backend)
        assert stats["snr_hist"].shape == (len(edges) + 1,)
        what = f"edges {backend} seed={seed}"
        _check_against(stats, expected, rtol=1e-4, what=what, hist_slack=2, inputs=(sums, coord, k, b))
    assert torch.equal(coord[0], before), "reset=False must leave coord_sq untouched"


@pytest.mark.triton
@pytest.mark.skipif(not HAS_TRITON, reason="no triton")
def test_triton_one_launch_and_small_chunks(monkeypatch, seed):
    from bscale.kernels import coord_triton
    from bscale.kernels._triton_common import LaunchConfig

    # Small blocks and chunks run the in-program loop and every chunk boundary; count the launches.
    monkeypatch.setattr(coord_triton, "launch_config", lambda device, heavy=False: LaunchConfig(64, 256, 4))
    launches = []
    kernel = coord_triton._coord_stats_kernel

    class Counting:
        def __getitem__(self, grid):
            launches.append(grid)
            return kernel[grid]

    monkeypatch.setattr(coord_triton, "_coord_stats_kernel", Counting())
    k, b = 4, 2.0
    shapes = [(1,), (63,), (256,), (257,), (1000,)]
    gs = _microbatches(shapes, k)
    dtypes = [torch.float32, torch.bfloat16, torch.float16, torch.float32, torch.float64]
    sums = [g.sum(0).to(d) for g, d in zip(gs, dtypes, strict=True)]
    coord = [(g**2).sum(0).float() for g in gs]
    v = [torch.rand(s).to(d) for s, d in zip(shapes, reversed(dtypes), strict=True)]
    expected = K.coordinate_stats_reference(sums, coord, k, b, exp_avg_sq=v)
    inputs = (sums, [t.clone() for t in coord], k, b)
    stats = K.coordinate_stats(sums, coord, k, b, exp_avg_sq=v, backend="triton")
    assert len(launches) == 1
    _check_against(stats, expected, rtol=1e-4, what=f"small chunks seed={seed}", hist_slack=2, inputs=inputs)
    assert all(bool((c == 0).all()) for c in coord)


@pytest.mark.triton
@pytest.mark.skipif(not HAS_TRITON, reason="no triton")
@pytest.mark.filterwarnings("ignore:invalid value encountered:RuntimeWarning")  # the interpreter's inf − inf
def test_coordinates_without_a_gradient_are_the_same_on_every_path():
    # One coordinate per case; k = 4, so S = 2, C = 1 has σ̂ = 0 < |μ̂| exactly.
    nan = math.nan
    inf = math.inf
    cases = [(0.0, 0.0), (1.0, nan), (nan, 1.0), (0.0, 1.0), (2.0, 1.0), (1e-24, 0.0), (0.3, 0.5), (inf, inf)]
    # (1e-24, 0): S²/k underflows float32, as 0/0; (inf, inf): C − S²/k is inf − inf.
    none, bin0, overflow = [0, 1, 2, 5, 7], [3], [4]
    s = torch.tensor([c[0] for c in cases])
    results = {}
    for backend in ("torch", "triton"):
        c = torch.tensor([c[1] for c in cases])
        results[backend] = K.coordinate_stats([s], [c], 4, 2.0, backend=backend)
    ref = K.coordinate_stats_reference([s], [torch.tensor([c[1] for c in cases])], 4, 2.0)
    for backend, stats in results.items():
        assert float(stats["num_no_grad"]) == len(none), backend
        hist = stats["snr_hist"]
        assert float(hist.sum()) == len(cases) - len(none), backend
        assert float(hist[0]) == len(bin0) and float(hist[-1]) == len(overflow), backend
        # Of the three with a gradient, μ̂ = 0 and (0.3, 0.5) are inside the regime, σ̂ = 0 < |μ̂| is not.
        assert float(stats["frac_small_batch"]) == pytest.approx(2 / 3, rel=1e-6), backend
    # The float64 reference does not underflow at 1e-24: that coordinate is an infinite SNR there.
    assert float(ref["num_no_grad"]) == len(none) - 1 and float(ref["snr_hist"][-1]) == len(overflow) + 1


@pytest.mark.parametrize("backend", BACKENDS)
def test_no_parameters(backend):
    stats = K.coordinate_stats([], [], 2, 1.0, backend=backend)
    assert float(stats["num_coords"]) == 0 and float(stats["frac_small_batch"]) == 0
    assert stats["snr_hist"].shape == (len(K.DEFAULT_SNR_EDGES) + 1,) and float(stats["snr_hist"].sum()) == 0


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"num_microbatches": 1}, "at least two"),
        ({"num_microbatches": 2.5}, "integer"),
        ({"microbatch_size": 0.0}, "positive"),
        ({"eps": -1.0}, "eps"),
        ({"coord_sq": [torch.zeros(4, dtype=torch.float64)]}, "float32"),
        ({"coord_sq": [torch.zeros(4, 2)[:, 0]]}, "dense"),
        ({"coord_sq": []}, "one each"),
        ({"grad_sums": [torch.zeros(5)]}, "shape"),
        ({"exp_avg_sq": [torch.zeros(3)]}, "shape"),
        ({"exp_avg_sq": []}, "one each"),
        ({"snr_edges": [1.0, 0.5]}, "increasing"),
        ({"snr_edges": []}, "at least one"),
        ({"backend": "gpu"}, "Invalid kernel backend"),
    ],
)
def test_bad_arguments_raise_value_error(kwargs, message):
    call = {
        "grad_sums": [torch.ones(4)],
        "coord_sq": [torch.ones(4)],
        "num_microbatches": 2,
        "microbatch_size": 1.0,
    }
    call.update(kwargs)
    with pytest.raises(ValueError, match=message):
        K.coordinate_stats(**call)
