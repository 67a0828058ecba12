"""Triton kernel for the per-coordinate statistics of `coord.coordinate_stats`: one launch over every
coordinate of every parameter, reading S = Σ_j g_j, C = Σ_j g_j² (and Adam's v), optionally zeroing C.

Each program reduces its chunk into float32 partial sums and a histogram, then adds them to a shared output
vector with atomics (so the last bits can vary between runs). The layout of that vector is `coord.SLOTS`.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import triton
import triton.language as tl

from ._layout import aligned, check_dtype, chunk_table, flat_like, pointer_table
from ._triton_common import launch_config, load_f32
from .coord import share_with_gradient

# Columns of the pointer table.
_S_ADDR, _S_CODE, _C_ADDR, _V_ADDR, _V_CODE, _NUMEL = range(6)
_WIDTH = 6
# Output vector: sum_mu_sq, sum_sigma_sq, sum_mu_sq_over_sigma, num_coords, precond_small, precond_big,
# frac_small_batch (the count inside the regime until the launcher divides), sum_sigma, num_no_grad, then the
# histogram.
NUM_SCALARS = 9


@triton.jit
def _coord_block(
    acc_mu2, acc_sig2, acc_sig, acc_ratio, acc_inside, acc_small, acc_big, acc_hist,
    s_addr, s_code, coord, v_addr, v_code, offs, mask, edges_ptr, inv_k, var_scale, two_big_b, eps,
    NUM_EDGES: tl.constexpr, NUM_BINS_P2: tl.constexpr, PRECOND: tl.constexpr, RESET: tl.constexpr,
    ALIGNED: tl.constexpr,
):  # fmt: skip
    """The accumulators with one block's terms (0 outside `mask`) and histogram added; zeroes `coord` there
    when RESET."""
    s = load_f32(s_addr, offs, mask, s_code, ALIGNED)
    c = tl.load(coord + offs, mask=mask, other=0.0)
    if RESET:
        tl.store(coord + offs, tl.zeros_like(c), mask=mask)
    mu = s * inv_k
    m2 = c * inv_k
    mu2 = mu * mu
    d = m2 - mu2  # NaN for inf − inf
    # Rounding can make m2 - mu² slightly negative when the spread is tiny: clamp at 0.
    sig2 = tl.maximum(d, 0.0) * var_scale
    sig = tl.sqrt_rn(sig2)
    pos = sig > 0.0
    safe = tl.where(pos, sig, 1.0)
    ratio = tl.where(pos, tl.div_rn(mu2, safe), 0.0)
    snr = tl.div_rn(tl.abs(mu), safe)
    bins = tl.zeros_like(offs).to(tl.int32)
    for j in tl.static_range(NUM_EDGES):
        bins += (snr >= tl.load(edges_ptr + j)).to(tl.int32)
    # σ̂ = 0 < |μ̂|: an infinite SNR, the overflow bin. No gradient in the step (μ̂ = σ̂ = 0), or NaN: one past
    # the last bin, counted into num_no_grad. (As the torch path decides it: M = kμ̂² and D = C − M both 0, or
    # NaN; within float32 rounding of overflow or underflow, |g| near 1e19 or 1e-22, the two paths, whose
    # operations differ in order, may still classify a coordinate differently.)
    none = ((mu2 == 0.0) & (sig2 == 0.0)) | (d != d)
    bins = tl.where(none, NUM_EDGES + 1, tl.where(pos, bins, NUM_EDGES))
    acc_hist += tl.histogram(bins, NUM_BINS_P2, mask=mask)
    # Surge thm. 3 regime B < π σ̂² / (2 μ̂²), written without a division; μ̂ = 0 is inside, and so is what has
    # no gradient or is NaN (taken back out of the count by the launcher, with num_no_grad).
    outside = (mu != 0.0) & (two_big_b * mu2 >= 3.141592653589793 * sig2) & (none == 0)
    acc_inside += tl.where(mask, 1.0 - outside.to(tl.float32), 0.0)
    if PRECOND:
        v = load_f32(v_addr, offs, mask, v_code, ALIGNED)
        p = 1.0 / (tl.sqrt_rn(v) + eps)
        p2 = p * p
        acc_small += p2 * m2
        acc_big += p2 * mu2
    return acc_mu2 + mu2, acc_sig2 + sig2, acc_sig + sig, acc_ratio + ratio, acc_inside, acc_small, acc_big, acc_hist


@triton.jit
def _coord_stats_kernel(
    table_ptr,
    chunk_ptr,
    out_ptr,
    edges_ptr,
    inv_k,
    var_scale,
    two_big_b,
    eps,
    num_coords,
    WIDTH: tl.constexpr,
    CHUNK: tl.constexpr,
    BLOCK: tl.constexpr,
    NUM_EDGES: tl.constexpr,
    NUM_BINS_P2: tl.constexpr,
    PRECOND: tl.constexpr,
    RESET: tl.constexpr,
    ALIGNED: tl.constexpr,
):
    pid = tl.program_id(0)
    index = tl.load(chunk_ptr + 2 * pid)
    # Chunks start at multiples of CHUNK (see chunk_table): said here, it lets the loads below be vector loads.
    start = tl.multiple_of(tl.load(chunk_ptr + 2 * pid + 1), CHUNK)
    row = table_ptr + index * WIDTH
    s_addr = tl.load(row + 0)
    s_code = tl.load(row + 1)
    coord = tl.load(row + 2).to(tl.pointer_type(tl.float32))
    if ALIGNED:
        coord = tl.multiple_of(coord, 16)
    v_addr = tl.load(row + 3)
    v_code = tl.load(row + 4)
    numel = tl.load(row + 5)
    stop = tl.minimum(numel - start, CHUNK)

    acc_mu2 = tl.zeros([BLOCK], dtype=tl.float32)
    acc_sig2 = tl.zeros([BLOCK], dtype=tl.float32)
    acc_sig = tl.zeros([BLOCK], dtype=tl.float32)
    acc_ratio = tl.zeros([BLOCK], dtype=tl.float32)
    acc_inside = tl.zeros([BLOCK], dtype=tl.float32)
    acc_small = tl.zeros([BLOCK], dtype=tl.float32)
    acc_big = tl.zeros([BLOCK], dtype=tl.float32)
    acc_hist = tl.zeros([NUM_BINS_P2], dtype=tl.int32)
    # Whole blocks with a mask that is the same for every element (so the loads can be vector loads), then the
    # last partial block, masked per element.
    whole = stop - stop % BLOCK
    everywhere = tl.full([BLOCK], True, tl.int1)
    for off in range(0, whole, BLOCK):
        acc_mu2, acc_sig2, acc_sig, acc_ratio, acc_inside, acc_small, acc_big, acc_hist = _coord_block(
            acc_mu2, acc_sig2, acc_sig, acc_ratio, acc_inside, acc_small, acc_big, acc_hist,
            s_addr, s_code, coord, v_addr, v_code, start + off + tl.arange(0, BLOCK), everywhere, edges_ptr,
            inv_k, var_scale, two_big_b, eps, NUM_EDGES, NUM_BINS_P2, PRECOND, RESET, ALIGNED,
        )  # fmt: skip
    if whole < stop:
        offs = start + whole + tl.arange(0, BLOCK)
        acc_mu2, acc_sig2, acc_sig, acc_ratio, acc_inside, acc_small, acc_big, acc_hist = _coord_block(
            acc_mu2, acc_sig2, acc_sig, acc_ratio, acc_inside, acc_small, acc_big, acc_hist,
            s_addr, s_code, coord, v_addr, v_code, offs, offs < numel, edges_ptr,
            inv_k, var_scale, two_big_b, eps, NUM_EDGES, NUM_BINS_P2, PRECOND, RESET, ALIGNED,
        )  # fmt: skip

    tl.atomic_add(out_ptr + 0, tl.sum(acc_mu2, axis=0))
    tl.atomic_add(out_ptr + 1, tl.sum(acc_sig2, axis=0))
    tl.atomic_add(out_ptr + 2, tl.sum(acc_ratio, axis=0))
    if pid == 0:
        tl.atomic_add(out_ptr + 3, num_coords)
    if PRECOND:
        tl.atomic_add(out_ptr + 4, tl.sum(acc_small, axis=0))
        tl.atomic_add(out_ptr + 5, tl.sum(acc_big, axis=0))
    tl.atomic_add(out_ptr + 6, tl.sum(acc_inside, axis=0))
    tl.atomic_add(out_ptr + 7, tl.sum(acc_sig, axis=0))
    bin_ids = tl.arange(0, NUM_BINS_P2)
    # Bins 0..NUM_EDGES after the scalars; the count one past them (no gradient) into num_no_grad.
    dest = tl.where(bin_ids <= NUM_EDGES, out_ptr + 9 + bin_ids, out_ptr + 8)
    tl.atomic_add(dest, acc_hist.to(tl.float32), mask=bin_ids <= NUM_EDGES + 1)


def coordinate_stats_triton(
    grad_sums: Sequence[torch.Tensor],
    coord_sq: Sequence[torch.Tensor],
    exp_avg_sq: Sequence[torch.Tensor] | None,
    num_microbatches: int,
    microbatch_size: float,
    eps: float,
    edges: torch.Tensor,
    reset: bool,
) -> torch.Tensor:
    """Launcher behind `coordinate_stats(..., backend="triton")`; arguments are already validated.

    Returns the float32 output vector (layout above). `grad_sums` and `exp_avg_sq` are read in place when
    their layout matches `coord_sq`'s, else copied to it once.
    """
    device = coord_sq[0].device
    keep: list[torch.Tensor] = []  # copies made here must outlive the launch call
    rows: list[list[int]] = []
    for i, (s, c) in enumerate(zip(grad_sums, coord_sq, strict=True)):
        s_code = check_dtype(s, f"grad_sums[{i}]")
        s_src = flat_like(s, c)
        keep.append(s_src)
        v_addr, v_code = 0, 0
        if exp_avg_sq is not None:
            v_code = check_dtype(exp_avg_sq[i], f"exp_avg_sq[{i}]")
            v_src = flat_like(exp_avg_sq[i], c)
            keep.append(v_src)
            v_addr = v_src.data_ptr()
        rows.append([s_src.data_ptr(), s_code, c.data_ptr(), v_addr, v_code, c.numel()])
    num_edges = edges.numel()
    out = torch.zeros(NUM_SCALARS + num_edges + 1, dtype=torch.float32, device=device)
    total = sum(r[_NUMEL] for r in rows)
    cfg = launch_config(device, heavy=True)
    chunks = chunk_table([r[_NUMEL] for r in rows], cfg.chunk, device)
    if chunks.shape[0] == 0:
        return out
    table = pointer_table(rows, device)
    k = float(num_microbatches)
    ptrs = [r[_S_ADDR] for r in rows] + [r[_C_ADDR] for r in rows]
    if exp_avg_sq is not None:
        ptrs += [r[_V_ADDR] for r in rows]
    _coord_stats_kernel[(chunks.shape[0],)](
        table,
        chunks,
        out,
        edges,
        1.0 / k,
        microbatch_size * k / (k - 1.0),  # σ̂² = b·(m2 − μ̂²)·k/(k−1): unbiased, per example
        2.0 * k * microbatch_size,  # 2B with B = k·b
        float(eps),
        float(total),
        WIDTH=_WIDTH,
        CHUNK=cfg.chunk,
        BLOCK=cfg.block,
        NUM_EDGES=num_edges,
        NUM_BINS_P2=triton.next_power_of_2(num_edges + 2),  # and the bin of coordinates without a gradient
        PRECOND=exp_avg_sq is not None,
        RESET=reset,
        ALIGNED=aligned(ptrs),
        num_warps=cfg.num_warps,
    )
    del keep
    share_with_gradient(out, total)
    return out
