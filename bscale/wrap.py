"""The drop-in optimizer wrapper: live noise scale, optimal learning rate and batch scaling inside ``step()``."""

from __future__ import annotations

import math
import numbers
import os
import sys
import warnings
import weakref
from collections import OrderedDict
from collections.abc import Callable, Iterable, Sequence
from typing import TYPE_CHECKING, Any

import torch
from torch.optim import Optimizer

from . import laws
from .coord_stats import noise_only_small_batch_fraction, unbiased_coordinate_sums
from .distributed import DataParallel, _is_dtensor
from .estimate import NEED_TWO_STEPS, NoiseScaleEstimator
from .kernels import resolve_backend
from .kernels.coord import (
    DEFAULT_SNR_EDGES,
    SLOTS,
    coordinate_stats_and_sq_norms_cpu,
    coordinate_stats_trusted,
    scratch_bytes,
)
from .kernels.sqnorm import accumulate_sq_norms_trusted, dense_values

if TYPE_CHECKING:
    from types import FrameType

    from .distributed import PendingReduce

__all__ = ["ScaledOptimizer", "wrap"]

_RULES = ("noise", "linear", "sqrt")
_LAWS = ("sgd", "adam")
_BACKENDS = ("auto", "torch", "triton")
_ADAM_LIKE = ("Adam", "AdamW", "NAdam", "RAdam", "Adamax", "Adafactor", "RMSprop", "Adagrad", "SparseAdam")


def _infer_law(optimizer: Optimizer) -> str:
    """Adam-family optimizers follow the Surge law; everything else is treated as SGD (McCandlish)."""
    return "adam" if type(optimizer).__name__ in _ADAM_LIKE else "sgd"


# Frames under these folders are not the user's: a warning is attributed to the first frame outside them.
_INTERNAL_DIRS = (
    os.path.dirname(os.path.abspath(__file__)) + os.sep,
    os.path.dirname(torch.__file__) + os.sep,
)


def _caller_stacklevel() -> int:
    """``stacklevel`` for a ``warnings.warn`` made by the caller of this function that names the user's line.

    A fixed number would point into torch (``step`` runs under ``torch.no_grad``'s decorator, the optimizer's
    profiling wrapper and possibly an LR scheduler's wrapper, each adding a frame).
    """
    level, frame = 1, sys._getframe(1)
    while frame.f_back is not None and os.path.abspath(frame.f_code.co_filename).startswith(_INTERNAL_DIRS):
        frame = frame.f_back
        level += 1
    return level


def _check_positive(name: str, value: Any, integer: bool = False, unit: str = "examples") -> None:
    # numbers.Real admits numpy scalars (a size read from an array); bool is excluded: True is no size.
    ok = isinstance(value, numbers.Real) and not isinstance(value, bool)
    ok = ok and math.isfinite(value) and value > 0
    if integer:
        ok = ok and float(value).is_integer()
    if not ok:
        kind = "a positive integer" if integer else "a positive, finite number"
        raise ValueError(f"Invalid {name}: {value!r}; it must be {kind}" + (f" of {unit}" if unit else ""))


_ENGINE_CALL = getattr(getattr(torch.autograd.graph, "_engine_run_backward", None), "__code__", None)
_GRAD_CALL = getattr(torch.autograd.grad, "__code__", None)


def _backward_call() -> tuple[FrameType | None, bool]:
    """``(frame, grad)``: the frame of the outermost running ``backward()``/``autograd.grad()`` call (its entry
    into the autograd engine) or None, and whether the innermost one is ``torch.autograd.grad()``, which
    accumulates nothing into ``.grad``. Graph tasks nested in one call (reentrant checkpointing) share the
    frame. Held until the next backward begins, a frame cannot be mistaken for a later call's (its identity is
    not reused while held). One walk up the Python stack: an op or a C++ query here would cost more."""
    frame, outer, grad = sys._getframe(1), None, None
    while frame is not None:
        if frame.f_code is _ENGINE_CALL:
            outer = frame
            if grad is None:
                grad = frame.f_back is not None and frame.f_back.f_code is _GRAD_CALL
        frame = frame.f_back
    return outer, bool(grad)


# What the wrapper warns of, once each (`ScaledOptimizer._warn_once`).
_WARNINGS = {
    "unfinished_backward": (
        "bscale: a backward() of this step never reached its end (an exception was raised inside it), so this "
        "step's statistics are left out. After an exception in backward(), call opt.zero_grad() before the next "
        "microbatch."
    ),
    "one_microbatch": (
        "bscale: one microbatch per step in one process gives no second batch size to compare, so the noise "
        "scale cannot be estimated. Accumulate 2 or more microbatches per step (call backward() on smaller "
        "pieces of the batch), or train data-parallel on 2 or more ranks. Training continues."
    ),
}


def _check_adam_hparams_reach(optimizer: Optimizer, controller: Any, ref_batch: float | None) -> None:
    """With scale_adam_hparams, the square-root rule sets β → 1 − κ(1 − β), which needs κ(1 − β) < 1: check
    the controller's largest batch against every group's betas now rather than at the step that reaches it."""
    top, multiple = getattr(controller, "max_batch", None), getattr(controller, "multiple_of", 1)
    ref = ref_batch if ref_batch is not None else getattr(controller, "batch_size", None)
    if not isinstance(top, (int, float)) or not isinstance(ref, (int, float)) or ref <= 0:
        return
    if isinstance(multiple, int) and multiple > 0:
        top = top // multiple * multiple  # the largest batch it can choose
    kappa = top / ref
    for group in optimizer.param_groups:
        beta = min(float(b) for b in group.get("betas", (0.0,)))
        if kappa * (1.0 - beta) >= 1.0 - 1e-12:
            raise ValueError(
                f"scale_adam_hparams=True with this controller can reach kappa = max_batch / ref_batch = {top:g} / "
                f"{ref:g} = {kappa:g}, but the square-root rule needs kappa < 1/(1 - beta) = "
                f"{1.0 / (1.0 - beta):.6g} for betas {tuple(group['betas'])}: lower max_batch to below "
                f"{ref / (1.0 - beta):g}, pass a larger ref_batch, or drop scale_adam_hparams"
            )


def _whole(micro: float) -> float:
    """128.0 or a numpy integer names the same microbatch as 128: the controller counts in Python ints."""
    return int(micro) if float(micro).is_integer() else micro


def _foreach_normable(g: torch.Tensor) -> bool:
    """`_foreach_norm(..., dtype=float32)` takes it: dense, real, and not float64 (which it will not narrow)."""
    return g.dtype != torch.float64 and not g.is_sparse and not g.is_complex()


def _unusual_norm(g: torch.Tensor) -> torch.Tensor:
    """0-d float32 L2 norm of a sparse COO gradient (of its coalesced values: repeated indices summed first) or
    of a complex one (of its real and imaginary parts)."""
    (values,) = dense_values([g])
    if values.dtype == torch.float64:
        return torch.linalg.vector_norm(values).float()
    return torch.linalg.vector_norm(values, dtype=torch.float32)


