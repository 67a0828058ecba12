r"""Per-coordinate gradient statistics at the optimizer step (the inputs of the Surge analysis).

From k microbatch gradients g_j of b examples each, kept as S = Σ_j g_j and C = Σ_j g_j², every coordinate
gets

.. math::
    \hat\mu = S/k, \quad m_2 = C/k, \quad
    \hat\sigma^2 = b \cdot \max(m_2 - \hat\mu^2, 0) \cdot \frac{k}{k-1}

(:math:`\hat\sigma^2` is the unbiased per-example variance: the microbatch means have variance σ²/b).
The torch path here is also the CPU path in production; the Triton path (`coord_triton`) is imported only
when chosen. `coordinate_stats_reference` is the float64 definition the tests hold both to.
"""

from __future__ import annotations

import functools
import itertools
import math
import threading
import weakref
from collections.abc import Sequence
from typing import NamedTuple

import numpy
import torch

from ._layout import flat_like, is_dense, to_device
from .dispatch import resolve_backend

# Default SNR histogram edges: 10^-3 .. 10^1, four bins per decade. Surge thm. 3 needs |μ|/σ ≪ √(π/2B),
# i.e. SNRs well under 0.1 at B ~ 100, so the range spans the regime boundary at every practical batch size.
DEFAULT_SNR_EDGES: tuple[float, ...] = tuple(10.0 ** (-3.0 + 4.0 * i / 16) for i in range(17))

# Scalars of the output vector, in order; the histogram follows them.
SLOTS: tuple[str, ...] = (
    "sum_mu_sq",
    "sum_sigma_sq",
    "sum_mu_sq_over_sigma",
    "num_coords",
    "precond_small",
    "precond_big",
    "frac_small_batch",
    "sum_sigma",
    "num_no_grad",
)
# A coordinate with no gradient in the step (μ̂ = σ̂ = 0, or NaN) gets the bin index one past the histogram's
# bins: it is counted into `num_no_grad` and left out of the histogram and of `frac_small_batch`.
_FRAC, _NO_GRAD = SLOTS.index("frac_small_batch"), SLOTS.index("num_no_grad")

# Elements per slice of the torch path. A slice costs ~22 whole-slice eager ops whatever its size: at 2^18,
# their dispatch (5-15 µs an op) is a few percent of the arithmetic (~7 ns an element on one core), while
# the nine float32 scratch rows and the int16 bin indices (10 MiB) stay in the L3 cache; 2^17 measures the
# same, smaller slices pay more dispatch and larger ones spill. Slice sums are pairwise float32 sums over at
# most this many terms (relative error ~1e-7).
_SLICE = 1 << 18
# Tensors below this many elements are packed (one copy each) into shared slices: for them dispatch, not
# arithmetic, is the cost. A 240k-parameter char-level transformer (28 tensors) becomes one slice.
_PACK_BELOW = 1 << 16
# Smallest normal float32. Special values make the vectorized log several times (log of 0 ~25x) slower, so
# its inputs are first clamped into the normal range where that cannot change a result.
_TINY = torch.finfo(torch.float32).tiny

_EDGE_CACHE: dict[tuple[tuple[float, ...], torch.device], torch.Tensor] = {}


@functools.lru_cache(maxsize=32)
def _geometric(values: tuple[float, ...] | None) -> tuple[float, float] | None:
    """(log10 of the first edge, log10 step) when the edges are positive and evenly spaced in log10."""
    if values is None or len(values) < 2 or values[0] <= 0:
        return None
    logs = [math.log10(e) for e in values]
    step = (logs[-1] - logs[0]) / (len(logs) - 1)
    if step <= 0 or any(abs(x - (logs[0] + i * step)) > 1e-9 * (1 + abs(x)) for i, x in enumerate(logs)):
        return None
    return logs[0], step


def _host_edges(snr_edges: Sequence[float] | torch.Tensor | None) -> tuple[float, ...] | None:
    if snr_edges is None:
        return DEFAULT_SNR_EDGES
    if isinstance(snr_edges, torch.Tensor):
        return tuple(snr_edges.tolist()) if snr_edges.device.type == "cpu" else None
    return tuple(float(e) for e in snr_edges)


def _edges_tensor(snr_edges: Sequence[float] | torch.Tensor | None, device: torch.device) -> torch.Tensor:
    if isinstance(snr_edges, torch.Tensor):
        if snr_edges.dim() != 1 or snr_edges.numel() == 0:
            raise ValueError(f"snr_edges must be a non-empty 1-D sequence, got shape {tuple(snr_edges.shape)}")
        if snr_edges.device.type != "cpu":
            # Already on the device: used as given (checking monotonicity would need a host sync).
            return snr_edges.to(device=device, dtype=torch.float32).contiguous()
        snr_edges = snr_edges.tolist()
    values = DEFAULT_SNR_EDGES if snr_edges is None else tuple(float(e) for e in snr_edges)
    key = (values, device)
    edges = _EDGE_CACHE.get(key)
    if edges is None:  # only checked edges are cached
        if not values:
            raise ValueError("snr_edges must hold at least one edge")
        if any(not math.isfinite(e) for e in values) or any(b <= a for a, b in itertools.pairwise(values)):
            raise ValueError(f"snr_edges must be finite and strictly increasing, got {values}")
        edges = to_device(torch.tensor(values, dtype=torch.float32), device)
        if len(_EDGE_CACHE) >= 32:
            _EDGE_CACHE.clear()
        _EDGE_CACHE[key] = edges
    return edges


