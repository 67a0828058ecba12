"""Squared-norm kernels (`accumulate_sq_norms`, `sq_norms`) and backend dispatch.

Every path is checked against a float64 closed form on fresh random inputs (the seed is in each message),
with outputs poisoned so that an element the kernel forgets to write fails.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

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
# Tolerance against the float64 norm of the values *before* rounding to the gradient dtype: the rounding of
# each element (2^-24, 2^-9, 2^-11 relative) bounds the relative error of a sum of squares by twice that.
SOURCE_RTOL = {torch.float32: 1e-5, torch.bfloat16: 8e-3, torch.float16: 1e-3}
# Against the float64 norm of the rounded values only float32 accumulation remains (squares of bf16/fp16
# values are exact in float32).
ACCUM_RTOL = 2e-5


@pytest.fixture
def seed() -> int:
    value = int.from_bytes(os.urandom(4), "little")
    torch.manual_seed(value)
    return value


def _bucket(dtype: torch.dtype) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    """Odd and tiny sizes, a transposed (dense, non-contiguous) and a gapped (strided) view, random scales.

    Returns the float64 sources and the gradients cast to `dtype`.
    """
    scales = torch.exp(torch.randn(6, dtype=torch.float64))
    sources = [
        torch.randn(1, dtype=torch.float64),
        torch.randn(7, dtype=torch.float64),
        torch.randn(4097, dtype=torch.float64),
        torch.randn(65, 33, dtype=torch.float64).t(),
        torch.randn(40, 50, dtype=torch.float64)[:, ::2],
        torch.randn(3, 5, 7, dtype=torch.float64).permute(2, 0, 1),
    ]
    sources = [s * c for s, c in zip(sources, scales, strict=True)]
    grads = [s.to(dtype) for s in sources]
    # .to() keeps the layout for dense tensors; make the gapped view gapped again in the low-precision copy.
    grads[4] = torch.randn(40, 50, dtype=torch.float64).to(dtype)[:, ::2].copy_(sources[4].to(dtype))
    return sources, grads


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_sq_norms_match_closed_form(backend, dtype, seed):
    sources, grads = _bucket(dtype)
    assert not grads[3].is_contiguous() and not grads[4].is_contiguous()
    got = K.sq_norms(grads, backend=backend)
    assert got.dtype == torch.float32 and got.shape == (len(grads),)
    what = f"sq_norms {backend} {dtype} seed={seed}"
    assert_close_verbose(got, K.sq_norms_reference(grads), rtol=ACCUM_RTOL, atol=0, what=what)
    assert_close_verbose(got, K.sq_norms_reference(sources), rtol=SOURCE_RTOL[dtype], atol=0, what=what)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("slots_as", ["list", "tensor"])
def test_accumulate_adds_exactly_into_slots(backend, slots_as, seed):
    dtypes = [torch.float32, torch.bfloat16, torch.float16, torch.float32, torch.bfloat16, torch.float64]
    grads = [g.to(d) for g, d in zip(_bucket(torch.float32)[1], dtypes, strict=True)]
    out = torch.randn(13) * 100  # random start: accumulation must add to it, not overwrite it
    start = out.clone()
    slots = [11, 0, 5, 5, 2, 7]  # a repeated slot: both contributions must land
    expected = start.double().clone()
    expected.index_add_(0, torch.tensor(slots), K.sq_norms_reference(grads))
    arg = slots if slots_as == "list" else torch.tensor(slots)
    K.accumulate_sq_norms(grads, out, arg, backend=backend)
    what = f"accumulate {backend} slots as {slots_as} seed={seed}"
    assert_close_verbose(out, expected, rtol=ACCUM_RTOL, atol=1e-4, what=what)
    untouched = [i for i in range(13) if i not in slots]
    assert torch.equal(out[untouched], start[untouched]), f"{what}: a slot not named was written"


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_accumulate_per_coordinate_mode(backend, dtype, seed):
    _, grads = _bucket(dtype)
    # coord_sq in the parameter's layout: contiguous, so the transposed/permuted gradients need a relayout.
    coord = [torch.rand(g.shape) * 5 for g in grads]
    start = [c.clone() for c in coord]
    out = torch.randn(len(grads))
    out_start = out.clone()
    K.accumulate_sq_norms(grads, out, list(range(len(grads))), coord_sq=coord, backend=backend)
    what = f"coord_sq {backend} {dtype} seed={seed}"
    for i, (g, c, c0) in enumerate(zip(grads, coord, start, strict=True)):
        assert_close_verbose(c, c0.double() + g.double() ** 2, rtol=1e-6, atol=0, what=f"{what} tensor {i}")
    expected = out_start.double() + K.sq_norms_reference(grads)
    assert_close_verbose(out, expected, rtol=ACCUM_RTOL, atol=1e-5, what=what)


@pytest.mark.parametrize("backend", BACKENDS)
def test_accumulate_coord_sq_in_the_gradient_layout(backend, seed):
    # A channels-last gradient with a channels-last buffer is read in place; values must still line up.
    g = torch.randn(3, 4, 5, 6).to(memory_format=torch.channels_last)
    c = torch.zeros_like(g)
    out = torch.zeros(1)
    K.accumulate_sq_norms([g], out, [0], coord_sq=[c], backend=backend)
    assert_close_verbose(c, g.double() ** 2, rtol=1e-6, atol=0, what=f"channels-last {backend} seed={seed}")


@pytest.mark.triton
@pytest.mark.skipif(not HAS_TRITON, reason="no triton")
def test_triton_chunks_and_blocks_cover_every_element(monkeypatch, seed):
    # Small blocks and chunks exercise the in-program loop and every chunk boundary the default hides.
    from bscale.kernels import sqnorm_triton
    from bscale.kernels._triton_common import LaunchConfig

    monkeypatch.setattr(sqnorm_triton, "launch_config", lambda device, heavy=False: LaunchConfig(64, 256, 4))
    grads = [torch.randn(n) for n in (1, 63, 64, 255, 256, 257, 1000)]
    coord = [torch.zeros_like(g) for g in grads]
    out = torch.zeros(len(grads))
    K.accumulate_sq_norms(grads, out, list(range(len(grads))), coord_sq=coord, backend="triton")
    what = f"small launch config seed={seed}"
    assert_close_verbose(out, K.sq_norms_reference(grads), rtol=ACCUM_RTOL, atol=0, what=what)
    for g, c in zip(grads, coord, strict=True):
        assert_close_verbose(c, g.double() ** 2, rtol=1e-6, atol=0, what=what)


@pytest.mark.triton
@pytest.mark.skipif(not HAS_TRITON, reason="no triton")
def test_triton_bucket_of_mixed_dtypes_is_one_launch(monkeypatch):
    from bscale.kernels import sqnorm_triton

    launches = []
    kernel = sqnorm_triton._sq_norm_kernel

    class Counting:
        def __getitem__(self, grid):
            launches.append(grid)
            return kernel[grid]

    monkeypatch.setattr(sqnorm_triton, "_sq_norm_kernel", Counting())
    _, grads = _bucket(torch.float32)
    grads = [g.to(d) for g, d in zip(grads, [torch.float32, torch.bfloat16, torch.float16] * 2, strict=True)]
    K.accumulate_sq_norms(grads, torch.zeros(6), torch.arange(6), backend="triton")
    assert len(launches) == 1


@pytest.mark.parametrize("backend", BACKENDS)
def test_empty_tensors_and_empty_bucket(backend):
    out = torch.tensor([1.5, 2.5])
    K.accumulate_sq_norms([torch.zeros(0), torch.ones(3)], out, [1, 0], backend=backend)
    assert out.tolist() == [4.5, 2.5]
    K.accumulate_sq_norms([], out, [], backend=backend)
    assert out.tolist() == [4.5, 2.5]
    assert K.sq_norms([], backend=backend).shape == (0,)


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"out": torch.zeros(3, dtype=torch.float64)}, "float32"),
        ({"out": torch.zeros(3, 2)[:, 0]}, "contiguous 1-D"),
        ({"slots": [0]}, "one slot per tensor"),
        ({"slots": [0, 3]}, "outside out"),
        ({"slots": torch.tensor([0.0, 1.0])}, "int64"),
        ({"coord_sq": [torch.zeros(4)]}, "one per gradient"),
        ({"coord_sq": [torch.zeros(4), torch.zeros(4, dtype=torch.float16)]}, "float32"),
        ({"coord_sq": [torch.zeros(4), torch.zeros(5)]}, "shape"),
        ({"coord_sq": [torch.zeros(4), torch.zeros(4, 2)[:, 0]]}, "strided view"),
        ({"backend": "cuda"}, "Invalid kernel backend"),
    ],
)
def test_bad_arguments_raise_value_error(kwargs, message):
    call = {"tensors": [torch.ones(4), torch.ones(4)], "out": torch.zeros(3), "slots": [0, 1], **kwargs}
    with pytest.raises(ValueError, match=message):
        K.accumulate_sq_norms(call.pop("tensors"), call.pop("out"), call.pop("slots"), **call)


def test_dispatch(monkeypatch):
    cpu = [torch.zeros(2)]
    monkeypatch.delenv(dispatch.ENV_VAR, raising=False)
    assert K.resolve_backend(None, cpu) == "torch"
    assert K.resolve_backend("auto", cpu) == "torch"  # auto never runs the interpreter on CPU tensors
    monkeypatch.setenv(dispatch.ENV_VAR, "torch")
    assert K.resolve_backend(None, cpu) == "torch"
    monkeypatch.setenv(dispatch.ENV_VAR, "bogus")
    with pytest.raises(ValueError, match=dispatch.ENV_VAR):
        K.resolve_backend(None, cpu)
    assert K.resolve_backend("torch", cpu) == "torch"  # an explicit argument wins over the variable
    monkeypatch.setattr(dispatch, "triton_available", lambda: False)
    with pytest.raises(RuntimeError, match="pip install triton"):
        K.resolve_backend("triton", cpu)
    monkeypatch.setattr(dispatch, "triton_available", lambda: True)
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    with pytest.raises(RuntimeError, match="CUDA"):
        K.resolve_backend("triton", cpu)
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    assert K.resolve_backend("triton", cpu) == "triton"
    monkeypatch.setenv(dispatch.ENV_VAR, "triton")
    assert K.resolve_backend(None, cpu) == "triton"


def test_torch_path_never_imports_triton():
    # Import, run every entry point on the torch path, then make triton unimportable: the torch path must
    # still work and asking for triton must say how to fix it.
    code = """
