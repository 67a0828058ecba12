r"""What crosses ranks under ``torch.distributed``, and nothing else.

Data parallel training gives the two batch sizes of the estimator for free (McCandlish App. A.1): each
rank's microbatch gradient ``g_{r,j}`` (before any reduction) is the small batch, the synchronised mean
gradient over all ``k = W·A`` microbatches (``W`` ranks × ``A`` accumulation steps) is the big one. Every rank
observes

- its own microbatch contributions ``c·g_{r,j}`` during backward (a gradient hook), and
- the reduced accumulated gradient after backward, which DDP and FSDP2 make ``c·A·ḡ``: DDP averages the local
  sum ``c·Σ_j g_{r,j}`` over ranks whether it synchronises once (``no_sync()`` on the first ``A − 1``
  microbatches) or after every microbatch (the average of sums is the sum of averages); FSDP2 does the same
  and keeps one shard.

so only a few scalars need to cross ranks, once per step:

.. math::
    |G_b|^2 = \frac{1}{k}\sum_{r,j} |g_{r,j}|^2, \qquad
    |G_B|^2 = \frac{1}{(cA)^2}\sum_{r} w_r\, |\text{grad}_r|^2, \qquad
    b = \frac{k}{\sum_{r,j} 1/b_{r,j}}

with ``w_r = 1/W`` for a replicated gradient (DDP: every rank holds the same ``.grad``) and ``w_r = 1`` for
a sharded one (FSDP2: the shards' squared norms add up to the whole). Both sums, the counts ``Σ A_r`` and
``Σ 1/b_{r,j}`` and the per-layer breakdown travel in **one** ``all_reduce`` of a small float64 vector over
the data-parallel group. It is launched asynchronously at the end of the step's last backward, just after the
gradient synchronisation has brought the ranks together, runs while they clip and step, and is awaited
inside ``step()``; every rank then computes identical readings and applies the identical learning-rate
scale. The GradScaler's loss scale and overflow flag are not reduced: they are the same on every rank
whenever the ranks step alike (an averaged gradient overflows on every rank or on none, and a sharded
scaler reduces its own flag).

Under DDP the statistics can instead ride with DDP's own gradient all-reduce (``bscale.wrap(..., ddp=model)``):
a communication hook (:meth:`DataParallel.ride_ddp`) does what DDP's default hook does — divide each bucket by
``W`` and all-reduce it — and appends the rank's microbatch sums and counts to the step's last bucket, so no
collective of its own is sent. The synchronised gradient's squared norms need no reduction there: only
parameters that DDP synchronises in its buckets are accepted, so every rank holds the same ``.grad``. DDP
takes one communication hook per model, so this does not compose with a user's own hook (fp16 or bf16
compression, PowerSGD): that hook owns the bucket's wire format, in which float32 sums cannot travel exactly.
Without ``ddp=`` no hook is installed, a user's hook keeps working, and the readings describe the gradient that
hook delivers.
"""

from __future__ import annotations

import math
import weakref
from collections.abc import Callable, Mapping, Sequence
from typing import Any, NamedTuple

import torch
import torch.distributed as dist

__all__ = ["DataParallel"]

# Readings that must agree on every rank; `debug=True` compares them after each step (keys of `stats`).
_CHECKED = (
    "batch_size",
    "microbatches",
    "steps",
    "examples",
    "noise_scale",
    "noise_scale_stderr",
    "grad_sq",
    "trace_sigma",
    "lr_scale",
    "lr",
)


def _dtensor_type() -> type | None:
    # DTensor is what FSDP2 (and tensor parallelism) turn parameters into; it is optional in a torch build.
    try:
        from torch.distributed.tensor import DTensor
    except ImportError:  # torch < 2.5 keeps it under torch.distributed._tensor
        try:
            from torch.distributed._tensor import DTensor
        except ImportError:
            return None
    return DTensor


_DTENSOR = _dtensor_type()


def _is_dtensor(t: torch.Tensor) -> bool:
    return _DTENSOR is not None and isinstance(t, _DTENSOR)