def _validate(
    grad_sums: Sequence[torch.Tensor],
    coord_sq: Sequence[torch.Tensor],
    exp_avg_sq: Sequence[torch.Tensor] | None,
    num_microbatches: int,
    microbatch_size: float,
    eps: float,
) -> None:
    if isinstance(num_microbatches, bool) or int(num_microbatches) != num_microbatches or num_microbatches < 2:
        raise ValueError(
            f"num_microbatches must be an integer >= 2, got {num_microbatches}; a variance needs at least "
            "two "
            "microbatches (use gradient accumulation or data-parallel ranks)"
        )
    if not (math.isfinite(microbatch_size) and microbatch_size > 0):
        raise ValueError(f"microbatch_size must be a positive number of examples, got {microbatch_size}")
    if not (math.isfinite(eps) and eps >= 0):
        raise ValueError(f"eps must be a finite number >= 0, got {eps}")
    if len(coord_sq) != len(grad_sums):
        raise ValueError(f"coord_sq has {len(coord_sq)} tensors for {len(grad_sums)} grad_sums; pass one each")
    if exp_avg_sq is not None and len(exp_avg_sq) != len(grad_sums):
        raise ValueError(f"exp_avg_sq has {len(exp_avg_sq)} tensors for {len(grad_sums)} grad_sums; pass one each")
    device = coord_sq[0].device if coord_sq else None
    for i, (s, c) in enumerate(zip(grad_sums, coord_sq, strict=True)):
        if c.dtype != torch.float32 or not is_dense(c):
            raise ValueError(
                f"coord_sq[{i}] must be a dense float32 tensor, got {c.dtype}; allocate it with "
                "torch.zeros_like(param, dtype=torch.float32)"
            )
        if c.device != device:
            raise ValueError(f"coord_sq[{i}] is on {c.device}, coord_sq[0] on {device}; move them to one device")
        others = [("grad_sums", s)] + ([("exp_avg_sq", exp_avg_sq[i])] if exp_avg_sq is not None else [])
        for name, t in others:
            if t.shape != c.shape or t.device != device or not t.is_floating_point():
                raise ValueError(
                    f"{name}[{i}] must be a floating tensor of shape {tuple(c.shape)} on {device}, got "
                    f"{t.dtype} {tuple(t.shape)} on {t.device}"
                )


def _pack(out: torch.Tensor, precond: bool) -> dict[str, torch.Tensor]:
    stats = {name: out[i] for i, name in enumerate(SLOTS) if precond or not name.startswith("precond")}
    stats["snr_hist"] = out[len(SLOTS) :]
    return stats


