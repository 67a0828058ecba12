"""Choice between the Triton kernels and the pure-torch path.

`backend` is one of None / "auto", "torch" or "triton". The environment variable `BSCALE_KERNEL_BACKEND`
(same values) replaces "auto", so a run can be switched without touching code. "auto" picks Triton when every
tensor is on a CUDA device and triton imports, torch otherwise. Triton is imported only when it is chosen.
"""

from __future__ import annotations

import os
from collections.abc import Iterable
from functools import cache

import torch

ENV_VAR = "BSCALE_KERNEL_BACKEND"
BACKENDS = ("auto", "torch", "triton")


@cache
def triton_available() -> bool:
    """True when `import triton` succeeds (checked once per process)."""
    try:
        import triton  # noqa: F401
    except ImportError:
        return False
    return True


def _interpreted() -> bool:
    # Triton's CPU interpreter runs kernels on CPU tensors; it is chosen by this variable before import.
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


def _check_name(name: str, source: str) -> str:
    value = name.strip().lower()
    if value not in BACKENDS:
        raise ValueError(f"Invalid kernel backend {name!r} from {source}; use one of {', '.join(BACKENDS)}")
    return value


def resolve_backend(backend: str | None, tensors: Iterable[torch.Tensor]) -> str:
    """Return "torch" or "triton" for a call on `tensors`.

    Args:
        backend (str, optional): "auto" or None (choose; `BSCALE_KERNEL_BACKEND` overrides the choice),
            "torch" or "triton" (default: None)
        tensors (iterable of Tensor): every tensor the call reads or writes

    Raises:
        ValueError: an unknown backend name.
        RuntimeError: "triton" asked for where it cannot run (not installed, or tensors off CUDA without
            `TRITON_INTERPRET=1`).
    """
    choice = "auto" if backend is None else _check_name(backend, "the backend argument")
    if choice == "auto":
        env = os.environ.get(ENV_VAR, "")
        if env:
            choice = _check_name(env, ENV_VAR)
    devices = {t.device.type for t in tensors}
    if choice == "torch":
        return "torch"
    if choice == "auto":
        return "triton" if devices == {"cuda"} and triton_available() else "torch"
    if not triton_available():
        raise RuntimeError(
            "backend='triton' needs triton: `pip install triton` (or bscale[triton]), or use backend='torch'"
        )
    if devices - {"cuda"} and not _interpreted():
        raise RuntimeError(
            f"backend='triton' needs every tensor on a CUDA device, got {sorted(devices)}; move them to CUDA,"
            " use backend='torch', or set TRITON_INTERPRET=1 before importing triton (kernels on CPU)"
        )
    return "triton"