def _fsdp_params_by_sharded() -> dict[int, tuple[Any, Any, list[torch.nn.Module]]]:
    """Map ``id(sharded parameter)`` to ``(FSDPParam, FSDPParamGroup, [modules given to fully_shard])``.

    FSDP2 keeps no public link from a sharded parameter to the unsharded one that autograd sees; its states
    are found through the registry every composable API writes to (``torch.distributed._composable_state``),
    present with this layout from torch 2.4 to at least 2.13 (``_fsdp_param_groups`` in recent versions,
    ``_fsdp_param_group`` before).
    """
    try:
        from torch.distributed._composable_state import _module_state_mapping
    except ImportError as e:  # pragma: no cover - depends on the installed torch
        raise RuntimeError(
            f"bscale cannot find FSDP2's state in this torch ({torch.__version__}); "
            "FSDP2 support needs torch 2.4 to 2.13"
        ) from e
    found: dict[int, tuple[Any, Any, list[torch.nn.Module]]] = {}
    for module, ref in list(_module_state_mapping.items()):
        state = ref()
        groups = getattr(state, "_fsdp_param_groups", None)
        if groups is None:
            group = getattr(state, "_fsdp_param_group", None)
            groups = [] if group is None else [group]
        for group in groups:
            for fsdp_param in getattr(group, "fsdp_params", ()):
                sharded = getattr(fsdp_param, "sharded_param", None)
                if sharded is None:
                    continue
                entry = found.setdefault(id(sharded), (fsdp_param, group, []))
                if module not in entry[2]:
                    entry[2].append(module)
    return found


class _FSDPGradHook:
    """A gradient hook on the unsharded parameter FSDP2 runs autograd on, installed once it exists.

    FSDP2 computes gradients for a plain (unsharded) ``nn.Parameter`` it all-gathers into, then
    reduce-scatters them into the sharded DTensor's ``.grad``; hooks on the sharded parameter never see a
    microbatch. The unsharded parameter is created at the first forward and kept (its storage is freed and
    re-allocated, the object stays), so a hook on it fires once per backward with this rank's full,
    pre-reduce-scatter microbatch gradient, with or without ``set_requires_gradient_sync(False)``. Until the
    first forward, a forward hook on the FSDP2 modules waits for it.
    """

    def __init__(self, fsdp_param: Any, modules: Sequence[torch.nn.Module], fn: Callable[[torch.Tensor], None]):
        self._fsdp_param = fsdp_param
        self._fn = fn
        self._tensor_handle: Any = None
        self._forward_handles: list[Any] = []
        if not self._install():
            self._forward_handles = [m.register_forward_hook(self._after_forward) for m in modules]

    def _install(self) -> bool:
        unsharded = getattr(self._fsdp_param, "_unsharded_param", None)
        if unsharded is None:
            return False
        self._tensor_handle = unsharded.register_hook(self._on_grad)
        return True

    def _after_forward(self, *args: Any) -> None:
        if self._tensor_handle is None and self._install():
            self._remove_forward_hooks()

    def _remove_forward_hooks(self) -> None:
        for h in self._forward_handles:
            h.remove()
        self._forward_handles = []

    def _on_grad(self, grad: torch.Tensor) -> None:
        # Under tensor parallelism the unsharded parameter is itself a DTensor: measure this rank's part.
        self._fn(grad.to_local() if _is_dtensor(grad) else grad)

    def remove(self) -> None:
        self._remove_forward_hooks()
        if self._tensor_handle is not None:
            self._tensor_handle.remove()
            self._tensor_handle = None


class PendingReduce(NamedTuple):
    """A step's all-reduce in flight: the float64 buffer, the collective's work handle (None once complete),
    the statistics' length."""

    buf: torch.Tensor
    work: Any
    n: int


# Bucket dtypes whose all-reduce can carry the statistics (float32 sums, small integer counts) unchanged.
_RIDE_DTYPES = (torch.float32, torch.float64)
_SPLIT = 4096.0  # Σb rides as ⌊Σb/2^12⌋ and Σb mod 2^12: both sums stay exact in float32 up to 2^36 examples


_HOOKED = (
    "this DDP model already has a communication hook (DDP takes one per model), so bscale cannot send its "
    "statistics with the gradients; drop ddp= and bscale sends them in one small all-reduce of its own, beside "
    "your hook"
)


