"""Pieces shared by the Triton kernels: a typed load through an address taken from a pointer table, and the
launch shapes. Importing this module imports triton.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import triton
import triton.language as tl


@triton.jit
def load_f32(addr, offs, mask, code, ALIGNED: tl.constexpr):
    """Load `addr[offs]` as float32, where `addr` is an int64 address and `code` its dtype (see DTYPE_CODES).

    One kernel serves a bucket of mixed dtypes: the branch is on a per-tensor scalar, so every lane of a
    program takes the same one.
    """
    # ALIGNED: every address in the table is 16-byte aligned (checked on the host). Said of each pointer (an
    # address loaded from a table tells the compiler nothing), it lets the loads be 16-byte vector loads.
    if code == 0:
        p_f32 = addr.to(tl.pointer_type(tl.float32))  # a name per type: branches may not retype a variable
        if ALIGNED:
            p_f32 = tl.multiple_of(p_f32, 16)
        x = tl.load(p_f32 + offs, mask=mask, other=0.0)
    elif code == 1:
        p_bf16 = addr.to(tl.pointer_type(tl.bfloat16))  # a name per type: branches may not retype a variable
        if ALIGNED:
            p_bf16 = tl.multiple_of(p_bf16, 16)
        x = tl.load(p_bf16 + offs, mask=mask, other=0.0).to(tl.float32)
    elif code == 2:
        p_f16 = addr.to(tl.pointer_type(tl.float16))  # a name per type: branches may not retype a variable
        if ALIGNED:
            p_f16 = tl.multiple_of(p_f16, 16)
        x = tl.load(p_f16 + offs, mask=mask, other=0.0).to(tl.float32)
    else:
        p_f64 = addr.to(tl.pointer_type(tl.float64))  # a name per type: branches may not retype a variable
        if ALIGNED:
            p_f64 = tl.multiple_of(p_f64, 16)
        x = tl.load(p_f64 + offs, mask=mask, other=0.0).to(tl.float32)
    return x


@dataclass(frozen=True)
class LaunchConfig:
    """Elements per loop iteration (`block`), per program (`chunk`, a multiple of block), and warps."""

    block: int
    chunk: int
    num_warps: int


def interpreted() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


def launch_config(device: torch.device, heavy: bool = False) -> LaunchConfig:
    """Launch shape for `device`.

    The interpreter costs ~2 ms per program instance and per loop iteration whatever the block, so it gets
    one wide block per program. On a GPU a program streams 64K elements (32K for the heavier per-coordinate
    pass) in blocks of 2048 (1024): enough in flight per SM to saturate bandwidth, and a 124M-parameter model
    still spreads over thousands of programs.
    """
    if interpreted() or device.type != "cuda":
        return LaunchConfig(block=4096, chunk=4096, num_warps=4)
    if heavy:
        return LaunchConfig(block=1024, chunk=32768, num_warps=4)
    return LaunchConfig(block=2048, chunk=65536, num_warps=8)