import sys, torch
import bscale.kernels as K
g = [torch.randn(5), torch.randn(3, 2, dtype=torch.bfloat16)]
c = [torch.zeros(5), torch.zeros(3, 2)]
K.accumulate_sq_norms(g, torch.zeros(2), [0, 1], coord_sq=c)
K.sq_norms(g, backend="torch")
K.coordinate_stats(g, c, 2, 1.0, exp_avg_sq=c)
assert "triton" not in sys.modules, "triton was imported"
sys.modules["triton"] = None
K.dispatch.triton_available.cache_clear()
K.sq_norms(g)
try:
    K.sq_norms(g, backend="triton")
except RuntimeError as e:
    assert "pip install triton" in str(e), e
else:
    raise SystemExit("no error for backend='triton' without triton")
"""
    env = {k: v for k, v in os.environ.items() if k not in ("TRITON_INTERPRET", dispatch.ENV_VAR)}
    root = Path(__file__).resolve().parents[1]
    result = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=120, cwd=root
    )
    assert result.returncode == 0, result.stderr[-3000:]


@pytest.mark.triton
@pytest.mark.skipif(not HAS_TRITON, reason="no triton")
def test_triton_kernels_compile_for_nvidia_gpus_with_vector_loads():
    # The interpreter runs the kernels' Python; the GPU compiler is stricter (types across branches, pointer
    # casts, masks). Compile every launched variant to a cubin for sm_80 and sm_90, no GPU needed, and check
    # that with 16-byte-aligned tensors the whole blocks are read with 16-byte vector loads (float32: v4.b32).
    env = {k: v for k, v in os.environ.items() if k not in ("TRITON_INTERPRET", dispatch.ENV_VAR)}
    env["TRITON_DEFAULT_FP_FUSION"] = "1"
    root = Path(__file__).resolve().parents[1]
    result = subprocess.run(
        [sys.executable, str(root / "tests" / "_triton_aot.py")],
        capture_output=True,
        text=True,
        env={**env, "PYTHONPATH": str(root)},
        timeout=600,
        cwd=root,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    rows = [json.loads(line) for line in result.stdout.splitlines()]
    assert len(rows) == 16
    for row in rows:
        vector_loads = row["ptx"].get("ld.global.v4.b32", 0)
        if row["variant"]["ALIGNED"]:
            assert vector_loads > 0, row
        else:
            assert vector_loads == 0, row  # unaligned: element loads (what the host check is for)


@pytest.mark.parametrize("backend", BACKENDS)
def test_sparse_tensors_count_by_their_coalesced_values(backend, seed):
    # Index 2 appears twice: its rows add up before squaring, as in the dense gradient.
    indices = torch.tensor([[0, 2, 2, 5]])
    values = torch.randn(4, 3)
    sparse = torch.sparse_coo_tensor(indices, values, (7, 3), check_invariants=True)
    dense = torch.randn(9)
    got = K.sq_norms([sparse, dense], backend=backend)
    assert_close_verbose(
        got, K.sq_norms_reference([sparse.to_dense(), dense]), rtol=ACCUM_RTOL, atol=0, what=f"sparse seed={seed}"
    )
    out = torch.zeros(2)
    K.accumulate_sq_norms([sparse, dense], out, [1, 0], backend=backend)
    assert_close_verbose(out, got.flip(0), rtol=ACCUM_RTOL, atol=0, what=f"sparse accumulate seed={seed}")
    with pytest.raises(ValueError, match="sparse"):
        K.accumulate_sq_norms([sparse], torch.zeros(1), [0], coord_sq=[torch.zeros(7, 3)], backend=backend)


@pytest.mark.parametrize("backend", BACKENDS)
def test_complex_tensors_count_by_their_real_view(backend, seed):
    z = torch.randn(5, 3, dtype=torch.complex64)
    got = K.sq_norms([z], backend=backend)
    want = torch.tensor([float((z.abs() ** 2).double().sum())], dtype=torch.float64)
    assert_close_verbose(got, want, rtol=ACCUM_RTOL, atol=0, what=f"complex seed={seed}")
