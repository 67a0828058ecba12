"""Squared L2 norms of many gradient tensors at once: the per-microbatch statistic of McCandlish App. A.1.

The torch path here is also the CPU path in production; the Triton path (`sqnorm_triton`) is imported only
when chosen.
"""

from __future__ import annotations

import threading
from collections.abc import Sequence

import torch

from ._layout import is_dense, same_layout, to_device
from .dispatch import resolve_backend


def _check_coord_sq(tensors: Sequence[torch.Tensor], coord_sq: Sequence[torch.Tensor]) -> None:
    if len(coord_sq) != len(tensors):
        raise ValueError(f"coord_sq has {len(coord_sq)} tensors for {len(tensors)} gradients; pass one per gradient")
    for i, (t, c) in enumerate(zip(tensors, coord_sq, strict=True)):
        if t.is_sparse or t.is_complex():
            raise ValueError(
                f"tensors[{i}] is sparse or complex; coord_sq needs dense real gradients (.to_dense(), "
                "torch.view_as_real)"
            )
        if c.dtype != torch.float32 or c.shape != t.shape or c.device != t.device:
            raise ValueError(
                f"coord_sq[{i}] must be float32 of shape {tuple(t.shape)} on {t.device}, got {c.dtype} "
                f"{tuple(c.shape)} on {c.device}; allocate it with "
                "torch.zeros_like(param, dtype=torch.float32)"
            )
        if not is_dense(c):
            raise ValueError(f"coord_sq[{i}] is a strided view; allocate it with torch.zeros_like(param)")


# Elements per block of the CPU path with coord_sq. addcmul_ reads a block of gradients and of coord_sq from
# memory, and the norm re-reads the gradients right after from the L3 cache (4 MiB of float32); per-block
# dispatch (two foreach calls) is negligible at this size.
_COORD_BLOCK = 1 << 20
# A float16/bfloat16 gradient piece at least this large is first copied to a float32 staging row: mixed-dtype
# addcmul_ and norm on it make float32 temporaries of their own, fresh memory each call, and run 5-10x slower
# than on float32 (smaller pieces stay cheap as they are, and a copy would cost more than it saves).
_STAGE_FROM = 1 << 16
_LOW_PRECISION = (torch.float16, torch.bfloat16)
# The float32 staging row, per thread: a fresh 4 MiB buffer would cost its page faults every microbatch.
_STAGING = threading.local()


def _flat(t: torch.Tensor) -> torch.Tensor:
    # A dense tensor in any dimension order is one run of memory from its first element (view is the cheaper
    # call for the usual contiguous case).
    return t.view(-1) if t.is_contiguous() else t.as_strided((t.numel(),), (1,), t.storage_offset())


def _blocks(
    tensors: list[torch.Tensor], coord_sq: list[torch.Tensor]
) -> tuple[list[list[tuple[torch.Tensor, torch.Tensor]]], list[int]]:
    """(gradient, buffer) pairs in blocks of at most `_COORD_BLOCK` elements, and each pair's tensor index.

    A tensor over `_COORD_BLOCK` elements is split when it shares coord_sq's layout (else it is a block of its
    own); smaller ones are grouped in order.
    """
    blocks: list[list[tuple[torch.Tensor, torch.Tensor]]] = [[]]
    owner: list[int] = []
    size = 0
    for i, (g, c) in enumerate(zip(tensors, coord_sq, strict=True)):
        n = g.numel()
        if n > _COORD_BLOCK and is_dense(g) and same_layout(g, c):
            g_flat, c_flat = _flat(g), _flat(c)
            pairs = [
                (g_flat[lo : lo + _COORD_BLOCK], c_flat[lo : lo + _COORD_BLOCK]) for lo in range(0, n, _COORD_BLOCK)
            ]
        else:
            pairs = [(g, c)]
        for pair in pairs:
            m = pair[0].numel()
            if size + m > _COORD_BLOCK and blocks[-1]:
                blocks.append([])
                size = 0
            blocks[-1].append(pair)
            owner.append(i)
            size += m
    return blocks, owner


