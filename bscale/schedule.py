r"""Learning-rate schedules driven by examples seen instead of steps.

When the batch grows during training, a schedule written in steps ends at the wrong place: a warmup of ``W``
steps planned at batch ``B₀`` covers ``W·B₀`` examples only if the batch never grows. Written in examples (or
tokens: whatever unit the run counts), the schedule ends where it should whatever the batch does.
"""

from __future__ import annotations

import math
import numbers
import types
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

from torch.optim import Optimizer
from torch.optim.lr_scheduler import LRScheduler

__all__ = ["ExampleSchedule", "WarmupCosine", "warmup_cosine"]


@dataclass
class WarmupCosine:
    r"""The factor of a linear warmup followed by a cosine decay, as a function of examples seen ``x``.

    .. math::
        f(x) = \begin{cases} x / W & x < W \\
        m + (1 - m)\,\tfrac12\bigl(1 + \cos(\pi \min(1, \tfrac{x - W}{T - W}))\bigr) & x \ge W \end{cases}

    with ``W = warmup_examples``, ``T = total_examples``, ``m = min_ratio``. Build it with
    :func:`warmup_cosine`.
    """

    warmup_examples: float
    total_examples: float
    min_ratio: float = 0.0

    def __call__(self, examples_seen: float) -> float:
        w, t, m = self.warmup_examples, self.total_examples, self.min_ratio
        if examples_seen < w:
            return examples_seen / w
        progress = min(1.0, (examples_seen - w) / (t - w))
        return m + (1.0 - m) * 0.5 * (1.0 + math.cos(math.pi * progress))


def warmup_cosine(warmup_examples: float, total_examples: float, min_ratio: float = 0.0) -> WarmupCosine:
    """A linear warmup over ``warmup_examples``, then a cosine decay to ``min_ratio`` at ``total_examples``.

    Args:
        warmup_examples: examples over which the factor rises linearly from 0 to 1; 0 for no warmup.
        total_examples: examples at which the decay reaches ``min_ratio``; it stays there afterwards.
        min_ratio: the final factor, a fraction of the base learning rate. (default: 0.0)
    """
    given = {"warmup_examples": warmup_examples, "total_examples": total_examples, "min_ratio": min_ratio}
    for name, value in given.items():
        if isinstance(value, bool) or not isinstance(value, numbers.Real):
            raise ValueError(f"{name} must be a number, got {value!r}")
    if not (0 <= warmup_examples < math.inf):
        raise ValueError(f"warmup_examples must be a non-negative, finite count, got {warmup_examples!r}")
    if not (warmup_examples < total_examples < math.inf):
        raise ValueError(
            f"total_examples must be finite and exceed warmup_examples={warmup_examples!r}, got {total_examples!r}"
        )
    if not (0.0 <= min_ratio <= 1.0):
        raise ValueError(f"min_ratio must lie in [0, 1], got {min_ratio!r}")
    return WarmupCosine(warmup_examples, total_examples, min_ratio)


