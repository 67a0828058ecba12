"""Triton kernel for squared L2 norms of a bucket of tensors (and, optionally, per-coordinate squares).

One launch covers every tensor of the bucket: a pointer table gives each tensor's address, size, dtype and
per-coordinate buffer, and a chunk table tells each program which tensor and which elements it reads. Each
program sums `x.float()**2` over its chunk in float32 and adds the partial sum into `out[slot]` with one
atomic.
The order in which partial sums land is not fixed, so the last bits of a norm can differ between runs.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import triton
import triton.language as tl

from ._layout import aligned, check_dtype, chunk_table, flat_like, is_dense, pointer_table
from ._triton_common import launch_config, load_f32

# Columns of the pointer table.
_ADDR, _NUMEL, _CODE, _COORD, _SLOT = range(5)
_WIDTH = 5


@triton.jit
def _sq_block(addr, coord, offs, mask, code, COORD: tl.constexpr, ALIGNED: tl.constexpr):
    """Squares of one block as float32 (0 outside `mask`), added into `coord` too when COORD."""
    x = load_f32(addr, offs, mask, code, ALIGNED)
    sq = x * x
    if COORD:
        c = tl.load(coord + offs, mask=mask, other=0.0)
        tl.store(coord + offs, c + sq, mask=mask)
    return sq


@triton.jit
def _sq_norm_kernel(
    table_ptr,
    chunk_ptr,
    out_ptr,
    slots_ptr,
    slots_stride,
    WIDTH: tl.constexpr,
    CHUNK: tl.constexpr,
    BLOCK: tl.constexpr,
    COORD: tl.constexpr,
    ALIGNED: tl.constexpr,
):
    pid = tl.program_id(0)
    index = tl.load(chunk_ptr + 2 * pid)
    # Chunks start at multiples of CHUNK (see chunk_table): said here, it lets the loads below be vector loads.
    start = tl.multiple_of(tl.load(chunk_ptr + 2 * pid + 1), CHUNK)
    row = table_ptr + index * WIDTH
    addr = tl.load(row + 0)
    numel = tl.load(row + 1)
    code = tl.load(row + 2)
    stop = tl.minimum(numel - start, CHUNK)
    coord = tl.load(row + 3).to(tl.pointer_type(tl.float32))
    if ALIGNED:
        coord = tl.multiple_of(coord, 16)
    acc = tl.zeros([BLOCK], dtype=tl.float32)
    # Whole blocks with a mask that is the same for every element (so the loads can be vector loads), then the
    # last partial block, masked per element.
    whole = stop - stop % BLOCK
    everywhere = tl.full([BLOCK], True, tl.int1)
    for off in range(0, whole, BLOCK):
        acc += _sq_block(addr, coord, start + off + tl.arange(0, BLOCK), everywhere, code, COORD, ALIGNED)
    if whole < stop:
        offs = start + whole + tl.arange(0, BLOCK)
        acc += _sq_block(addr, coord, offs, offs < numel, code, COORD, ALIGNED)
    slot = tl.load(slots_ptr + index * slots_stride)
    tl.atomic_add(out_ptr + slot, tl.sum(acc, axis=0))


def accumulate_sq_norms_triton(
    tensors: Sequence[torch.Tensor],
    out: torch.Tensor,
    slots: torch.Tensor | Sequence[int],
    coord_sq: Sequence[torch.Tensor] | None,
) -> None:
    """Launcher behind `accumulate_sq_norms(..., backend="triton")`; arguments are already validated.

    A tensor that is not dense (a slice with gaps), or whose layout differs from its `coord_sq` buffer, is
    copied first; dense tensors in any dimension order (transposed, channels-last) are read in place.
    """
    device = out.device
    keep: list[torch.Tensor] = []  # copies made here must outlive the launch call
    rows: list[list[int]] = []
    for i, t in enumerate(tensors):
        code = check_dtype(t, f"tensors[{i}]")
        if coord_sq is not None:
            src = flat_like(t, coord_sq[i])
            cptr = coord_sq[i].data_ptr()
        else:
            src = t if is_dense(t) else t.contiguous()
            cptr = 0
        keep.append(src)
        slot = int(slots[i]) if not isinstance(slots, torch.Tensor) else 0
        rows.append([src.data_ptr(), t.numel(), code, cptr, slot])
    if not rows:
        return
    cfg = launch_config(device)
    chunks = chunk_table([r[_NUMEL] for r in rows], cfg.chunk, device)
    if chunks.shape[0] == 0:
        return
    table = pointer_table(rows, device)
    if isinstance(slots, torch.Tensor):
        slot_src, slot_stride = slots, slots.stride(0)
    else:
        slot_src, slot_stride = table[:, _SLOT], _WIDTH
    ptrs = [r[_ADDR] for r in rows] + ([r[_COORD] for r in rows] if coord_sq is not None else [])
    _sq_norm_kernel[(chunks.shape[0],)](
        table,
        chunks,
        out,
        slot_src,
        slot_stride,
        WIDTH=_WIDTH,
        CHUNK=cfg.chunk,
        BLOCK=cfg.block,
        COORD=coord_sq is not None,
        ALIGNED=aligned(ptrs),
        num_warps=cfg.num_warps,
    )
    del keep


def sq_norms_triton(tensors: Sequence[torch.Tensor]) -> torch.Tensor:
    """Launcher behind `sq_norms(..., backend="triton")`: zeroed output, then one accumulating launch."""
    out = torch.zeros(len(tensors), dtype=torch.float32, device=tensors[0].device)
    accumulate_sq_norms_triton(tensors, out, list(range(len(tensors))), None)
    return out
