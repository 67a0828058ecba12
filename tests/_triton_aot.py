"""Compile the Triton kernels for NVIDIA GPUs, ahead of time and without one: what the interpreter cannot check.

Run as a script with TRITON_INTERPRET unset (the interpreter replaces the kernels). For each kernel, each
variant the launchers use and each target architecture, Triton compiles the kernel down to a cubin (its
bundled LLVM and ptxas), so code the interpreter accepts but the compiler rejects fails here. Prints one JSON
line per compiled variant: the kernel, target, variant and how many of each global load and store width the
PTX has.
"""

from __future__ import annotations

import collections
import json
import re
import sys

import torch
import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource

from bscale.kernels._triton_common import launch_config
from bscale.kernels.coord_triton import _WIDTH as COORD_WIDTH
from bscale.kernels.coord_triton import _coord_stats_kernel
from bscale.kernels.sqnorm_triton import _WIDTH as SQ_WIDTH
from bscale.kernels.sqnorm_triton import _sq_norm_kernel

SQ_SIGNATURE = {
    "table_ptr": "*i64",
    "chunk_ptr": "*i64",
    "out_ptr": "*fp32",
    "slots_ptr": "*i64",
    "slots_stride": "i32",
}
COORD_SIGNATURE = {
    "table_ptr": "*i64",
    "chunk_ptr": "*i64",
    "out_ptr": "*fp32",
    "edges_ptr": "*fp32",
    **{name: "fp32" for name in ("inv_k", "var_scale", "two_big_b", "eps", "num_coords")},
}


def _compile(fn, signature: dict[str, str], constexprs: dict, arch: int, num_warps: int) -> dict[str, int]:
    sig = {**signature, **{name: "constexpr" for name in constexprs}}
    kernel = triton.compile(
        ASTSource(fn=fn, signature=sig, constexprs=constexprs),
        target=GPUTarget("cuda", arch, 32),
        options={"num_warps": num_warps},
    )
    assert kernel.asm.get("cubin"), "no cubin"
    return dict(collections.Counter(re.findall(r"(?:ld|st)\.global(?:\.v\d)?\.b\d+", kernel.asm["ptx"])))


def main() -> None:
    cuda = torch.device("cuda")  # a device name only: no GPU is touched
    sq, heavy = launch_config(cuda), launch_config(cuda, heavy=True)
    for arch in (80, 90):
        for coord in (False, True):
            for aligned in (False, True):
                variant = {"WIDTH": SQ_WIDTH, "CHUNK": sq.chunk, "BLOCK": sq.block, "COORD": coord, "ALIGNED": aligned}
                counts = _compile(_sq_norm_kernel, SQ_SIGNATURE, variant, arch, sq.num_warps)
                print(json.dumps({"kernel": "sq_norm", "arch": arch, "variant": variant, "ptx": counts}))
        for precond in (False, True):
            for aligned in (False, True):
                variant = {
                    "WIDTH": COORD_WIDTH, "CHUNK": heavy.chunk, "BLOCK": heavy.block, "NUM_EDGES": 17,
                    "NUM_BINS_P2": 32, "PRECOND": precond, "RESET": True, "ALIGNED": aligned,
                }  # fmt: skip
                counts = _compile(_coord_stats_kernel, COORD_SIGNATURE, variant, arch, heavy.num_warps)
                print(json.dumps({"kernel": "coord_stats", "arch": arch, "variant": variant, "ptx": counts}))
    sys.stdout.flush()


if __name__ == "__main__":
    main()
