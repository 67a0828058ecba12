"""The benchmarks' baselines compute what the paths they are compared with compute."""

import importlib.util
from pathlib import Path

import torch

import bscale.kernels as K

_PATH = Path(__file__).resolve().parents[1] / "benchmarks" / "kernel_bandwidth.py"


def _kernel_bandwidth():
    spec = importlib.util.spec_from_file_location("kernel_bandwidth", _PATH)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_plain_eager_coordinate_stats_matches_the_library():
    kb = _kernel_bandwidth()
    gen = torch.Generator().manual_seed(torch.seed() % 2**31)
    shapes = [(1,), (7, 3), (4097,), (300,)]
    k, b = 6, 5.0
    sums = [torch.randn(s, generator=gen) for s in shapes]
    # Σ g² ≥ (Σ g)²/k keeps the variance non-negative, as in real accumulation; kept well above it, so that
    # float32 cancellation in C − S²/k cannot move a coordinate's σ̂ far between the two implementations.
    coord = [s.square() / k + 0.5 + torch.rand(s.shape, generator=gen) for s in sums]
    sums[1][0, :2] = coord[1][0, :2] = 0.0  # coordinates with no gradient, counted apart
    v = [torch.rand(s, generator=gen) for s in shapes]
    edges = torch.tensor(K.DEFAULT_SNR_EDGES, dtype=torch.float32)
    mine = [c.clone() for c in coord]
    plain = kb.plain_coordinate_stats(sums, mine, k, b, v, edges)
    assert all(bool((c == 0).all()) for c in mine)
    lib = K.coordinate_stats(sums, coord, k, b, exp_avg_sq=v, backend="torch")
    n = sum(s.numel() for s in sums)
    names = ["sum_mu_sq", "sum_sigma_sq", "sum_mu_sq_over_sigma", "sum_sigma", "frac_small_batch"]
    expected = torch.stack([lib[x] for x in names] + [lib["precond_small"], lib["precond_big"]])
    expected[4] *= n - 2  # the plain version counts, the library gives the share of the coordinates with a gradient
    torch.testing.assert_close(plain[:7], expected, rtol=1e-4, atol=1e-4)
    # Ties at an edge may round either way in float32: the histograms agree to a coordinate or two.
    assert plain[7:].sum() == n - 2 and lib["num_no_grad"] == 2
    assert (plain[7:] - lib["snr_hist"]).abs().sum() <= 2