@torch.no_grad()  # buffers of gradient statistics: the cached staging row must never join a graph
def _accumulate_coord_cpu(
    tensors: list[torch.Tensor], coord_sq: list[torch.Tensor]
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """`coord_sq += g²` and the float32 squared norm of every piece of every gradient, block by block.

    Returns the squares and which tensor each piece belongs to (None when every tensor is one piece).
    """
    blocks, owner = _blocks(tensors, coord_sq)
    staging = _STAGING.__dict__.get("rows")
    squares = []
    for block in blocks:
        grads = [g for g, _ in block]
        low = [j for j, g in enumerate(grads) if g.dtype in _LOW_PRECISION and _STAGE_FROM <= g.numel() <= _COORD_BLOCK]
        if low:
            if staging is None or staging.numel() < _COORD_BLOCK:
                staging = _STAGING.rows = torch.empty(_COORD_BLOCK, dtype=torch.float32)
            views, offset = [], 0
            for j in low:
                n = grads[j].numel()
                views.append(staging[offset : offset + n].view(grads[j].shape))
                offset += n
            torch._foreach_copy_(views, [grads[j] for j in low])  # exact: every f16/bf16 is a float32
            for v, j in zip(views, low, strict=True):
                grads[j] = v
        # addcmul_ promotes a low-precision gradient to float32 before multiplying, so g*g is not rounded.
        torch._foreach_addcmul_([c for _, c in block], grads, grads)
        squares.append(_squared_norms_torch(grads))
    split = len(owner) > len(tensors)
    squares = squares[0] if len(squares) == 1 else torch.cat(squares)
    return squares, (torch.tensor(owner, dtype=torch.int64) if split else None)


def _squared_norms_torch(tensors: list[torch.Tensor]) -> torch.Tensor:
    """float32 vector of squared norms. `_foreach_norm` reads each tensor once and accumulates in float32
    (it refuses to narrow float64, whose norms are taken in float64 and then rounded)."""
    wide = [i for i, t in enumerate(tensors) if t.dtype == torch.float64]
    if not wide:
        return torch.stack(torch._foreach_norm(tensors, 2, dtype=torch.float32)).square_()
    norms: list[torch.Tensor | None] = [None] * len(tensors)
    rest = [i for i, t in enumerate(tensors) if t.dtype != torch.float64]
    for group, dtype in ((wide, None), (rest, torch.float32)):
        if group:
            for i, n in zip(group, torch._foreach_norm([tensors[i] for i in group], 2, dtype=dtype), strict=True):
                norms[i] = n.float()
    return torch.stack(norms).square_()


def dense_values(tensors: list[torch.Tensor]) -> list[torch.Tensor]:
    """A sparse COO tensor's squared norm is that of its coalesced values (repeated indices summed first), a
    complex tensor's that of its real view: those stand in for it. Dense real tensors are passed as they are."""
    if not any(t.is_sparse or t.is_complex() for t in tensors):
        return tensors
    out = [t.coalesce().values() if t.is_sparse else t for t in tensors]
    return [torch.view_as_real(t) if t.is_complex() else t for t in out]


def _check_out_slots(tensors: Sequence[torch.Tensor], out: torch.Tensor, slots: torch.Tensor | Sequence[int]) -> None:
    if out.dtype != torch.float32 or out.dim() != 1 or not out.is_contiguous():
        raise ValueError(
            f"out must be a contiguous 1-D float32 tensor, got {out.dtype} of shape {tuple(out.shape)}; "
            "allocate it with torch.zeros(num_slots, dtype=torch.float32, device=...)"
        )
    for i, t in enumerate(tensors):
        if t.device != out.device:
            raise ValueError(f"tensors[{i}] is on {t.device} but out is on {out.device}; move them to one device")
    if isinstance(slots, torch.Tensor):
        if slots.dim() != 1 or slots.numel() != len(tensors) or slots.dtype not in (torch.int64, torch.int32):
            raise ValueError(
                f"slots must be a 1-D int64 tensor with one entry per tensor ({len(tensors)}), "
                f"got {slots.dtype} "
                f"of shape {tuple(slots.shape)}"
            )
        if slots.device != out.device:
            raise ValueError(f"slots is on {slots.device} but out is on {out.device}; move slots to out's device")
    else:
        if len(slots) != len(tensors):
            raise ValueError(f"slots has {len(slots)} entries for {len(tensors)} tensors; pass one slot per tensor")
        n = out.numel()
        for s in slots:
            if not 0 <= int(s) < n:
                raise ValueError(f"slot {s} is outside out (length {n}); allocate out with one slot per parameter")


def accumulate_sq_norms(
    tensors: Sequence[torch.Tensor],
    out: torch.Tensor,
    slots: torch.Tensor | Sequence[int],
    *,
    coord_sq: Sequence[torch.Tensor] | None = None,
    backend: str | None = None,
) -> None:
    r"""Add each tensor's squared L2 norm into its slot of `out`, in float32, without a host sync.

    .. math::
        \mathrm{out}[s_i] \mathrel{+}= \sum_x \mathrm{float}(t_i)_x^2, \qquad
        \mathrm{coord\_sq}_i \mathrel{+}= \mathrm{float}(t_i)^2 \ \text{(elementwise, if given)}

    Called once per microbatch on a bucket of gradients; the sums of :math:`|g_j|^2` over microbatches are the
    "small batch" statistic of McCandlish App. A.1, and `coord_sq` accumulates :math:`\sum_j g_j^2` per
    coordinate for :func:`coordinate_stats`.

    Tensors may mix shapes and dtypes (float32, bfloat16, float16, float64) and may be non-contiguous: dense
    layouts (transposed, channels-last) are read in place, other views are copied once. A sparse COO tensor
    counts by its coalesced values, a complex one by its real view (neither with `coord_sq`). Slots may repeat
    (their contributions add). On Triton the whole bucket is one launch; partial sums land by atomics, so the
    last bits can vary between runs. A slot index outside `out` in a *device* `slots` tensor is not checked
    (that would need a host sync).

    Args:
        tensors (sequence of Tensor): gradients, all on `out`'s device
        out (Tensor): contiguous 1-D float32 accumulator, one slot per parameter
        slots (Tensor or sequence of int): slot of each tensor; an int64 tensor on `out`'s device or ints
        coord_sq (sequence of Tensor, optional): float32 buffers shaped like each tensor, dense (e.g. from
            `torch.zeros_like`), updated in the same pass (default: None)
        backend (str, optional): "auto", "torch" or "triton", see :func:`resolve_backend` (default: None)
    """
    tensors = list(tensors)
    _check_out_slots(tensors, out, slots)
    if coord_sq is not None:
        coord_sq = list(coord_sq)
        _check_coord_sq(tensors, coord_sq)
    if not tensors:
        return
    accumulate_sq_norms_trusted(tensors, out, slots, coord_sq, resolve_backend(backend, [*tensors, out]))


def accumulate_sq_norms_trusted(
    tensors: list[torch.Tensor],
    out: torch.Tensor,
    slots: torch.Tensor | Sequence[int],
    coord_sq: list[torch.Tensor] | None,
    backend: str,
) -> None:
    """:func:`accumulate_sq_norms` without argument checks, for a caller that validated its buffers once and
    resolved `backend` to "torch" or "triton" (the optimizer wrapper, once per microbatch)."""
    tensors = dense_values(tensors)
    if backend == "triton":
        from .sqnorm_triton import accumulate_sq_norms_triton

        accumulate_sq_norms_triton(tensors, out, slots, coord_sq)
        return
    # Fewest bytes in eager torch: one read of each tensor from memory (with coord_sq on the CPU the norm
    # reads it again from cache, block by block); squaring the norm back costs one rounding (relative 1e-7).
    # index_add_ adds all slots in one call.
    if isinstance(slots, torch.Tensor):
        index = slots
    else:
        index = to_device(torch.tensor([int(s) for s in slots], dtype=torch.int64), out.device)
    if coord_sq is not None and out.device.type == "cpu":
        squares, owner = _accumulate_coord_cpu(tensors, coord_sq)
        if owner is not None:
            index = index[owner]
    else:
        squares = _squared_norms_torch(tensors)
        if coord_sq is not None:
            # addcmul_ promotes a low-precision gradient to float32 before multiplying: g*g is not rounded.
            torch._foreach_addcmul_(coord_sq, tensors, tensors)
    out.index_add_(0, index, squares)


def sq_norms(tensors: Sequence[torch.Tensor], *, backend: str | None = None) -> torch.Tensor:
    r"""Squared L2 norm of each tensor, as a float32 vector on the tensors' device, without a host sync.

    .. math::
        \mathrm{result}_i = \sum_x \mathrm{float}(t_i)_x^2

    Used at the end of backward on the `.grad`s: with the summed gradient :math:`k\bar g` it gives the "big
    batch" statistic :math:`|G_B|^2` of McCandlish App. A.1. Accepts the same tensors as
    :func:`accumulate_sq_norms`. On Triton: one launch over all tensors (after zeroing the output).

    Args:
        tensors (sequence of Tensor): tensors on one device
        backend (str, optional): "auto", "torch" or "triton", see :func:`resolve_backend` (default: None)
    """
    tensors = list(tensors)
    if not tensors:
        return torch.zeros(0, dtype=torch.float32)
    device = tensors[0].device
    for i, t in enumerate(tensors):
        if t.device != device:
            raise ValueError(f"tensors[{i}] is on {t.device}, tensors[0] on {device}; move them to one device")
    tensors = dense_values(tensors)
    if resolve_backend(backend, tensors) == "triton":
        from .sqnorm_triton import sq_norms_triton

        return sq_norms_triton(tensors)
    return _squared_norms_torch(tensors)
