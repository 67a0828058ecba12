"""Code run inside the 2-process job of test_distributed.py (imported by the spawned ranks and by the test).

Every microbatch is a pure function of (step, rank, micro), so a single process running the same W·A
microbatches with gradient accumulation is the reference every data-parallel run must reproduce.
"""

from __future__ import annotations

import contextlib
import gc
import math
import os
import traceback
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import timedelta
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

import bscale
from bscale.wrap import ScaledOptimizer

MICRO = 8  # examples per microbatch (b)
D_IN, D_HID, D_OUT = 6, 8, 4
STEPS = 5
CKPT_AT = 3  # the checkpoint scenario saves after this many steps and resumes from there
VARYING = (2, 3, 3, 2, 1, 2)  # per-rank microbatches per step in the changing-accumulation scenario
# Readings compared between runs; layer keys are added from the reference run.
KEYS = (
    "noise_scale",
    "noise_scale_stderr",
    "grad_sq",
    "trace_sigma",
    "lr_scale",
    "lr",
    "batch_size",
    "microbatches",
    "step_grad_sq",
    "step_trace_sigma",
    "examples",
)


def make_model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(D_IN, D_HID), nn.Tanh(), nn.Linear(D_HID, D_OUT))


def batch(step: int, rank: int, micro: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Microbatch `micro` of rank `rank` at step `step`: a noisy linear teacher, so |G|² is well resolved."""
    g = torch.Generator().manual_seed(100_003 * step + 1_009 * rank + micro)
    teacher = torch.Generator().manual_seed(7)
    w = torch.randn(D_IN, D_OUT, generator=teacher)
    x = torch.randn(MICRO, D_IN, generator=g)
    y = x @ w + 0.5 * torch.randn(MICRO, D_OUT, generator=g)
    return x, y


def make_opt(model: nn.Module, named: nn.Module | None = None, **kw: Any) -> ScaledOptimizer:
    # ref_batch ≠ the batch used, so the noise-aware lr_scale depends on the live B_noise and is compared too.
    inner = torch.optim.SGD(model.parameters(), lr=0.05)
    kw.setdefault("rule", "noise")
    kw.setdefault("ref_batch", 16)
    kw.setdefault("beta", 0.8)
    return bscale.wrap(inner, MICRO, named_parameters=(named or model).named_parameters(), **kw)


def readings(opt: ScaledOptimizer) -> dict[str, float]:
    s = opt.stats
    return {k: v for k, v in s.items() if k in KEYS or k.startswith("layer/")}


def loss_of(model: nn.Module, step: int, rank: int, micro: int, divide: int) -> torch.Tensor:
    x, y = batch(step, rank, micro)
    return nn.functional.mse_loss(model(x), y) / divide


def _count(accum: int | Sequence[int], step: int) -> int:
    return accum if isinstance(accum, int) else accum[step]


def reference(
    ranks: Sequence[int],
    accum: int | Sequence[int],
    steps: int = STEPS,
    new_opt_at: int | None = None,
    **opt_kw: Any,
) -> list[dict[str, float]]:
    """One process running the microbatches of `ranks`, accumulated with loss / (len(ranks)·accum); a fresh
    wrapped optimizer takes over at step `new_opt_at`; `opt_kw` go to the wrapper."""
    model = make_model()
    opt = make_opt(model, **opt_kw)
    out = []
    for step in range(steps):
        if step == new_opt_at:
            opt = make_opt(model, **opt_kw)
        a = _count(accum, step)
        for rank in ranks:
            for micro in range(a):
                loss_of(model, step, rank, micro, len(ranks) * a).backward()
        opt.step()
        opt.zero_grad()
        out.append(readings(opt))
    return out


def train(
    model: nn.Module,
    opt: ScaledOptimizer,
    rank: int,
    accum: int | Sequence[int],
    steps: range,
    sync_context: Callable[[bool], Any],
    scaler: Any = None,
) -> list[dict[str, float]]:
    """The data-parallel loop: `accum` local microbatches per step (a count, or one per step), each backward
    inside `sync_context(is_last_microbatch)`."""
    out = []
    for step in steps:
        a = _count(accum, step)
        for micro in range(a):
            with sync_context(micro == a - 1):
                loss = loss_of(model, step, rank, micro, a)
                (loss if scaler is None else scaler.scale(loss)).backward()
        if scaler is None:
            opt.step()
        else:
            scaler.step(opt)
            scaler.update()
        opt.zero_grad()
        out.append(readings(opt))
    return out


def _ddp(model: nn.Module, **kw: Any) -> nn.Module:
    return nn.parallel.DistributedDataParallel(model, **kw)


def _raises(fn: Callable[[], Any], error: type[Exception] = RuntimeError) -> str:
    try:
        fn()
    except error as e:
        return str(e)
    return ""


@dataclass
class Ctx:
    rank: int
    world: int
    accum: int
    out_dir: str

    @staticmethod
    def no_sync_but_last(ddp: nn.Module) -> Callable[[bool], Any]:
        return lambda last: contextlib.nullcontext() if last else ddp.no_sync()


def _always_sync(last: bool) -> Any:
    return contextlib.nullcontext()


def ddp_no_sync_and_resume(c: Ctx) -> dict[str, Any]:
    """DDP with no_sync() on all but the last microbatch, debug on; rank 0 checkpoints mid-run, and a fresh
    model and optimizer resumed from that checkpoint continue where the saved run stood."""
    model = make_model()
    ddp = _ddp(model)
    opt = make_opt(ddp, named=model, debug=True)
    run = train(ddp, opt, c.rank, c.accum, range(CKPT_AT), c.no_sync_but_last(ddp))
    ckpt = os.path.join(c.out_dir, "ckpt.pt")
    if c.rank == 0:
        torch.save({"model": model.state_dict(), "optimizer": opt.state_dict()}, ckpt + ".tmp")
        os.replace(ckpt + ".tmp", ckpt)
    dist.barrier()
    run += train(ddp, opt, c.rank, c.accum, range(CKPT_AT, STEPS), c.no_sync_but_last(ddp))

    model = make_model()
    state = torch.load(ckpt, map_location="cpu")
    model.load_state_dict(state["model"])
    ddp = _ddp(model)
    opt = make_opt(ddp, named=model)
    opt.load_state_dict(state["optimizer"])
    resumed = train(ddp, opt, c.rank, c.accum, range(CKPT_AT, STEPS), c.no_sync_but_last(ddp))
    return {"ddp_no_sync": run, "resumed": resumed}


def ddp_bucket_view_scaler(c: Ctx) -> dict[str, Any]:
    """Gradients as views into DDP's buckets, and a GradScaler whose scale (2^10 on every rank) must be
    divided out once, not once per rank."""
    model = make_model()
    ddp = _ddp(model, gradient_as_bucket_view=True)
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**10)
    opt = make_opt(ddp, named=model, grad_scaler=scaler)
    run = train(ddp, opt, c.rank, c.accum, range(STEPS), c.no_sync_but_last(ddp), scaler=scaler)
    return {"ddp_bucket_view_scaler": run}


def ddp_varying_accum(c: Ctx) -> dict[str, Any]:
    """The accumulation count changes between steps (read late, or twice, on every rank alike)."""
    model = make_model()
    ddp = _ddp(model)
    opt = make_opt(ddp, named=model, debug=True)
    run = train(ddp, opt, c.rank, VARYING, range(len(VARYING)), c.no_sync_but_last(ddp))
    return {"ddp_varying_accum": run}


def ddp_sync(c: Ctx) -> dict[str, Any]:
    """DDP synchronising after every microbatch: .grad is the sum of rank-averaged gradients. With gradients as
    bucket views, DDP rebuilds its buckets in the second iteration and points every .grad at a new view between
    two backwards of the first step: that must not look like gradients discarded."""
    out = {}
    for name, kw in (("ddp_sync", {}), ("ddp_sync_bucket_view", {"gradient_as_bucket_view": True})):
        model = make_model()
        ddp = _ddp(model, **kw)
        opt = make_opt(ddp, named=model, debug=True)
        out[name] = train(ddp, opt, c.rank, c.accum, range(STEPS), _always_sync)
    return out


def ddp_unread_one_rank(c: Ctx) -> dict[str, Any]:
    """The accumulation count drops (3 then 2, 1): .grad is read in step(), and only rank 0 changes it in place
    first. That rank cannot read it; every rank must then leave the step out, or their readings (and LR scales)
    part."""
    model = make_model()
    ddp = _ddp(model)
    opt = make_opt(ddp, named=model, debug=True)
    out = []
    sync = c.no_sync_but_last(ddp)
    for step, a in enumerate((3, 3, 2, 1, 2)):
        for micro in range(a):
            with sync(micro == a - 1):
                loss_of(ddp, step, c.rank, micro, a).backward()
        if c.rank == 0 and step in (2, 3):
            next(model.parameters()).grad.add_(0.0)  # in place: the version moves, the values do not
        opt.step()
        opt.zero_grad()
        out.append(readings(opt))
    return {"ddp_unread_one_rank": out, "ddp_unread_one_rank_steps": opt.estimator.steps}


def _clamp_grad(p: torch.Tensor) -> None:
    p.grad.clamp_(-1e9, 1e9)


def ddp_static_graph_and_untouched(c: Ctx) -> dict[str, Any]:
    """(a) DDP with static_graph=True (no ddp=): its first iteration all-reduces every gradient in a callback
    queued before the wrapper's, in place in the .grad that the first microbatch's gradient became, before its
    norm is taken. That step must be left out (its norm would be the average's), the later ones equal DDP
    without static_graph. (b) One rank's backwards never reach the optimizer's parameters: the ranks must raise
    the unequal-count error, not send mismatched collectives."""
    out = {}
    for name, static in (("ddp_static_graph", True), ("ddp_dynamic_graph", False)):
        model = make_model()
        ddp = _ddp(model, static_graph=static)
        opt = make_opt(ddp, named=model, debug=True, rule=None)  # the same parameters whatever the readings
        out[name] = train(ddp, opt, c.rank, c.accum, range(STEPS), _always_sync)
        out[f"{name}_steps"] = opt.estimator.steps

    # A post-accumulate hook editing .grad in place (the values stay): it too changes the first gradient before
    # its norm, which only the first step checks for; later steps must all be read.
    model = make_model()
    ddp = _ddp(model)
    for p in model.parameters():
        p.register_post_accumulate_grad_hook(_clamp_grad)
    opt = make_opt(ddp, named=model)
    train(ddp, opt, c.rank, c.accum, range(STEPS), c.no_sync_but_last(ddp))
    out["ddp_post_hook_steps"] = opt.estimator.steps

    # The same edit on rank 0 only, where the step's reduction is launched at the last backward (a controller's
    # count is known from the first step) or rides DDP's bucket (ddp=): every rank must still leave that step out.
    for name in ("ddp_post_hook_rank0_controller", "ddp_post_hook_rank0_ride"):
        model = make_model()
        ddp = _ddp(model)
        if c.rank == 0:
            for p in model.parameters():
                p.register_post_accumulate_grad_hook(_clamp_grad)
        batch_size = c.world * c.accum * MICRO
        kw: dict[str, Any] = {"ddp": ddp} if name.endswith("ride") else {}
        kw["controller"] = bscale.BatchSizeController(min_batch=batch_size, max_batch=batch_size, multiple_of=MICRO)
        opt = make_opt(ddp, named=model, debug=True, rule=None, **kw)
        out[name] = train(ddp, opt, c.rank, c.accum, range(STEPS), c.no_sync_but_last(ddp))
        out[f"{name}_steps"] = opt.estimator.steps

    model, head = make_model(), nn.Linear(D_OUT, 1)
    opt = make_opt(head)

    def head_on_rank_0_only() -> None:
        for micro in range(c.accum):
            x, y = batch(0, c.rank, micro)
            loss = nn.functional.mse_loss(model(x), y)
            (loss + head(model(x)).pow(2).mean() if c.rank == 0 else loss).backward()
        opt.step()

    out["err_untouched"] = _raises(head_on_rank_0_only)
    return out


def ddp_fp16_hook(c: Ctx) -> dict[str, Any]:
    """A user's DDP communication hook (fp16 compression) keeps working beside bscale."""
    from torch.distributed.algorithms.ddp_comm_hooks import default_hooks

    calls = []

    # No annotations: DDP checks a hook's `bucket` annotation, and postponed ones would be strings here.
    def counting_fp16(state, bucket):  # type: ignore[no-untyped-def]
        calls.append(bucket.index())
        return default_hooks.fp16_compress_hook(state, bucket)

    model = make_model()
    ddp = _ddp(model)
    ddp.register_comm_hook(None, counting_fp16)
    opt = make_opt(ddp, named=model, debug=True)
    run = train(ddp, opt, c.rank, c.accum, range(STEPS), c.no_sync_but_last(ddp))
    return {"ddp_fp16_hook": run, "fp16_hook_calls": len(calls)}


def _recording_all_reduce(seen: list[int]) -> Callable[..., Any]:
    real_all_reduce = dist.all_reduce

    def recording(tensor: torch.Tensor, *args: Any, **kwargs: Any) -> Any:
        seen.append(tensor.numel())
        return real_all_reduce(tensor, *args, **kwargs)

    return recording


def ddp_ride(c: Ctx) -> dict[str, Any]:
    """ddp=: the statistics ride DDP's last gradient bucket, with no_sync() on all but the last microbatch,
    synchronising every microbatch, and with a changing accumulation count. Records the size of every
    all-reduce sent from Python (the hook's, and bscale's own if it sent any)."""
    out: dict[str, Any] = {}
    runs = (
        ("ride_no_sync", c.accum, range(STEPS), True),
        ("ride_sync", c.accum, range(STEPS), False),
        ("ride_varying", VARYING, range(len(VARYING)), True),
    )
    for name, accum, steps, no_sync in runs:
        model = make_model()
        ddp = _ddp(model)
        opt = make_opt(ddp, named=model, ddp=ddp)
        seen: list[int] = []
        real_all_reduce = dist.all_reduce
        dist.all_reduce = _recording_all_reduce(seen)
        try:
            out[name] = train(ddp, opt, c.rank, accum, steps, c.no_sync_but_last(ddp) if no_sync else _always_sync)
        finally:
            dist.all_reduce = real_all_reduce
        out[name + "_collectives"] = seen
    out["ride_sizes"] = (sum(p.numel() for p in make_model().parameters()), len(list(make_model().parameters())))
    # The same with debug=True: its check is the only collective bscale adds.
    model = make_model()
    ddp = _ddp(model)
    opt = make_opt(ddp, named=model, ddp=ddp, debug=True)
    out["ride_debug"] = train(ddp, opt, c.rank, c.accum, range(STEPS), c.no_sync_but_last(ddp))
    return out


REWRAP_AT = 2  # the rewrap scenario builds a second wrapper for the same DDP model at this step


def ddp_ride_more(c: Ctx) -> dict[str, Any]:
    """ddp= with several gradient buckets, with gradients as bucket views and a GradScaler, and with a second
    wrapper for the same DDP model taking over the hook from the first."""
    out: dict[str, Any] = {}
    model = make_model()
    ddp = _ddp(model, bucket_cap_mb=1e-4)  # ~100 bytes: a bucket per parameter tensor after the first step
    opt = make_opt(ddp, named=model, ddp=ddp)
    seen: list[int] = []
    real_all_reduce = dist.all_reduce
    dist.all_reduce = _recording_all_reduce(seen)
    try:
        out["ride_buckets"] = train(ddp, opt, c.rank, c.accum, range(STEPS), c.no_sync_but_last(ddp))
    finally:
        dist.all_reduce = real_all_reduce
    out["ride_buckets_collectives"] = seen

    model = make_model()
    ddp = _ddp(model, gradient_as_bucket_view=True)
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**10)
    opt = make_opt(ddp, named=model, grad_scaler=scaler, ddp=ddp)
    out["ride_bucket_view_scaler"] = train(
        ddp, opt, c.rank, c.accum, range(STEPS), c.no_sync_but_last(ddp), scaler=scaler
    )

    model = make_model()
    ddp = _ddp(model)
    opt = make_opt(ddp, named=model, ddp=ddp)
    run = train(ddp, opt, c.rank, c.accum, range(REWRAP_AT), c.no_sync_but_last(ddp))
    opt = make_opt(ddp, named=model, ddp=ddp)  # the model's hook now serves this one; the first is dropped
    seen = []
    dist.all_reduce = _recording_all_reduce(seen)
    try:
        run += train(ddp, opt, c.rank, c.accum, range(REWRAP_AT, STEPS), c.no_sync_but_last(ddp))
    finally:
        dist.all_reduce = real_all_reduce
    out["ride_rewrap"] = run
    out["ride_rewrap_collectives"] = seen

    # A wrapper dropped on one rank only: that rank's hook sends zeros, the other rank's counts do not add up.
    model = make_model()
    ddp = _ddp(model)
    opt = make_opt(ddp, named=model, ddp=ddp)
    train(ddp, opt, c.rank, c.accum, range(1), c.no_sync_but_last(ddp))
    if c.rank == 1:
        del opt
        gc.collect()
        opt = torch.optim.SGD(model.parameters(), lr=0.05)

    def one_step() -> None:
        for micro in range(c.accum):
            with c.no_sync_but_last(ddp)(micro == c.accum - 1):
                loss_of(ddp, 1, c.rank, micro, c.accum).backward()
        opt.step()

    out["err_dropped"] = _raises(one_step)
    return out


def ddp_ride_errors(c: Ctx) -> dict[str, Any]:
    """ddp= refuses what it cannot ride: a plain module, a model with its own comm hook, another group."""
    from torch.distributed.algorithms.ddp_comm_hooks import default_hooks

    def value_error(fn: Callable[[], Any]) -> str:
        return _raises(fn, ValueError)

    model = make_model()
    out = {"err_plain": value_error(lambda: make_opt(model, ddp=model))}
    ddp = _ddp(make_model())
    ddp.register_comm_hook(None, default_hooks.fp16_compress_hook)
    out["err_hooked"] = value_error(lambda: make_opt(ddp, ddp=ddp))
    own = [dist.new_group([r]) for r in range(c.world)][c.rank]
    ddp = _ddp(make_model())
    out["err_group"] = value_error(lambda: make_opt(ddp, ddp=ddp, process_group=own))
    extra = nn.Parameter(torch.zeros(1))
    ddp = _ddp(make_model())
    out["err_outside"] = value_error(
        lambda: bscale.wrap(torch.optim.SGD([*ddp.parameters(), extra], lr=0.05), MICRO, ddp=ddp)
    )
    opt = bscale.wrap(torch.optim.SGD(ddp.parameters(), lr=0.05), MICRO, ddp=ddp)
    out["err_added"] = value_error(lambda: opt.add_param_group({"params": [extra]}))
    out["err_added_named"] = value_error(lambda: opt.add_param_group({"params": [("extra", extra)]}))
    # Refused before the optimizer changed: no group that would be stepped and never measured.
    out["groups_after_refusal"] = len(opt.param_groups)
    return out


MEASURE_EVERY = 2  # the measure_every scenario measures steps 1 and 3


def measure_every(c: Ctx) -> dict[str, Any]:
    """measure_every=2 under DDP (its own collective, and ddp=) and FSDP2: the unmeasured steps still count their
    examples through the step's reduction, and every rank measures the same steps."""
    from torch.distributed.fsdp import fully_shard

    out: dict[str, Any] = {}
    for name in ("every_ddp", "every_ride", "every_fsdp"):
        model = make_model()
        if name == "every_fsdp":
            fully_shard(model[0])
            fully_shard(model)
            opt, ctx = make_opt(model, measure_every=MEASURE_EVERY, debug=True), _always_sync
        else:
            ddp = _ddp(model)
            ride = {"ddp": ddp} if name == "every_ride" else {}
            opt = make_opt(ddp, named=model, measure_every=MEASURE_EVERY, debug=True, **ride)
            model, ctx = ddp, c.no_sync_but_last(ddp)
        out[name] = train(model, opt, c.rank, c.accum, range(STEPS), ctx)
    return out


def fsdp(c: Ctx) -> dict[str, Any]:
    """FSDP2, with and without set_requires_gradient_sync(False) on the first microbatches."""
    from torch.distributed.fsdp import fully_shard

    out: dict[str, Any] = {}
    for name, no_sync in (("fsdp_no_sync", True), ("fsdp_sync", False)):
        model = make_model()
        fully_shard(model[0])
        fully_shard(model)
        opt = make_opt(model, debug=True)

        def fsdp_ctx(last: bool, model: Any = model, no_sync: bool = no_sync) -> Any:
            model.set_requires_gradient_sync(not no_sync or last)
            return contextlib.nullcontext()

        out[name] = train(model, opt, c.rank, c.accum, range(STEPS), fsdp_ctx)
        out[name + "_sharded"] = opt._dp.sharded
    return out


def hsdp(c: Ctx) -> dict[str, Any]:
    """HSDP on a (replicate=2, shard=1) mesh: gradients are replicated DTensors, counted once, not summed."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    mesh = init_device_mesh("cpu", (c.world, 1), mesh_dim_names=("replicate", "shard"))
    model = make_model()
    fully_shard(model[0], mesh=mesh)
    fully_shard(model, mesh=mesh)
    opt = make_opt(model, debug=True)
    return {"hsdp": train(model, opt, c.rank, c.accum, range(STEPS), _always_sync)}


def fsdp_divide_factor(c: Ctx) -> dict[str, Any]:
    """A gradient divide factor of 1 on the root module only: its gradients are sums over ranks, the first
    layer's stay averages. (Sums also step twice as far, so only the first step matches the reference.)"""
    from torch.distributed.fsdp import fully_shard

    model = make_model()
    fully_shard(model[0])
    fully_shard(model)
    for m in (model[0], model):
        m.set_force_sum_reduction_for_comms(True)  # gloo has no PREMUL_SUM: divide outside the collective
    model.set_gradient_divide_factor(1.0)
    opt = make_opt(model, debug=True)
    return {"fsdp_divide_factor": train(model, opt, c.rank, c.accum, range(1), _always_sync)}


def process_groups(c: Ctx) -> dict[str, Any]:
    """Each rank alone in its own group trains like one process on its own data; a group spanning both
    ranks is the one every bscale collective goes through."""
    groups = [dist.new_group([r]) for r in range(c.world)]
    model = make_model()
    opt = make_opt(model, process_group=groups[c.rank])
    own = train(model, opt, c.rank, c.accum, range(2), _always_sync)

    pair = dist.new_group(list(range(c.world)))
    seen: list[Any] = []
    real_all_reduce = dist.all_reduce

    def recording_all_reduce(tensor: torch.Tensor, *args: Any, **kwargs: Any) -> Any:
        seen.append(kwargs.get("group", args[1] if len(args) > 1 else None))
        return real_all_reduce(tensor, *args, **kwargs)

    model = make_model()
    ddp = _ddp(model, process_group=pair)
    opt = make_opt(ddp, named=model, process_group=pair, debug=True)
    dist.all_reduce = recording_all_reduce
    try:
        run = train(ddp, opt, c.rank, c.accum, range(2), _always_sync)
    finally:
        dist.all_reduce = real_all_reduce
    return {"own_group": own, "pair_group": run, "pair_group_collectives": [g is pair for g in seen]}


def debug_errors(c: Ctx) -> dict[str, Any]:
    """debug=True names what diverged; unequal microbatch counts raise with or without it."""
    model = make_model()
    opt = make_opt(model, debug=True)

    def same_data_step(step: int, sync: bool = True) -> None:
        for micro in range(c.accum):
            loss_of(model, step, 0 if sync else c.rank, micro, c.accum).backward()
        opt.step()
        opt.zero_grad()

    # (a) The estimator state differs on one rank (as after loading a stale checkpoint there).
    same_data_step(0)
    same_data_step(1)
    if c.rank == 1:
        opt.estimator.m_t *= 1.5
    out = {"err_estimator": _raises(lambda: same_data_step(2))}
    # (b) Gradients that were never synchronised (every backward under no_sync, or no DDP at all).
    model = make_model()
    opt = make_opt(model, debug=True)
    out["err_unsynced"] = _raises(lambda: same_data_step(0, sync=False))
    # (c) Ranks that ran different numbers of microbatches.
    model = make_model()
    opt = make_opt(model)

    def uneven() -> None:
        for micro in range(c.accum if c.rank == 0 else c.accum - 1):
            loss_of(model, 0, 0, micro, c.accum).backward()
        opt.step()

    out["err_uneven"] = _raises(uneven)
    return out


SCENARIOS = (
    ddp_no_sync_and_resume,
    ddp_bucket_view_scaler,
    ddp_sync,
    ddp_varying_accum,
    ddp_unread_one_rank,
    ddp_static_graph_and_untouched,
    ddp_fp16_hook,
    ddp_ride,
    ddp_ride_more,
    ddp_ride_errors,
    measure_every,
    fsdp,
    hsdp,
    fsdp_divide_factor,
    process_groups,
    debug_errors,
)


def job(rank: int, world: int, init_file: str, out_dir: str, accum: int) -> None:
    """Every scenario in one 2-rank job; each rank saves its results (and any tracebacks) to rank{rank}.pt."""
    torch.set_num_threads(1)
    # A short timeout turns a hang (a collective one rank never joins) into a failing test.
    dist.init_process_group(
        "gloo", init_method=f"file://{init_file}", rank=rank, world_size=world, timeout=timedelta(seconds=60)
    )
    c = Ctx(rank, world, accum, out_dir)
    res: dict[str, Any] = {"errors": {}}
    for scenario in SCENARIOS:
        try:
            res.update(scenario(c))
        except Exception:  # recorded for the test that reads this scenario; the others still run
            res["errors"][scenario.__name__] = traceback.format_exc()
        dist.barrier()
    torch.save(res, os.path.join(out_dir, f"rank{rank}.pt"))
    dist.barrier()
    dist.destroy_process_group()


def close(a: float, b: float, rtol: float) -> bool:
    if math.isnan(a) or math.isnan(b):
        return math.isnan(a) and math.isnan(b)
    return math.isclose(a, b, rel_tol=rtol, abs_tol=0.0)