def coordinate_stats(
    grad_sums: Sequence[torch.Tensor],
    coord_sq: Sequence[torch.Tensor],
    num_microbatches: int,
    microbatch_size: float,
    *,
    exp_avg_sq: Sequence[torch.Tensor] | None = None,
    eps: float = 1e-8,
    snr_edges: Sequence[float] | torch.Tensor | None = None,
    reset: bool = True,
    backend: str | None = None,
) -> dict[str, torch.Tensor]:
    r"""Per-coordinate noise statistics of one optimizer step, reduced over every coordinate, in float32.

    With :math:`\hat\mu, m_2, \hat\sigma^2` per coordinate as in the module docstring, B = k·b, and
    :math:`P = 1/(\sqrt{v} + \epsilon)` from Adam's second moment v:

    .. math::
        \texttt{sum\_mu\_sq} = \sum \hat\mu^2, \quad
        \texttt{sum\_sigma\_sq} = \sum \hat\sigma^2, \quad
        \texttt{sum\_mu\_sq\_over\_sigma} = \sum_{\hat\sigma > 0} \hat\mu^2 / \hat\sigma, \quad
        \texttt{sum\_sigma} = \sum \hat\sigma, \\
        \texttt{precond\_small} = \sum P^2 m_2, \quad \texttt{precond\_big} = \sum P^2 \hat\mu^2, \quad
        \texttt{frac\_small\_batch} = \frac{1}{N - N_0}\#\{B < \pi\hat\sigma^2 / (2\hat\mu^2)\}

    These are plug-in sums of one step's estimates (:mod:`bscale.coord_stats` turns Σ μ̂² and Σ μ̂²/σ̂ into
    unbiased ones with the help of `sum_sigma`). `sum_mu_sq_over_sigma` is the numerator of the small-batch
    Surge law (eq. 16: erf(x) ≈ 2x/√π turns Σ E_i μ_i into √(2B/π) Σ μ_i²/σ_i); `frac_small_batch` is the
    share of coordinates inside the regime of Surge thm. 3 (μ̂ = 0 counts as inside) among the N − N₀ that had
    a gradient; `precond_small` and
    `precond_big` are |P g|² averaged over microbatches and |P ḡ|², the two batch sizes of McCandlish App. A.1
    for the preconditioned gradient. `snr_hist` counts
    |μ̂|/σ̂ in `len(snr_edges) + 1` bins: bin 0 below the first edge, bin i in [edge[i-1], edge[i]), the last
    bin at or above the last edge together with every coordinate where σ̂ = 0 < |μ̂|. The N₀ coordinates with
    no gradient in the step (μ̂ = σ̂ = 0: a frozen slice, a ReLU that never fired, an embedding row no token
    used) have no SNR: `num_no_grad` counts them, and neither the histogram nor `frac_small_batch` includes
    them (NaN when no coordinate had a gradient).

    Precision: float32 throughout, with float64 only to add up per-slice sums. σ̂² comes from m2 − μ̂², so a
    coordinate with |μ̂|/σ̂ beyond ~10³ has a variance at the level of float32 rounding (clamped at 0); an
    SNR within float32 rounding of an edge may land one bin over. Counts above 2^24 round to float32. A NaN
    input makes the sums NaN and counts with `num_no_grad`.

    Args:
        grad_sums (sequence of Tensor): S = Σ_j g_j per parameter (the accumulated `.grad` in sum units)
        coord_sq (sequence of Tensor): Σ_j g_j² per parameter, dense float32 (filled by
            :func:`accumulate_sq_norms`)
        num_microbatches (int): k >= 2
        microbatch_size (float): b, examples per microbatch (the harmonic mean when they differ)
        exp_avg_sq (sequence of Tensor, optional): Adam's v per parameter; adds the `precond_*` keys
            (default: None)
        eps (float, optional): Adam's epsilon in P (default: 1e-8)
        snr_edges (sequence of float or Tensor, optional): increasing histogram edges (default: 17 edges
            10^linspace(-3, 1, 17))
        reset (bool, optional): zero `coord_sq` in the same pass, ready for the next step (default: True)
        backend (str, optional): "auto", "torch" or "triton", see :func:`resolve_backend` (default: None)

    Returns:
        dict[str, Tensor]: 0-d float32 tensors `sum_mu_sq`, `sum_sigma_sq`, `sum_mu_sq_over_sigma`,
        `sum_sigma`, `num_coords`, `num_no_grad`, `frac_small_batch` (and `precond_small`, `precond_big` with
        `exp_avg_sq`), and the
        float32 vector `snr_hist`; all are views of one buffer on the tensors' device. No host sync.
    """
    grad_sums, coord_sq = list(grad_sums), list(coord_sq)
    exp_avg_sq = None if exp_avg_sq is None else list(exp_avg_sq)
    _validate(grad_sums, coord_sq, exp_avg_sq, num_microbatches, microbatch_size, eps)
    if coord_sq:  # _validate put every tensor on coord_sq[0]'s device, so that one stands for all of them
        backend = resolve_backend(backend, coord_sq[:1])
    out = coordinate_stats_trusted(
        grad_sums, coord_sq, exp_avg_sq, int(num_microbatches), float(microbatch_size), eps, snr_edges, reset, backend
    )
    return _pack(out, exp_avg_sq is not None)


def coordinate_stats_trusted(
    grad_sums: list[torch.Tensor],
    coord_sq: list[torch.Tensor],
    exp_avg_sq: list[torch.Tensor] | None,
    k: int,
    b: float,
    eps: float,
    snr_edges: Sequence[float] | torch.Tensor | None,
    reset: bool,
    backend: str | None,
) -> torch.Tensor:
    """:func:`coordinate_stats` without argument checks, for a caller that allocated its buffers itself and
    resolved `backend` (the optimizer wrapper, once per step): the output vector, `SLOTS` then the histogram
    (the `precond_*` entries are 0 without `exp_avg_sq`)."""
    device = coord_sq[0].device if coord_sq else torch.device("cpu")
    edges = _edges_tensor(snr_edges, device)
    if coord_sq and backend == "triton":
        from .coord_triton import coordinate_stats_triton

        return coordinate_stats_triton(grad_sums, coord_sq, exp_avg_sq, k, b, eps, edges, reset)
    return _coordinate_stats_torch(
        grad_sums, coord_sq, exp_avg_sq, k, b, eps, edges, _geometric(_host_edges(snr_edges)), reset
    )


def coordinate_stats_and_sq_norms_cpu(
    grad_sums: list[torch.Tensor],
    coord_sq: list[torch.Tensor],
    exp_avg_sq: list[torch.Tensor] | None,
    k: int,
    b: float,
    eps: float,
) -> tuple[torch.Tensor, torch.Tensor]:
    r""":func:`coordinate_stats_trusted` on CPU tensors (torch path, `coord_sq` kept), and from the same pass the
    two squared norms per tensor that the noise-scale estimator needs: a ``(2, len(coord_sq))`` float32 tensor
    of :math:`\sum_i C_i = \sum_j |g_j|^2` and :math:`|S|^2 = |\sum_j g_j|^2`.

    They come from the same pass: :math:`|S|^2 = k \sum M` from a row it sums anyway, and :math:`\sum C` from
    the packed rows while they are in cache (one more reduction for a tensor with slices of its own), so a
    caller that keeps `coord_sq` needs no norm of its own, per microbatch or of the accumulated gradient.
    """
    device = coord_sq[0].device if coord_sq else torch.device("cpu")
    if device.type != "cpu":
        raise ValueError(f"coordinate_stats_and_sq_norms_cpu takes CPU tensors, got {device}")
    edges = _edges_tensor(None, device)
    sums: list[tuple[tuple[int, ...], torch.Tensor]] = []
    out = _coordinate_stats_torch(
        grad_sums, coord_sq, exp_avg_sq, k, b, eps, edges, _geometric(DEFAULT_SNR_EDGES), False, sums
    )
    return out, _tensor_norms(sums, len(coord_sq), k)


