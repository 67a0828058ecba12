"""bscale: live gradient noise scale, optimal learning rate and adaptive batch size for torch.optim."""

from __future__ import annotations

from .estimate import (
    NoiseEstimate,
    NoiseReading,
    NoiseScaleEstimator,
    microbatch_batch_sizes,
    microbatch_estimates,
    two_batch_estimates,
)

__version__ = "0.1.0"

__all__: list[str] = [
    "NoiseEstimate",
    "NoiseReading",
    "NoiseScaleEstimator",
    "__version__",
    "microbatch_batch_sizes",
    "microbatch_estimates",
    "two_batch_estimates",
]
