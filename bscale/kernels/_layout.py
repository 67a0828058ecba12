"""Memory-layout checks and the host-side tables the Triton launchers pass to their kernels.

Nothing here imports triton: the torch path uses the checks too.
"""

from __future__ import annotations

from collections.abc import Sequence
from functools import lru_cache

import torch

# Element types a kernel can load, with the code the kernel branches on (see `_triton_common._load_f32`).
DTYPE_CODES: dict[torch.dtype, int] = {
    torch.float32: 0,
    torch.bfloat16: 1,
    torch.float16: 2,
    torch.float64: 3,
}


def is_dense(t: torch.Tensor) -> bool:
    """True when `t` covers exactly `numel` consecutive elements of its storage, in some dimension order.

    Such a tensor (contiguous, channels-last, transposed, permuted) can be read as a flat run of memory
    starting at `t.data_ptr()`: every element once, nothing else. Slices with gaps and broadcast (stride 0)
    views cannot.
    """
    if t.is_contiguous():
        return True
    dims = sorted((st, sz) for st, sz in zip(t.stride(), t.shape, strict=True) if sz != 1)
    expected = 1
    for stride, size in dims:
        if stride != expected:
            return False
        expected *= size
    return True


def same_layout(a: torch.Tensor, b: torch.Tensor) -> bool:
    """True when two dense tensors of one shape store element `idx` at the same flat offset."""
    if a.shape != b.shape:
        return False
    if a.is_contiguous() and b.is_contiguous():
        return True
    return all(sa == sb for sa, sb, sz in zip(a.stride(), b.stride(), a.shape, strict=True) if sz != 1)


def flat_like(t: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """`t` in the memory layout of the dense tensor `like`, copying only when the layouts differ."""
    if is_dense(t) and same_layout(t, like):
        return t
    return torch.empty_like(like, dtype=t.dtype).copy_(t)


def check_dtype(t: torch.Tensor, what: str) -> int:
    """The kernel's dtype code for `t`, or a ValueError naming the supported types."""
    code = DTYPE_CODES.get(t.dtype)
    if code is None:
        names = ", ".join(str(d).removeprefix("torch.") for d in DTYPE_CODES)
        raise ValueError(f"{what} has dtype {t.dtype}; the triton backend reads {names} (or use backend='torch')")
    return code


@lru_cache(maxsize=64)
def _chunk_table_cpu(numels: tuple[int, ...], chunk: int) -> torch.Tensor:
    # Row p of the table is (tensor index, first element) of program p. It depends only on the sizes, which
    # repeat every step, so it is cached; only the pointer table is rebuilt per call.
    counts = torch.tensor([-(-n // chunk) for n in numels], dtype=torch.int64)
    index = torch.repeat_interleave(torch.arange(len(numels), dtype=torch.int64), counts)
    first = torch.cumsum(counts, 0) - counts
    start = (torch.arange(index.numel(), dtype=torch.int64) - first[index]) * chunk
    return torch.stack([index, start], dim=1).contiguous()


_DEVICE_TABLES: dict[tuple[tuple[int, ...], int, torch.device], torch.Tensor] = {}


def chunk_table(numels: Sequence[int], chunk: int, device: torch.device) -> torch.Tensor:
    """int64 `(programs, 2)` table on `device`: which tensor and which first element each program reads.

    Tensors are split into chunks of `chunk` elements so that one large tensor is spread over many programs
    while a bias still costs one; every program then loops over its chunk in blocks.
    """
    key = (tuple(int(n) for n in numels), int(chunk), device)
    table = _DEVICE_TABLES.get(key)
    if table is None:
        table = to_device(_chunk_table_cpu(key[0], key[1]), device)
        if len(_DEVICE_TABLES) >= 256:  # bound the cache when shapes keep changing (adaptive batches do not)
            _DEVICE_TABLES.clear()
        _DEVICE_TABLES[key] = table
    return table


def to_device(host: torch.Tensor, device: torch.device) -> torch.Tensor:
    """Copy a small host table to `device` without making the host wait (pinned memory, non-blocking)."""
    if device.type == "cpu":
        return host
    return host.pin_memory().to(device, non_blocking=True)


def pointer_table(rows: Sequence[Sequence[int]], device: torch.device) -> torch.Tensor:
    """int64 `(len(rows), width)` table of addresses, sizes and dtype codes, on `device`."""
    return to_device(torch.tensor(rows, dtype=torch.int64), device)


def aligned(ptrs: Sequence[int], nbytes: int = 16) -> bool:
    """True when every address is a multiple of `nbytes` (lets the GPU kernel use vector loads)."""
    return all(p % nbytes == 0 for p in ptrs)