def _tensor_norms(sums: list[tuple[tuple[int, ...], torch.Tensor]], count: int, k: int) -> torch.Tensor:
    """The ``(ΣC, |S|²)`` rows per tensor from `(members, (2, len(members)) sums of C and M)` per slice."""
    cm = torch.zeros(2, count, dtype=torch.float64)
    if sums:
        ids = torch.tensor([i for members, _ in sums for i in members], dtype=torch.int64)
        cm.index_add_(1, ids, torch.cat([s for _, s in sums], 1).double())
    cm[1] *= k
    return cm.float()


def _flat(t: torch.Tensor) -> torch.Tensor:
    # A dense tensor in any dimension order is one run of memory from its first element (view is the cheaper
    # call for the usual contiguous case).
    return t.view(-1) if t.is_contiguous() else t.as_strided((t.numel(),), (1,), t.storage_offset())


@functools.lru_cache(maxsize=32)
def _plan(numels: tuple[int, ...], slice_size: int, pack_below: int) -> tuple[tuple[tuple[int, ...], int, int], ...]:
    """`(members, lo, hi)` groups of at most `slice_size` elements, in order: a tensor of `pack_below` elements or
    more alone, elements `lo:hi` of it per group; smaller tensors packed together (elements `0:hi` of the
    pack). Cached: the sizes repeat every step."""
    groups: list[tuple[tuple[int, ...], int, int]] = []
    packed: list[int] = []
    size = 0
    for i, n in enumerate(numels):
        if n == 0:
            continue
        if n >= pack_below:
            groups += [((i,), lo, min(lo + slice_size, n)) for lo in range(0, n, slice_size)]
            continue
        if size + n > slice_size:
            groups.append((tuple(packed), 0, size))
            packed, size = [], 0
        packed.append(i)
        size += n
    if packed:
        groups.append((tuple(packed), 0, size))
    return tuple(groups)


def _log_bins(log_edges: tuple[float, float], alpha: float, nbins: int) -> tuple[float, ...] | None:
    r"""Affine map from :math:`\log_2 T` to the bin, for :math:`T = \mathrm{snr}^2/\alpha` and log-even edges.

    With the first edge :math:`10^f` and step :math:`10^h`, the bin of snr is :math:`\lfloor y \rfloor`
    clamped to [0, nbins − 1], where

    .. math::
        y = \frac{\log_{10}\mathrm{snr} - f}{h} + 1 = a \log_2 T + c, \quad
        a = \frac{1}{2 h \log_2 10}, \quad c = a \log_2\alpha - \frac{f}{h} + 1

    Returns `(a, c, low, high, dead)` with `low`, `high` the T at y = −0.5 and y = nbins − 0.5: clamping T
    into them leaves every bin as it is and puts y in (−1, nbins), where truncation toward zero is the clamped
    floor; `dead`, the T at y = nbins + 0.5, stands for NaN (no gradient) and lands one past the last bin.
    None when they are not normal float32 numbers (edges near 1e-19 or 1e19): bucketize then.
    """
    first, step = log_edges
    a = 1.0 / (2.0 * step * math.log2(10.0))
    c = a * math.log2(alpha) - first / step + 1.0
    try:
        low, high, dead = (2.0 ** ((y - c) / a) for y in (-0.5, nbins - 0.5, nbins + 0.5))
    except OverflowError:
        return None
    if not (_TINY <= low and dead <= torch.finfo(torch.float32).max / 2):
        return None
    return a, c, low, high, dead


class _Constants(NamedTuple):
    """The per-slice ops' scalars as 0-d tensors on the device.

    An op given a Python number wraps it in a tensor first, which adds several microseconds to its dispatch
    (more than doubling it). Two-sided clamp is the exception: its tensor form takes several times longer
    per element, so `low` and `high` stay numbers.
    """

    zero: torch.Tensor
    eps: torch.Tensor
    cut: torch.Tensor  # the regime boundary of T (see `_coordinate_stats_torch`)
    offset: torch.Tensor  # c of `_log_bins` (0 when bucketizing)


_CONSTANTS: dict[tuple, _Constants] = {}


def _constants(device: torch.device, k: int, eps: float, bins: tuple[float, ...] | None) -> _Constants:
    key = (device, k, eps, bins)
    consts = _CONSTANTS.get(key)
    if consts is None:
        values = [0.0, eps, math.pi / (2.0 * (k - 1.0)), 0.0 if bins is None else bins[1]]
        consts = _Constants(*to_device(torch.tensor(values, dtype=torch.float32), device).unbind())
        if len(_CONSTANTS) >= 32:
            _CONSTANTS.clear()
        _CONSTANTS[key] = consts
    return consts