class _RideState:
    """The state of bscale's DDP communication hook: DDP's process group and the wrapper it serves, held weakly
    (a later ``wrap(..., ddp=model)`` takes the hook over: DDP keeps one hook per model for its lifetime)."""

    def __init__(self, group: Any, world_size: int) -> None:
        self.group = group
        self.world_size = world_size
        self.owner: weakref.ref | None = None  # the ScaledOptimizer: _ride_payload(device), _ride_arrived(t)
        # The statistics' length last sent: once the wrapper is gone, zeros of that length keep every rank's last
        # bucket the same size (a rank whose wrapper lives on then reports unequal microbatch counts, no hang).
        self.length = 0

    def serve(self, owner: Any) -> None:
        self.owner = weakref.ref(owner)

    def __deepcopy__(self, memo: dict[int, Any]) -> _RideState:
        return _RideState(self.group, self.world_size)  # a copied model's hook serves no wrapper


def _ride_hook(state, bucket):  # type: ignore[no-untyped-def]
    """DDP communication hook: DDP's default all-reduce (divide by ``W``, sum) of every bucket; the step's last
    bucket carries this rank's statistics appended to its gradients. (Unannotated: DDP checks the annotations
    of a hook's arguments, and this module's are postponed to strings.)"""
    buf = bucket.buffer()
    extra, owner = None, None
    if bucket.is_last() and buf.dtype in _RIDE_DTYPES:
        owner = state.owner() if state.owner is not None else None
        if owner is not None:
            extra = owner._ride_payload(buf.device)
            state.length = extra.numel()
        elif state.length:
            extra = torch.zeros(state.length, dtype=buf.dtype, device=buf.device)
    if extra is None:
        fut = dist.all_reduce(buf.div_(state.world_size), group=state.group, async_op=True).get_future()
        return fut.then(lambda f: f.value()[0])
    nb = buf.numel()
    flat = torch.empty(nb + extra.numel(), dtype=buf.dtype, device=buf.device)
    torch.div(buf, state.world_size, out=flat[:nb])
    flat[nb:].copy_(extra)
    fut = dist.all_reduce(flat, group=state.group, async_op=True).get_future()

    def unpack(f: torch.futures.Future) -> torch.Tensor:
        out = f.value()[0]
        if owner is not None:
            owner._ride_arrived(out[nb:].clone())  # a copy: a view would keep the whole bucket alive until step()
        return out[:nb]

    return fut.then(unpack)