class ScaledOptimizer(Optimizer):
    r"""Wraps a ``torch.optim`` optimizer to measure the gradient noise scale live and scale its learning rate.

    The training loop is unchanged: ``k`` calls of ``loss.backward()`` (gradient accumulation), then ``step()`` and
    ``zero_grad()``. During each backward, gradient hooks add every parameter's squared microbatch-gradient norm
    into a device buffer with no host sync (on CUDA with Triton: one fused launch per bucket of gradients; with the
    torch backend: one op for all the gradients of a backward, when it ends or ``bucket_mb`` fills); once per
    step, at the expected last backward, the squared norm of the accumulated ``.grad`` is taken, before any
    clipping or unscaling. At ``step()`` one host sync reads those sums and feeds the two-batch estimator
    (McCandlish App. A.1) with ``b`` = the microbatch size and ``B = k·b``:

    .. math::
        |G_b|^2 = \operatorname{mean}_j |g_j|^2, \qquad |G_B|^2 = |\bar g|^2, \qquad
        B_{simple} = tr(Σ)/|G|^2

    Then, if a scaling ``rule`` is set, every group's learning rate is multiplied by ``lr_scale`` for the batch
    actually used, the wrapped optimizer steps, and the user's learning rate is restored, so schedulers and loops
    that write ``group["lr"]`` keep working:

    .. math::
        lr = lr_{user} \cdot f(B)/f(B_{ref}), \quad f_{SGD}(B) = \frac{1}{1+B_{noise}/B}, \quad
        f_{Adam}(B) = \frac{1}{\sqrt{B_{noise}/B}+\sqrt{B/B_{noise}}}

    ``param_groups``, ``state`` and ``defaults`` are the wrapped optimizer's own objects.

    Args:
        optimizer: any ``torch.optim.Optimizer`` (LBFGS excepted: it re-evaluates its closure).
        microbatch_size: examples in one backward call on one rank, in the unit you count batches in (samples, or
            tokens for language models). Set :attr:`microbatch_size` before a backward when it changes (the last
            batch of an epoch). The step's batch is the sum over its microbatches (and ranks).
        rule: ``None`` to observe only (default), ``"noise"`` for the noise-aware law, ``"linear"`` or ``"sqrt"``.
        ref_batch: batch size at which the user's learning rate is right (default: the first step's batch).
        ref_lr: learning rate tuned at ``ref_batch``, used to report ``optimal_lr`` (default: the largest LR the
            first group has had, so the peak of a warmup-then-decay schedule).
        law: ``"sgd"`` or ``"adam"``, which optimal-LR law applies (default: from the optimizer's class).
        beta: per-step smoothing of the estimator at the batch of its first measured step (default: 0.99, ~100
            steps of that size); the averages forget per example, so the horizon stays fixed in examples (steps of
            a grown batch count for more).
        loss_reduction: ``"mean"`` if each microbatch loss is divided by the number of microbatches (nanoGPT's
            ``loss / accum``), ``"sum"`` if not (default: ``"mean"``). Only the absolute ``grad_sq`` and
            ``trace_sigma`` depend on it; the noise scale does not.
        grad_scaler: the ``torch.amp.GradScaler`` in use, if any, so readings are in unscaled units. Pass it
            whenever one is used: its scale changes during training (it grows every ``growth_interval``
            steps and halves after an overflow), and without it the averages mix steps taken at different
            scales, which biases the noise scale too. (A fused optimizer is handed the scale by
            ``GradScaler.step``.)
        named_parameters: the model's ``named_parameters()``, to break the noise scale down by module in
            :attr:`stats` (``layer/<module>/noise_scale``).
        scale_adam_hparams: with a rule and an Adam-type optimizer, also rescale β1, β2 and eps by the square-root
            rule (Malladi) for the batch used (default: False).
        per_coordinate: also measure per-coordinate gradient statistics (Surge's SNR diagnostics and the
            Adam-preconditioned noise scale); costs one float32 buffer per parameter (default: False).
        controller: a :class:`bscale.BatchSizeController` deciding the next batch size from the readings.
        loggers: objects with ``log(stats, step)``; called every ``log_every`` steps (default: 10).
        process_group: the data-parallel group under ``torch.distributed`` (default: the world, when initialised).
        ddp: the ``DistributedDataParallel`` model, to send the step's statistics with DDP's own gradient
            all-reduce (a communication hook appends them to its last bucket) instead of in one more collective.
            Not with a communication hook of your own (DDP takes one per model). Default: None.
        debug: under ``torch.distributed``, check after every step that all ranks hold identical readings
            and that the step's gradient was synchronised (that one on measured steps, see ``measure_every``);
            ``RuntimeError`` names what differs
            (default: False; one more all-reduce of a few scalars per step).
        bucket_mb: how many MiB of microbatch gradients are held before one fused launch (Triton) or one op (torch
            backend) takes their norms; fewer are held when a backward ends first (default: 32).
        measure_every: measure one step in this many: the last of every ``measure_every`` steps (default: 1, every
            step), so a logger whose ``log_every`` is a multiple of it logs fresh readings; before that every
            step until the estimator has its first reading (the first step, or the first after a bare optimizer's
            checkpoint), so that a rule scales the LR from a measurement from the start; and the step after a
            measured one that gave no reading (left out, or skipped by GradScaler). The other steps run
            without the statistics' passes over the gradients (their hooks count the microbatch and nothing
            else); readings, the LR scale and the controller keep the latest measurement. Each measurement is
            weighted by the examples since the one before (as is the first one after any step left out), so the
            averages keep ``beta``'s horizon in examples, from fewer readings: while ``measure_every·(1 − beta)``
            is small, the standard error grows by about √measure_every.
        backend: kernel backend, ``None`` to choose from the device (default), ``"torch"`` or ``"triton"``.

    Under ``torch.distributed``, one all-reduce of a few scalars per step runs over ``process_group``, launched
    at the end of the step's last backward and awaited in ``step()`` (with ``ddp=``, none: they travel in DDP's
    gradient all-reduce); every rank then holds identical readings and applies the identical learning-rate
    scale.
    """

    def __init__(
        self,
        optimizer: Optimizer,
        microbatch_size: float,
        *,
        rule: str | None = None,
        ref_batch: float | None = None,
        ref_lr: float | None = None,
        law: str | None = None,
        beta: float = 0.99,
        loss_reduction: str = "mean",
        grad_scaler: Any = None,
        named_parameters: Iterable[tuple[str, torch.nn.Parameter]] | None = None,
        scale_adam_hparams: bool = False,
        per_coordinate: bool = False,
        controller: Any = None,
        loggers: Sequence[Any] = (),
        log_every: int = 10,
        process_group: Any = None,
        ddp: Any = None,
        debug: bool = False,
        bucket_mb: float = 32.0,
        backend: str | None = None,
        measure_every: int = 1,
    ) -> None:
        if not isinstance(optimizer, Optimizer):
            raise ValueError(f"bscale.wrap needs a torch.optim.Optimizer instance, got {type(optimizer).__name__}")
        if isinstance(optimizer, ScaledOptimizer):
            raise ValueError("this optimizer is already wrapped by bscale; wrap the inner optimizer once")
        if isinstance(optimizer, torch.optim.LBFGS):
            raise ValueError(
                "LBFGS re-evaluates its closure several times per step; bscale cannot attribute "
                "microbatches there: wrap a first-order optimizer instead"
            )
        _check_positive("microbatch_size", microbatch_size)
        if rule is not None and rule not in _RULES:
            raise ValueError(f"Invalid rule: {rule!r}; choose one of {_RULES} or None to observe only")
        if law is not None and law not in _LAWS:
            raise ValueError(f"Invalid law: {law!r}; choose 'sgd' or 'adam'")
        if ref_batch is not None:
            _check_positive("ref_batch", ref_batch)
        if ref_lr is not None:
            _check_positive("ref_lr", ref_lr, unit="")
        if loss_reduction not in ("mean", "sum"):
            raise ValueError(f"Invalid loss_reduction: {loss_reduction!r}; use 'mean' (loss / accum) or 'sum'")
        if isinstance(log_every, bool) or not (isinstance(log_every, int) and log_every > 0):
            raise ValueError(f"Invalid log_every: {log_every!r}; it must be a positive integer")
        _check_positive("bucket_mb", bucket_mb, unit="MiB")
        if backend is not None and (not isinstance(backend, str) or backend.strip().lower() not in _BACKENDS):
            # Checked here: the kernels would raise it from a gradient hook, in the middle of a backward.
            raise ValueError(f"Invalid backend: {backend!r}; use None (choose from the device) or one of {_BACKENDS}")
        if scale_adam_hparams and rule is None:
            raise ValueError(
                "scale_adam_hparams=True rescales betas and eps along with the learning rate: "
                "pass a rule ('noise', 'linear' or 'sqrt'), or drop scale_adam_hparams"
            )
        if scale_adam_hparams and "betas" not in optimizer.defaults:
            raise ValueError(
                f"scale_adam_hparams=True needs an optimizer with betas (Adam, AdamW, ...); "
                f"{type(optimizer).__name__} has none: drop scale_adam_hparams"
            )
        if grad_scaler is not None and not all(hasattr(grad_scaler, a) for a in ("get_scale", "is_enabled")):
            raise ValueError(
                f"Invalid grad_scaler: {type(grad_scaler).__name__}; pass the "
                "torch.amp.GradScaler that scales the loss, or None"
            )
        if controller is not None:
            methods = ("observe", "accumulation_steps", "state_dict", "load_state_dict")
            missing = [a for a in methods if not callable(getattr(controller, a, None))]
            if isinstance(controller, type) or missing or not hasattr(controller, "batch_size"):
                raise ValueError(
                    f"Invalid controller: {controller!r} is not a batch-size controller (it needs observe(), "
                    "accumulation_steps(), batch_size, state_dict() and load_state_dict()); pass an instance, e.g. "
                    "controller=bscale.BatchSizeController(min_batch=..., max_batch=...)"
                )
            if scale_adam_hparams and rule is not None and (law or _infer_law(optimizer)) == "adam":
                _check_adam_hparams_reach(optimizer, controller, ref_batch)
        if callable(getattr(loggers, "log", None)):
            raise ValueError("loggers takes a sequence of loggers: pass loggers=[logger]")
        loggers = list(loggers)
        for logger in loggers:
            if not callable(getattr(logger, "log", None)):
                raise ValueError(f"Invalid logger: {type(logger).__name__} has no log(stats, step) method")
        if named_parameters is not None:
            named_parameters = list(named_parameters)
            for item in named_parameters:
                # model.parameters() by mistake would unpack a 2-row weight as a (name, tensor) pair silently.
                if not (
                    isinstance(item, tuple)
                    and len(item) == 2
                    and isinstance(item[0], str)
                    and isinstance(item[1], torch.Tensor)
                ):
                    raise ValueError(
                        "named_parameters must yield (name, parameter) pairs: pass "
                        "model.named_parameters(), not model.parameters()"
                    )
        # Optimizer.__init__ would rebuild param_groups: set up the hook tables and step patching ourselves.
        self.optimizer = optimizer
        self._optimizer_step_pre_hooks = OrderedDict()
        self._optimizer_step_post_hooks = OrderedDict()
        self._optimizer_state_dict_pre_hooks = OrderedDict()
        self._optimizer_state_dict_post_hooks = OrderedDict()
        self._optimizer_load_state_dict_pre_hooks = OrderedDict()
        self._optimizer_load_state_dict_post_hooks = OrderedDict()
        self._patch_step_function()

        self.microbatch_size = microbatch_size
        self.rule = rule
        self.law = law or _infer_law(optimizer)
        self.ref_batch = None if ref_batch is None else float(ref_batch)
        self.ref_lr = ref_lr
        self.loss_reduction = loss_reduction
        self.grad_scaler = grad_scaler
        self.scale_adam_hparams = scale_adam_hparams
        self.per_coordinate = per_coordinate
        self.controller = controller
        self.loggers = list(loggers)
        self.log_every = log_every
        self.backend = backend
        self._bucket_bytes = int(bucket_mb * 2**20)
        self.measure_every = measure_every
        # Examples of the steps taken since the last measurement (left unmeasured, or left out), by which the next
        # measurement's weight is set.
        self._pending_examples = 0.0
        self._measure_missed = False  # the last step was to be measured and gave no reading
        self.estimator = NoiseScaleEstimator(beta)

        self._dp = DataParallel(process_group, debug=debug)
        if per_coordinate and self._dp.world_size > 1:
            # The buffer holds this rank's Σ_j g_j² while .grad holds the all-reduced mean: they do not combine.
            raise ValueError("per_coordinate=True is single-process for now; wrap without it under torch.distributed")
        self._params: list[torch.Tensor] = []
        self._slot: dict[torch.Tensor, int] = {}
        self._hook_handles: list[Any] = []
        self._layer_of_slot: list[int] = []
        self._layers: list[str] = []
        self._layer_estimators: dict[str, NoiseScaleEstimator] = {}
        # Per module: the examples of measured steps that gave it no gradient, to weigh its next measurement.
        self._layer_pending: dict[str, float] = {}
        names = {p: n for n, p in named_parameters} if named_parameters is not None else None
        self._param_names = names
        self._backends: dict[torch.device, str] = {}
        self._step_norms: list[torch.Tensor] = []  # torch backend: |g| of each gradient seen this step
        self._step_norm_slots: list[int] = []  # ... and its parameter's slot
        self._held: list[torch.Tensor] = []  # torch backend: gradients of this backward, normed at its end
        self._held_slots: list[int] = []
        self._held_versions: list[int] = []  # ... and their version counters when held
        self._held_bytes = 0  # ... and their bytes
        self._peak_held_bytes = 0
        self._in_backward = False
        self._skipping = False  # inside torch.autograd.grad(): hooks ignored until it ends
        self._call: FrameType | None = None  # the backward() call whose graph task is running ...
        self._ended_call: FrameType | None = None  # ... and the one whose graph task ended last (held: see below)
        self._reduce: PendingReduce | None = None  # the step's all-reduce in flight (torch.distributed)
        self._reduce_k = 0  # ... and the local microbatch count it carries
        self._ride_out: torch.Tensor | None = None  # ddp=: the statistics reduced with DDP's last bucket
        self._ride_k = -1  # ... and the local microbatch count they carry
        # ddp=: DDP's last bucket has carried the statistics, so none are sent early: not in a backward that turns
        # out not to be the step's last (a step of more microbatches than the one before) either.
        self._rides = False
        self._frozen: dict[torch.Tensor, None] = {}  # parameters that did not require grad when registered
        for group in optimizer.param_groups:
            self._register(group["params"])
        # Held gradients' versions are recorded in the first step of data-parallel training (DDP's first iteration)
        # only: the one time an end-of-backward callback can change them in place (see _adopted_and_modified).
        self._track_versions = self._dp.world_size > 1 and not self._dp.sharded

        self.steps = 0
        self.examples = 0.0
        self._stats: dict[str, float] | None = None  # None: built from _stats_args when asked for
        self._stats_args: tuple | None = None  # ... or, before the first step, from the state as it stands
        self._coord_gradless = 0  # per-coordinate mode: coordinates of the step's parameters without a .grad
        self._warned: set[str] = set()  # the keys of _WARNINGS already given (each once per wrapper)
        self._saw_backward = False  # any backward() reached the parameters since this wrapper was made ...
        self._own_steps = 0  # ... and the steps it has taken (`steps` also counts those of a loaded checkpoint)
        self._last_batch = math.nan
        self._ref_lr_seen = 0.0
        self._peak_pending_bytes = 0
        self._expected_k: int | None = None
        # A controller's count: the full microbatch it was computed for (see `_nominal_microbatch`), its batch, the
        # count; and the largest microbatch of the last step that had backwards (the constructor's until one has),
        # with the controller's batch and the number of local microbatches in that step.
        self._controller_k: tuple[float, int, int | None] | None = None
        self._last_full_micro = float(microbatch_size)
        self._last_full_batch = None if controller is None else controller.batch_size
        self._last_full_k = 0
        # One float32 device buffer, two slots per parameter tensor, read to the host in one piece at step():
        self._sums: torch.Tensor | None = None
        self._small: torch.Tensor | None = None  # its first half: Σ_j |g_j|² per parameter tensor
        self._big: torch.Tensor | None = None  # its second half: |.grad|² per parameter tensor
        self._coord_sq: dict[int, torch.Tensor] = {}  # per-coordinate mode: Σ_j g_j² per parameter
        self._reset_step_stats()
        if ddp is not None:
            self._dp.ride_ddp(ddp, self, self._params)

    # ---- the torch.optim contract ---------------------------------------------------------------------------------

    @property
    def param_groups(self) -> list[dict[str, Any]]:  # type: ignore[override]
        return self.optimizer.param_groups

    @param_groups.setter
    def param_groups(self, value: list[dict[str, Any]]) -> None:
        self.optimizer.param_groups = value

    @property
    def state(self):  # type: ignore[override]
        return self.optimizer.state

    @state.setter
    def state(self, value) -> None:
        self.optimizer.state = value

    @property
    def defaults(self) -> dict[str, Any]:  # type: ignore[override]
        return self.optimizer.defaults

    @defaults.setter
    def defaults(self, value: dict[str, Any]) -> None:
        self.optimizer.defaults = value

    @property
    def _step_supports_amp_scaling(self) -> bool:
        # GradScaler hands fused optimizers `grad_scale`/`found_inf` instead of unscaling: forward them (step()).
        return bool(getattr(self.optimizer, "_step_supports_amp_scaling", False))

    @property
    def microbatch_size(self) -> float:
        """Examples in the next backward call on this rank; set it before a backward whose batch differs."""
        return self._microbatch_size

    @microbatch_size.setter
    def microbatch_size(self, value: float) -> None:
        # Checked when set, in the user's code: a bad size read later inside a backward callback or at step()
        # would surface as a ZeroDivisionError far from its cause.
        _check_positive("microbatch_size", value)
        self._microbatch_size = value

    @property
    def measure_every(self) -> int:
        """Measure one step in this many (see the class docstring); may be changed between steps, e.g. every step
        while the noise scale moves fast early on, then less often (under torch.distributed, on every rank alike). It
        applies from the next step on."""
        return self._measure_every

    @measure_every.setter
    def measure_every(self, value: int) -> None:
        if isinstance(value, bool) or not (isinstance(value, numbers.Integral) and value > 0):
            raise ValueError(f"Invalid measure_every: {value!r}; it must be a positive integer (1 measures every step)")
        self._measure_every = int(value)
        if hasattr(self, "_measuring") and not self._in_backward and not self._sizes:
            # Between steps: the coming step follows the new cadence (mid-step, the step in progress keeps its own).
            self._measuring = self._measure_due()

    def _measure_due(self) -> bool:
        """Whether the coming step is measured: the last of every measure_every, counted in steps taken, any step
        before the first reading, and the step after a measured one that gave none (all the same on every rank)."""
        return self.estimator.steps == 0 or self._measure_missed or (self.steps + 1) % self._measure_every == 0

    def _register_unfrozen(self) -> None:
        """After a step: parameters frozen when registered that now require grad are measured from the next step
        on (the step they were unfrozen in measured the others alone, its sums and norms alike).

        Not under DDP, which buckets and synchronises only the parameters that required grad when it was built.
        A hook that cannot be registered yet (FSDP2 passes requires_grad on at its next unshard) is tried again
        after the next step."""
        if self._dp.world_size > 1 and not self._dp.sharded:
            return
        for p in [p for p in self._frozen if p.requires_grad]:
            try:
                self._register([p])
            except RuntimeError:
                continue
            del self._frozen[p]

    def add_param_group(self, param_group: dict[str, Any]) -> None:
        """Add a group to the wrapped optimizer; its parameters are measured from the next backward on."""
        params = param_group.get("params") if isinstance(param_group, dict) else None
        if isinstance(params, torch.Tensor):
            params = [params]
        elif params is not None and not isinstance(params, set):  # a set: torch's own error below
            params = param_group["params"] = list(params)  # an iterator read once here, as torch does
        for p in params if isinstance(params, list) else []:
            p = p[1] if isinstance(p, tuple) and len(p) == 2 else p  # a named parameter, (name, tensor)
            # With ddp=, refused before the optimizer changes: a parameter it would step but never measure.
            if isinstance(p, torch.Tensor) and p.requires_grad and p not in self._slot and not _is_dtensor(p):
                self._dp._check_ddp_param(p)
        self.optimizer.add_param_group(param_group)
        self._register(self.optimizer.param_groups[-1]["params"])

    def zero_grad(self, set_to_none: bool = True) -> None:
        """Zero the wrapped optimizer's gradients and discard the statistics of a step that was not taken."""
        self.optimizer.zero_grad(set_to_none=set_to_none)
        self._reset_step_stats()

    def state_dict(self) -> dict[str, Any]:
        """The wrapped optimizer's state dict plus a ``"bscale"`` entry with the estimator and counters.

        A bare optimizer of the same type loads it unchanged (the extra key is ignored).
        """
        for hook in self._optimizer_state_dict_pre_hooks.values():
            hook(self)
        sd = self.optimizer.state_dict()
        sd["bscale"] = self.bscale_state_dict()
        for hook in self._optimizer_state_dict_post_hooks.values():
            out = hook(self, sd)
            if out is not None:
                sd = out
        return sd

    def bscale_state_dict(self) -> dict[str, Any]:
        """The ``"bscale"`` entry of :meth:`state_dict` alone: the estimators, counters and controller.

        For checkpoint APIs that build the optimizer's state dict themselves and keep only ``state`` and
        ``param_groups`` (``torch.distributed.checkpoint.state_dict.get_optimizer_state_dict``, used with FSDP2):
        save this beside it and restore it with :meth:`load_bscale_state_dict` after loading theirs.
        """
        return {
            "estimator": self.estimator.state_dict(),
            "layers": {k: v.state_dict() for k, v in self._layer_estimators.items()},
            "layer_pending": dict(self._layer_pending),
            "steps": self.steps,
            "examples": self.examples,
            "ref_batch": self.ref_batch,
            "ref_lr": self.ref_lr,
            "ref_lr_seen": self._ref_lr_seen,
            "warned_one_microbatch": "one_microbatch" in self._warned,
            "last_full_micro": self._last_full_micro,
            "last_full_batch": self._last_full_batch,
            "last_full_k": self._last_full_k,
            "pending_examples": self._pending_examples,
            "measure_missed": self._measure_missed,
            "measure_every": self.measure_every,
            "expected_k": self._expected_k,
            "coord": dict(getattr(self, "_coord", {})),  # the last measured step's per-coordinate readings
            # What the last step's readings are built from: a resumed wrapper reads as the saved one did.
            "last_step": None if self._stats_args is None else list(self._stats_args),
            "last_batch": self._last_batch,
            "controller": None if self.controller is None else self.controller.state_dict(),
        }

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Load a state dict saved by this wrapper (or by the bare optimizer: then the estimator starts fresh)."""
        for hook in self._optimizer_load_state_dict_pre_hooks.values():
            out = hook(self, state_dict)
            if out is not None:
                state_dict = out
        state_dict = dict(state_dict)
        ours = state_dict.pop("bscale", None)
        self.optimizer.load_state_dict(state_dict)
        if ours is not None:
            self._load_ours(ours)
        else:
            # A bare optimizer's checkpoint: readings taken before the load belong to another trajectory.
            self.estimator.reset()
            self._layer_estimators = {}
            self._layer_pending = {}
            self._pending_examples = 0.0
            self._measure_missed = False
            self._coord = {}
            self._stats_args, self._stats = None, None
        self._reset_step_stats()
        for hook in self._optimizer_load_state_dict_post_hooks.values():
            hook(self)

    def __getstate__(self) -> dict[str, Any]:
        # Optimizer.__getstate__ keeps defaults, state and param_groups only, which would make a copy without its
        # inner optimizer, hooks or estimator: copying and pickling are refused, with what to do instead.
        raise TypeError(
            "bscale: a wrapped optimizer cannot be copied or pickled (its hooks live on the model's parameters); "
            "save opt.state_dict() and load it into a new bscale.wrap(...) of the copied model's optimizer"
        )

    def load_bscale_state_dict(self, state: dict[str, Any]) -> None:
        """Restore what :meth:`bscale_state_dict` saved (the optimizer's own state is loaded separately)."""
        if not isinstance(state, dict) or "estimator" not in state:
            raise ValueError(
                "load_bscale_state_dict takes the dict that bscale_state_dict() returned (the 'bscale' entry of "
                f"state_dict()), got {type(state).__name__}"
            )
        self._load_ours(state)
        self._reset_step_stats()

    def _load_ours(self, ours: dict[str, Any]) -> None:
        """The estimators, counters and controller from a ``"bscale"`` entry."""
        self.estimator.load_state_dict(ours["estimator"])
        self._layer_estimators = {}
        for name, st in ours.get("layers", {}).items():
            est = NoiseScaleEstimator(self.estimator.beta)
            est.load_state_dict(st)
            self._layer_estimators[name] = est
        self.steps = ours["steps"]
        self.examples = ours["examples"]
        self.ref_batch = ours["ref_batch"]
        self.ref_lr = ours["ref_lr"]
        self._ref_lr_seen = ours.get("ref_lr_seen", 0.0)
        self._last_full_micro = ours.get("last_full_micro", self._last_full_micro)
        self._last_full_batch = ours.get("last_full_batch", self._last_full_batch)
        self._last_full_k = ours.get("last_full_k", self._last_full_k)
        self._pending_examples = ours.get("pending_examples", 0.0)
        self._layer_pending = dict(ours.get("layer_pending", {}))
        self._measure_missed = ours.get("measure_missed", False)
        self.measure_every = ours.get("measure_every", self.measure_every)
        # The count the next step is expected to reach: a resumed run reads .grad when the uninterrupted one would.
        self._expected_k = ours.get("expected_k", self._last_full_k or None)
        self._coord = dict(ours.get("coord", {})) if self.per_coordinate else {}
        if ours.get("warned_one_microbatch", False):
            self._warned.add("one_microbatch")
        else:
            self._warned.discard("one_microbatch")
        if self.controller is not None and ours.get("controller") is not None:
            self.controller.load_state_dict(ours["controller"])
        # The readings are those of the loaded state, as the saved wrapper gave them after its last step.
        last = ours.get("last_step")
        self._stats_args, self._stats = (None if last is None else tuple(last)), None
        self._last_batch = ours.get("last_batch", self._last_batch)

    def __repr__(self) -> str:
        return f"bscale.{type(self).__name__}({self.optimizer!r}, rule={self.rule!r}, law={self.law!r})"

    # ---- capture during backward ----------------------------------------------------------------------------------

    def _register(self, params: Iterable[torch.Tensor]) -> None:
        for p in params:
            if p in self._slot:
                continue
            if not p.requires_grad:  # frozen (no hook can be put on it): registered once it is unfrozen
                self._frozen[p] = None
                continue
            slot = len(self._params)
            # The hook first: a parameter whose hook cannot be registered gets no slot either.
            self._hook_handles.append(self._dp.register_grad_hook(p, self._make_hook(slot, p)))
            self._params.append(p)
            self._slot[p] = slot
            name = self._param_names.get(p, f"param{slot}") if self._param_names is not None else f"param{slot}"
            layer = name.rsplit(".", 1)[0] if "." in name else name
            if layer not in self._layers:
                self._layers.append(layer)
            self._layer_of_slot.append(self._layers.index(layer))
        self._slots_cache: dict[tuple[int, ...], torch.Tensor] = {}

    def _make_hook(self, slot: int, p: torch.Tensor) -> Callable[[torch.Tensor], None]:
        # A weak reference: the parameters outlive a wrapper the user dropped (a new optimizer for the same
        # model), and a strong one would keep it alive, measuring on every backward, for as long as they live.
        ref = weakref.ref(self)
        if p.dtype != torch.float64 and self._backend_for(p.device) == "torch":
            # Eager torch: the gradient is held (an alias) and normed with the backward's others in one op when
            # the backward ends (or `bucket_mb` fills). In the middle of a backward, each op costs far more than
            # measured alone (code and data are out of cache there): the fewer ops, the cheaper.
            held_append, held_slots_append = self._held.append, self._held_slots.append
            held_versions_append = self._held_versions.append
            nbytes = p.numel() * p.element_size()

            def held_hook(grad: torch.Tensor) -> None:
                opt = ref()
                if opt is not None and not opt._skipping:
                    if not opt._in_backward and not opt._begin_backward(slot):
                        return
                    if not opt._measuring:  # a step left unmeasured (measure_every): the backward is only counted
                        return
                    if grad.is_sparse or grad.is_complex():
                        opt._on_unusual_grad(grad, slot)
                        return
                    if grad.dtype is torch.float64:  # the model was moved to float64 after wrapping
                        opt._on_grad(grad, slot)
                        return
                    # .data: an alias with a TensorImpl of its own (so AccumulateGrad can still adopt the gradient
                    # as .grad without a copy), made without an op dispatch, unlike detach().
                    held_append(grad.data)
                    held_slots_append(slot)
                    if opt._track_versions:  # the first data-parallel step only (see _adopted_and_modified)
                        held_versions_append(grad._version)
                    opt._held_bytes += nbytes
                    if opt._held_bytes >= opt._bucket_bytes:
                        opt._norm_held()

            return held_hook

        def hook(grad: torch.Tensor) -> None:
            opt = ref()
            if opt is not None and not opt._skipping:
                opt._on_grad(grad, slot)

        return hook

    def _begin_backward(self, slot: int) -> bool:
        """At the first hook of a graph task (``slot``'s): True for a backward that accumulates into ``.grad`` (a
        microbatch), False for ``torch.autograd.grad()``, whose hooks are then ignored until it ends (a gradient
        penalty computed that way is not a microbatch)."""
        engine = torch.autograd.Variable._execution_engine
        call, grad = _backward_call()
        if grad:
            self._skipping = True
            engine.queue_callback(self._end_skipping)
            return False
        if call is not None and call is self._ended_call and self._sizes:
            # The backward that just ended ran nested in the same backward() call as this one (reentrant
            # activation checkpointing: checkpoint(..., use_reentrant=True) runs its part's backward as a graph
            # task of its own): one microbatch, which ends with the call. The count is taken back; the norms stay;
            # .grad is read again when the call ends.
            self._sizes.pop()
            self._drop_reduce()
        elif self._sizes and self._grads_discarded():
            # .grad was set to None since the last backward, without a step (model.zero_grad(), say): the
            # statistics of the microbatches it held go with it, as with this wrapper's own zero_grad().
            self._reset_step_stats()
        self._first_slot = slot
        self._call = call
        self._in_backward = True
        self._saw_backward = True
        # Runs once when this backward finishes, before DDP's own end-of-backward work (queued later).
        engine.queue_callback(self._end_backward)
        return True

    def _mark_grad(self) -> None:
        """After a backward: remember a parameter it gave a gradient, to tell at the next backward whether
        ``.grad`` was set to None in between (`_grads_discarded`)."""
        slot = self._first_slot
        self._grad_mark = slot if self._params[slot].grad is not None else None

    def _grads_discarded(self) -> bool:
        """Whether the parameter `_mark_grad` remembered has lost its ``.grad`` since: one attribute test per
        backward. Only None counts: the tensor can legitimately change between backwards (DDP points ``.grad``
        at a rebuilt bucket; in-place ops, a clip included, bump its version; several parameters' gradients can
        share one version counter), so zeroing in place (``set_to_none=False``) is not seen. Not under FSDP2,
        which may leave ``.grad`` unset between backwards that do not synchronise."""
        slot = self._grad_mark
        return slot is not None and not self._dp.sharded and self._params[slot].grad is None

    def _end_skipping(self) -> None:
        self._skipping = False

    # The statistics' ops run without autograd: backward(create_graph=True) leaves .grad differentiable.
    @torch.no_grad()
    def _on_unusual_grad(self, grad: torch.Tensor, slot: int) -> None:
        """A sparse gradient (``nn.Embedding(sparse=True)``) or a complex one: its norm, taken now."""
        if self.per_coordinate:
            kind = "a sparse one (nn.Embedding(sparse=True) or similar)" if grad.is_sparse else "a complex one"
            raise RuntimeError(
                f"bscale: per_coordinate=True needs dense real gradients, and a parameter got {kind}: wrap "
                "without per_coordinate, or give that parameter a dense real gradient"
            )
        self._step_norms.append(_unusual_norm(grad))
        self._step_norm_slots.append(slot)

    def _on_grad(self, grad: torch.Tensor, slot: int) -> None:
        if not self._in_backward and not self._begin_backward(slot):
            return
        if not self._measuring:
            return
        if grad.is_sparse or grad.is_complex():
            self._on_unusual_grad(grad, slot)
            return
        # A detached alias keeps AccumulateGrad free to adopt the gradient as .grad without a copy.
        g = grad.detach()
        if self._backend_for(g.device) == "torch":
            # Eager torch, a float64 gradient (which `_foreach_norm` will not narrow to float32): its norm now.
            if self._coord_norms(g.device):
                self._coord_buffer(slot, g).addcmul_(g, g)  # the norms come from the sums of squares
                return
            if g.dtype == torch.float64:  # vector_norm will not narrow float64: round its norm instead
                self._step_norms.append(torch.linalg.vector_norm(g).float())
            else:
                self._step_norms.append(torch.linalg.vector_norm(g, dtype=torch.float32))
            self._step_norm_slots.append(slot)
            if self.per_coordinate:
                self._coord_buffer(slot, g).addcmul_(g, g)  # float32 buffer: g*g is promoted before rounding
            return
        self._pending.append(g)
        self._pending_slots.append(slot)
        self._pending_bytes += g.numel() * g.element_size()
        if self._pending_bytes > self._peak_pending_bytes:
            self._peak_pending_bytes = self._pending_bytes
        if self._pending_bytes >= self._bucket_bytes:
            self._flush()

    @torch.no_grad()
    def _add_norms(self) -> None:
        """Add the step's gradient norms taken so far into the per-parameter sums: three ops for all of them."""
        if not self._step_norms:
            return
        device = self._step_norms[0].device
        self._ensure_sums(device)
        squares = torch.stack(self._step_norms).square_()
        self._small.index_add_(0, self._slots_tensor(self._step_norm_slots, device), squares)
        self._step_norms.clear()
        self._step_norm_slots.clear()

    def _flush(self) -> None:
        if not self._pending:
            return
        device = self._pending[0].device
        self._ensure_sums(device)
        coord = None
        if self.per_coordinate:
            coord = [self._coord_buffer(s, g) for s, g in zip(self._pending_slots, self._pending, strict=True)]
        accumulate_sq_norms_trusted(
            self._pending,
            self._small,
            self._slots_tensor(self._pending_slots, device),
            coord,
            self._backend_for(device),
        )
        self._pending, self._pending_slots, self._pending_bytes = [], [], 0

    def _coord_norms(self, device: torch.device) -> bool:
        """Per-coordinate mode with the torch backend on the CPU: the squared norms come from the per-coordinate
        sums (see `_read_accumulated`), not from norm ops of their own."""
        return self.per_coordinate and device.type == "cpu" and self._backend_for(device) == "torch"

    def _big_slots(self) -> range:
        """The slots of ``|.grad|²`` in ``_sums`` (its second half), in parameter order."""
        n = len(self._params)
        return range(n, 2 * n)

    def _ensure_sums(self, device: torch.device) -> None:
        """Allocate the zeroed per-parameter sums on `device` unless they are there with one slot per parameter."""
        n = len(self._params)
        if self._sums is None or self._sums.device != device or self._sums.numel() != 2 * n:
            self._sums = torch.zeros(2 * n, dtype=torch.float32, device=device)
            self._small, self._big = self._sums[:n], self._sums[n:]

    def _backend_for(self, device: torch.device) -> str:
        # Resolved once per device (the choice cannot change mid-run); the per-microbatch calls skip it.
        b = self._backends.get(device)
        if b is None:
            b = self._backends[device] = resolve_backend(self.backend, [torch.empty(0, device=device)])
        return b

    def _slots_tensor(self, slots: list[int], device: torch.device) -> torch.Tensor:
        key = (*slots, -1, device.index or 0) if device.type != "cpu" else tuple(slots)
        t = self._slots_cache.get(key)
        if t is None:
            if len(self._slots_cache) >= 64:
                # A model whose gradients arrive in a new order every step (conditional branches) would
                # otherwise grow this without bound; a usual run needs a handful (one per accumulation count).
                self._slots_cache.clear()
            t = torch.tensor(slots, dtype=torch.int64, device=device)
            self._slots_cache[key] = t
        return t

    def _coord_buffer(self, slot: int, g: torch.Tensor) -> torch.Tensor:
        buf = self._coord_sq.get(slot)
        if buf is None:
            buf = torch.zeros(g.shape, dtype=torch.float32, device=g.device)
            self._coord_sq[slot] = buf
        return buf

    def _adopted_and_modified(self) -> bool:
        """Whether a held gradient that became ``.grad`` (adopted, not added: the step's first backward) was
        changed in place before its norm was taken: by an end-of-backward callback queued before this wrapper's,
        such as the gradient all-reduce of DDP's first iteration with ``static_graph=True``. Its norm would then
        be of the changed (averaged) gradient, not of the microbatch's. Checked in the first step of data-parallel
        training only, DDP's first iteration: at other times only the user's own in-place gradient hooks change
        it, and a step left out for them would be every step."""
        if self._sizes or not self._track_versions or self._dp.sharded:
            return False
        params = self._params
        for g, slot, version in zip(self._held, self._held_slots, self._held_versions, strict=True):
            grad = params[slot].grad
            if grad is not None and grad._version != version and grad.data_ptr() == g.data_ptr():
                return True
        return False

    @torch.no_grad()
    def _norm_held(self) -> None:
        """Norm the held gradients (one op) and flush the pending ones."""
        if self._held:
            if self._adopted_and_modified():
                self._held_modified = True
            self._peak_held_bytes = max(self._peak_held_bytes, self._held_bytes)
            if self.per_coordinate:  # float32 buffers: g*g is promoted before rounding
                bufs = [self._coord_buffer(s, g) for s, g in zip(self._held_slots, self._held, strict=True)]
                torch._foreach_addcmul_(bufs, self._held, self._held)
            if not self._coord_norms(self._held[0].device):
                self._step_norms.extend(torch._foreach_norm(self._held, 2, dtype=torch.float32))
                self._step_norm_slots.extend(self._held_slots)
            self._held.clear()
            self._held_slots.clear()
            self._held_versions.clear()
            self._held_bytes = 0
        self._flush()

    def _end_backward(self) -> None:
        self._ended_call, self._call = self._call, None
        rode = self._ride_k == len(self._sizes) + 1  # DDP's last bucket carried this backward's statistics
        if rode and (self._held or self._pending or self._step_norms):
            # Only parameters DDP synchronises are accepted with ddp=, and all of theirs precede its last bucket.
            raise RuntimeError(
                "bscale: gradients arrived after DDP's last bucket had carried this backward's statistics; "
                "with ddp=, every parameter of the optimizer must be one DDP synchronises: drop ddp="
            )
        if self._held or self._pending:  # none on a step left unmeasured
            self._norm_held()
        self._in_backward = False
        self._sizes.append(float(self.microbatch_size))
        # Only the step's last backward leaves the .grad that matters, so |.grad|² is read once per step: at the
        # backward that completes the expected accumulation count (last step's, or the controller's), or the one
        # DDP synchronised (ddp=). Queued from inside a callback, the read runs after every callback already
        # queued (DDP's gradient synchronisation among them), so it sees the averaged .grad, still unclipped
        # and unscaled.
        engine = torch.autograd.Variable._execution_engine
        expected = self._expected_count()
        if rode or expected is None or len(self._sizes) >= expected:
            engine.queue_callback(self._read_accumulated)
        else:
            self._have_big = False
            engine.queue_callback(self._note_versions)

    def _local_grads(self) -> list[torch.Tensor | None]:
        if self._dp.sharded:
            return [self._dp.local_grad(p) for p in self._params]
        return [p.grad for p in self._params]  # plain tensors: .grad is the local gradient

    def _grad_versions(self) -> list[int]:
        return [-1 if g is None else g._version for g in self._local_grads()]

    def _note_versions(self) -> None:
        # In-place changes (clipping, GradScaler's unscale) bump these: step() reads .grad late only if none did.
        if self._measuring:
            self._versions = self._grad_versions()
        self._mark_grad()

    def _read_late(self) -> bool:
        """At step(), after fewer backwards than expected: read |.grad|² now if nothing modified it since."""
        if self._versions is None or self._versions != self._grad_versions() or self._unscaled_by_scaler():
            return False
        self._read_accumulated()
        return self._have_big

    def _unscaled_by_scaler(self) -> bool:
        """Whether the ``grad_scaler`` has unscaled ``.grad`` in place this step (its ``unscale_()``, or its
        ``step()`` on a non-fused optimizer), which leaves ``.grad``'s version as it was."""
        scaler = self.grad_scaler
        states = getattr(scaler, "_per_optimizer_states", None)
        if states is None or not scaler.is_enabled():
            return False
        from torch.amp.grad_scaler import OptState

        state = states.get(id(self))  # a defaultdict: get() adds no entry
        return state is not None and state.get("stage") is OptState.UNSCALED

    @torch.no_grad()
    def _read_accumulated(self) -> None:
        self._mark_grad()
        grads = self._local_grads()
        present = [i for i, g in enumerate(grads) if g is not None]
        if not present:
            self._add_norms()
            self._have_big = False
            return
        device = grads[present[0]].device
        self._ensure_sums(device)
        if self._measuring:
            self._read_norms(grads, present, device)
            if self._held_modified:
                # A held gradient changed in place before its norm: left out, on every rank, by the NaN that the
                # reduction launched below (or riding DDP's bucket) carries (_update_estimates).
                self._big.fill_(math.nan)
        self._local_microbatches = self._dp.local_microbatches(len(self._sizes))
        if self._dp.world_size > 1 and self._reduce is None:
            # Also on a step left unmeasured: the collective carries the step's microbatch counts and examples.
            if self._ride_out is not None and self._ride_k == len(self._sizes):
                # ddp=: the statistics came back with DDP's last bucket; the synchronised gradient's norms are
                # the same on every rank and need no reduction.
                self._reduce = self._dp.rode(self._ride_out, self._big)
                self._reduce_k = self._ride_k
            elif len(self._sizes) == self._expected_count() and not self._rides:
                # The expected last backward: the ranks have just synchronised their gradients, so launch the
                # step's one all-reduce now and let it run while they clip and step. (Without an expected count,
                # e.g. on the first step, it is launched in step(): one collective per step on every rank, so
                # ranks that ran fewer microbatches than the others are still told apart, not left waiting.)
                self._start_reduce()

    def _read_norms(self, grads: list[torch.Tensor | None], present: list[int], device: torch.device) -> None:
        """The squared norms of the accumulated ``.grad`` (``grads``, per slot; ``present``: those not None) into the
        sums, with the microbatches' norms still pending, and the per-coordinate summaries."""
        backend = self._backend_for(device)
        if self._coord_norms(device):
            # Per-coordinate mode on the CPU: the sums of squares already hold Σ_j g_j², and the per-coordinate pass
            # over .grad gives |.grad|²: no norm op, per microbatch or here (fewer than 2 microbatches: none needed).
            self._add_norms()
            self._coord_out = self._coordinate_stats(len(self._sizes), grads, with_norms=True)
        elif len(present) == len(grads) and backend == "torch" and all(_foreach_normable(g) for g in grads):
            # Every parameter has a gradient (the usual case): these norms and the microbatches' go into the sums
            # together, in four ops for all of them (each op run as a backward ends costs ~10x its time alone).
            if self._have_big:  # read before in this step (more backwards followed): replaced, not added to
                self._big.zero_()
            norms = [*self._step_norms, *torch._foreach_norm(grads, 2, dtype=torch.float32)]
            slots = self._slots_tensor([*self._step_norm_slots, *self._big_slots()], device)
            self._sums.index_add_(0, slots, torch.stack(norms).square_())
            self._step_norms.clear()
            self._step_norm_slots.clear()
        else:
            self._add_norms()
            self._big.zero_()
            accumulate_sq_norms_trusted(
                [grads[i] for i in present], self._big, self._slots_tensor(present, device), None, backend
            )
        self._have_big = True
        if self.per_coordinate and not self._coord_norms(device):
            # Taken with |.grad|², before the user can clip or unscale .grad in place: the per-coordinate sums of
            # squares hold the unmodified microbatch gradients, and S must be their unmodified sum.
            self._coord_out = self._coordinate_stats(len(self._sizes), grads)

    def _ride_payload(self, device: torch.device) -> torch.Tensor:
        """ddp=: called by the DDP hook when the last gradient bucket of a synchronising backward is ready (every
        parameter's gradient of this backward has passed its hook): this rank's ``[small..., k, k², Σ1/b, Σb in two
        parts]`` including the backward in progress, the same length on every rank."""
        self._drop_reduce()  # a collective sent for fewer microbatches (every rank sent it): complete it
        sizes = list(self._sizes)
        if self._in_backward:
            self._norm_held()
            sizes.append(float(self.microbatch_size))
        self._add_norms()
        if self._sums is None:
            self._ensure_sums(device)
        if self._held_modified:
            # A held gradient changed in place before its norm: the synchronised .grad's norm is the same on every
            # rank, so the NaN that leaves the step out on every rank rides in this rank's microbatch sums.
            self._small.fill_(math.nan)
        self._ride_k, self._ride_out = len(sizes), None
        self._rides = True
        return self._dp.ride_payload(self._small, sizes)

    def _ride_arrived(self, reduced: torch.Tensor) -> None:
        self._ride_out = reduced

    def _start_reduce(self) -> None:
        self._reduce_k = len(self._sizes)
        self._reduce = self._dp.start_reduce(
            self._pack_local(),
            k_local=self._reduce_k,
            inv_sizes=math.fsum(1.0 / s for s in self._sizes),
            examples=math.fsum(self._sizes),
            big_slice=slice(len(self._params), 2 * len(self._params)),
        )

    def _drop_reduce(self) -> None:
        if self._reduce is not None:
            if self._reduce.work is not None:
                self._reduce.work.wait()  # every rank launched it: complete it, then forget it
            self._reduce = None

    def _pack_local(self) -> torch.Tensor:
        """This rank's per-parameter sums on the device, ``[small..., big...]``, the big ones weighted by their
        share of the synchronised gradient's squared norm (1/W replicated under DDP, 1 sharded under FSDP2)."""
        w = self._dp.grad_weights(self._params, self._sums.device)
        if isinstance(w, float) and w == 1.0:
            return self._sums
        return torch.cat([self._small, self._big * w])

    def _reset_step_stats(self) -> None:
        self._drop_reduce()
        self._ride_out, self._ride_k = None, -1
        self._pending: list[torch.Tensor] = []
        self._pending_slots: list[int] = []
        # Cleared, never replaced: the torch-backend hooks hold these lists' append methods.
        self._step_norms.clear()
        self._step_norm_slots.clear()
        self._held.clear()
        self._held_slots.clear()
        self._held_versions.clear()
        self._held_bytes = 0
        self._held_modified = False  # a held gradient changed in place before its norm (see _norm_held)
        self._pending_bytes = 0
        self._in_backward = False
        self._skipping = False  # an autograd.grad() that raised never ran its end callback
        self._ended_call = None
        self._first_slot = 0
        self._grad_mark: int | None = None
        self._sizes: list[float] = []
        # Persistent device buffer (two float32 per parameter tensor), zeroed rather than reallocated.
        if self._sums is not None:
            self._sums.zero_()
        self._have_big = False
        self._local_microbatches = 0
        self._versions: list[int] | None = None
        # Per-coordinate mode: the sums of squares restart (one op; a step left unmeasured left them at zero), and a
        # reading not consumed is dropped.
        self._coord_out: tuple[int, torch.Tensor] | None = None
        if self._coord_sq and getattr(self, "_measuring", True):
            torch._foreach_zero_(list(self._coord_sq.values()))
        self._measuring = self._measure_due()

    # ---- the step -------------------------------------------------------------------------------------------------

    @torch.no_grad()
    def step(self, closure: Callable[[], float] | None = None) -> float | None:  # type: ignore[override]
        """Read this step's statistics, update the estimator, then step the wrapped optimizer with scaled LRs.

        Args:
            closure: re-evaluates the model and returns the loss (its backward counts as one microbatch).
        """
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        self._amp_skipped = False
        if self._sizes:
            self._last_full_micro = max(self._sizes)
            self._last_full_batch = None if self.controller is None else self.controller.batch_size
            self._last_full_k = len(self._sizes)
        if self._in_backward and torch._C._current_graph_task_id() == -1:
            # A backward() whose end the wrapper never saw (and not one this step() runs inside, as an optimizer
            # stepped from a post-accumulate hook does): its statistics and those of later backwards are
            # incomplete, so the step is left out (and the state starts afresh for the next one).
            self._warn_once("unfinished_backward")
            self._reset_step_stats()
        readings_before = self.estimator.steps
        batch = self._update_estimates()
        # A step meant to be measured that gave no reading (left out, or skipped by GradScaler): the next is measured.
        self._measure_missed = self._measuring and self.estimator.steps == readings_before
        scale = self._lr_scale(batch)
        saved = self._apply_scaling(scale, batch)
        fused_amp = hasattr(self, "grad_scale")
        if fused_amp:
            self.optimizer.grad_scale = self.grad_scale
            self.optimizer.found_inf = self.found_inf
        try:
            self.optimizer.step()
        finally:
            if fused_amp:
                del self.optimizer.grad_scale, self.optimizer.found_inf
            self._restore(saved)
        if self._amp_skipped:
            # GradScaler found inf/NaN: the fused optimizer left the parameters alone (a non-fused one is not
            # stepped at all), so nothing is counted and both paths leave identical counters and readings.
            self._reset_step_stats()
            return loss
        self.steps += 1
        self._own_steps += 1
        self._track_versions = False
        self._finish_stats(batch, scale)
        if self._dp.debug:
            self._dp.check_same(self._readings())  # every rank must hold these exact readings
        if self.controller is not None:
            self.controller.observe(self._readings())
        if self.loggers and self.steps % self.log_every == 0:
            for logger in self.loggers:
                logger.log(self._readings(), self.steps)
        self._reset_step_stats()
        if self._frozen:
            self._register_unfrozen()
        return loss

    def _scaler_scale(self) -> torch.Tensor | float:
        """The loss scale the captured gradients carry (GradScaler), as a device tensor when possible."""
        if hasattr(self, "grad_scale") and self.grad_scale is not None:
            return self.grad_scale
        if self.grad_scaler is not None and self.grad_scaler.is_enabled():
            getter = getattr(self.grad_scaler, "_get_scale_async", None)
            s = getter() if getter is not None else None
            return s if s is not None else self.grad_scaler.get_scale()
        return 1.0

    def _update_estimates(self) -> float:
        """Consume the step's sums (one host sync), update the estimators; return the step's global batch size."""
        k_local = len(self._sizes)
        self._step_microbatches = float(k_local * self._dp.world_size)
        self._add_norms()
        if k_local == 0 and self._dp.world_size > 1 and self._params:
            # No backward reached these parameters on this rank. The others may have had some: this rank still
            # sends the step's collective (zeros), so that unequal counts raise the usual error instead of
            # leaving the ranks' collectives out of step.
            self._ensure_sums(self._params[0].device)
            if self._reduce is None:
                self._start_reduce()
            self._dp.finish_reduce(self._reduce)
            self._reduce = None
            return self._last_batch
        if k_local == 0:
            # No backward since the last step: nothing to measure; the batch is unknown, keep the previous one.
            return self._last_batch
        if self._sums is None:  # a fresh wrapper's unmeasured first step read before its expected count
            self._ensure_sums(self._params[0].device)
        self._expected_k = k_local  # the next step most likely accumulates as many microbatches
        # Fewer backwards than expected, and .grad was modified (clipped, unscaled) before step(): its unmodified
        # value is gone, so this one step is left out of the estimate (the next one reads in time). Its examples
        # are still counted, and its batch size is still the one the LR is scaled for.
        # A microbatch's norm taken after its gradient was changed in place is no reading either.
        # A step left unmeasured (measure_every) reads like an unread one: counted, not measured.
        unread = not self._measuring or self._held_modified or (not self._have_big and not self._read_late())
        if unread and self._measuring:
            # NaN in this rank's |.grad|² reaches every rank through the step's reduction: all leave the step out,
            # even where other ranks could read theirs (their estimators must stay identical). (An unmeasured step
            # is one on every rank.)
            self._big.fill_(math.nan)
        found_inf = getattr(self, "found_inf", None)
        scale = self._scaler_scale()
        device = self._sums.device
        # This rank's own: the loss scale and GradScaler's overflow flag (the same on every rank, see
        # distributed.py), and the per-coordinate summaries (single process). Device values join the one read.
        own: list[torch.Tensor] = []
        if isinstance(found_inf, torch.Tensor) or isinstance(scale, torch.Tensor):
            own.append(torch.as_tensor(0.0 if found_inf is None else found_inf, device=device).reshape(1).float())
            own.append(torch.as_tensor(scale, device=device).reshape(1).float())
        # The per-coordinate summaries taken when .grad was read, if that read saw every backward of the step.
        coord = self._coord_out[1] if self._coord_out is not None and self._coord_out[0] == k_local else None
        if coord is not None:
            own.append(coord)
        flags = torch.cat(own) if own else None
        if self._dp.world_size > 1:
            if self._reduce is not None and self._reduce_k != k_local:
                # More backwards followed the expected last one (on every rank alike, or the counts check below
                # fails): complete that collective and send the whole step's statistics again.
                self._drop_reduce()
            if self._reduce is None:
                self._start_reduce()
            # Cross-rank sums of the microbatch statistics and counts, usually complete by now.
            reduced = self._dp.finish_reduce(self._reduce, flags)
            self._reduce = None
        else:
            # An unmeasured step reads only its flags, if any (its sums were never added to).
            packed = self._pack_local() if self._measuring else self._sums[:0]
            if flags is None:
                local = packed.tolist() if packed.numel() else []  # the step's one host sync
            else:
                local = torch.cat([packed, flags]).tolist()
            n = packed.numel()
            reduced = {
                "values": local[:n],
                "extra": local[n:],
                "microbatches": k_local,
                "inv_sizes": math.fsum(1.0 / s for s in self._sizes),
                "examples": math.fsum(self._sizes),
            }
        values, extra = reduced["values"], reduced["extra"]
        k, inv_sizes_total = reduced["microbatches"], reduced["inv_sizes"]
        self._step_microbatches = float(k)
        # .grad holds c·m·ḡ: m = the local accumulation count under DDP and FSDP2 (see DataParallel).
        m = self._local_microbatches or k_local
        b = k / inv_sizes_total  # harmonic mean of the microbatch sizes (see NoiseScaleEstimator)
        B = k * b  # the estimator's big batch; with unequal microbatches fewer than the examples seen:
        examples = reduced["examples"]  # the step's true batch size, Σ_j b_j over every rank
        P = len(self._params)
        small_sums, big_sums = values[:P], values[P:]
        small_sum, big_sum = math.fsum(small_sums), math.fsum(big_sums)
        if isinstance(found_inf, torch.Tensor) or isinstance(scale, torch.Tensor):
            inf_flag, loss_scale = extra[:2]
            extra = extra[2:]
        else:
            inf_flag, loss_scale = (0.0 if found_inf is None else float(found_inf)), float(scale)
        self._last_batch = examples
        self._amp_skipped = inf_flag > 0
        if unread or inf_flag > 0 or not (math.isfinite(small_sum) and math.isfinite(big_sum)) or loss_scale == 0:
            if inf_flag <= 0:
                self._pending_examples += examples  # trained on: they weigh the next measurement
            return examples
        # Units: hooks see c·g_j, .grad holds c·k_local·ḡ, c = loss scale × (1/k_local if the loss is a mean).
        c = loss_scale * (1.0 / k_local if self.loss_reduction == "mean" else 1.0)
        to_true = 1.0 / (c * c)
        small = small_sum / k * to_true
        big_sq = big_sum / (m**2) * to_true
        if k < 2:
            self._warn_once("one_microbatch")
            self._pending_examples += examples
            return examples
        # The examples since the last measurement: this step's, and those of the steps before it that were left
        # unmeasured or left out.
        seen = examples + self._pending_examples
        self._pending_examples = 0.0
        if self.estimator.ref_batch is None:
            # beta counts steps of the first measured step's own batch, not of the examples pooled before it.
            self.estimator.ref_batch = examples
        self.estimator.update(small, big_sq, b, B, seen)
        if self._param_names is not None:
            L = len(self._layers)
            lay_small, lay_big = [0.0] * L, [0.0] * L
            for slot, layer in enumerate(self._layer_of_slot):
                lay_small[layer] += small_sums[slot]
                lay_big[layer] += big_sums[slot]
            for name, s, g in zip(self._layers, lay_small, lay_big, strict=True):
                if s == 0.0 and g == 0.0:
                    # No gradient reached this module this step (frozen, an unused branch, an expert no token was
                    # routed to): nothing measured, so its average is left as it stands rather than fed zeros, and
                    # the step's examples weigh its next measurement (its horizon stays the same in examples).
                    self._layer_pending[name] = self._layer_pending.get(name, 0.0) + seen
                    continue
                pooled = seen + self._layer_pending.pop(name, 0.0)
                self._sub_estimator(name).update(s / k * to_true, g / m**2 * to_true, b, B, pooled)
        if coord is not None:
            self._record_coordinate_stats(extra, k, b, B, c, seen, tuple(self._sizes))
        return examples

    def _sub_estimator(self, name: str) -> NoiseScaleEstimator:
        """The estimator of one module (or of the Adam-preconditioned gradient), smoothed like the whole model's."""
        est = self._layer_estimators.get(name)
        if est is None:
            est = NoiseScaleEstimator(self.estimator.beta, ref_batch=self.estimator.ref_batch)
            self._layer_estimators[name] = est
        return est

    def _warn_once(self, key: str) -> None:
        """Give the warning `_WARNINGS[key]` unless this wrapper already has."""
        if key not in self._warned:
            self._warned.add(key)
            warnings.warn(_WARNINGS[key], RuntimeWarning, stacklevel=_caller_stacklevel())

    # ---- per-coordinate statistics (opt-in) -----------------------------------------------------------------------

    _COORD_KEYS = SLOTS  # the kernels' output vector: these sums, then the SNR histogram
    # The per-coordinate readings in `stats` (`_record_coordinate_stats`), the histogram's bins with the default edges.
    _COORD_READINGS = (
        "coord/sum_mu_sq",
        "coord/sum_sigma_sq",
        "coord/sum_mu_sq_over_sigma",
        "coord/frac_small_batch",
        "coord/frac_small_batch_noise_only",
        "coord/frac_no_grad",
        *(f"coord/snr_hist/{i}" for i in range(len(DEFAULT_SNR_EDGES) + 1)),
    )

    def _coordinate_stats(
        self, k_local: int, local_grads: list[torch.Tensor | None], with_norms: bool = False
    ) -> tuple[int, torch.Tensor] | None:
        """``(k_local, the kernel's output vector)`` from the unmodified ``.grad`` (``local_grads``, per slot), the
        sums of squares (left as they are: more backwards may follow) and Adam's v; None if it cannot be taken.
        `with_norms` (CPU): also put each parameter's Σ_j |g_j|² and |.grad|² into the sums, from the same pass."""
        slots = sorted(self._coord_sq)
        if k_local < 2 or not slots:
            return None
        grads, bufs, vs, used = [], [], [], []
        # The trainable parameters no measured backward reached, whatever zero_grad left in their .grad (None, or
        # zeros): without a gradient this step, or without a buffer yet. Frozen ones count nowhere.
        self._coord_gradless = sum(
            p.numel()
            for s, (p, g) in enumerate(zip(self._params, local_grads, strict=True))
            if p.requires_grad and (g is None or s not in self._coord_sq)
        )
        for s in slots:
            p = self._params[s]
            g = local_grads[s]
            if g is None or not p.requires_grad:
                continue
            used.append(s)
            grads.append(g)
            bufs.append(self._coord_sq[s])
            st = self.optimizer.state.get(p, {})
            vs.append(st.get("exp_avg_sq"))
        if not grads:
            return None
        use_v = all(v is not None for v in vs)
        self._coord_precond = use_v
        b = k_local / math.fsum(1.0 / s for s in self._sizes)
        # P = 1/(√v + ε) with the optimizer's own ε (the first group's, where groups differ).
        eps = float(self.param_groups[0].get("eps", 1e-8)) if use_v else 1e-8
        # .grad holds c·k·ḡ while the buffer holds Σ_j (c g_j)²: pass .grad as the sum S = Σ_j c g_j. Checked
        # once, when the buffers were made: the vector comes back as is, the SLOTS (= _COORD_KEYS) then the
        # histogram, in the one read of the step.
        if with_norms:
            out, norms = coordinate_stats_and_sq_norms_cpu(grads, bufs, vs if use_v else None, k_local, b, eps)
            n = len(self._params)
            self._sums.index_copy_(0, self._slots_tensor([*used, *(s + n for s in used)], out.device), norms.view(-1))
        else:
            out = coordinate_stats_trusted(
                grads, bufs, vs if use_v else None, k_local, b, eps, None, False, self._backend_for(grads[0].device)
            )
        return k_local, out

    def _record_coordinate_stats(
        self, values: list[float], k: int, b: float, B: float, c: float, examples: float, sizes: tuple[float, ...]
    ) -> None:
        """`sizes`: the step's microbatch sizes (per-coordinate mode is single-process: all k of them)."""
        d = dict(zip(self._COORD_KEYS, values[: len(self._COORD_KEYS)], strict=True))
        if not self._coord_precond:  # no Adam second moment to precondition with: those sums are not there
            d["precond_small"] = d["precond_big"] = math.nan
        hist = values[len(self._COORD_KEYS) :]
        # The kernels see gradients in the hooks' units (c·g): squares carry c², σ and μ²/σ carry |c|. Their sums
        # of μ̂² and μ̂²/σ̂ carry the step's sampling noise; the ones reported are made unbiased (coord_stats.py).
        sigma_sq = d["sum_sigma_sq"] / (c * c)
        # Unequal microbatch sizes (an epoch's short last one) change the corrections, not their form.
        mu_sq, mu_sq_over_sigma = unbiased_coordinate_sums(
            d["sum_mu_sq"] / (c * c), sigma_sq, d["sum_mu_sq_over_sigma"] / abs(c), d["sum_sigma"] / abs(c), k, B, sizes
        )
        noise_only = noise_only_small_batch_fraction(k, sizes)
        self._coord = {
            "coord/sum_mu_sq": mu_sq,
            "coord/sum_sigma_sq": sigma_sq,
            "coord/sum_mu_sq_over_sigma": mu_sq_over_sigma,
            "coord/frac_small_batch": d["frac_small_batch"],
            "coord/frac_small_batch_noise_only": noise_only,
            # Coordinates that had no gradient in the step: in neither the SNR histogram nor the regime share.
            # (With .grad None, zero_grad's default, a parameter no backward reached is among them too.)
            "coord/frac_no_grad": (d["num_no_grad"] + self._coord_gradless) / (d["num_coords"] + self._coord_gradless)
            if d["num_coords"] + self._coord_gradless
            else math.nan,
        }
        total = sum(hist)  # the coordinates with a gradient
        for i, h in enumerate(hist):
            self._coord[f"coord/snr_hist/{i}"] = h / total if total else math.nan
        if math.isfinite(d["precond_small"]) and self._dp.world_size == 1:
            est = self._sub_estimator("__adam_preconditioned__")
            # Squares of the hooks' c·g, like the plain sums (P, from Adam's v, is in .grad's unscaled units):
            # unscaled, so that steps under different loss scales (GradScaler's changes) weigh alike.
            est.update(d["precond_small"] / (c * c), d["precond_big"] / (c * c), b, B, examples)

    # ---- learning rate --------------------------------------------------------------------------------------------

    def _lr_scale(self, batch: float) -> float:
        if self.rule is None or not math.isfinite(batch):
            return 1.0
        if self.ref_batch is None:
            self.ref_batch = batch
        ns = self.estimator.noise_scale
        if ns is not None and ns <= 0.0:
            # tr(Σ) clamped at 0 (no measurable noise): take the law's B_noise → 0 limit instead of dividing by it.
            ns = 1e-30
        return laws._lr_scale_float(batch, self.ref_batch, ns, self.rule, self.law)

    def _apply_scaling(self, scale: float, batch: float) -> list[dict[str, Any]]:
        saved = []
        hparams = None
        if self.rule is not None and self.scale_adam_hparams and self.law == "adam" and math.isfinite(batch):
            kappa = batch / self.ref_batch
            if kappa != 1.0:
                hparams = kappa
        for group in self.param_groups:
            keep = {"lr": group["lr"]}
            lr = group["lr"]
            group["lr"] = lr * scale  # out of place, also for a tensor LR: the user's object is restored as is
            if hparams is not None and "betas" in group:
                keep["betas"], keep["eps"] = group["betas"], group["eps"]
                try:
                    h = laws.sqrt_rule(hparams, 1.0, betas=tuple(group["betas"]), eps=group["eps"])
                except ValueError as e:
                    # Every group goes back to the user's values, the groups already scaled included.
                    group.update(keep)
                    self._restore(saved)
                    raise RuntimeError(
                        f"bscale: cannot rescale Adam's betas for this batch ({e}); pass "
                        "scale_adam_hparams=False or a larger ref_batch"
                    ) from e
                group["betas"], group["eps"] = h.betas, h.eps
            saved.append(keep)
        return saved

    def _restore(self, saved: list[dict[str, Any]]) -> None:
        # `saved` may be shorter (an error part-way through _apply_scaling): restore what was changed.
        for group, keep in zip(self.param_groups, saved, strict=False):
            group.update(keep)

    # ---- readings -------------------------------------------------------------------------------------------------

    def _finish_stats(self, batch: float, scale: float) -> None:
        """The step's counters; its readings are built from them when first asked for (:meth:`_readings`), so a
        loop that reads them every N steps pays for the dict every N steps."""
        if self._step_microbatches > 0 and math.isfinite(batch):
            self.examples += batch  # a step with no backward since the last one saw no new examples
        first_lr = self._first_lr()
        # Default reference LR: the largest the user's schedule has reached (a scheduler's `initial_lr` counts), i.e.
        # the tuned peak, so the report follows neither a warmup up from zero nor a decay down to it.
        self._ref_lr_seen = max(self._ref_lr_seen, first_lr, float(self.param_groups[0].get("initial_lr", 0.0)))
        if self.ref_batch is None and math.isfinite(batch):
            # The documented default, also without a rule: optimal_lr is relative to the first step's batch.
            self.ref_batch = batch
        microbatches = getattr(self, "_step_microbatches", float(len(self._sizes) * self._dp.world_size))
        # Everything else the readings show changes only in the next step().
        self._stats_args = (batch, scale, first_lr, microbatches, self.examples, self.steps)
        self._stats = None

    def _first_lr(self) -> float:
        lr = self.param_groups[0]["lr"]
        return float(lr) if not isinstance(lr, torch.Tensor) else float(lr.item())

    def _readings(self) -> dict[str, float]:
        """The latest step's readings (the dict itself, built at most once per step)."""
        if self._stats_args is None:
            # No step taken yet: every key, NaN where there is nothing to show (the batch is not known yet).
            return self._build_stats(math.nan, 1.0, self._first_lr(), 0.0, self.examples, self.steps)
        if self._stats is None:
            self._stats = self._build_stats(*self._stats_args)
        return self._stats

    def _build_stats(
        self, batch: float, scale: float, first_lr: float, microbatches: float, examples: float, steps: int
    ) -> dict[str, float]:
        r = self.estimator.reading()
        stats = r.as_dict()
        stats.pop("steps", None)
        stats.pop("examples", None)
        ref_lr = self.ref_lr if self.ref_lr is not None else self._ref_lr_seen
        B_noise = r.noise_scale
        ref_batch = self.ref_batch if self.ref_batch is not None else batch
        if B_noise and math.isfinite(batch) and B_noise > 0:
            # The laws' float forms (bit-identical to laws.lr_scale & co., without numpy's per-call checks).
            opt = ref_lr * laws._lr_scale_float(batch, ref_batch, B_noise, "noise", self.law)
            peak = B_noise if self.law == "adam" else math.inf  # laws.peak_batch
            # lr = 0 is a legal setting (observing only, a warmup from 0) but no reference for lr_max.
            lr_max = laws._lr_max_float(ref_lr, ref_batch, B_noise, self.law) if ref_lr > 0 else math.nan
        elif B_noise == 0.0 and math.isfinite(batch):
            # No measurable noise (tr(Σ) clamped at 0): the law's B_noise → 0 limit, as the LR scale takes it; the
            # peak LR grows without bound there, so lr_max has no value.
            opt = ref_lr * laws._lr_scale_float(batch, ref_batch, 1e-30, "noise", self.law)
            peak, lr_max = (0.0 if self.law == "adam" else math.inf), math.nan
        else:
            opt, peak, lr_max = math.nan, math.nan, math.nan
        raw = self.estimator.raw
        stats.update(
            batch_size=batch,
            microbatches=microbatches,
            examples=examples,
            steps=float(steps),
            lr_scale=scale,
            lr=first_lr * scale,
            optimal_lr=opt,
            lr_max=lr_max,
            peak_batch=peak,
            balance_batch=B_noise if B_noise is not None else math.nan,
            step_grad_sq=raw["last_grad_sq"],
            step_trace_sigma=raw["last_trace_sigma"],
        )
        for name, est in self._layer_estimators.items():
            rr = est.reading()
            key = "adam_preconditioned" if name == "__adam_preconditioned__" else f"layer/{name}"
            stats[f"{key}/noise_scale"] = math.nan if rr.noise_scale is None else rr.noise_scale
            stats[f"{key}/noise_scale_stderr"] = math.nan if rr.noise_scale_stderr is None else rr.noise_scale_stderr
        stats.update(getattr(self, "_coord", {}))
        # Every key the configuration has, NaN until it has a value (a module no gradient has reached yet, the
        # per-coordinate readings before their first step), so that loggers and readers see one set of keys.
        nan_keys: list[str] = []
        if self._param_names is not None:
            nan_keys += [f"layer/{name}/{s}" for name in self._layers for s in ("noise_scale", "noise_scale_stderr")]
        if self.per_coordinate:
            nan_keys += [
                *self._COORD_READINGS,
                "adam_preconditioned/noise_scale",
                "adam_preconditioned/noise_scale_stderr",
            ]
        for key in nan_keys:
            stats.setdefault(key, math.nan)
        return stats

    @property
    def stats(self) -> dict[str, float]:
        """The latest readings as floats (``nan`` where not available yet). Keys include ``noise_scale``,
        ``noise_scale_stderr``, ``grad_sq``, ``trace_sigma`` (unscaled, per-example units), ``batch_size``,
        ``examples``, ``steps``, ``lr_scale``, ``lr``, ``optimal_lr``, ``peak_batch`` (Adam's surge peak, or inf for
        SGD) and ``balance_batch`` (B_noise, where steps and examples trade evenly)."""
        return dict(self._readings())

    @property
    def noise_scale(self) -> float | None:
        """Smoothed ``B_simple`` in the user's example unit, or ``None`` until it can be estimated."""
        return self.estimator.noise_scale

    @property
    def reason(self) -> str | None:
        """Why :attr:`noise_scale` is ``None`` (or ``None`` when there is a reading)."""
        if "one_microbatch" in self._warned and self.estimator.steps == 0:
            return "one microbatch per step in one process: accumulate 2 or more, or train data-parallel"
        if self._own_steps > 0 and not self._saw_backward and self.estimator.steps == 0:
            return (
                "no backward() has reached the wrapped optimizer's parameters: their hooks never ran (an optimizer "
                "of copies whose .grad is assigned, such as fp32 master weights, is not measured; wrap one of the "
                "parameters backward runs on)"
            )
        reason = self.estimator.reading().reason
        n = self.measure_every
        if n > 1 and reason == NEED_TWO_STEPS:
            return f"standard errors need at least 2 measured steps (measure_every={n}: one step in {n})"
        return reason

    @property
    def batch_size(self) -> int | None:
        """The batch size for the next step: the controller's decision, else the last step's batch."""
        if self.controller is not None:
            return self.controller.batch_size
        return None if not math.isfinite(self._last_batch) else round(self._last_batch)

    def accumulation_steps(self, world_size: int | None = None, microbatch_size: float | None = None) -> int:
        """Microbatches per rank for the current or next step under the controller: ``batch / (microbatch ×
        world)``.

        The microbatch is a full one: by default the largest of the last step's, this step's so far and
        :attr:`microbatch_size`. So a short microbatch (an epoch's last) does not change the count, wherever it
        falls in the step, and a microbatch that grows does at once, as does one that shrinks with the batch the
        controller lowered (at the last step's count). After lowering the microbatch for another reason (an
        out-of-memory error), pass the new size here for the first step at it.

        Args:
            world_size: data-parallel ranks (default: the process group's size).
            microbatch_size: the full microbatch to count in, when it differs from all of those (default: None).
        """
        if self.controller is None:
            raise RuntimeError(
                "accumulation_steps() needs a controller: wrap(..., controller=BatchSizeController(...))"
            )
        if microbatch_size is not None:
            _check_positive("microbatch_size", microbatch_size)
        world = self._dp.world_size if world_size is None else world_size
        micro = self._nominal_microbatch() if microbatch_size is None else microbatch_size
        return self.controller.accumulation_steps(_whole(micro), world)

    def _nominal_microbatch(self) -> float:
        """The step's full microbatch: the largest of the last step's microbatches, this step's so far and the size
        set for the next backward. A short microbatch (an epoch's last, wherever it falls in the step) does not
        lower it; a size that grows (a sampler's) raises it at once; a smaller one takes over at once when the
        controller lowered the batch and the size lowers it at the last step's count (a sampler following it),
        else after one step at it."""
        full = float(self.microbatch_size)
        if self._sizes:
            full = max(full, *self._sizes)
        batch = None if self.controller is None else self.controller.batch_size
        lowered = batch is not None and self._last_full_batch is not None and batch < self._last_full_batch
        # A sampler that follows the controller lowers the microbatch with the batch, at the last step's count; any
        # other smaller size (an epoch's short microbatch) leaves the full microbatch as it was.
        followed = lowered and float(self.microbatch_size) * self._last_full_k * self._dp.world_size == batch
        if not followed:
            full = max(full, self._last_full_micro)
        return full

    def _expected_count(self) -> int | None:
        """How many local backwards the step is expected to have (when to read ``.grad``): the controller's count
        for the step's full microbatch, else the last step's count (None: unknown, read after every backward)."""
        if self.controller is None:
            return self._expected_k
        micro, batch = self._nominal_microbatch(), self.controller.batch_size
        cached = self._controller_k
        if cached is None or cached[0] != micro or cached[1] != batch:
            try:
                count = self.controller.accumulation_steps(_whole(micro), self._dp.world_size)
            except (TypeError, ValueError):
                count = None  # not a whole number of microbatches: read after every backward
            cached = self._controller_k = (micro, batch, count)
        return cached[2]

    def memory_bytes(self) -> dict[str, int]:
        """Memory the wrapper holds: ``persistent`` buffers (two float32 values per parameter tensor, plus one
        float32 copy of the parameters in per-coordinate mode) and the ``transient_peak`` of microbatch gradients
        kept alive within a backward until their norms are taken: on the torch backend when the backward ends,
        with Triton by their bucket's fused launch; either way bounded by ``bucket_mb`` plus one gradient. Only the
        gradients of a backward that finds ``.grad`` set add memory: the first one's become ``.grad``.
        ``workspace``: in per-coordinate mode on the torch backend, the scratch rows of the per-coordinate pass
        (nine float32 values per coordinate of its widest slice, ~10 MiB at most per thread that runs it), kept for
        the next step and shared by every wrapper in the process; the Triton kernel needs none."""
        persistent = 0 if self._sums is None else self._sums.numel() * self._sums.element_size()
        persistent += sum(b.numel() * b.element_size() for b in self._coord_sq.values())
        # The per-coordinate torch path's scratch: kept between steps (fresh pages each step would cost as much as
        # the arithmetic), shared by every wrapper, and bounded whatever the model.
        workspace = scratch_bytes() if self._coord_sq else 0
        return {
            "persistent": persistent,
            "transient_peak": max(self._peak_pending_bytes, self._peak_held_bytes),
            "workspace": workspace,
        }

    def remove_hooks(self) -> None:
        """Detach every gradient hook (the wrapper then only steps the optimizer)."""
        for h in self._hook_handles:
            h.remove()
        self._hook_handles.clear()
        self._frozen.clear()


def wrap(optimizer: Optimizer, microbatch_size: float, **kwargs: Any) -> ScaledOptimizer:
    """Wrap ``optimizer`` so it measures the noise scale live; see :class:`ScaledOptimizer` for the arguments.

    Example::

        opt = bscale.wrap(torch.optim.AdamW(model.parameters(), lr=3e-4), microbatch_size=32)
        for x, y in batches:                 # the loop is unchanged
            for xm, ym in zip(x.chunk(4), y.chunk(4)):
                (loss_fn(model(xm), ym) / 4).backward()
            opt.step()
            opt.zero_grad()
        opt.noise_scale, opt.stats["optimal_lr"]
    """
    return ScaledOptimizer(optimizer, microbatch_size, **kwargs)