# Bin indices are counted two to an entry (see `_count_bins`) while (nbins + 1)² entries stay this few.
_PAIRED_ENTRIES = 4096


def _paired(device: torch.device, nbins: int, bins: tuple[float, ...] | None) -> bool:
    return device.type == "cpu" and bins is not None and (nbins + 1) ** 2 <= _PAIRED_ENTRIES


class _Rows(NamedTuple):
    """Views of the torch path's scratch for one slice of `n` elements (see `_coordinate_stats_torch`)."""

    t: torch.Tensor  # a float32 copy of S, then T = M/D, then the bin coordinate y
    c: torch.Tensor  # packed C
    p: torch.Tensor  # packed v, then P², then the regime flags
    x: torch.Tensor  # M/√D
    m: torch.Tensor  # M
    d: torch.Tensor  # D
    r: torch.Tensor  # √D
    p_c: torch.Tensor  # P²C
    p_m: torch.Tensor  # P²M
    summed: torch.Tensor  # flags, M/√D, M, D, √D[, P²C, P²M]: added up per slice by one reduction
    index: torch.Tensor  # the bin of each element
    spare: torch.Tensor  # the element after `index`, when n is odd the partner of its last element
    first: torch.Tensor  # `index` in two halves (the second ends at `spare` when n is odd)
    second: torch.Tensor
    pairs: torch.Tensor  # first * (nbins + 1) + second


