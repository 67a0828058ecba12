"""The torch path's slicing, packing, blocking and bf16 staging, reached with small constants, match the reference."""

from __future__ import annotations

import pytest
import torch

from bscale.kernels import accumulate_sq_norms, coord, coordinate_stats, coordinate_stats_reference, sqnorm


@pytest.fixture
def small_constants(monkeypatch):
    # Shrink the thresholds so tensors of a few hundred elements cross slice, pack and block boundaries.
    monkeypatch.setattr(coord, "_SLICE", 64)
    monkeypatch.setattr(coord, "_PACK_BELOW", 16)
    monkeypatch.setattr(sqnorm, "_COORD_BLOCK", 48)
    monkeypatch.setattr(sqnorm, "_STAGE_FROM", 32)


def _tensors(dtype, gen):
    shapes = [(7,), (300,), (5, 13), (129,), (3,), (2, 100)]
    return [torch.randn(s, generator=gen).to(dtype) for s in shapes]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_accumulate_with_coord_sq_across_blocks(small_constants, dtype):
    gen = torch.Generator().manual_seed(torch.seed() % 2**31)
    grads = _tensors(dtype, gen)
    out = torch.rand(len(grads) + 2, generator=gen)
    start = out.clone()
    bufs = [torch.rand(g.shape, generator=gen) for g in grads]
    before = [b.clone() for b in bufs]
    slots = [2, 0, 5, 1, 7, 3]
    accumulate_sq_norms(grads, out, slots, coord_sq=bufs, backend="torch")
    want = start.double()
    for g, s in zip(grads, slots, strict=True):
        want[s] += g.double().pow(2).sum()
    torch.testing.assert_close(out.double(), want, rtol=2e-6, atol=1e-6)
    for g, b, b0 in zip(grads, bufs, before, strict=True):
        torch.testing.assert_close(b.double(), b0.double() + g.double().pow(2), rtol=2e-6, atol=1e-6)


def _step_inputs(k: int, with_v: bool):
    """S = Σ_j g_j and C = Σ_j g_j² of k fresh microbatches of `_tensors`, and Adam's v when `with_v`."""
    gen = torch.Generator().manual_seed(torch.seed() % 2**31)
    micro = [_tensors(torch.float32, gen) for _ in range(k)]
    sums = [sum(m[i] for m in micro) for i in range(len(micro[0]))]
    sq = [sum(m[i] ** 2 for m in micro) for i in range(len(micro[0]))]
    v = [torch.rand(t.shape, generator=gen) for t in sums] if with_v else None
    return sums, sq, v


@pytest.mark.parametrize("with_v", [False, True])
def test_coordinate_stats_across_slices(small_constants, with_v):
    k, b = 4, 8.0
    sums, sq, v = _step_inputs(k, with_v)
    ref = coordinate_stats_reference(sums, sq, k, b, exp_avg_sq=v)
    got = coordinate_stats(sums, [t.clone() for t in sq], k, b, exp_avg_sq=v, backend="torch")
    assert set(got) == set(ref)
    for key in ref:
        torch.testing.assert_close(got[key].double(), ref[key].double(), rtol=1e-5, atol=1e-5, msg=key)


@pytest.mark.parametrize("with_v", [False, True])
def test_coordinate_stats_with_tensor_norms_across_slices(small_constants, with_v):
    # Lone tensors cut into several slices, small ones packed: each tensor's ΣC and |S|² against float64, and the
    # statistics are the plain call's, bit for bit (the norms come from rows it computes anyway).
    k, b = 3, 4.0
    sums, sq, v = _step_inputs(k, with_v)
    kept = [t.clone() for t in sq]
    out, norms = coord.coordinate_stats_and_sq_norms_cpu(sums, kept, v, k, b, 1e-8)
    plain = coord.coordinate_stats_trusted(sums, [t.clone() for t in sq], v, k, b, 1e-8, None, False, "torch")
    assert torch.equal(out, plain)
    assert all(torch.equal(a, c) for a, c in zip(kept, sq, strict=True))  # the sums of squares are kept
    want = torch.tensor(
        [[float(c.double().sum()) for c in sq], [float(s.double().pow(2).sum()) for s in sums]], dtype=torch.float64
    )
    assert norms.shape == (2, len(sq)) and norms.dtype == torch.float32
    torch.testing.assert_close(norms.double(), want, rtol=2e-6, atol=0)
    # Sums of squares below S²/k (a .grad that is not the sum of the microbatches seen: added to before the
    # wrapper, or scaled after its hooks) are still summed as they are, not as the clamped variance implies.
    low = [t * 0.1 for t in sq]
    _, norms = coord.coordinate_stats_and_sq_norms_cpu(sums, low, v, k, b, 1e-8)
    torch.testing.assert_close(norms[0].double(), 0.1 * want[0], rtol=2e-6, atol=0)
