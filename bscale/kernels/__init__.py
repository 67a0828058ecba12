"""Per-parameter gradient statistics: fused Triton kernels, each beside the pure-torch path that is also the
CPU path. Importing this package never imports triton; it is imported when a call chooses it.
"""

from __future__ import annotations

from .coord import DEFAULT_SNR_EDGES, coordinate_stats
from .dispatch import ENV_VAR, resolve_backend, triton_available
from .reference import coordinate_stats_reference, sq_norms_reference
from .sqnorm import accumulate_sq_norms, sq_norms

__all__ = [
    "DEFAULT_SNR_EDGES",
    "ENV_VAR",
    "accumulate_sq_norms",
    "coordinate_stats",
    "coordinate_stats_reference",
    "resolve_backend",
    "sq_norms",
    "sq_norms_reference",
    "triton_available",
]
