"""Loggers for a wrapped optimizer's statistics: JSON lines, TensorBoard, W&B, Lightning, plain logging.

Every logger follows one small protocol (:class:`SupportsLog`): ``log(stats, step)`` with a flat mapping of
names to floats (``opt.stats``), and ``close()`` once at the end. Given ``loggers=[...]``, the wrapper calls
``log`` every ``log_every`` steps; ``close()`` is the training loop's to call (or use the logger in a ``with``
block), as the wrapper cannot tell the last step. Values that are not finite (NaN before an estimate
exists, inf) are written as ``null`` by :class:`JSONLLogger` and left out by the other loggers, whose plots
would otherwise break on them.

Optional back ends (``tensorboard``, ``wandb``, ``lightning``) are imported only when the logger that needs
them is created, so ``import bscale`` never pays for them.
"""

from __future__ import annotations

import io
import json
import logging
import math
import operator
import os
import stat
import warnings
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any, Protocol, runtime_checkable

__all__ = [
    "JSONLLogger",
    "LightningCallback",
    "Logger",
    "PrintLogger",
    "SupportsLog",
    "TensorBoardLogger",
    "WandbLogger",
    "format_noise_scale",
    "read_jsonl",
]


@runtime_checkable
class SupportsLog(Protocol):
    """What the wrapper needs from a logger: ``log(stats, step)`` and ``close()``."""

    def log(self, stats: Mapping[str, float], step: int) -> None: ...

    def close(self) -> None: ...


class Logger:
    """Base class for loggers: subclasses implement :meth:`log`; :meth:`close` and ``with`` come from here.

    ``with JSONLLogger("run.jsonl") as log: ...`` closes the logger on exit, also when an exception leaves
    the block.
    """

    def log(self, stats: Mapping[str, float], step: int) -> None:
        """Record ``stats`` (a flat mapping of names to floats) at optimizer step ``step``."""
        raise NotImplementedError(f"{type(self).__name__} must implement log(stats, step)")

    def close(self) -> None:
        """Release what the logger holds (files, writers). Calling it twice is harmless."""

    def __enter__(self) -> Logger:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()


# ------------------------------------------------------------------------------------------------------------
# Shared checks and conversions


def _check_step(step: object) -> int:
    if isinstance(step, bool):  # a bool is an int to Python, but never a step count
        raise ValueError(f"step must be an integer, got {step!r}; pass the optimizer step count")
    try:
        value = operator.index(step)  # accepts int and numpy integers, refuses floats
    except TypeError:
        raise ValueError(f"step must be an integer, got {step!r}; pass the optimizer step count") from None
    if value < 0:
        raise ValueError(f"step must be >= 0, got {value}")
    return value


def _as_floats(stats: Mapping[str, Any]) -> dict[str, float]:
    """Every value of ``stats`` as a Python float (NaN and inf kept, ``None`` read as NaN: no value yet, as
    ``opt.noise_scale`` before its first estimate), in the mapping's order."""
    if not isinstance(stats, Mapping):
        raise ValueError(f"stats must be a mapping of names to numbers (such as opt.stats), got {type(stats)}")
    out: dict[str, float] = {}
    for key, value in stats.items():
        if not isinstance(key, str):
            raise ValueError(f"stats keys must be strings, got {key!r}")
        try:
            # float() also reads one-element tensors; logging is off the hot path, so the sync is acceptable.
            out[key] = math.nan if value is None else float(value)
        except (TypeError, ValueError):
            raise ValueError(f"stats[{key!r}] must be a number, got {value!r}") from None
    return out


def _finite(stats: Mapping[str, Any], prefix: str) -> dict[str, float]:
    """The finite values of ``stats`` under ``prefix + key``; NaN and inf dropped (plots break on them)."""
    return {prefix + k: v for k, v in _as_floats(stats).items() if math.isfinite(v)}


def _check_prefix(prefix: object) -> str:
    if not isinstance(prefix, str):
        raise ValueError(f"prefix must be a string such as 'bscale/', got {prefix!r}")
    return prefix


# ------------------------------------------------------------------------------------------------------------
# Formatting


_SUFFIXES = ("", "k", "M", "G", "T")


