"""bscale: live gradient noise scale, optimal learning rate and adaptive batch size for torch.optim."""

from __future__ import annotations

from .batch import BatchChange, BatchSizeController, StepCostMeter
from .estimate import (
    NoiseEstimate,
    NoiseReading,
    NoiseScaleEstimator,
    microbatch_batch_sizes,
    microbatch_estimates,
    two_batch_estimates,
)
from .laws import (
    AdamHyperparams,
    CriticalBatchFit,
    adam_law_from_moments,
    adam_optimal_lr_exact,
    cost_optimal_batch,
    fit_critical_batch,
    kaplan_critical_batch,
    linear_rule,
    linear_rule_max_kappa,
    lr_max_from_reference,
    lr_scale,
    optimal_lr,
    peak_batch,
    sqrt_rule,
    steps_examples_tradeoff,
)
from .log import (
    JSONLLogger,
    LightningCallback,
    Logger,
    PrintLogger,
    SupportsLog,
    TensorBoardLogger,
    WandbLogger,
    format_noise_scale,
    read_jsonl,
)
from .plot import plot_run
from .sampler import AdaptiveBatchSampler
from .schedule import ExampleSchedule, WarmupCosine, warmup_cosine
from .wrap import ScaledOptimizer, wrap

__version__ = "0.1.0"

__all__: list[str] = [
    "AdamHyperparams",
    "AdaptiveBatchSampler",
    "BatchChange",
    "BatchSizeController",
    "CriticalBatchFit",
    "ExampleSchedule",
    "JSONLLogger",
    "LightningCallback",
    "Logger",
    "NoiseEstimate",
    "NoiseReading",
    "NoiseScaleEstimator",
    "PrintLogger",
    "ScaledOptimizer",
    "StepCostMeter",
    "SupportsLog",
    "TensorBoardLogger",
    "WandbLogger",
    "WarmupCosine",
    "__version__",
    "adam_law_from_moments",
    "adam_optimal_lr_exact",
    "cost_optimal_batch",
    "fit_critical_batch",
    "format_noise_scale",
    "kaplan_critical_batch",
    "linear_rule",
    "linear_rule_max_kappa",
    "lr_max_from_reference",
    "lr_scale",
    "microbatch_batch_sizes",
    "microbatch_estimates",
    "optimal_lr",
    "peak_batch",
    "plot_run",
    "read_jsonl",
    "sqrt_rule",
    "steps_examples_tradeoff",
    "two_batch_estimates",
    "warmup_cosine",
    "wrap",
]