class _Scratch:
    """Nine float32 rows of `width` (see `_Rows`) and two integer bin-index rows, with views into them.

    Kept per thread and device between calls (`_scratch`): fresh multi-MiB buffers come from mmap, and their
    first touch (page faults) costs as much as the arithmetic on them. The views are kept too, by slice width
    and by the shapes of packed tensors: building a few dozen views costs as much as several whole-slice ops.
    On the CPU bincount reads int16 several times faster than the int64 that `.long()` makes; index_add_ (the
    other devices) takes int32.
    """

    def __init__(self, width: int, device: torch.device, index_dtype: torch.dtype) -> None:
        self.work = torch.empty(9, width, dtype=torch.float32, device=device)
        self.index = torch.empty(width + 1, dtype=index_dtype, device=device)
        self.pairs = torch.empty((width + 1) // 2, dtype=index_dtype, device=device)
        self._rows: dict[tuple[int, bool], _Rows] = {}
        self._packs: dict[tuple[torch.Size, ...], tuple[list[torch.Tensor], ...]] = {}
        self._starts: dict[tuple[torch.Size, ...], numpy.ndarray] = {}

    def rows(self, n: int, precond: bool) -> _Rows:
        rows = self._rows.get((n, precond))
        if rows is None:
            work, index, half = self.work[:, :n], self.index, (n + 1) // 2
            t, c, p, x, m, d, r, p_c, p_m = work
            rows = _Rows(
                t, c, p, x, m, d, r, p_c, p_m, work[2 : 9 if precond else 7], index[:n], index[n : n + 1],
                index[:half], index[half : 2 * half], self.pairs[:half],
            )  # fmt: skip
            if len(self._rows) >= 16:
                self._rows.clear()
            self._rows[(n, precond)] = rows
        return rows

    def starts(self, shapes: tuple[torch.Size, ...]) -> numpy.ndarray:
        """Where each packed tensor begins in the rows (`packs`' layout)."""
        starts = self._starts.get(shapes)
        if starts is None:
            starts = numpy.cumsum([0] + [shape.numel() for shape in shapes[:-1]])
            if len(self._starts) >= 16:
                self._starts.clear()
            self._starts[shapes] = starts
        return starts

    def packs(self, shapes: tuple[torch.Size, ...]) -> tuple[list[torch.Tensor], ...]:
        """Views shaped like the packed tensors, one after another in rows t, c and p (S, C and v)."""
        views = self._packs.get(shapes)
        if views is None:
            views = tuple([] for _ in range(3))
            start = 0
            for shape in shapes:
                n = shape.numel()
                for row, out in zip(self.work[:3], views, strict=True):
                    out.append(row[start : start + n].view(shape))
                start += n
            if len(self._packs) >= 16:
                self._packs.clear()
            self._packs[shapes] = views
        return views


_SCRATCH = threading.local()
# Every thread's scratch while it lives (the autograd engine may run the pass on a device thread of its own).
_LIVE: weakref.WeakSet[_Scratch] = weakref.WeakSet()


def _scratch(width: int, device: torch.device, index_dtype: torch.dtype) -> _Scratch:
    cache = _SCRATCH.__dict__.setdefault("buffers", {})
    scratch = cache.get((device, index_dtype))
    if scratch is None or scratch.work.shape[1] < width:
        scratch = cache[(device, index_dtype)] = _Scratch(width, device, index_dtype)
        _LIVE.add(scratch)
    return scratch


def scratch_bytes() -> int:
    """Bytes of the torch path's scratch kept between calls, by every thread that has run it (per thread and
    device: nine float32 rows and the bin indices, as wide as its widest slice so far, at most `_SLICE`
    elements, ~10 MiB)."""
    return sum(t.numel() * t.element_size() for s in list(_LIVE) for t in (s.work, s.index, s.pairs))


def _moments(
    rows: _Rows, s: torch.Tensor, c: torch.Tensor, v: torch.Tensor | None, k: int, zero_c: bool,
    consts: _Constants,
) -> torch.Tensor:  # fmt: skip
    """One slice's float32 sums of `rows.summed`; leaves T in `rows.t`. Zeroes `c` after its last read when
    `zero_c` (the slice is still in cache: zeroing then costs no extra read)."""
    # S²/k is on the scale of C = Σ g²: it under- or overflows float32 only where C itself would.
    torch.addcmul(consts.zero, s, s, value=1.0 / k, out=rows.m)  # s (maybe in t) is dead from here on
    d = torch.sub(c, rows.m, out=rows.d).clamp_min_(consts.zero)  # clamp: rounding can go below 0
    if v is not None:
        # P² = 1/(√v + ε)², with √v as 1/rsqrt(v): vectorized sqrt takes several times longer on 0 and on
        # subnormals (Adam's v of parameters that never or long ago had a gradient), rsqrt does not, and
        # 1/rsqrt(0) = 0 exactly. Together they cost less than sqrt alone and are within an ulp of it.
        p = rows.p
        if v.dtype == torch.float32:
            torch.rsqrt(v, out=p)
        else:
            p.copy_(v).rsqrt_()  # float32 first: rsqrt of a bf16 v would round in bf16
        p.reciprocal_().add_(consts.eps).pow_(-2)
        torch.mul(p, c, out=rows.p_c)
        torch.mul(p, rows.m, out=rows.p_m)
    if zero_c:
        c.zero_()
    # 1/√D, then √D = D/√D and M/√D, with σ̂ = 0 (rsqrt = inf) dropped from Σ μ̂²/σ̂; a NaN input stays NaN.
    torch.rsqrt(d, out=rows.x).nan_to_num_(nan=math.nan, posinf=0.0)
    torch.mul(rows.x, d, out=rows.r)
    rows.x.mul_(rows.m)
    # T: NaN where μ̂ = σ̂ = 0 (0/0: no gradient in the step), inf where σ̂ = 0 < |μ̂|.
    torch.div(rows.m, d, out=rows.t)
    # Outside the regime: T >= cut. NaN compares False, so μ̂ = 0 counts as inside.
    torch.ge(rows.t, consts.cut, out=rows.p)
    return rows.summed.sum(1)


def _bin_index(
    rows: _Rows, bins: tuple[float, ...] | None, consts: _Constants, edges: torch.Tensor, alpha: float
) -> torch.Tensor:
    """The bin of each element of the slice, from T in `rows.t` (which it overwrites)."""
    t = rows.t
    if bins is None:
        # σ̂ = 0 < |μ̂| (inf) goes to the overflow bin, μ̂ = σ̂ = 0 (NaN: no gradient) one past the last bin.
        none = torch.isnan(t)
        snr = t.nan_to_num_(nan=0.0).mul_(alpha).sqrt_()
        return torch.bucketize(snr, edges, right=True).masked_fill_(none, edges.numel() + 1)
    scale, _, low, high, dead = bins
    # σ̂ = 0 < |μ̂| (inf) joins the overflow bin, T = 0 (μ̂ = 0) the first; clamp keeps NaN (μ̂ = σ̂ = 0: no
    # gradient), which goes one past the last bin.
    t.clamp_(low, high).nan_to_num_(nan=dead)
    torch.add(consts.offset, t.log2_(), alpha=scale, out=t)  # y = c + a log2 T, in (-1, nbins)
    return rows.index.copy_(t)  # truncation toward 0: the clamped floor of y


def _count_bins(rows: _Rows, idx: torch.Tensor, nbins: int, paired: bool) -> torch.Tensor:
    """bincount of `idx` (the CPU's), two bins to an entry a·(nbins + 1) + b when `paired`.

    bincount's loop costs about a nanosecond an element, several times any other pass over the index: pairs
    halve it for one pass over half the index in int16. Index nbins (no gradient) is also the filler of an odd
    slice's last pair: `_assemble` takes the fillers back out of its count.
    """
    if not paired:
        return torch.bincount(idx, minlength=nbins + 1)  # bin nbins: no gradient
    if idx.numel() % 2:
        rows.spare.fill_(nbins)  # the no-gradient bin: `_assemble` takes these fillers back out
    torch.add(rows.second, rows.first, alpha=nbins + 1, out=rows.pairs)
    return torch.bincount(rows.pairs, minlength=(nbins + 1) ** 2)


@torch.no_grad()  # statistics of gradients: nothing to differentiate, and out= ops refuse autograd inputs
def _coordinate_stats_torch(
    grad_sums: list[torch.Tensor],
    coord_sq: list[torch.Tensor],
    exp_avg_sq: list[torch.Tensor] | None,
    k: int,
    b: float,
    eps: float,
    edges: torch.Tensor,
    log_edges: tuple[float, float] | None,
    reset: bool,
    tensor_sums: list[tuple[tuple[int, ...], torch.Tensor]] | None = None,
) -> torch.Tensor:
    r"""Whole-slice eager ops on :math:`M = S^2/k = k\hat\mu^2` and :math:`D = \max(C - M, 0)`, where

    .. math::
        \hat\sigma^2 = \frac{b}{k-1} D, \qquad
        \frac{\hat\mu^2}{\hat\sigma^2} = \alpha T, \quad T = \frac{M}{D}, \quad \alpha = \frac{k-1}{k b}

    so that the constants move out of the loop: sums are scaled once at the end (in float64), the regime test
    of Surge thm. 3 is :math:`2B\hat\mu^2 < \pi\hat\sigma^2 \Leftrightarrow T < \pi / (2(k-1))` (no
    square root, no division by σ̂), and the histogram bins log2(T) (see :func:`_log_bins`).

    A slice costs ~22 eager ops (`_moments`, `_bin_index`, `_count_bins`), each a pass over the slice plus
    5-15 µs of dispatch; everything else is a fixed few dozen small ops per call.

    With `tensor_sums` (CPU), each slice appends `(members, sums)`: the slice's Σ C and Σ M per member tensor,
    a ``(2, len(members))`` tensor (for a packed slice one `numpy.add.reduceat` over rows C and M while they are
    in cache; several times faster than a torch op per member).
    """
    device = edges.device
    nbins = edges.numel() + 1
    precond = exp_avg_sq is not None
    total = sum(c.numel() for c in coord_sq)
    alpha = (k - 1.0) / (k * b)
    bins = None if log_edges is None else _log_bins(log_edges, alpha, nbins)
    consts = _constants(device, k, eps, bins)
    paired = _paired(device, nbins, bins)
    small = device.type == "cpu" and (nbins + 1) ** 2 <= torch.iinfo(torch.int16).max
    index_dtype = torch.int16 if small else torch.int32
    scratch = _scratch(min(total, _SLICE), device, index_dtype)
    flats: dict[int, tuple[torch.Tensor, ...]] = {}
    row_sums: list[torch.Tensor] = []
    counts: list[torch.Tensor] = []
    if device.type != "cpu":
        hist = torch.zeros(nbins + 1, dtype=torch.int64, device=device)  # bin nbins: no gradient
        one = torch.ones((), dtype=torch.int64, device=device)
    fillers = 0  # odd slices' filler pairs (see `_count_bins`)
    for members, lo, hi in _plan(tuple(c.numel() for c in coord_sq), _SLICE, _PACK_BELOW):
        fillers += paired and (hi - lo) % 2
        rows = scratch.rows(hi - lo, precond)
        if len(members) == 1:
            s, c, v = _lone(rows, flats, members[0], lo, hi, grad_sums, coord_sq, exp_avg_sq)
        else:
            s, c, v = _packed(scratch, rows, members, grad_sums, coord_sq, exp_avg_sq, reset)
        row_sums.append(_moments(rows, s, c, v, k, reset and len(members) == 1, consts))
        if tensor_sums is not None:
            if len(members) == 1:  # Σ M is in `summed`; Σ C one more reduction (C read in place, not zeroed)
                tensor_sums.append((members, torch.stack([c.sum(), row_sums[-1][2]])[:, None]))
            else:  # rows C and M of the packed slice (work rows 1 and 4, see `_Rows`), still in cache
                starts = scratch.starts(tuple(coord_sq[i].shape for i in members))
                cm = numpy.add.reduceat(scratch.work[1:5:3, : hi - lo].numpy(), starts, axis=1)
                tensor_sums.append((members, torch.from_numpy(cm)))
        idx = _bin_index(rows, bins, consts, edges, alpha)
        if device.type == "cpu":
            counts.append(_count_bins(rows, idx, nbins, paired))
        else:  # bincount sizes its output from the data on CUDA (a host sync); index_add_ does not
            hist.index_add_(0, idx, one.expand_as(idx))
    if device.type != "cpu":
        counts = [hist]
    return _assemble(row_sums, counts, paired, device, nbins, total, k, b, precond, fillers)


def _lone(
    rows: _Rows,
    flats: dict[int, tuple[torch.Tensor, ...]],
    i: int,
    lo: int,
    hi: int,
    grad_sums: list[torch.Tensor],
    coord_sq: list[torch.Tensor],
    exp_avg_sq: list[torch.Tensor] | None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """Elements `lo:hi` of tensor `i`, read in place in memory order (S and v in C's layout); its flat views
    are made once, in `flats`, for all its slices."""
    flat = flats.get(i)
    if flat is None:
        c = coord_sq[i]
        others = [grad_sums[i]] + ([] if exp_avg_sq is None else [exp_avg_sq[i]])
        flat = flats[i] = (_flat(c), *(_flat(flat_like(t, c)) for t in others))
    c, s, v = flat[0][lo:hi], flat[1][lo:hi], flat[2][lo:hi] if len(flat) == 3 else None
    if s.dtype != torch.float32:
        s = rows.t.copy_(s)  # float32 before squaring: S² of a bf16 S rounded in bf16 would lose 8 bits
    return s, c, v


def _packed(
    scratch: _Scratch,
    rows: _Rows,
    members: tuple[int, ...],
    grad_sums: list[torch.Tensor],
    coord_sq: list[torch.Tensor],
    exp_avg_sq: list[torch.Tensor] | None,
    reset: bool,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """Small tensors copied, one foreach op each, into views of scratch rows shaped like them: in their
    logical order, which is the same for S, C and v whatever their layouts. C is zeroed after its copy."""
    cs = [coord_sq[i] for i in members]
    s_views, c_views, v_views = scratch.packs(tuple(t.shape for t in cs))
    torch._foreach_copy_(s_views, [grad_sums[i] for i in members])
    torch._foreach_copy_(c_views, cs)
    if exp_avg_sq is not None:
        torch._foreach_copy_(v_views, [exp_avg_sq[i] for i in members])
    if reset:
        torch._foreach_zero_(cs)
    return rows.t, rows.c, None if exp_avg_sq is None else rows.p


def _assemble(
    row_sums: list[torch.Tensor],
    counts: list[torch.Tensor],
    paired: bool,
    device: torch.device,
    nbins: int,
    total: int,
    k: int,
    b: float,
    precond: bool,
    fillers: int,
) -> torch.Tensor:
    """The output vector (`SLOTS`, then the histogram) from the slices' float32 row sums and bincounts.

    The slices' results are added up (row sums in float64: adding float32 slice sums in float64 keeps the
    total at float32 accuracy), put in one vector, and each output entry is a weighted sum of its entries
    of that vector (see `_assembly_tables`): a handful of small ops, each costing as much as its dispatch.
    """
    acc = torch.float32 if device.type == "mps" else torch.float64
    gather, weight, dest, bias = _assembly_tables(device, acc, nbins, paired, total, k, b, precond, fillers)
    if not row_sums:  # no elements
        return bias.to(torch.float32)
    sums = row_sums[0] if len(row_sums) == 1 else torch.stack(row_sums).sum(0, dtype=acc)
    hist = counts[0] if len(counts) == 1 else torch.stack(counts).sum(0)
    parts = torch.cat([sums, hist], out=torch.empty(0, dtype=acc, device=device))
    terms = torch.index_select(parts, 0, gather).mul_(weight)
    out = torch.index_add(bias, 0, dest, terms)
    share_with_gradient(out, total)
    return out.to(torch.float32)


def share_with_gradient(out: torch.Tensor, total: int) -> None:
    """Turn `frac_small_batch` from the count of coordinates inside the regime (those without a gradient among
    them: NaN compares as inside) into the share of the coordinates with a gradient; NaN when none has one."""
    if total:
        none = out[_NO_GRAD]
        out[_FRAC] = (out[_FRAC] - none) / (total - none)


@functools.lru_cache(maxsize=32)
def _assembly_tables(
    device: torch.device,
    acc: torch.dtype,
    nbins: int,
    paired: bool,
    total: int,
    k: int,
    b: float,
    precond: bool,
    fillers: int,
) -> tuple[torch.Tensor, ...]:
    """`(gather, weight, dest, bias)`: output entry j is bias[j] + Σ parts[gather[i]] · weight[i] over the i
    with dest[i] = j, where `parts` is the row sums, then the bincount.

    Row sums are (outside, Σ M/√D, Σ M, Σ D, Σ √D[, Σ P²C, Σ P²M]); a paired bincount entry a·(nbins + 1) + b
    counts bin a and bin b. Bin nbins counts the coordinates without a gradient, and in a paired count also
    the `fillers` of odd slices, taken back out by the bias. Each output entry reads only its own terms, so
    that an inf or NaN in one sum cannot reach the others.
    """
    c3 = 1.0 / (k * math.sqrt(b / (k - 1.0)))
    # (row, output slot, weight): Σ μ̂² = Σ M / k, Σ σ̂² = b/(k−1) Σ D, Σ μ̂²/σ̂ = c3 Σ M/√D,
    # Σ P² m2 = Σ P²C / k, Σ P² μ̂² = Σ P²M / k, inside = N − outside (a count, see `share_with_gradient`),
    # Σ σ̂ = √(b/(k−1)) Σ √D.
    terms = [(2, 0, 1.0 / k), (3, 1, b / (k - 1.0)), (1, 2, c3), (0, _FRAC, -1.0)]
    terms += [(4, 7, math.sqrt(b / (k - 1.0)))]
    if precond:
        terms += [(5, 4, 1.0 / k), (6, 5, 1.0 / k)]
    gather, dest, weight = (list(column) for column in zip(*terms, strict=True))
    first = 7 if precond else 5
    for entry in range((nbins + 1) ** 2 if paired else nbins + 1):
        for bin_ in divmod(entry, nbins + 1) if paired else (entry,):
            gather.append(first + entry)
            dest.append(len(SLOTS) + bin_ if bin_ < nbins else _NO_GRAD)
            weight.append(1.0)
    bias = [0.0] * (len(SLOTS) + nbins)
    bias[3], bias[_FRAC], bias[_NO_GRAD] = float(total), float(total), -float(fillers)
    index = to_device(torch.tensor([gather, dest], dtype=torch.int64), device)
    values = to_device(torch.tensor(weight + bias, dtype=acc), device)
    return index[0], values[: len(weight)], index[1], values[len(weight) :]