class ExampleSchedule(LRScheduler):
    r"""Sets each group's learning rate to ``base_lr · lr_lambda(examples_seen)``.

    A :class:`~torch.optim.lr_scheduler.LRScheduler` like :class:`~torch.optim.lr_scheduler.LambdaLR`, with
    the clock changed from steps to examples seen: call :meth:`step` after each optimizer step with the
    examples seen so far (or construct it with ``examples``, a callable that returns them, and call
    ``step()``). It keeps the LRScheduler contract: ``base_lrs`` from each group's ``initial_lr``,
    ``last_epoch`` counting ``step()`` calls, :meth:`get_last_lr`, and a state dict that saves callable
    objects' attributes but not plain functions (as LambdaLR does). It accepts any
    :class:`~torch.optim.Optimizer`, a wrapping subclass included.

    .. math::
        lr_g = base\_lr_g \cdot \lambda_g(x), \qquad x = \text{examples seen}

    Args:
        optimizer: the optimizer whose groups' ``lr`` it sets.
        lr_lambda: ``examples_seen -> factor``, or one such callable per parameter group.
        examples: a callable returning the examples seen so far, read by ``step()`` without an argument; None
            requires ``step(examples_seen)``. (default: None)
        total_examples: the examples the run is planned for, used by :attr:`finished` and :attr:`progress` so
            the training loop can end on examples rather than steps. (default: None)
        examples_seen: the examples seen when it is constructed. (default: 0)
        last_epoch: as in LRScheduler; ``-1`` starts afresh. (default: -1)

    Example::

        >>> sched = ExampleSchedule(opt, warmup_cosine(10_000, 1_000_000), total_examples=1_000_000)
        >>> while not sched.finished:
        ...     seen += train_step(batch_size)   # the batch may grow
        ...     sched.step(seen)
    """

    def __init__(
        self,
        optimizer: Optimizer,
        lr_lambda: Callable[[float], float] | Sequence[Callable[[float], float]],
        *,
        examples: Callable[[], float] | None = None,
        total_examples: float | None = None,
        examples_seen: float = 0,
        last_epoch: int = -1,
    ) -> None:
        if not isinstance(optimizer, Optimizer):
            raise TypeError(f"{type(optimizer).__name__} is not an Optimizer")
        groups = len(optimizer.param_groups)
        if isinstance(lr_lambda, (list, tuple)):
            if len(lr_lambda) != groups:
                raise ValueError(
                    f"lr_lambda has {len(lr_lambda)} callables for {groups} parameter groups; "
                    "pass one per group "
                    "or a single callable for all"
                )
            self.lr_lambdas = list(lr_lambda)
        else:
            self.lr_lambdas = [lr_lambda] * groups
        if not all(callable(f) for f in self.lr_lambdas):
            raise ValueError("lr_lambda must be a callable examples_seen -> factor (or a list of them)")
        if examples is not None and not callable(examples):
            raise ValueError(f"examples must be a callable returning the examples seen, got {examples!r}")
        if total_examples is not None and (
            isinstance(total_examples, bool)
            or not isinstance(total_examples, numbers.Real)
            or not (0 < total_examples < math.inf)
        ):
            raise ValueError(f"total_examples must be a positive, finite count, got {total_examples!r}")
        self._examples_fn = examples
        self.total_examples = total_examples
        self.examples_seen = self._check_examples(examples_seen)
        self._constructing = True  # the base class's first step() applies lr_lambda at examples_seen
        super().__init__(optimizer, last_epoch)
        self._constructing = False

    @staticmethod
    def _check_examples(examples_seen: Any) -> float:
        value = float(examples_seen)
        if not (0 <= value < math.inf):
            raise ValueError(f"examples_seen must be a non-negative, finite count, got {examples_seen!r}")
        # A Python or numpy number is kept as given (an int stays an int for the schedule function); a tensor
        # count becomes a float, so that the learning rates stay floats.
        return examples_seen if isinstance(examples_seen, numbers.Real) else value

    @property
    def finished(self) -> bool:
        """True once ``examples_seen`` has reached ``total_examples`` (always False without it)."""
        return self.total_examples is not None and self.examples_seen >= self.total_examples

    @property
    def progress(self) -> float | None:
        """``examples_seen / total_examples``; None without ``total_examples``."""
        return None if self.total_examples is None else self.examples_seen / self.total_examples

    def step(self, examples_seen: float | None = None) -> None:  # type: ignore[override]
        """Set every group's lr for the examples seen so far.

        Args:
            examples_seen: examples seen so far; None reads the ``examples`` callable. (default: None)
        """
        if examples_seen is None and not getattr(self, "_constructing", False):
            if self._examples_fn is None:
                raise RuntimeError(
                    "ExampleSchedule.step() needs the examples seen: call step(examples_seen) "
                    "or construct the "
                    "schedule with examples=<callable returning the count>"
                )
            examples_seen = self._examples_fn()
        if examples_seen is not None:
            self.examples_seen = self._check_examples(examples_seen)
        super().step()

    def get_lr(self) -> list[Any]:
        """``base_lr · lr_lambda(examples_seen)`` for each group."""
        return [base * f(self.examples_seen) for f, base in zip(self.lr_lambdas, self.base_lrs, strict=True)]

    def state_dict(self) -> dict[str, Any]:
        """The state, as LambdaLR keeps it: attributes of callable objects are kept, plain functions not."""
        state = {
            k: v
            for k, v in self.__dict__.items()
            if k not in ("optimizer", "lr_lambdas", "_examples_fn", "_constructing")
        }
        state["lr_lambdas"] = [
            None if isinstance(f, types.FunctionType) else dict(vars(f)) if hasattr(f, "__dict__") else None
            for f in self.lr_lambdas
        ]
        return state

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        state = dict(state_dict)
        saved = state.pop("lr_lambdas")
        self.__dict__.update(state)
        for f, attrs in zip(self.lr_lambdas, saved, strict=True):
            if attrs is not None:
                vars(f).update(attrs)
