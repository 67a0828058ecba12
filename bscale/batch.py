r"""The batch-size controller: the batch for the next step, from the live noise scale.

The noise scale rises as the loss falls (McCandlish App. D), so the best batch grows during training. After
every optimizer step the controller is fed that step's readings and answers with the batch for the next step.
Its answer is a pure function of the readings and of its own state, so data-parallel ranks fed identical
readings decide identically without talking to each other.

Policies, with ``B_est = scale · B_noise`` the controller's estimate of the critical batch:

.. math::
    \text{noise: } B = B_{est} \qquad
    \text{cost: } B = \sqrt{r \, B_{est}} \qquad
    \text{double: } B \to 2B \text{ once } B_{est} \ge h B

``cost`` is McCandlish App. D (one optimizer step costs as much as ``r`` examples; :class:`StepCostMeter`
estimates ``r`` from timings); ``double`` is the schedule of Merrill et al. 2025 (arXiv 2505.23971), who
double the batch each time the critical batch passes ``2B``.
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Mapping
from typing import Any, NamedTuple

__all__ = ["BatchChange", "BatchSizeController", "StepCostMeter"]

_POLICIES = ("noise", "cost", "double")
# Per-policy default dead band: Merrill doubles once the critical batch passes 2B; for the policies that move
# to a target, a 25% band keeps the batch still while the smoothed estimate wanders inside its own error (a
# reading that passes the default 30% standard-error gate is uncertain by about that much).
_DEFAULT_HYSTERESIS = {"noise": 1.25, "cost": 1.25, "double": 2.0}


class BatchChange(NamedTuple):
    """One change of batch size, as recorded in :attr:`BatchSizeController.changes`.

    ``step`` and ``examples`` are the optimizer steps and examples seen when the change was decided; the new
    batch is used from the step that follows.
    """

    step: int
    examples: int
    old: int
    new: int
    reason: str


def _positive_int(name: str, value: Any) -> int:
    """`value` as an int: a positive integer of any type (numpy's, or a float such as 128.0 that is one)."""
    whole = isinstance(value, numbers.Integral) or (isinstance(value, float) and value.is_integer())
    if isinstance(value, bool) or not whole or value < 1:
        raise ValueError(f"{name} must be a positive integer, got {value!r}")
    return int(value)


def _real(name: str, value: Any, what: str) -> float:
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise ValueError(f"{name} must be {what}, got {value!r}")
    return float(value)


def _as_float(stats: Mapping[str, Any], key: str) -> float:
    value = stats[key]
    return float(value) if value is not None else math.nan


class StepCostMeter:
    r"""Estimates ``r``, the cost of one optimizer step in examples, from timed steps.

    Fits the time of one step as a fixed overhead plus a cost per example by least squares,

    .. math::
        t = t_0 + t_1 B, \qquad r = t_0 / t_1

    so a step costs as much time as ``r`` extra examples (McCandlish App. D). The meter reads no clock: the
    caller feeds it ``(batch_size, seconds)`` pairs. Under data parallelism feed every rank the same numbers
    (for example the all-reduced maximum of the ranks' timings), or the ranks' controllers will disagree. The
    fit needs steps at two or more distinct batch sizes; leave out steps that pay one-off costs (compilation,
    the first step after a batch change).
    """

    def __init__(self) -> None:
        # Running means and centred sums (Welford): the raw sums of B² and B·t lose the slope to cancellation
        # once B is large and nearly constant.
        self._n = 0
        self._mean_b = 0.0
        self._mean_t = 0.0
        self._sbb = 0.0
        self._sbt = 0.0

    def update(self, batch_size: int, seconds: float) -> None:
        """Add one timed step: ``batch_size`` examples took ``seconds``."""
        batch_size = _positive_int("batch_size", batch_size)
        if isinstance(seconds, bool) or not isinstance(seconds, (int, float)) or not (0 <= seconds < math.inf):
            raise ValueError(f"seconds must be a non-negative, finite duration, got {seconds!r}")
        self._n += 1
        db = batch_size - self._mean_b
        self._mean_b += db / self._n
        self._mean_t += (seconds - self._mean_t) / self._n
        self._sbb += db * (batch_size - self._mean_b)
        self._sbt += db * (seconds - self._mean_t)

    @property
    def count(self) -> int:
        """Timed steps seen."""
        return self._n

    @property
    def per_example_seconds(self) -> float | None:
        """``t_1``, the fitted seconds per example; None until two distinct batch sizes were seen."""
        return self._sbt / self._sbb if self._sbb > 0 else None

    @property
    def overhead_seconds(self) -> float | None:
        """``t_0``, the fitted seconds per step that do not depend on the batch; None until identifiable."""
        t1 = self.per_example_seconds
        return None if t1 is None else self._mean_t - t1 * self._mean_b

    @property
    def step_cost(self) -> float | None:
        """``r = t_0 / t_1`` in examples; None until two distinct batch sizes give a positive slope."""
        t1 = self.per_example_seconds
        if t1 is None or t1 <= 0:
            return None
        # A slightly negative intercept is noise around a negligible overhead: a step then costs nothing
        # extra.
        return max(self.overhead_seconds, 0.0) / t1  # type: ignore[type-var]

    def state_dict(self) -> dict[str, Any]:
        return {
            "n": self._n,
            "mean_b": self._mean_b,
            "mean_t": self._mean_t,
            "sbb": self._sbb,
            "sbt": self._sbt,
        }

    def load_state_dict(self, state_dict: Mapping[str, Any]) -> None:
        self._n = int(state_dict["n"])
        self._mean_b, self._mean_t = float(state_dict["mean_b"]), float(state_dict["mean_t"])
        self._sbb, self._sbt = float(state_dict["sbb"]), float(state_dict["sbt"])

    def __repr__(self) -> str:
        r = self.step_cost
        return f"{type(self).__name__}(count={self._n}, step_cost={'None' if r is None else f'{r:.4g}'})"


class BatchSizeController:
    r"""Decides the global batch size of the next step from the live noise scale.

    Fed once per optimizer step with the wrapper's readings, :meth:`observe` returns the batch for the next
    step. The batch changes only when all of these hold: the estimate exists and is finite; its relative
    standard error is at most ``max_rel_stderr``; at least ``min_examples_between`` examples have passed since
    the last change (counted from the start of training for the first one); and the policy's target leaves the
    dead band set by ``hysteresis``. The result always lies in ``[min_batch, max_batch]`` and is a multiple of
    ``multiple_of`` (targets are rounded down, but never below ``min_batch`` rounded up to a multiple).

    With ``B_est = scale · B_noise``:

    .. math::
        \text{noise: } T = B_{est}, \qquad
        \text{cost: } T = \sqrt{r\,B_{est}} \quad \text{(McCandlish App. D)}

    ``noise`` and ``cost`` move to ``T`` once ``T ≥ h·B`` (and, when shrinking is allowed, once ``T ≤ B/h``).
    ``double`` doubles once ``B_est ≥ h·B`` (Merrill's schedule, ``h = 2``) and, when shrinking is allowed,
    halves once ``B_est < B/(2h)``, a band that cannot oscillate on a steady estimate. It makes one doubling
    per decision; a batch far below the estimate doubles again at the next permitted decision.

    The noise scale is an estimate of the critical batch, not a measurement of it: across tasks their ratio
    varies about tenfold (McCandlish table 1), and Merrill finds it underestimates the critical batch of large
    language models. ``scale`` is the calibration.

    Args:
        policy: ``"noise"``, ``"cost"`` or ``"double"``. (default: ``"noise"``)
        min_batch: smallest global batch, in the user's unit of examples (samples or tokens).
        max_batch: largest global batch.
        multiple_of: every batch is a multiple of this, usually ``microbatch × world_size``. (default: 1)
        scale: ``B_est = scale · B_noise``. (default: 1.0)
        step_cost: ``r``, the cost of one optimizer step in examples, or a :class:`StepCostMeter` that
            estimates it; required by ``"cost"`` and only used by it. A meter gives ``r`` once it has timings
            at two batch sizes, and the policy holds until then: time a few steps at a second size before
            training. (default: None)
        grow_only: never shrink the batch. (default: True)
        min_examples_between: examples that must pass between two changes. (default: 0)
        max_rel_stderr: hold while ``noise_scale_stderr / noise_scale`` exceeds this, or while the standard
            error is missing; None decides without the gate. (default: 0.3)
        hysteresis: ``h ≥ 1``, the dead band above; None picks 2.0 for ``"double"`` and 1.25 otherwise.
            (default: None)
        initial_batch: the batch before the first change, a multiple of ``multiple_of`` in range; None picks
            ``min_batch`` rounded up to a multiple. (default: None)

    Example::

        >>> ctl = BatchSizeController(min_batch=64, max_batch=4096, multiple_of=64)
        >>> ctl.observe({"noise_scale": 900.0, "noise_scale_stderr": 50.0, "examples": 6400, "steps": 100})
        896
        >>> ctl.accumulation_steps(microbatch_size=32, world_size=2)
        14
    """

    def __init__(
        self,
        policy: str = "noise",
        *,
        min_batch: int,
        max_batch: int,
        multiple_of: int = 1,
        scale: float = 1.0,
        step_cost: float | StepCostMeter | None = None,
        grow_only: bool = True,
        min_examples_between: int = 0,
        max_rel_stderr: float | None = 0.3,
        hysteresis: float | None = None,
        initial_batch: int | None = None,
    ) -> None:
        if policy not in _POLICIES:
            raise ValueError(f"Unknown policy {policy!r}; choose one of {', '.join(map(repr, _POLICIES))}")
        min_batch = _positive_int("min_batch", min_batch)
        max_batch = _positive_int("max_batch", max_batch)
        multiple_of = _positive_int("multiple_of", multiple_of)
        if min_batch > max_batch:
            raise ValueError(f"min_batch={min_batch} exceeds max_batch={max_batch}; swap them or widen the range")
        lo = -(-min_batch // multiple_of) * multiple_of
        hi = max_batch // multiple_of * multiple_of
        if lo > hi:
            raise ValueError(
                f"no multiple of multiple_of={multiple_of} lies in "
                f"[min_batch={min_batch}, max_batch={max_batch}]; "
                f"raise max_batch to at least {lo} or use a multiple_of that divides a batch in the range"
            )
        if isinstance(scale, bool) or not isinstance(scale, (int, float)) or not (0 < scale < math.inf):
            raise ValueError(f"scale must be a positive, finite number, got {scale!r}")
        if policy == "cost":
            if step_cost is None:
                raise ValueError(
                    "policy='cost' needs step_cost: the cost of one optimizer step in examples, or a StepCostMeter"
                )
            if not isinstance(step_cost, StepCostMeter) and (
                isinstance(step_cost, bool)
                or not isinstance(step_cost, (int, float))
                or not (0 <= step_cost < math.inf)
            ):
                raise ValueError(
                    f"step_cost must be a non-negative, finite number or a StepCostMeter, got {step_cost!r}"
                )
        elif step_cost is not None:
            raise ValueError(f"step_cost is only used by policy='cost'; drop it for policy={policy!r}")
        if (
            isinstance(min_examples_between, bool)
            or not isinstance(min_examples_between, int)
            or min_examples_between < 0
        ):
            raise ValueError(f"min_examples_between must be a non-negative integer, got {min_examples_between!r}")
        if not isinstance(grow_only, bool):
            raise ValueError(f"grow_only must be True or False, got {grow_only!r}")
        if max_rel_stderr is not None:
            max_rel_stderr = _real("max_rel_stderr", max_rel_stderr, "a positive number or None")
        if max_rel_stderr is not None and not (0 < max_rel_stderr <= math.inf):
            raise ValueError(f"max_rel_stderr must be positive (or None to drop the gate), got {max_rel_stderr!r}")
        if hysteresis is None:
            hysteresis = _DEFAULT_HYSTERESIS[policy]
        hysteresis = _real("hysteresis", hysteresis, "a finite factor >= 1 or None")
        if not (1.0 <= hysteresis < math.inf):
            raise ValueError(f"hysteresis must be a finite factor >= 1 (1 = no dead band), got {hysteresis!r}")
        if initial_batch is None:
            initial_batch = lo
        initial_batch = _positive_int("initial_batch", initial_batch)
        if not (lo <= initial_batch <= hi) or initial_batch % multiple_of:
            raise ValueError(
                f"initial_batch={initial_batch} must be a multiple of multiple_of={multiple_of} "
                f"in [{lo}, {hi}]; pass one such value or None for {lo}"
            )
        self.policy = policy
        self.min_batch = min_batch
        self.max_batch = max_batch
        self.multiple_of = multiple_of
        self.scale = float(scale)
        self.step_cost = step_cost
        self.grow_only = grow_only
        self.min_examples_between = min_examples_between
        self.max_rel_stderr = max_rel_stderr
        self.hysteresis = float(hysteresis)
        self._lo, self._hi = lo, hi
        self._batch = initial_batch
        self._last_change_examples = 0
        self._changes: list[BatchChange] = []

    @property
    def batch_size(self) -> int:
        """The global batch for the next step, in examples."""
        return self._batch

    @property
    def changes(self) -> list[BatchChange]:
        """Every change so far, oldest first, as ``(step, examples, old, new, reason)``."""
        return list(self._changes)

    def _snap(self, target: float) -> int:
        m = self.multiple_of
        # Round down to the grid; the 1e-9 keeps a target computed as exactly k·m (e.g. 2·B) from landing on
        # (k-1)·m through floating-point error.
        k = math.floor(target / m + 1e-9) if math.isfinite(target) else self._hi // m
        return min(max(k * m, self._lo), self._hi)

    def _current_step_cost(self) -> float | None:
        if isinstance(self.step_cost, StepCostMeter):
            return self.step_cost.step_cost
        return float(self.step_cost)  # type: ignore[arg-type]

    def _decide(self, noise_scale: float) -> tuple[int, str] | None:
        b, h = self._batch, self.hysteresis
        estimate = self.scale * noise_scale
        if self.policy == "double":
            if estimate >= h * b:
                new, why = self._snap(2 * b), f"B_est {estimate:.4g} >= {h:g} x {b}"
            elif not self.grow_only and estimate < b / (2 * h):
                new, why = self._snap(b / 2), f"B_est {estimate:.4g} < {b} / (2 x {h:g})"
            else:
                return None
        else:
            if self.policy == "noise":
                target, what = estimate, f"B_est {estimate:.4g}"
            else:
                r = self._current_step_cost()
                if r is None:  # the meter has not yet seen two distinct batch sizes
                    return None
                target = math.sqrt(r * estimate)
                what = f"sqrt(r {r:.4g} x B_est {estimate:.4g}) = {target:.4g}"
            if target >= h * b:
                why = f"{what} >= {h:g} x {b}"
            elif not self.grow_only and target <= b / h:
                why = f"{what} <= {b} / {h:g}"
            else:
                return None
            new = self._snap(target)
        if self.grow_only:
            new = max(new, b)
        if new == b:
            return None
        return new, f"{self.policy}: {why}"

    def observe(self, stats: Mapping[str, Any]) -> int:
        """Feed one step's readings; return the batch for the next step.

        Args:
            stats: the step's readings, with at least ``noise_scale`` (examples; NaN while unavailable),
                ``examples`` (seen so far) and ``steps`` (taken so far), and ``noise_scale_stderr`` unless
                ``max_rel_stderr`` is None. Only these keys are read.

        Returns:
            The global batch for the next step; unchanged when no change is decided.
        """
        needed = ("noise_scale", "examples", "steps") + (("noise_scale_stderr",) if self.max_rel_stderr else ())
        missing = [k for k in needed if k not in stats]
        if missing:
            hint = "" if "noise_scale_stderr" not in missing else "; or pass max_rel_stderr=None to drop the gate"
            raise RuntimeError(f"observe() needs stats with keys {list(needed)}, missing {missing}{hint}")
        noise_scale = _as_float(stats, "noise_scale")
        examples = _as_float(stats, "examples")
        if not (0 <= examples < math.inf):
            raise ValueError(f"stats['examples'] must be a non-negative, finite count of examples, got {examples!r}")
        examples = int(examples)
        if not (0 <= noise_scale < math.inf):
            return self._batch
        if self.max_rel_stderr is not None:
            stderr = _as_float(stats, "noise_scale_stderr")
            # NaN fails this test: a reading whose uncertainty is unknown does not move the batch.
            if not (stderr <= self.max_rel_stderr * noise_scale):
                return self._batch
        if examples - self._last_change_examples < self.min_examples_between:
            return self._batch
        decision = self._decide(noise_scale)
        if decision is not None:
            new, reason = decision
            self._changes.append(BatchChange(int(stats["steps"]), examples, self._batch, new, reason))
            self._batch = new
            self._last_change_examples = examples
        return self._batch

    def accumulation_steps(self, microbatch_size: int, world_size: int = 1) -> int:
        """Microbatches per rank in the current batch: ``batch_size / (microbatch_size · world_size)``.

        Args:
            microbatch_size: examples per forward/backward on one rank.
            world_size: data-parallel ranks. (default: 1)
        """
        microbatch_size = _positive_int("microbatch_size", microbatch_size)
        world_size = _positive_int("world_size", world_size)
        per_round = microbatch_size * world_size
        if self._batch % per_round:
            raise ValueError(
                f"batch_size={self._batch} is not a multiple of microbatch_size x world_size = {per_round}; "
                f"construct the controller with multiple_of={per_round} (or a multiple of it)"
            )
        return self._batch // per_round

    def state_dict(self) -> dict[str, Any]:
        """The decision state: batch, examples at the last change, the change log, the meter's state."""
        meter = self.step_cost.state_dict() if isinstance(self.step_cost, StepCostMeter) else None
        return {
            "batch_size": self._batch,
            "last_change_examples": self._last_change_examples,
            "changes": [tuple(c) for c in self._changes],
            "step_cost_meter": meter,
        }

    def load_state_dict(self, state_dict: Mapping[str, Any]) -> None:
        """Restore a :meth:`state_dict`; later decisions then equal those of an uninterrupted run."""
        batch = state_dict["batch_size"]
        if not (self._lo <= batch <= self._hi) or batch % self.multiple_of:
            raise ValueError(
                f"saved batch_size={batch} is not a multiple of multiple_of={self.multiple_of} in "
                f"[{self._lo}, {self._hi}]; construct the controller with the bounds of the saved run"
            )
        meter = state_dict.get("step_cost_meter")
        if meter is not None:
            if not isinstance(self.step_cost, StepCostMeter):
                raise ValueError("the state holds a StepCostMeter's state; construct with step_cost=StepCostMeter()")
            self.step_cost.load_state_dict(meter)
        self._batch = int(batch)
        self._last_change_examples = int(state_dict["last_change_examples"])
        self._changes = [BatchChange(*c) for c in state_dict["changes"]]

    def __repr__(self) -> str:
        cost = f", step_cost={self.step_cost!r}" if self.policy == "cost" else ""
        return (
            f"{type(self).__name__}(policy={self.policy!r}, batch_size={self._batch}, "
            f"min_batch={self.min_batch}, "
            f"max_batch={self.max_batch}, multiple_of={self.multiple_of}, scale={self.scale:g}{cost}, "
            f"grow_only={self.grow_only}, hysteresis={self.hysteresis:g}, changes={len(self._changes)})"
        )
