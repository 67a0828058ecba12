"""Plot a run's log (the records :class:`bscale.JSONLLogger` writes) as a PNG."""

from __future__ import annotations

import os
import warnings
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from .log import read_jsonl

if TYPE_CHECKING:
    from matplotlib.figure import Figure

__all__ = ["plot_run"]


def _load(source: str | os.PathLike[str] | Iterable[Mapping[str, Any]]) -> list[Mapping[str, Any]]:
    if isinstance(source, (str, os.PathLike)):
        return list(read_jsonl(source))
    if isinstance(source, Mapping):
        raise ValueError("pass a list of records (dicts), or the path of a .jsonl file, not a single dict")
    records = list(source)
    if not all(isinstance(r, Mapping) for r in records):
        raise ValueError("every record must be a dict of names to numbers, as JSONLLogger writes them")
    return records


def _latest_per_step(records: list[Mapping[str, Any]]) -> list[Mapping[str, Any]]:
    """One record per step, the last one written, in step order, from the log's last run.

    A run resumed from a checkpoint appends to its log, so the steps between the checkpoint and the crash
    appear twice; the later lines belong to the run that continued. A log whose steps go back to its first
    step or before holds a new run appended to an old one (a script run again): only the last run is kept,
    with a warning.
    """
    if not records or not all(isinstance(r.get("step"), (int, float)) for r in records):
        return records
    start, first = 0, records[0]["step"]
    for i in range(1, len(records)):
        if records[i]["step"] <= first and records[i]["step"] < records[i - 1]["step"]:
            start, first = i, records[i]["step"]
    if start:
        warnings.warn(
            f"the log holds {start} records of an earlier run before the last one (its steps start over at line "
            f"{start + 1}); only the last run is drawn. Pass append=False to JSONLLogger for a fresh log per run",
            RuntimeWarning,
            stacklevel=3,
        )
    latest: dict[float, Mapping[str, Any]] = {}
    for record in records[start:]:
        latest[record["step"]] = record
    return [latest[s] for s in sorted(latest)]


def _column(records: list[Mapping[str, Any]], key: str) -> np.ndarray:
    """``key`` of every record as float64; absent, ``None`` or non-numeric entries read as NaN."""
    out = np.full(len(records), np.nan)
    for i, record in enumerate(records):
        value = record.get(key)
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            out[i] = float(value)
    return out