def _unit_and_decimals(value: float) -> tuple[int, int]:
    """Power of 1000 and number of decimals that show ``value`` with three significant digits."""
    # Round to three significant digits first so that 999.6 becomes 1.00k rather than "1000".
    rounded = abs(float(f"{value:.3g}"))
    if rounded == 0.0:
        return 0, 2
    exponent = math.floor(math.log10(rounded))
    power = min(max(exponent // 3, 0), len(_SUFFIXES) - 1)  # no suffixes below 1: noise scales rarely are
    scaled_exponent = exponent - 3 * power
    return power, max(2 - scaled_exponent, 0)


def format_noise_scale(value: float | None, stderr: float | None = None) -> str:
    """Format a noise scale and its standard error for a progress bar or a log line.

    Three significant digits with an SI suffix (k, M, G, T); the standard error is written in the same unit
    with the same number of decimals, so the two can be compared at a glance::

        format_noise_scale(1234.0, 98.0)  -> "1.23k ± 0.10k"
        format_noise_scale(950.0, 12.3)   -> "950 ± 12"
        format_noise_scale(5123.0, 4.0)   -> "5.12k ± 0.004k"   (an error below the last digit: one digit of it)
        format_noise_scale(float("nan"))  -> "n/a"

    Args:
        value (float, optional): the estimate (e.g. ``stats["noise_scale"]`` or ``opt.noise_scale``); NaN and
            ``None`` (no estimate yet) give ``"n/a"``.
        stderr (float, optional): its standard error; left out when ``None`` or NaN (default: None).
    """
    if value is None:
        return "n/a"
    value = float(value)
    if math.isnan(value):
        return "n/a"
    if math.isinf(value):
        return "inf" if value > 0 else "-inf"
    power, decimals = _unit_and_decimals(value)
    unit, suffix = 1000.0**power, _SUFFIXES[power]
    text = f"{value / unit:.{decimals}f}{suffix}"
    if stderr is None or math.isnan(float(stderr)):
        return text
    stderr = abs(float(stderr))
    if math.isinf(stderr):
        return f"{text} ± inf"
    err = stderr / unit
    shown = f"{err:.{decimals}f}"
    if stderr > 0 and float(shown) == 0:  # an error below the value's last digit: one significant digit of it,
        shown = f"{err:.1g}"  # or a bound where that takes an exponent
        if "e" in shown or float(shown) == 0:
            shown = f"<{10.0**-decimals:.{decimals}f}"
    return f"{text} ± {shown}{suffix}"


def _format_plain(value: float) -> str:
    if math.isnan(value):
        return "n/a"
    if math.isinf(value):
        return "inf" if value > 0 else "-inf"
    if value == int(value) and abs(value) < 1e15:  # counts (batch size, examples) read best without decimals
        return str(int(value))
    return f"{value:.4g}"


# ------------------------------------------------------------------------------------------------------------
# JSON lines


class JSONLLogger(Logger):
    """Write one JSON object per line: ``{"step": step, **stats}``.

    * Values that are not finite (NaN before an estimate exists, inf) are written as ``null``, so every line
      is valid JSON (``json.dumps`` would otherwise write the non-standard ``NaN``); :func:`read_jsonl` turns
      them back into NaN.
    * Each line is flushed to the operating system as soon as it is written: a crashed process loses nothing
      already logged. ``fsync=True`` also forces it to disk (survives a power cut, costs a disk round trip).
    * An existing file is **appended to** (``append=True``), so a run resumed from a checkpoint continues the
      same log. Steps between that checkpoint and the crash then appear twice; readers such as
      :func:`bscale.plot_run` keep the later line for each step. A last line the crash cut short is removed
      first, so the log stays valid. For a fresh run, pass ``append=False`` (or a new file): a run appended
      to an older run's log makes :func:`bscale.plot_run` draw only the last run, with a warning.
    * A key named ``"step"`` in ``stats`` is ignored: the ``step`` argument is the one written.

    Args:
        path (str or os.PathLike): file to write; missing parent folders are created.
        append (bool): append to an existing file rather than truncate it (default: True).
        fsync (bool): ``os.fsync`` after every line (default: False).
    """

    def __init__(self, path: str | os.PathLike[str], *, append: bool = True, fsync: bool = False) -> None:
        if not isinstance(path, (str, os.PathLike)):
            raise ValueError(f"path must be a file path, got {path!r}")
        self.path = Path(path)
        if self.path.is_dir():
            raise ValueError(f"path {str(self.path)!r} is a folder; pass a file name such as 'run.jsonl'")
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._fsync = bool(fsync)
        if append:
            _drop_cut_last_line(self.path)
        self._file: io.TextIOWrapper | None = open(  # held open across calls, closed in close()
            self.path, "a" if append else "w", encoding="utf-8"
        )

    def log(self, stats: Mapping[str, float], step: int) -> None:
        if self._file is None:
            raise RuntimeError(f"JSONLLogger({str(self.path)!r}) is closed; create a new logger to write again")
        record: dict[str, float | int | None] = {"step": _check_step(step)}
        for key, value in _as_floats(stats).items():
            if key != "step":
                record[key] = value if math.isfinite(value) else None
        # allow_nan=False proves the line is strict JSON: every non-finite value was mapped to None above.
        self._file.write(json.dumps(record, allow_nan=False) + "\n")
        self._file.flush()
        if self._fsync:
            os.fsync(self._file.fileno())

    def close(self) -> None:
        if self._file is not None:
            self._file.close()
            self._file = None


def _drop_cut_last_line(path: Path) -> None:
    """Repair a log whose last line has no newline (the process died while writing it), so that lines appended
    next start on a line of their own: a whole record only lacks its newline and gets it; a record cut short is
    removed, back to the last whole line."""
    try:
        if not stat.S_ISREG(os.stat(path).st_mode):  # a pipe, a terminal, /dev/stdout: nothing to repair
            return
        with open(path, "rb+") as f:
            size = f.seek(0, os.SEEK_END)
            if size == 0:
                return
            f.seek(size - 1)
            if f.read(1) == b"\n":
                return
            # Walk back to the last newline in blocks (a record is shorter than a block or two); a last line longer
            # than _LONGEST_RECORD is no record this logger wrote, and is not kept to be parsed.
            end, keep, blocks, held = size, 0, [], 0
            while end > 0:
                start = max(0, end - 65536)
                f.seek(start)
                block = f.read(end - start)
                cut = block.rfind(b"\n")
                if cut >= 0:
                    keep = start + cut + 1
                    blocks.append(block[cut + 1 :])
                    break
                held += len(block)
                blocks.append(block if held <= _LONGEST_RECORD else b"")
                end = start
            if held <= _LONGEST_RECORD and _is_record(b"".join(reversed(blocks))):
                f.seek(size)
                f.write(b"\n")
                return
            f.truncate(keep)
    except FileNotFoundError:
        return
    warnings.warn(f"{path}: removed a last line cut short by a crash before appending", RuntimeWarning, stacklevel=3)


_LONGEST_RECORD = 1 << 20


def _is_record(line: bytes) -> bool:
    try:
        return isinstance(json.loads(line), dict)
    except ValueError:  # JSONDecodeError and UnicodeDecodeError both are
        return False


def read_jsonl(path: str | os.PathLike[str]) -> list[dict[str, float]]:
    """Read a file written by :class:`JSONLLogger`: one dict per line, ``null`` read back as NaN.

    A last line cut short (the process died while writing it) is skipped with a warning; a malformed line
    anywhere else raises ``ValueError``, as it means the file is not such a log.

    Args:
        path (str or os.PathLike): the ``.jsonl`` file.
    """
    lines = Path(path).read_text(encoding="utf-8").splitlines()
    records: list[dict[str, float]] = []
    for number, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        try:
            raw = json.loads(line)
        except json.JSONDecodeError as err:
            if number == len(lines):
                warnings.warn(f"{path}: skipped a truncated last line ({err})", RuntimeWarning, stacklevel=2)
                continue
            raise ValueError(f"{path}, line {number}: not JSON ({err})") from None
        if not isinstance(raw, dict):
            raise ValueError(f"{path}, line {number}: expected a JSON object, got {type(raw).__name__}")
        records.append({k: math.nan if v is None else v for k, v in raw.items()})
    return records


# ------------------------------------------------------------------------------------------------------------
# TensorBoard


class TensorBoardLogger(Logger):
    """Write each finite statistic as a TensorBoard scalar ``prefix + key`` at ``step``.

    Uses :class:`torch.utils.tensorboard.SummaryWriter` (needs ``pip install tensorboard``). Given a folder,
    the logger creates its own writer and closes it in :meth:`close`; given a writer (anything with
    ``add_scalar``), it shares it and only flushes it in :meth:`close`, leaving it open for the rest of the
    training loop. The writer is flushed after every :meth:`log` so a crash loses nothing already logged.

    Args:
        log_dir_or_writer (str, os.PathLike or SummaryWriter): event folder, or a writer to share.
        prefix (str): prepended to every tag (default: ``"bscale/"``).
    """

    def __init__(self, log_dir_or_writer: str | os.PathLike[str] | Any, prefix: str = "bscale/") -> None:
        self.prefix = _check_prefix(prefix)
        if isinstance(log_dir_or_writer, (str, os.PathLike)):
            try:
                from torch.utils.tensorboard import SummaryWriter
            except ImportError as err:
                raise ImportError("TensorBoardLogger needs the tensorboard package: pip install tensorboard") from err
            self._writer: Any = SummaryWriter(log_dir=os.fspath(log_dir_or_writer))
            self._owns_writer = True
        elif callable(getattr(log_dir_or_writer, "add_scalar", None)):
            self._writer = log_dir_or_writer
            self._owns_writer = False
        else:
            raise ValueError(
                f"log_dir_or_writer must be a folder path or a SummaryWriter, got {type(log_dir_or_writer)}"
            )
        self._closed = False

    @property
    def writer(self) -> Any:
        """The underlying writer."""
        return self._writer

    def log(self, stats: Mapping[str, float], step: int) -> None:
        if self._closed:
            raise RuntimeError("TensorBoardLogger is closed; create a new logger to write again")
        step = _check_step(step)
        for tag, value in _finite(stats, self.prefix).items():
            self._writer.add_scalar(tag, value, global_step=step)
        flush = getattr(self._writer, "flush", None)
        if callable(flush):
            flush()

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        if self._owns_writer:
            self._writer.close()
        elif callable(getattr(self._writer, "flush", None)):
            self._writer.flush()


# ------------------------------------------------------------------------------------------------------------
# Weights & Biases


class WandbLogger(Logger):
    """Log the finite statistics to a Weights & Biases run with ``run.log``.

    ``run=None`` uses the run current at each :meth:`log` (``wandb.run``), so the logger may be created before
    ``wandb.init()``. With ``pass_step=True`` the optimizer step is given as wandb's ``step``; set it to False
    when the training loop also calls ``wandb.log`` with wandb's own step counter (wandb drops values logged
    at a step lower than its current one): the step is then logged as the metric ``prefix + "step"`` instead.
    :meth:`close` does not finish the run, which belongs to the caller.

    Args:
        run (wandb run, optional): the run to log to; anything with a ``log(dict, step=...)`` method works
            (default: None, the current ``wandb.run``).
        prefix (str): prepended to every key (default: ``"bscale/"``).
        pass_step (bool): pass ``step=`` to ``run.log`` (default: True).
        commit (bool, optional): passed to ``run.log``; ``False`` attaches the values to the caller's next
            committed ``wandb.log`` (default: None, wandb's own default).
    """

    def __init__(
        self, run: Any = None, prefix: str = "bscale/", *, pass_step: bool = True, commit: bool | None = None
    ) -> None:
        self.prefix = _check_prefix(prefix)
        self._wandb: Any = None
        if run is None:
            try:
                import wandb
            except ImportError as err:
                raise ImportError(
                    "WandbLogger(run=None) needs the wandb package: pip install wandb (or pass run=)"
                ) from err
            self._wandb = wandb
        elif not callable(getattr(run, "log", None)):
            raise ValueError(f"run must be a wandb run (with a log method), got {type(run)}")
        self._run = run
        self._pass_step = bool(pass_step)
        self._commit = commit

    def _current_run(self) -> Any:
        if self._run is not None:
            return self._run
        run = getattr(self._wandb, "run", None)
        if run is None:
            raise RuntimeError("WandbLogger has no run to log to: call wandb.init() first, or pass run=")
        return run

    def log(self, stats: Mapping[str, float], step: int) -> None:
        step = _check_step(step)
        values: dict[str, float | int] = dict(_finite(stats, self.prefix))
        kwargs: dict[str, Any] = {}
        if self._pass_step:
            kwargs["step"] = step
        else:
            values[self.prefix + "step"] = step
        if self._commit is not None:
            kwargs["commit"] = self._commit
        self._current_run().log(values, **kwargs)


# ------------------------------------------------------------------------------------------------------------
# Lightning


def _lightning_callback_bases() -> tuple[type, ...]:
    """Lightning's ``Callback`` classes that can be imported (``lightning`` and/or ``pytorch_lightning``)."""
    bases: list[type] = []
    for module_name in ("lightning.pytorch", "pytorch_lightning"):
        try:
            module = __import__(module_name, fromlist=["Callback"])
        except ImportError:
            continue
        base = getattr(module, "Callback", None)
        if isinstance(base, type) and base not in bases:
            bases.append(base)
    return tuple(bases)


_LIGHTNING_CLASSES: dict[tuple[type, ...], type] = {}


def _find_stats_owner(candidate: Any) -> Any:
    """``candidate`` if it has ``stats``, else the optimizer a ``LightningOptimizer`` wraps, else None."""
    if hasattr(candidate, "stats"):
        return candidate
    inner = getattr(candidate, "_optimizer", None)
    if inner is not None and hasattr(inner, "stats"):
        return inner
    return None


class LightningCallback:
    """A Lightning callback that logs the wrapped optimizer's ``stats`` through ``pl_module.log_dict``.

    Lightning is not a dependency: on creation the instance becomes a subclass of
    ``lightning.pytorch.Callback`` (and/or ``pytorch_lightning.Callback``) when either is installed, so
    ``Trainer(callbacks=[...])`` accepts it; without Lightning it is a plain object with the same hook.

    **Hook.** ``on_train_batch_end``, logging when ``trainer.global_step`` (the count of optimizer steps) has
    moved since the last call and is a multiple of ``every_n_steps``. Lightning calls this hook after the
    batch's optimizer step, in automatic and manual optimization alike, and once per batch under gradient
    accumulation (the step check skips the batches that only accumulate). ``on_before_zero_grad`` would be
    wrong: Lightning zeroes gradients at the *start* of the next accumulation window, so that hook fires
    before the first step as well, late for every other, and never in manual optimization.

    Values are logged with ``on_step=True, on_epoch=False``; non-finite ones are left out. The statistics are
    already global under data parallelism (the wrapper reduces them), so no ``sync_dist`` is needed.

    Args:
        optimizer_or_getter (optimizer or callable, optional): the wrapped optimizer, or a function of no
            arguments returning it (default: None, the first of ``trainer.optimizers`` that has ``stats``).
        every_n_steps (int): log every this many optimizer steps; match the Trainer's ``log_every_n_steps`` to
            avoid reading statistics Lightning would discard (default: 1).
        prefix (str): prepended to every key (default: ``"bscale/"``).
    """

    def __new__(cls, *args: Any, **kwargs: Any) -> LightningCallback:
        if cls is LightningCallback:
            bases = _lightning_callback_bases()
            if bases:
                if bases not in _LIGHTNING_CLASSES:
                    _LIGHTNING_CLASSES[bases] = type(
                        "LightningCallback", (LightningCallback, *bases), {"__module__": __name__}
                    )
                cls = _LIGHTNING_CLASSES[bases]
        return super().__new__(cls)

    def __init__(
        self,
        optimizer_or_getter: Any = None,
        every_n_steps: int = 1,
        prefix: str = "bscale/",
    ) -> None:
        if isinstance(every_n_steps, bool) or not isinstance(every_n_steps, int) or every_n_steps < 1:
            raise ValueError(f"every_n_steps must be an integer >= 1, got {every_n_steps!r}")
        if not (
            optimizer_or_getter is None
            or _find_stats_owner(optimizer_or_getter) is not None
            or callable(optimizer_or_getter)
        ):
            raise ValueError(
                "optimizer_or_getter must be the bscale-wrapped optimizer (with .stats), a function "
                f"returning it, or None; got {type(optimizer_or_getter)}"
            )
        self.optimizer_or_getter = optimizer_or_getter
        self.every_n_steps = every_n_steps
        self.prefix = _check_prefix(prefix)
        self._last_step = -1

    def __reduce__(self) -> tuple[Any, ...]:
        # The class made in __new__ has no importable name; rebuild through the public class instead.
        return (LightningCallback, (), dict(self.__dict__))

    def _optimizer(self, trainer: Any) -> Any:
        given = self.optimizer_or_getter
        if given is not None:
            owner = _find_stats_owner(given)
            if owner is None:
                owner = _find_stats_owner(given())
            if owner is None:
                raise RuntimeError("the optimizer getter returned an object without .stats; return bscale.wrap(...)")
            return owner
        for candidate in getattr(trainer, "optimizers", ()) or ():
            owner = _find_stats_owner(candidate)
            if owner is not None:
                return owner
        raise RuntimeError(
            "LightningCallback found no optimizer with .stats in trainer.optimizers: return bscale.wrap(...) "
            "from configure_optimizers, or pass LightningCallback(optimizer_or_getter=...)"
        )

    def on_train_batch_end(self, trainer: Any, pl_module: Any, outputs: Any, batch: Any, batch_idx: int) -> None:
        """Log the statistics if an optimizer step was taken since the last call and is due."""
        step = int(trainer.global_step)
        if step == self._last_step or step == 0 or step % self.every_n_steps != 0:
            return
        self._last_step = step
        values = _finite(self._optimizer(trainer).stats, self.prefix)
        if values:
            pl_module.log_dict(values, on_step=True, on_epoch=False, prog_bar=False, logger=True)


# ------------------------------------------------------------------------------------------------------------
# Plain logging


_LABELS = {"noise_scale": "B_noise", "lr_scale": "lr scale", "batch_size": "batch"}


class PrintLogger(Logger):
    """Write one line per call through :mod:`logging`: ``step 120: B_noise 1.23k ± 0.10k | lr scale 1.5``.

    A key ``k`` with a companion ``k + "_stderr"`` in the stats is shown as ``value ± stderr``
    (:func:`format_noise_scale`); keys absent from the stats are skipped and NaN is shown as ``n/a``.

    Args:
        logger (logging.Logger or str, optional): where to write, or a logger name
            (default: None, the ``"bscale"`` logger).
        keys (iterable of str): the statistics to show, in order
            (default: ``("noise_scale", "lr_scale", "batch_size")``).
        level (int): the logging level (default: ``logging.INFO``).
    """

    def __init__(
        self,
        logger: logging.Logger | str | None = None,
        keys: Iterable[str] = ("noise_scale", "lr_scale", "batch_size"),
        *,
        level: int = logging.INFO,
    ) -> None:
        if logger is None or isinstance(logger, str):
            logger = logging.getLogger(logger or "bscale")
        elif not isinstance(logger, logging.Logger):
            raise ValueError(f"logger must be a logging.Logger, a logger name or None, got {type(logger)}")
        if isinstance(keys, str):
            raise ValueError(f"keys must be a sequence of names, got the single string {keys!r}; wrap it in a tuple")
        self.keys = tuple(keys)
        if not all(isinstance(k, str) for k in self.keys):
            raise ValueError(f"keys must be strings, got {self.keys!r}")
        self.logger = logger
        self.level = level

    def format(self, stats: Mapping[str, float], step: int) -> str:
        """The line :meth:`log` writes."""
        values = _as_floats(stats)
        parts = []
        for key in self.keys:
            if key not in values:
                continue
            label = _LABELS.get(key, key)
            stderr_key = key + "_stderr"
            if stderr_key in values:
                parts.append(f"{label} {format_noise_scale(values[key], values[stderr_key])}")
            else:
                parts.append(f"{label} {_format_plain(values[key])}")
        return f"step {_check_step(step)}: " + " | ".join(parts)

    def log(self, stats: Mapping[str, float], step: int) -> None:
        if self.logger.isEnabledFor(self.level):  # format nothing when the line would be dropped
            self.logger.log(self.level, "%s", self.format(stats, step))