class DataParallel:
    r"""The data-parallel view of one process: where gradients are observed, how step statistics are reduced.

    Detects what manages each parameter: a plain tensor is observed with a tensor hook (single process, or
    DDP, where the hook sees the local gradient before DDP's all-reduce); a DTensor parameter managed by FSDP2
    (``torch.distributed.fsdp.fully_shard``) is observed through the unsharded parameter FSDP2 computes
    gradients for (torch 2.4–2.13). Collectives run only over ``process_group``, once per step
    (:meth:`start_reduce`), plus one more with ``debug=True`` (:meth:`check_same`).

    Args:
        process_group: the data-parallel group (default: the world group when ``torch.distributed`` is
            initialised, else a single process). With several groups (a data-parallel subgroup of a larger
            mesh), pass the one across which gradients are averaged.
        debug: after every step, check that the readings and learning-rate scale are identical on every rank
            and that the accumulated gradient was synchronised; raises ``RuntimeError`` naming the first
            quantity that differs (default: False; costs one extra all-reduce of a few scalars per step).
    """

    def __init__(self, process_group: Any = None, *, debug: bool = False) -> None:
        self.group = process_group
        self.debug = bool(debug)
        self.distributed = dist.is_available() and dist.is_initialized()
        if process_group is not None and not self.distributed:
            raise ValueError(
                "process_group was given but torch.distributed is not initialised; call "
                "torch.distributed.init_process_group() first, or pass process_group=None"
            )
        self.world_size = dist.get_world_size(process_group) if self.distributed else 1
        if self.world_size < 1:
            raise ValueError(
                "this rank is not a member of process_group; pass the data-parallel group that contains this rank"
            )
        self.rank = dist.get_rank(process_group) if self.distributed else 0
        self._weights: dict[int, float] = {}  # id(param) -> share of its local squared norm in the global
        self._weight_cache: dict[tuple[Any, ...], torch.Tensor | float] = {}
        self._fsdp_map: dict[int, tuple[Any, Any, list[torch.nn.Module]]] | None = None
        self._fsdp_groups: list[Any] = []
        self._group_of: dict[int, Any] = {}  # id(FSDP2 parameter) -> its FSDPParamGroup
        self._group_ranks: set[int] | None = None
        self._local_check: torch.Tensor | None = None
        self._device: torch.device | None = None
        self._ddp_params: set[int] | None = None  # ddp=: ids of the parameters DDP synchronises in buckets

    # ---- observing gradients -------------------------------------------------------------------------------

    @property
    def sharded(self) -> bool:
        """Whether any registered parameter is an FSDP2 (sharded DTensor) parameter."""
        return bool(self._fsdp_groups)

    def register_grad_hook(self, p: torch.Tensor, fn: Callable[[torch.Tensor], None]) -> Any:
        """Call ``fn(grad)`` with each backward's local contribution to ``p``'s gradient, before accumulation
        and before any cross-rank reduction. Returns a handle with ``remove()``."""
        if not _is_dtensor(p):
            self._check_ddp_param(p)  # a parameter added later (add_param_group) must be DDP's too
            self._weights[id(p)] = 1.0 / self.world_size  # every rank holds the same synchronised .grad
            return p.register_hook(fn)
        if self._fsdp_map is None or id(p) not in self._fsdp_map:
            self._fsdp_map = _fsdp_params_by_sharded()
        entry = self._fsdp_map.get(id(p))
        if entry is None:
            raise ValueError(
                "bscale found a DTensor parameter that FSDP2 does not manage; wrap the optimizer after "
                "fully_shard(model), and build the optimizer from the sharded model's parameters"
            )
        fsdp_param, group, modules = entry
        if all(g is not group for g in self._fsdp_groups):
            self._fsdp_groups.append(group)
        self._weights[id(p)] = self._shard_weight(p)
        self._group_of[id(p)] = group
        return _FSDPGradHook(fsdp_param, modules, fn)

    def _shard_weight(self, p: torch.Tensor) -> float:
        """``shards / W``: the share of this rank's squared norm of ``p``'s gradient shard in the global one.

        A DTensor is split over the mesh dimensions with a ``Shard`` placement and copied over the others;
        only dimensions inside the data-parallel group count (a tensor-parallel dimension outside it is
        measured per rank, as a part of the model).
        """
        if self._group_ranks is None:
            self._group_ranks = set(dist.get_process_group_ranks(self.group or dist.group.WORLD))
        shards = 1
        mesh = p.device_mesh
        for dim, placement in enumerate(p.placements):
            if placement.is_shard():
                ranks = set(dist.get_process_group_ranks(mesh.get_group(dim)))
                if ranks <= self._group_ranks:
                    shards *= len(ranks)
        return shards / self.world_size

    def local_grad(self, p: torch.Tensor) -> torch.Tensor | None:
        """The accumulated gradient of ``p`` held by this rank (the local shard for sharded parameters)."""
        g = p.grad
        if g is not None and hasattr(g, "to_local"):
            g = g.to_local()
        return g

    def local_microbatches(self, backwards: int) -> int:
        r"""``m`` such that this rank's reduced ``.grad`` is ``c·m·ḡ`` after ``backwards`` local microbatches.

        DDP and FSDP2 average over the ``W`` ranks, with or without ``no_sync()`` /
        ``set_requires_gradient_sync(False)`` on the first microbatches, so ``m`` is the local accumulation
        count ``A`` itself. (An FSDP2 module with ``set_gradient_divide_factor(f)`` holds ``(n/f)·A·ḡ``
        instead, for its ``n`` data-parallel ranks; :meth:`grad_weights` takes that out per parameter.)
        """
        return backwards

    def _divide_correction(self, group: Any) -> float:
        """``(f/n)²`` for an FSDP2 group that divides its gradient sum by ``f`` instead of its ``n`` ranks."""
        f = getattr(group, "gradient_divide_factor", None)
        if f is None:
            return 1.0
        info = getattr(group, "mesh_info", None)
        n = getattr(info, "shard_mesh_size", 1) * getattr(info, "replicate_mesh_size", 1)
        return (f / n) ** 2 if info is not None else (f / self.world_size) ** 2

    def grad_weights(self, params: Sequence[torch.Tensor], device: torch.device) -> torch.Tensor | float:
        r"""Per-parameter weights ``w`` that make local squared norms of ``.grad`` shares of the global one.

        ``Σ_ranks Σ_p w_p |grad_p|²`` is the squared norm of the whole synchronised gradient: ``w = 1/W`` for
        a replicated gradient, ``shards/W`` for a sharded one, times ``(f/n)²`` for an FSDP2 module whose
        gradient divide factor ``f`` differs from its ``n`` ranks. A float when all weights are equal.
        """
        # The divide factors can be changed at any time: they are part of the cache key.
        corrections = tuple(self._divide_correction(g) for g in self._fsdp_groups)
        key = (len(params), str(device), corrections)
        w = self._weight_cache.get(key)
        if w is None:
            by_group = {id(g): c for g, c in zip(self._fsdp_groups, corrections, strict=True)}
            ws = []
            for p in params:
                group = self._group_of.get(id(p))
                correction = 1.0 if group is None else by_group[id(group)]
                ws.append(self._weights.get(id(p), 1.0 / self.world_size) * correction)
            if not ws:
                w = 1.0
            elif all(x == ws[0] for x in ws):
                w = ws[0]
            else:
                w = torch.tensor(ws, dtype=torch.float32, device=device)
            self._weight_cache[key] = w
        return w

    def ride_ddp(self, model: torch.nn.Module, owner: Any, params: Sequence[torch.Tensor]) -> None:
        """Install the communication hook that sends the step's statistics with DDP's last gradient bucket.

        ``owner`` (held weakly) provides ``_ride_payload(device)``, called inside backward when the last bucket
        of a synchronising backward is ready, returning this rank's statistics vector, and
        ``_ride_arrived(reduced)``, which receives their sums over ranks. A bucket of another dtype than
        float32/float64 carries nothing and the statistics then need a collective of their own. If the model
        already has bscale's hook (an earlier wrapper), the hook is handed to ``owner``.

        Raises:
            ValueError: ``model`` is not a ``DistributedDataParallel``, runs compiled autograd's Python reducer,
                was built over another process group, does not synchronise every parameter in ``params``, or
                already has a communication hook of its own.
        """
        from torch.nn.parallel import DistributedDataParallel

        if not isinstance(model, DistributedDataParallel):
            raise ValueError(
                f"ddp= takes the DistributedDataParallel model, got {type(model).__name__}; pass the DDP wrapper "
                "itself (FSDP2 models need nothing: pass no ddp=)"
            )
        if getattr(model, "_use_python_reducer", False):
            raise ValueError(
                "this DDP model reduces gradients in Python (compiled autograd's python_reducer), which hands "
                "communication hooks no buckets; drop ddp= and bscale sends its statistics in an all-reduce of its own"
            )
        group = model.process_group
        ours = dist.get_process_group_ranks(self.group or dist.group.WORLD)
        theirs = dist.get_process_group_ranks(group)
        if sorted(ours) != sorted(theirs):
            raise ValueError(
                f"the DDP model averages over ranks {sorted(theirs)} but bscale reduces over {sorted(ours)}; pass "
                "the DDP model's process group as process_group="
            )
        ignored = getattr(model, "parameters_to_ignore", set())
        self._ddp_params = {id(p) for n, p in model.module.named_parameters() if n not in ignored}
        for p in params:
            self._check_ddp_param(p)
        hooks = list(getattr(model, "_comm_hooks", []))
        for hook, state in hooks:
            if hook is _ride_hook:
                state.serve(owner)  # an earlier wrapper's hook (DDP keeps a hook for the model's lifetime)
                return
        if self.world_size == 1:
            return  # nothing crosses ranks: DDP's own all-reduce stays as it is
        if hooks:
            raise ValueError(_HOOKED)
        state = _RideState(group, self.world_size)
        state.serve(owner)
        try:
            model.register_comm_hook(state, _ride_hook)
        except RuntimeError as e:  # a built-in (C++) hook registered earlier
            model._comm_hooks = [h for h in model._comm_hooks if h[0] is not _ride_hook]
            raise ValueError(f"{_HOOKED} ({e})") from None

    def _check_ddp_param(self, p: torch.Tensor) -> None:
        """With ddp=: ``p``'s gradient must be synchronised in DDP's buckets (the statistics ride the last one)."""
        if self._ddp_params is not None and id(p) not in self._ddp_params:
            raise ValueError(
                "with ddp=, every parameter of the optimizer must be one that DDP synchronises in its buckets; "
                "this one is outside the DDP model (or in its ignored or delayed-all-reduce parameters): give it "
                "to DDP, or drop ddp= and bscale sends its statistics in an all-reduce of its own"
            )

    @staticmethod
    def ride_payload(small: torch.Tensor, sizes: Sequence[float]) -> torch.Tensor:
        """What one rank's last DDP bucket carries (:meth:`ride_ddp`): ``[small..., k, k², Σ1/b, ⌊Σb/2^12⌋,
        Σb mod 2^12]`` in float32 on ``small``'s device, for the microbatch sizes ``sizes`` of the step so far.

        The counts and both parts of Σb are integers below 2^24 (whole batches under 2^36 examples, up to 4096
        ranks), so their sums over ranks are exact even in a float32 bucket; Σ1/b is rounded to ~1e-7 relative.
        """
        p, k = small.numel(), len(sizes)
        examples = math.fsum(sizes)
        hi = math.floor(examples / _SPLIT)
        payload = torch.empty(p + 5, dtype=torch.float32, device=small.device)
        payload[:p].copy_(small)
        # Scalar fills, not a host-to-device copy.
        payload[p] = float(k)
        payload[p + 1] = float(k * k)
        payload[p + 2] = math.fsum(1.0 / b for b in sizes)
        payload[p + 3] = float(hi)
        payload[p + 4] = examples - hi * _SPLIT
        return payload

    def rode(self, reduced: torch.Tensor, big: torch.Tensor) -> PendingReduce:
        """A completed :class:`PendingReduce` from :meth:`ride_ddp`'s reduced ``[small..., k, k², Σ1/b, ⌊Σb/2^12⌋,
        Σb mod 2^12]`` and this rank's squared norms of the synchronised (replicated, hence already global)
        gradient."""
        p = big.numel()
        self._device = big.device
        r = reduced.to(device=big.device, dtype=torch.float64)
        buf = torch.empty(2 * p + 4, dtype=torch.float64, device=big.device)
        buf[:p].copy_(r[:p])
        buf[p : 2 * p].copy_(big)
        buf[2 * p : 2 * p + 3].copy_(r[p : p + 3])
        buf[2 * p + 3] = r[p + 3] * _SPLIT + r[p + 4]  # Σb from its two parts (see ride_payload)
        if self.debug:
            self._local_check = big.double().sum()
        return PendingReduce(buf, None, 2 * p)

    # ---- once per step -------------------------------------------------------------------------------------

    def start_reduce(
        self,
        packed: torch.Tensor,
        *,
        k_local: int,
        inv_sizes: float,
        examples: float,
        big_slice: slice = slice(1, 2),
    ) -> PendingReduce:
        r"""Launch the step's one all-reduce (asynchronous) of this rank's statistics and counts.

        Called at the end of the step's last backward, right after the gradient synchronisation has brought
        the ranks together, so the collective completes while the ranks clip and step; :meth:`finish_reduce`
        waits for it inside ``step()``. Every rank must launch the same sequence of these.

        Args:
            packed: this rank's device vector of statistics, e.g. ``[small..., big...]`` per parameter, the big
                entries already weighted by :meth:`grad_weights`. All entries are summed over ranks.
            k_local: microbatches (backward calls) on this rank in this step.
            inv_sizes: ``Σ_j 1/b_j`` over this rank's microbatches.
            examples: ``Σ_j b_j`` over this rank's microbatches.
            big_slice: where the synchronised gradient's squared norms are in ``packed`` (their sum is compared
                across ranks with ``debug=True``).
        """
        n = packed.numel()
        self._device = packed.device
        if self.debug:
            # This rank's view of the synchronised gradient before the sum: equal on all ranks if replicated.
            self._local_check = packed[big_slice].double().sum()
        # float64: sums of per-rank float32 statistics and of 1/b stay exact enough to equal one process.
        buf = torch.empty(n + 4, dtype=torch.float64, device=packed.device)
        buf[:n].copy_(packed)
        # Scalar fills, not a host-to-device copy: no wait for the device before the collective.
        buf[n] = float(k_local)
        buf[n + 1] = float(k_local) ** 2
        buf[n + 2] = float(inv_sizes)
        buf[n + 3] = float(examples)
        work = dist.all_reduce(buf, op=dist.ReduceOp.SUM, group=self.group, async_op=True)
        return PendingReduce(buf, work, n)

    def finish_reduce(self, pending: PendingReduce, extra: torch.Tensor | None = None) -> dict[str, Any]:
        """Wait for :meth:`start_reduce`'s collective; read it and this rank's own `extra` values in one host sync.

        Returns:
            ``{"values": [Σ_r packed_r...], "extra": [extra...], "microbatches": Σ_r k_r,
            "inv_sizes": Σ_r Σ_j 1/b_{r,j}, "examples": Σ_r Σ_j b_{r,j}}``, identical on every rank except
            ``extra``.

        Raises:
            RuntimeError: ranks ran different numbers of microbatches (DDP's average over ranks would then
                weigh microbatches unequally).
        """
        if pending.work is not None:
            pending.work.wait()
        n, buf = pending.n, pending.buf
        if extra is not None:
            buf = torch.cat([buf, extra.to(device=buf.device, dtype=torch.float64).reshape(-1)])
        host = buf.tolist()  # the step's one host synchronisation
        W = self.world_size
        k_sum, k_sq, inv_total = host[n], host[n + 1], host[n + 2]
        # Σk² · W = (Σk)² exactly (small integers in float64) if and only if every rank ran the same k.
        if k_sq * W != k_sum * k_sum:
            raise RuntimeError(
                f"bscale: ranks ran different numbers of microbatches in this step (total {k_sum:.0f} "
                f"over {W} ranks, unequal; a microbatch is a backward() that reached this optimizer's "
                "parameters); DDP and FSDP2 average gradients over ranks, so give every rank the same number "
                "of backward() calls per step, each reaching the parameters (DistributedSampler pads the last "
                "batches)"
            )
        return {
            "values": host[:n],
            "extra": host[n + 4 :],
            "microbatches": round(k_sum),
            "inv_sizes": inv_total,
            "examples": host[n + 3],
        }

    def _collective_device(self) -> torch.device:
        # NCCL reduces device tensors only; every other backend here takes CPU tensors.
        if dist.get_backend(self.group) == "nccl":
            return torch.device("cuda", torch.cuda.current_device())
        return torch.device("cpu")

    def check_same(self, readings: Mapping[str, float]) -> None:
        """With ``debug=True``: raise ``RuntimeError`` unless every rank holds the same readings.

        One all-reduce (MAX of each value and of its negation). Compares the readings named in ``_CHECKED``
        exactly (they are computed from identical all-reduced sums) and, for replicated gradients, this rank's
        squared norm of the synchronised gradient (relative 1e-5: it differs only if a step's last backward
        skipped synchronisation).
        """
        if not self.debug or self.world_size == 1:
            return
        names = [k for k in _CHECKED if k in readings]
        vals = [float(readings[k]) for k in names]
        check_grad = self._local_check is not None and not self.sharded
        device = self._device or self._collective_device()
        nan = torch.tensor([math.isnan(v) for v in vals], dtype=torch.float64)
        x = torch.tensor([0.0 if math.isnan(v) else v for v in vals], dtype=torch.float64)
        parts = [x, -x, nan, -nan]
        vec = torch.cat(parts).to(device)
        if check_grad:
            # A step left out (NaN: its norms could not be read) takes no part: -inf loses every MAX.
            g = self._local_check.reshape(1).to(device=device, dtype=torch.float64)
            g = torch.cat([g, -g]).nan_to_num_(nan=-math.inf)
            vec = torch.cat([vec, g])
        dist.all_reduce(vec, op=dist.ReduceOp.MAX, group=self.group)
        out = vec.tolist()
        m = len(names)
        for i, name in enumerate(names):
            hi, lo = out[i], -out[m + i]
            nan_hi, nan_lo = out[2 * m + i], -out[3 * m + i]
            if hi != lo or nan_hi != nan_lo:
                lo_s = "nan" if nan_lo else f"{lo!r}"
                hi_s = "nan" if nan_hi else f"{hi!r}"
                raise RuntimeError(
                    f"bscale debug: '{name}' differs across ranks (min {lo_s}, max {hi_s}); every rank must "
                    "load the same checkpoint, run the same schedule and call step() the same number of times"
                )
        if check_grad:
            hi, lo = out[4 * m], -out[4 * m + 1]
            if math.isfinite(hi) and not math.isclose(hi, lo, rel_tol=1e-5, abs_tol=0.0):
                raise RuntimeError(
                    f"bscale debug: the accumulated gradient's squared norm differs across ranks (min "
                    f"{lo!r}, max {hi!r}): the last backward of the step did not synchronise gradients; call "
                    "backward outside no_sync() (or with require_backward_grad_sync=True) on the last "
                    "microbatch of each step"
                )
        self._local_check = None