def _build_figure(records: list[Mapping[str, Any]], title: str | None) -> Figure:
    from matplotlib.figure import Figure  # imported here so that `import bscale` does not load matplotlib

    records = _latest_per_step(records)
    x, x_label = _column(records, "examples"), "examples seen"
    if not np.isfinite(x).any():
        x, x_label = _column(records, "step"), "optimizer step"
    if not np.isfinite(x).any():
        x, x_label = np.arange(len(records), dtype=np.float64), "record"

    noise, stderr = _column(records, "noise_scale"), _column(records, "noise_scale_stderr")
    batch, loss, lr_scale = (_column(records, k) for k in ("batch_size", "loss", "lr_scale"))
    precond, regime = _column(records, "adam_preconditioned/noise_scale"), _column(records, "coord/frac_small_batch")
    has_loss, has_lr, has_regime = np.isfinite(loss).any(), np.isfinite(lr_scale).any(), np.isfinite(regime).any()

    n_panels = 1 + int(has_loss) + int(has_lr) + int(has_regime)
    fig = Figure(figsize=(8.0, 1.0 + 2.6 * n_panels), layout="constrained")
    axes = fig.subplots(n_panels, 1, sharex=True, squeeze=False)[:, 0]
    if title:
        fig.suptitle(title)

    ax = axes[0]
    # A log axis shows only positive values: B_noise is clamped at 0 early on, and NaN before any estimate.
    ok = np.isfinite(x) & np.isfinite(noise) & (noise > 0)
    ok_batch = np.isfinite(x) & np.isfinite(batch) & (batch > 0)
    ok_precond = np.isfinite(x) & np.isfinite(precond) & (precond > 0)
    positive = np.concatenate([noise[ok], batch[ok_batch], precond[ok_precond]])
    if ok.any():
        ax.plot(x[ok], noise[ok], color="C0", label="B_noise")
        band = ok & np.isfinite(stderr)
        if band.any():
            # Where the error bar reaches zero the band is cut at half the smallest value shown: a log axis
            # cannot draw it further, and the cut keeps the axis range set by the data, not the band.
            floor = 0.5 * positive.min()
            low = np.maximum(noise[band] - stderr[band], floor)
            ax.fill_between(x[band], low, noise[band] + stderr[band], color="C0", alpha=0.25, label="± stderr")
    else:
        ax.text(0.5, 0.5, "no B_noise estimate yet", transform=ax.transAxes, ha="center", va="center")
    if ok_batch.any():
        # A record holds the examples seen after its step and the batch that step used: the batch spans the
        # examples up to its own x, so it is drawn back to the previous record.
        # The first record's step began its own batch of examples earlier.
        xb, yb = x[ok_batch], batch[ok_batch]
        xb, yb = np.concatenate([[max(xb[0] - yb[0], 0.0)], xb]), np.concatenate([yb[:1], yb])
        ax.step(xb, yb, where="pre", color="C3", label="batch size")
    if ok_precond.any():  # per-coordinate mode with Adam
        ax.plot(x[ok_precond], precond[ok_precond], color="C4", linestyle="--", label="B_noise, Adam-preconditioned")
    if positive.size:
        ax.set_yscale("log")
        ax.legend(loc="best")
    ax.set_ylabel("examples")
    ax.set_title("gradient noise scale and batch size")
    ax.grid(True, which="major", alpha=0.3)

    panel = 1
    if has_loss:
        ax = axes[panel]
        ok = np.isfinite(x) & np.isfinite(loss)
        ax.plot(x[ok], loss[ok], color="C2")
        ax.set_ylabel("loss")
        ax.grid(True, alpha=0.3)
        panel += 1
    if has_lr:
        ax = axes[panel]
        ok = np.isfinite(x) & np.isfinite(lr_scale)
        ax.plot(x[ok], lr_scale[ok], color="C1")
        ax.axhline(1.0, color="0.5", linestyle="--", linewidth=0.8)  # 1.0: the learning rate as the user set it
        ax.set_ylabel("lr scale")
        ax.grid(True, alpha=0.3)
        panel += 1
    if has_regime:  # per-coordinate mode: how far the Adam law's small-batch reading can be trusted
        ax = axes[panel]
        ok = np.isfinite(x) & np.isfinite(regime)
        ax.plot(x[ok], regime[ok], color="C5")
        noise_only = _column(records, "coord/frac_small_batch_noise_only")
        ok = np.isfinite(x) & np.isfinite(noise_only)
        if ok.any():  # the share that reads inside with no signal at all: the statistic's floor of meaning
            ax.plot(x[ok], noise_only[ok], color="C5", linestyle=":", linewidth=1.0, label="pure noise")
            ax.legend(loc="lower left", fontsize="small")
        ax.set_ylim(0.0, 1.0)
        ax.set_ylabel("small-batch\nregime share")
        ax.set_title("coordinates with B < πσ²/(2μ²) (Surge)", fontsize="medium")
        ax.grid(True, alpha=0.3)
    axes[-1].set_xlabel(x_label)
    return fig


def plot_run(
    jsonl_path_or_records: str | os.PathLike[str] | Iterable[Mapping[str, Any]],
    png_path: str | os.PathLike[str],
    *,
    title: str | None = None,
) -> Path:
    """Plot a run's statistics against the number of examples seen and save them as a PNG.

    Panels, top to bottom:

    * ``noise_scale`` (B_noise) with a band of ± ``noise_scale_stderr``, and ``batch_size`` as a step line on
      the same log axis, so that a batch grown adaptively can be seen following B_noise;
    * ``loss``, when the records have it;
    * ``lr_scale``, when the records have it, with a dashed line at 1 (the learning rate as set);
    * ``coord/frac_small_batch``, from per-coordinate mode: the share of coordinates inside Surge's small-batch
      regime, dotted the share that would read inside with pure noise (the top panel then also draws
      ``adam_preconditioned/noise_scale``, dashed).

    The x axis is ``examples`` (falling back to ``step``). Rows whose values are NaN or ``null`` (before the
    first estimate) are left out of the panel they would spoil. When a step appears more than once (a resumed
    run appends to its log) the last record for it is used. Drawing uses matplotlib's Agg renderer and no
    display.

    Args:
        jsonl_path_or_records (str, os.PathLike or iterable of dict): a file written by
            :class:`bscale.JSONLLogger`, or its records.
        png_path (str or os.PathLike): where to write the PNG; missing parent folders are created.
        title (str, optional): title over the figure (default: None).

    Returns:
        pathlib.Path: ``png_path``.
    """
    records = _load(jsonl_path_or_records)
    if not records:
        raise ValueError("no records to plot: log at least one step (JSONLLogger.log) before plotting")
    if title is not None and not isinstance(title, str):
        raise ValueError(f"title must be a string or None, got {type(title)}")
    if not all(isinstance(k, str) for r in records for k in r):
        raise ValueError("record keys must be strings")
    path = Path(png_path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig = _build_figure(records, title)
    fig.savefig(path, format="png", dpi=100)  # 100 dpi: 800 px wide, readable and small
    return path
