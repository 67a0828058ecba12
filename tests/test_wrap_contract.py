"""`bscale.wrap` honours the torch.optim contract: state, steps, hooks, schedulers, checkpoints, errors."""

from __future__ import annotations

import copy
import gc
import io
import math
import pickle
import warnings
import weakref

import numpy as np
import pytest
import torch
from torch.utils.checkpoint import checkpoint

import bscale
from bscale import ScaledOptimizer, wrap


def _model(seed: int = 0) -> torch.nn.Module:
    torch.manual_seed(seed)
    return torch.nn.Sequential(torch.nn.Linear(5, 7), torch.nn.Tanh(), torch.nn.Linear(7, 2))


def _data(steps: int, k: int, b: int = 4, seed: int = 1) -> list[list[tuple[torch.Tensor, torch.Tensor]]]:
    """``steps`` lists of ``k`` microbatches of ``b`` examples (inputs 5, targets 2), reproducible."""
    g = torch.Generator().manual_seed(seed)
    # A learnable target, so |G|² is well above 0 and the noise scale has a reading.
    w = torch.randn(5, 2, generator=torch.Generator().manual_seed(99))
    out = []
    for _ in range(steps):
        xs = [torch.randn(b, 5, generator=g) for _ in range(k)]
        out.append([(x, x @ w + 0.3 * torch.randn(b, 2, generator=g)) for x in xs])
    return out


def _backward(model: torch.nn.Module, microbatches) -> None:
    k = len(microbatches)
    for x, y in microbatches:
        (((model(x) - y) ** 2).mean() / k).backward()  # nanoGPT's loss / accum


def _train(model, opt, data) -> list[dict[str, float]]:
    readings = []
    for microbatches in data:
        _backward(model, microbatches)
        opt.step()
        opt.zero_grad()
        readings.append(getattr(opt, "stats", {}))  # a bare optimizer has none
    return readings


def _same_float(a: float, b: float) -> bool:
    return (math.isnan(a) and math.isnan(b)) or a == b


# ---- identity and the basic calls --------------------------------------------------------------------------


def test_is_an_optimizer_that_shares_the_wrapped_state():
    model = _model()
    inner = torch.optim.AdamW(model.parameters(), lr=1e-2)
    opt = wrap(inner, microbatch_size=4)
    assert isinstance(opt, torch.optim.Optimizer)
    assert isinstance(opt, ScaledOptimizer) and bscale.wrap is wrap
    assert opt.optimizer is inner
    assert opt.param_groups is inner.param_groups
    assert opt.defaults is inner.defaults
    _train(model, opt, _data(1, 2))
    assert opt.state is inner.state
    # The inner step created its state, seen through the wrapper.
    assert set(opt.state) == set(model.parameters())
    assert "AdamW" in repr(opt)


def test_step_with_closure_returns_the_loss_and_counts_its_backwards():
    model = _model()
    opt = wrap(torch.optim.SGD(model.parameters(), lr=0.1), microbatch_size=4)
    (microbatches,) = _data(1, 2)

    def closure():
        opt.zero_grad()
        total = 0.0
        for x, y in microbatches:
            loss = ((model(x) - y) ** 2).mean() / 2
            loss.backward()
            total = total + loss.detach()
        return total

    expected = closure()
    opt.zero_grad()
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # two backwards: no one-microbatch warning
        out = opt.step(closure)
    assert torch.equal(out, expected)
    assert opt.stats["microbatches"] == 2.0
    assert opt.stats["batch_size"] == 8.0


def test_zero_grad_set_to_none_and_to_zero():
    model = _model()
    opt = wrap(torch.optim.SGD(model.parameters(), lr=0.1), microbatch_size=4)
    _backward(model, _data(1, 2)[0])
    opt.zero_grad(set_to_none=False)
    assert all(p.grad is not None and not p.grad.any() for p in model.parameters())
    opt.zero_grad(set_to_none=True)
    assert all(p.grad is None for p in model.parameters())
    _backward(model, _data(1, 2)[0])
    opt.zero_grad()  # the default is set_to_none=True, as torch's
    assert all(p.grad is None for p in model.parameters())


def _flat_microbatch_grads(model, microbatches, params) -> list[torch.Tensor]:
    """Per-microbatch mean gradients of ``params`` (no wrapper involved), flattened and concatenated."""
    out = []
    for x, y in microbatches:
        grads = torch.autograd.grad(((model(x) - y) ** 2).mean(), params, allow_unused=True)
        out.append(
            torch.cat([(torch.zeros_like(p) if g is None else g).flatten() for p, g in zip(params, grads, strict=True)])
        )
    return out


@pytest.mark.parametrize("as_given", [list, iter])  # torch.optim takes any iterable, read once
def test_add_param_group_parameters_are_measured(as_given):
    (microbatches,) = _data(1, 4)
    ref = _model()
    everything = bscale.microbatch_estimates(_flat_microbatch_grads(ref, microbatches, list(ref.parameters())))
    first_only = bscale.microbatch_estimates(_flat_microbatch_grads(ref, microbatches, list(ref[0].parameters())))
    assert not math.isclose(everything.trace_sigma, first_only.trace_sigma, rel_tol=1e-2)  # the test can fail

    model = _model()
    opt = wrap(torch.optim.SGD(model[0].parameters(), lr=0.0), microbatch_size=1, beta=0.0)
    opt.add_param_group({"params": as_given(list(model[2].parameters())), "lr": 0.0})
    assert len(opt.param_groups) == 2 and opt.param_groups is opt.optimizer.param_groups
    _train(model, opt, [microbatches])
    # microbatch_size=1: the estimates come out per microbatch, as microbatch_estimates' default sizes.
    assert opt.estimator.last_grad_sq == pytest.approx(everything.grad_sq, rel=1e-5, abs=1e-7)
    assert opt.estimator.last_trace_sigma == pytest.approx(everything.trace_sigma, rel=1e-5)


def test_a_dropped_wrapper_stops_measuring():
    model = _model()
    old = wrap(torch.optim.SGD(model.parameters(), lr=0.1), microbatch_size=4)
    _train(model, old, _data(1, 2))
    alive = weakref.ref(old)
    del old
    gc.collect()
    assert alive() is None  # the gradient hooks left on the parameters do not keep it alive
    new = wrap(torch.optim.SGD(model.parameters(), lr=0.1), microbatch_size=4)
    _train(model, new, _data(2, 3))
    assert new.stats["microbatches"] == 3.0 and new.stats["steps"] == 2.0


def test_held_gradients_are_normed_when_bucket_mb_fills_and_become_grad_without_a_copy():
    # Linear(5, 7) has 35 + 7 float32 values, Linear(7, 2) 14 + 2: a bucket of 100 bytes fills within a backward.
    data = _data(3, 3)
    readings, peaks = {}, {}
    for bucket_mb in (32.0, 100 / 2**20):
        model = _model()
        opt = wrap(torch.optim.SGD(model.parameters(), lr=0.1), microbatch_size=4, bucket_mb=bucket_mb)
        seen = {}
        for p in model.parameters():  # registered after the wrapper's hooks: sees what AccumulateGrad gets
            p.register_hook(lambda g, p=p, seen=seen: seen.__setitem__(p, g.data_ptr()))
        _backward(model, data[0][:1])
        # The first backward's gradients become .grad themselves: holding them costs no copy.
        assert all(p.grad.data_ptr() == seen[p] for p in model.parameters())
        readings[bucket_mb] = _train(model, opt, data)
        peaks[bucket_mb] = opt.memory_bytes()["transient_peak"]
    assert readings[32.0] == readings[100 / 2**20]  # the same norms, taken in more ops
    assert peaks[32.0] == 4 * (35 + 7 + 14 + 2)  # a whole backward's gradients, held until it ends
    assert 100 <= peaks[100 / 2**20] < 100 + 4 * 35  # the bucket, overfilled by at most one gradient


@pytest.mark.parametrize("kind", ["tensor hook", "post-accumulate hook"])
def test_gradients_edited_in_place_by_hooks_leave_no_step_out(kind):
    # A hook of the user's that edits the gradient in place (a mask; a clamp of .grad) after the wrapper's own
    # hook bumps the version of the gradient that becomes .grad. In one process that is no reason to leave a
    # step out (every microbatch is edited alike); only DDP's static_graph first iteration is.
    model = _model()
    opt = wrap(torch.optim.SGD(model.parameters(), lr=0.1), microbatch_size=4)

    def clamp(p: torch.Tensor) -> None:
        p.grad.clamp_(-1e6, 1e6)

    for p in model.parameters():
        if kind == "tensor hook":
            p.register_hook(lambda g: g.mul_(0.5))
        else:
            p.register_post_accumulate_grad_hook(clamp)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        _train(model, opt, _data(4, 3))
    assert opt.estimator.steps == 4 and opt.noise_scale is not None


def test_readings_are_the_same_read_every_step_or_once():
    data = _data(5, 3)
    every, once = [], None
    for read_each in (True, False):
        model = _model()
        opt = wrap(torch.optim.Adam(model.parameters(), lr=1e-2), microbatch_size=4, rule="sqrt", ref_lr=1e-2)
        for microbatches in data:
            _backward(model, microbatches)
            opt.step()
            opt.zero_grad()
            if read_each:
                every.append(opt.stats)
        once = opt.stats
        again = opt.stats  # built once, then the same until the next step
        assert all(_same_float(again[k], once[k]) for k in once)
    assert set(once) == set(every[-1])
    assert all(_same_float(once[k], every[-1][k]) for k in once)
    assert once["steps"] == 5.0 and every[0]["steps"] == 1.0 and every[0] != every[-1]


def _embedding_run(sparse: bool, make_opt, head: bool = True, **wrap_kwargs) -> dict[str, float]:
    torch.manual_seed(0)
    emb = torch.nn.Embedding(100, 8, sparse=sparse)
    lin = torch.nn.Linear(8, 3)
    params = list(emb.parameters()) + (list(lin.parameters()) if head else [])
    opt = wrap(make_opt(params), microbatch_size=4, **wrap_kwargs)
    g = torch.Generator().manual_seed(1)
    for _ in range(5):
        for _ in range(3):
            h = emb(torch.randint(100, (4, 6), generator=g))
            (lin(h) if head else h).pow(2).mean().backward()
        opt.step()
        opt.zero_grad()
    return opt.stats


def test_sparse_gradients_are_measured_like_dense_ones():
    # nn.Embedding(sparse=True): the norm of a sparse gradient is that of its coalesced values (rows looked up
    # twice in a microbatch add up first), so the readings equal the dense embedding's on the same data.
    dense = _embedding_run(False, lambda p: torch.optim.SGD(p, lr=0.0))
    sparse = _embedding_run(True, lambda p: torch.optim.SGD(p, lr=0.0))
    for key in ("grad_sq", "trace_sigma", "noise_scale"):
        assert sparse[key] == pytest.approx(dense[key], rel=1e-6), key
    # SparseAdam takes sparse gradients only: it can be wrapped too.
    adam = _embedding_run(True, lambda p: torch.optim.SparseAdam(p, lr=1e-3), head=False)
    assert math.isfinite(adam["noise_scale"]) and adam["steps"] == 5.0


def test_sparse_gradients_with_per_coordinate_mode_say_what_to_change():
    with pytest.raises(RuntimeError, match="per_coordinate=True needs dense real gradients"):
        _embedding_run(True, lambda p: torch.optim.SGD(p, lr=0.0), per_coordinate=True)


def _complex_run(complex_param: bool, **wrap_kwargs) -> dict[str, float]:
    torch.manual_seed(0)
    w0 = torch.randn(8, dtype=torch.complex64)
    w = torch.nn.Parameter(w0 if complex_param else torch.view_as_real(w0).clone())
    opt = wrap(torch.optim.SGD([w], lr=0.0), microbatch_size=4, **wrap_kwargs)
    g = torch.Generator().manual_seed(1)
    for _ in range(4):
        for _ in range(2):
            x = torch.randn(4, 8, dtype=torch.complex64, generator=g)
            ((x @ (w if complex_param else torch.view_as_complex(w))).abs() ** 2).mean().backward()
        opt.step()
        opt.zero_grad()
    return opt.stats


def test_complex_parameters_are_measured_like_their_real_view():
    cplx, real = _complex_run(True), _complex_run(False)
    for key in ("grad_sq", "trace_sigma", "noise_scale"):
        assert cplx[key] == pytest.approx(real[key], rel=1e-6), key
    with pytest.raises(RuntimeError, match="got a complex one"):
        _complex_run(True, per_coordinate=True)


def _readings_both_ways(backward_one, make_opt=lambda p: torch.optim.Adam(p, lr=0.0), **wrap_kwargs):
    """The last readings of two runs on the same data, ``{False: ..., True: ...}``: each microbatch's backward
    done by ``backward_one(model, x, y, variant)``."""
    readings = {}
    for variant in (False, True):
        model = _model()
        opt = wrap(make_opt(model.parameters()), microbatch_size=4, **wrap_kwargs)
        for microbatches in _data(3, 2):
            for x, y in microbatches:
                backward_one(model, x, y, variant)
            opt.step()
            opt.zero_grad()
        readings[variant] = opt.stats
    return readings


def _same_readings(readings) -> bool:
    return all(_same_float(readings[True][k], readings[False][k]) for k in readings[False])


def test_autograd_grad_inside_the_loop_is_not_a_microbatch():
    # A gradient penalty taken with torch.autograd.grad (create_graph) runs the parameters' hooks too, but
    # accumulates nothing into .grad: only the backward() counts. Weighted 0, it leaves the readings unchanged.
    def backward_one(model, x, y, penalty):
        loss = ((model(x) - y) ** 2).mean() / 2
        if penalty:
            grads = torch.autograd.grad(loss, list(model.parameters()), create_graph=True)
            loss = loss + 0.0 * sum(g.pow(2).sum() for g in grads)
        loss.backward()

    readings = _readings_both_ways(backward_one, lambda p: torch.optim.SGD(p, lr=0.0))
    assert readings[True]["microbatches"] == 2.0
    assert _same_readings(readings)


@pytest.mark.parametrize("per_coordinate", [False, True])
def test_backward_with_create_graph_gives_the_same_readings(per_coordinate):
    # backward(create_graph=True) leaves .grad differentiable (for a Hessian-vector product, say): the
    # statistics taken from it must neither fail nor differ.
    def backward_one(model, x, y, create_graph):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", UserWarning)  # torch's note on create_graph's reference cycle
            (((model(x) - y) ** 2).mean() / 2).backward(create_graph=create_graph)

    assert _same_readings(_readings_both_ways(backward_one, per_coordinate=per_coordinate))


@pytest.mark.parametrize("per_coordinate", [False, True])
@pytest.mark.parametrize("use_reentrant", [True, False])
@pytest.mark.parametrize("segments", ["last layer", "two segments"])
def test_activation_checkpointing_gives_the_same_readings(segments, use_reentrant, per_coordinate):
    # With use_reentrant=True each checkpointed part's backward runs as a graph task of its own, nested in the
    # backward() call's: here the last layer's comes first (and, with two segments, the first layer's in a
    # second one). Still one microbatch per backward() call.
    def backward_one(model, x, y, checkpointed):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # torch's notes on reentrant checkpointing
            if not checkpointed:
                out = model(x)
            elif segments == "last layer":
                out = checkpoint(model[2], model[1](model[0](x)), use_reentrant=use_reentrant)
            else:  # every parameter inside a checkpointed part (x needs a gradient for reentrant ones)
                h = checkpoint(model[:2], x.clone().requires_grad_(), use_reentrant=use_reentrant)
                out = checkpoint(model[2], h, use_reentrant=use_reentrant)
            (((out - y) ** 2).mean() / 2).backward()

    readings = _readings_both_ways(backward_one, per_coordinate=per_coordinate)
    assert readings[True]["microbatches"] == 2.0
    assert _same_readings(readings)


# ---- matches the bare optimizer when scaling is off --------------------------------------------------------


def _fused_adamw_on_cpu_supported() -> bool:
    try:
        p = torch.zeros(2, requires_grad=True)
        p.grad = torch.ones(2)
        torch.optim.AdamW([p], lr=1e-2, fused=True).step()
    except (RuntimeError, ValueError):
        return False
    return True


_OPTIMIZERS = {
    "sgd": lambda p: torch.optim.SGD(p, lr=0.1),
    "sgd-momentum": lambda p: torch.optim.SGD(p, lr=0.1, momentum=0.9, nesterov=True, weight_decay=1e-3),
    "adam": lambda p: torch.optim.Adam(p, lr=1e-2),
    "adamw-foreach": lambda p: torch.optim.AdamW(p, lr=1e-2, foreach=True),
    "adamw-forloop": lambda p: torch.optim.AdamW(p, lr=1e-2, foreach=False),
    "adamw-fused": pytest.param(
        lambda p: torch.optim.AdamW(p, lr=1e-2, fused=True),
        marks=pytest.mark.skipif(not _fused_adamw_on_cpu_supported(), reason="no fused AdamW on CPU here"),
    ),
    "rmsprop": lambda p: torch.optim.RMSprop(p, lr=1e-2, momentum=0.5),
    "adagrad": lambda p: torch.optim.Adagrad(p, lr=1e-2),
}


@pytest.mark.parametrize("make", list(_OPTIMIZERS.values()), ids=list(_OPTIMIZERS))
def test_wrapped_matches_bare_bitwise(make):
    data = _data(5, 3)
    bare_model, wrapped_model = _model(), _model()
    bare = make(bare_model.parameters())
    _train(bare_model, bare, data)
    opt = wrap(make(wrapped_model.parameters()), microbatch_size=4)
    _train(wrapped_model, opt, data)
    for a, b in zip(bare_model.parameters(), wrapped_model.parameters(), strict=True):
        assert torch.equal(a, b)
    assert bare.param_groups[0]["lr"] == opt.param_groups[0]["lr"]
    assert opt.stats["steps"] == 5.0 and opt.stats["lr_scale"] == 1.0


# ---- step hooks and LR schedulers --------------------------------------------------------------------------


def test_step_hooks_registered_on_the_wrapper_fire():
    model = _model()
    inner = torch.optim.SGD(model.parameters(), lr=0.1)
    opt = wrap(inner, microbatch_size=4)
    calls = []
    pre = opt.register_step_pre_hook(lambda o, args, kwargs: calls.append(("pre", o is opt)))
    post = opt.register_step_post_hook(lambda o, args, kwargs: calls.append(("post", o is opt)))
    inner.register_step_pre_hook(lambda o, args, kwargs: calls.append(("inner", o is inner)))
    _train(model, opt, _data(2, 2))
    assert calls == [("pre", True), ("inner", True), ("post", True)] * 2
    pre.remove()
    post.remove()
    _train(model, opt, _data(1, 2))
    assert calls[-1] == ("inner", True) and len(calls) == 7


_SCHEDULERS = {
    "lambda": lambda o: torch.optim.lr_scheduler.LambdaLR(o, lambda s: 0.5**s),
    "onecycle": lambda o: torch.optim.lr_scheduler.OneCycleLR(o, max_lr=0.5, total_steps=6),
    "cosine": lambda o: torch.optim.lr_scheduler.CosineAnnealingLR(o, T_max=6),
}


@pytest.mark.parametrize("make_scheduler", list(_SCHEDULERS.values()), ids=list(_SCHEDULERS))
def test_lr_schedulers_drive_the_wrapper(make_scheduler):
    model = _model()
    inner = torch.optim.AdamW(model.parameters(), lr=0.1)
    # rule="linear", batch twice ref_batch: the inner step sees 2x the scheduler's value; the user keeps it.
    opt = wrap(inner, microbatch_size=4, rule="linear", ref_batch=4)
    seen = []
    inner.register_step_pre_hook(lambda o, a, k: seen.append((o.param_groups[0]["lr"], o.param_groups[0]["betas"])))
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # e.g. "lr_scheduler.step() before optimizer.step()"
        scheduler = make_scheduler(opt)
        for microbatches in _data(5, 2):
            written = (opt.param_groups[0]["lr"], opt.param_groups[0]["betas"])
            _backward(model, microbatches)
            opt.step()
            opt.zero_grad()
            assert seen[-1] == (2 * written[0], written[1])
            assert (opt.param_groups[0]["lr"], opt.param_groups[0]["betas"]) == written  # restored exactly
            scheduler.step()
            assert opt.param_groups[0]["lr"] == scheduler.get_last_lr()[0]
    assert len({lr for lr, _ in seen}) > 1  # the scheduler did move the learning rate


# ---- state dicts and checkpoints ---------------------------------------------------------------------------


def _assert_same_optimizer_state(a: dict, b: dict) -> None:
    assert a["param_groups"] == b["param_groups"]
    assert a["state"].keys() == b["state"].keys()
    for i in a["state"]:
        assert a["state"][i].keys() == b["state"][i].keys()
        for key, value in a["state"][i].items():
            assert torch.equal(value, b["state"][i][key])


def test_state_dict_loads_into_bare_optimizer_and_back():
    model = _model()
    opt = wrap(torch.optim.Adam(model.parameters(), lr=1e-2), microbatch_size=4)
    _train(model, opt, _data(3, 2))
    sd = opt.state_dict()
    assert "bscale" in sd and sd["bscale"]["steps"] == 3
    _assert_same_optimizer_state({k: v for k, v in sd.items() if k != "bscale"}, opt.optimizer.state_dict())

    bare = torch.optim.Adam(_model().parameters(), lr=1e-2)
    bare.load_state_dict(sd)  # the extra key is ignored, as a bare optimizer's own loader does
    _assert_same_optimizer_state(bare.state_dict(), opt.optimizer.state_dict())

    other = _model(1)
    fresh = wrap(torch.optim.Adam(other.parameters(), lr=1e-2), microbatch_size=4)
    _train(other, fresh, _data(3, 2, seed=5))
    fresh.load_state_dict(bare.state_dict())  # a checkpoint from before bscale: the estimator starts fresh
    _assert_same_optimizer_state(fresh.optimizer.state_dict(), opt.optimizer.state_dict())
    assert fresh.estimator.steps == 0 and fresh.noise_scale is None


def test_state_dict_hooks_registered_on_the_wrapper_fire():
    model = _model()
    opt = wrap(torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9), microbatch_size=4)
    calls = []
    opt.register_state_dict_post_hook(lambda o, sd: calls.append(("save", "bscale" in sd)))
    opt.register_load_state_dict_post_hook(lambda o: calls.append(("load", o is opt)))
    opt.load_state_dict(opt.state_dict())
    assert calls == [("save", True), ("load", True)]


def _wrapped_adamw(model, **kwargs):
    return wrap(
        torch.optim.AdamW(model.parameters(), lr=1e-2),
        **kwargs,
        microbatch_size=4,
        rule="noise",
        ref_batch=6,
        beta=0.8,
        named_parameters=model.named_parameters(),
    )


@pytest.mark.parametrize("per_coordinate", [False, True], ids=["default", "per_coordinate"])
def test_checkpoint_resume_is_bitwise(per_coordinate):
    data = _data(10, 3)
    model = _model()
    opt = _wrapped_adamw(model, per_coordinate=per_coordinate)
    straight = [(r, [p.detach().clone() for p in model.parameters()]) for r in _train_each(model, opt, data)]

    model = _model()
    opt = _wrapped_adamw(model, per_coordinate=per_coordinate)
    resumed = [(r, [p.detach().clone() for p in model.parameters()]) for r in _train_each(model, opt, data[:5])]
    saved_batch = opt.batch_size
    buffer = io.BytesIO()
    torch.save({"model": model.state_dict(), "opt": opt.state_dict()}, buffer)
    buffer.seek(0)
    ckpt = torch.load(buffer, map_location="cpu")
    model = _model(seed=7)  # different initial weights: everything must come from the checkpoint
    model.load_state_dict(ckpt["model"])
    opt = _wrapped_adamw(model, per_coordinate=per_coordinate)
    opt.load_state_dict(ckpt["opt"])
    # Read right after the load, the readings are those the saved run gave after its last step.
    assert opt.batch_size == saved_batch is not None
    after_load = opt.stats
    assert all(_same_float(straight[4][0][k], after_load[k]) for k in after_load), {
        k: (straight[4][0][k], after_load[k]) for k in after_load if straight[4][0][k] != after_load[k]
    }
    resumed += [(r, [p.detach().clone() for p in model.parameters()]) for r in _train_each(model, opt, data[5:])]

    assert any(math.isfinite(r["noise_scale"]) for r, _ in straight[5:])  # readings worth comparing
    assert any(k.startswith("layer/") for k in straight[-1][0])
    assert per_coordinate == math.isfinite(straight[-1][0].get("adam_preconditioned/noise_scale", math.nan))
    for (r1, p1), (r2, p2) in zip(straight, resumed, strict=True):
        assert r1.keys() == r2.keys()
        assert all(_same_float(r1[k], r2[k]) for k in r1), {k: (r1[k], r2[k]) for k in r1 if r1[k] != r2[k]}
        assert all(torch.equal(a, b) for a, b in zip(p1, p2, strict=True))


def test_resume_through_distributed_checkpoint_state_dicts():
    # torch.distributed.checkpoint's get/set_optimizer_state_dict (the FSDP2 path) rebuild the optimizer's state
    # dict from `state` and `param_groups` alone: the estimator travels beside it, by bscale_state_dict().
    from torch.distributed.checkpoint.state_dict import get_optimizer_state_dict, set_optimizer_state_dict

    data = _data(8, 3)
    model = _model()
    opt = _wrapped_adamw(model)
    straight = list(_train_each(model, opt, data))

    model = _model()
    opt = _wrapped_adamw(model)
    resumed = list(_train_each(model, opt, data[:4]))
    ckpt = copy.deepcopy(
        {"model": model.state_dict(), "optim": get_optimizer_state_dict(model, opt), "bscale": opt.bscale_state_dict()}
    )
    model = _model(seed=7)
    model.load_state_dict(ckpt["model"])
    opt = _wrapped_adamw(model)
    set_optimizer_state_dict(model, opt, ckpt["optim"])
    opt.load_bscale_state_dict(ckpt["bscale"])
    assert all(_same_float(straight[3][k], opt.stats[k]) for k in straight[3])  # as the saved run read
    resumed += list(_train_each(model, opt, data[4:]))
    assert math.isfinite(straight[-1]["noise_scale"])
    for r1, r2 in zip(straight, resumed, strict=True):
        assert all(_same_float(r1[k], r2[k]) for k in r1), {k: (r1[k], r2[k]) for k in r1 if r1[k] != r2[k]}
    with pytest.raises(ValueError, match="bscale_state_dict"):
        opt.load_bscale_state_dict(ckpt["optim"])


def _train_each(model, opt, data):
    for microbatches in data:
        _backward(model, microbatches)
        opt.step()
        opt.zero_grad()
        yield opt.stats


class _FailingBackward(torch.autograd.Function):
    """Raises in backward, after the layers above it have had their gradients (an out-of-memory error, say)."""

    @staticmethod
    def forward(ctx, x):
        return x.clone()

    @staticmethod
    def backward(ctx, grad):
        raise RuntimeError("simulated failure in backward")


def test_a_backward_that_raised_leaves_only_its_step_out_and_says_so():
    data = _data(5, 3)
    model = _model()
    opt = wrap(torch.optim.SGD(model.parameters(), lr=0.0), microbatch_size=4)
    for step, microbatches in enumerate(data):
        if step == 2:
            x, _ = microbatches[0]
            with pytest.raises(RuntimeError, match="simulated failure"):
                model[2](torch.tanh(_FailingBackward.apply(model[0](x)))).sum().backward()
            model.zero_grad()  # the batch skipped, by the model rather than the wrapper
        for x, y in microbatches:
            _loss_backward(model, x, y, len(microbatches))
        if step == 2:
            with pytest.warns(RuntimeWarning, match="never reached its end"):
                opt.step()
        else:
            opt.step()
        opt.zero_grad()
    assert opt.estimator.steps == 4  # step 2 left out, the others read in full
    assert opt.stats["microbatches"] == 3.0


def _loss_backward(model, x, y, k):
    (((model(x) - y) ** 2).mean() / k).backward()


def test_removed_hooks_stay_removed_when_a_frozen_parameter_is_unfrozen():
    model = _model()
    model[0].requires_grad_(False)
    opt = wrap(torch.optim.SGD(model.parameters(), lr=0.0), microbatch_size=4)
    data = _data(3, 2)
    for step, microbatches in enumerate(data):
        if step == 1:
            opt.remove_hooks()
            model[0].requires_grad_(True)
        for x, y in microbatches:
            _loss_backward(model, x, y, 2)
        opt.step()
        opt.zero_grad()
    assert opt.estimator.steps == 1  # measured before remove_hooks() only


def test_an_optimizer_stepped_inside_backward_is_not_taken_for_a_failed_backward():
    # The "optimizer step in backward" pattern: step() from a post-accumulate-grad hook, while the backward runs.
    model = _model()
    opts = {p: wrap(torch.optim.SGD([p], lr=0.1), microbatch_size=4) for p in model.parameters()}

    def step_now(p):
        opts[p].step()
        opts[p].zero_grad()

    for p in model.parameters():
        p.register_post_accumulate_grad_hook(step_now)
    with warnings.catch_warnings():
        warnings.filterwarnings("error", message=".*never reached its end")
        warnings.filterwarnings("ignore", message=".*one microbatch per step")
        for x, y in _data(1, 2)[0]:
            _loss_backward(model, x, y, 1)


def test_copying_or_pickling_the_wrapper_says_what_to_do_instead():
    opt = wrap(torch.optim.SGD(_model().parameters(), lr=0.1), microbatch_size=4)
    for attempt in (copy.deepcopy, copy.copy, pickle.dumps):
        with pytest.raises(TypeError, match=r"save opt\.state_dict\(\)"):
            attempt(opt)


def test_an_optimizer_of_copies_no_backward_reaches_says_why_it_has_no_reading():
    # fp32 master weights of a model: their .grad is assigned, no backward runs on them, no hook fires.
    model = _model()
    master = [p.detach().clone().requires_grad_(True) for p in model.parameters()]
    opt = wrap(torch.optim.SGD(master, lr=0.1), microbatch_size=4)
    for microbatches in _data(2, 2):
        for x, y in microbatches:
            _loss_backward(model, x, y, 2)
        for q, p in zip(master, model.parameters(), strict=True):
            q.grad = p.grad.clone()
        opt.step()
        opt.zero_grad()
        model.zero_grad()
    assert opt.noise_scale is None and "no backward() has reached" in opt.reason


# ---- bad input ---------------------------------------------------------------------------------------------


def _sgd():
    return torch.optim.SGD(torch.nn.Linear(2, 2).parameters(), lr=0.1)


def _bad_calls():
    layer = torch.nn.Linear(3, 2)
    sgd = _sgd()
    return [
        ("not an optimizer", lambda: wrap(layer, microbatch_size=4), "needs a torch.optim.Optimizer"),
        (
            "already wrapped",
            lambda: wrap(wrap(_sgd(), microbatch_size=4), microbatch_size=4),
            "already wrapped",
        ),
        ("lbfgs", lambda: wrap(torch.optim.LBFGS(layer.parameters()), microbatch_size=4), "LBFGS"),
        ("microbatch 0", lambda: wrap(sgd, microbatch_size=0), "Invalid microbatch_size: 0"),
        ("microbatch <0", lambda: wrap(sgd, microbatch_size=-2), "Invalid microbatch_size: -2"),
        ("microbatch nan", lambda: wrap(sgd, microbatch_size=math.nan), "Invalid microbatch_size: nan"),
        ("microbatch inf", lambda: wrap(sgd, microbatch_size=math.inf), "Invalid microbatch_size: inf"),
        ("microbatch bool", lambda: wrap(sgd, microbatch_size=True), "Invalid microbatch_size: True"),
        ("microbatch str", lambda: wrap(sgd, microbatch_size="32"), "Invalid microbatch_size: '32'"),
        ("rule", lambda: wrap(sgd, microbatch_size=4, rule="Linear"), "Invalid rule: 'Linear'"),
        ("law", lambda: wrap(sgd, microbatch_size=4, law="lamb"), "Invalid law: 'lamb'"),
        ("ref_batch", lambda: wrap(sgd, microbatch_size=4, ref_batch=0), "Invalid ref_batch: 0"),
        ("ref_lr", lambda: wrap(sgd, microbatch_size=4, ref_lr=-1e-3), "Invalid ref_lr: -0.001"),
        ("beta", lambda: wrap(sgd, microbatch_size=4, beta=1.0), "Invalid beta: 1.0"),
        (
            "loss_reduction",
            lambda: wrap(sgd, microbatch_size=4, loss_reduction="none"),
            "Invalid loss_reduction",
        ),
        ("log_every 0", lambda: wrap(sgd, microbatch_size=4, log_every=0), "Invalid log_every: 0"),
        ("log_every bool", lambda: wrap(sgd, microbatch_size=4, log_every=True), "Invalid log_every: True"),
        ("bucket_mb", lambda: wrap(sgd, microbatch_size=4, bucket_mb=0), "Invalid bucket_mb: 0"),
        ("backend", lambda: wrap(sgd, microbatch_size=4, backend="cuda"), "Invalid backend: 'cuda'"),
        ("logger", lambda: wrap(sgd, microbatch_size=4, loggers=[object()]), "no log\\(stats, step\\)"),
        ("grad_scaler", lambda: wrap(sgd, microbatch_size=4, grad_scaler=object()), "Invalid grad_scaler"),
        (
            "named_parameters",
            lambda: wrap(
                torch.optim.SGD(layer.parameters(), lr=0.1),
                microbatch_size=4,
                named_parameters=layer.parameters(),
            ),
            "model.named_parameters\\(\\), not model.parameters\\(\\)",
        ),
        (
            "adam hparams without rule",
            lambda: wrap(torch.optim.Adam(layer.parameters()), microbatch_size=4, scale_adam_hparams=True),
            "pass a rule",
        ),
        (
            "adam hparams on sgd",
            lambda: wrap(sgd, microbatch_size=4, rule="sqrt", scale_adam_hparams=True),
            "needs an optimizer with betas",
        ),
        ("controller class", lambda: wrap(sgd, 4, controller=bscale.BatchSizeController), "Invalid controller"),
        ("controller int", lambda: wrap(sgd, 4, controller=256), "Invalid controller"),
        (
            # A controller that can grow 64x with β1 = 0.9: the square-root rule fails past 10x, so at wrap(), not
            # at the step that gets there.
            "adam hparams past the controller's reach",
            lambda: wrap(
                torch.optim.Adam(layer.parameters()),
                microbatch_size=4,
                rule="sqrt",
                scale_adam_hparams=True,
                controller=bscale.BatchSizeController(min_batch=8, max_batch=512),
            ),
            "lower max_batch to below 80, pass a larger ref_batch",
        ),
    ]


def test_adam_hparams_reach_is_checked_against_the_batches_the_controller_can_choose():
    layer = torch.nn.Linear(3, 1)
    # max_batch 3500 on a grid of 512: the largest batch is 3072, κ = 6 < 1/(1 − 0.85): the rule applies.
    ctl = bscale.BatchSizeController(min_batch=512, max_batch=3500, multiple_of=512)
    adam = torch.optim.Adam(layer.parameters(), betas=(0.85, 0.999))
    wrap(adam, microbatch_size=4, rule="sqrt", scale_adam_hparams=True, controller=ctl)
    # Under the SGD law betas are never rescaled, whatever the controller's reach.
    wide = bscale.BatchSizeController(min_batch=8, max_batch=512)
    opt = wrap(
        torch.optim.Adam(layer.parameters()), 4, rule="sqrt", law="sgd", scale_adam_hparams=True, controller=wide
    )
    assert opt.law == "sgd"


@pytest.mark.parametrize("case", _bad_calls(), ids=[c[0] for c in _bad_calls()])
def test_bad_arguments_raise_value_error(case):
    _, call, message = case
    with pytest.raises(ValueError, match=message):
        call()


def test_microbatch_size_is_checked_when_set():
    opt = wrap(_sgd(), microbatch_size=np.int64(8))  # numpy scalars are sizes too
    opt.microbatch_size = 3.5  # token counts need not be integers
    assert opt.microbatch_size == 3.5
    for bad in (0, -1, math.nan, False, None):
        with pytest.raises(ValueError, match="Invalid microbatch_size"):
            opt.microbatch_size = bad
    assert opt.microbatch_size == 3.5


@pytest.mark.parametrize("kw", [{}, {"per_coordinate": True}, {"named": True}])
def test_stats_has_every_key_before_the_first_step(kw):
    # The README's contract: a dict of floats, NaN where not available, also before any step (a logger or a
    # progress bar may read it first) and while GradScaler skips the first steps; per-module and per-coordinate
    # keys included.
    model = torch.nn.Sequential(torch.nn.Linear(3, 2), torch.nn.Linear(2, 1))
    if kw.pop("named", False):
        kw["named_parameters"] = model.named_parameters()
    opt = bscale.wrap(torch.optim.AdamW(model.parameters(), lr=1e-3), microbatch_size=4, **kw)
    before = opt.stats
    for _ in range(2):  # two steps: Adam's v is there for the preconditioned readings at the second
        for _ in range(2):
            model(torch.randn(4, 3)).sum().backward()
        opt.step()
    after = opt.stats
    assert set(before) == set(after)
    assert all(math.isnan(v) for k, v in before.items() if k.startswith(("layer/", "coord/", "adam_")))
    assert math.isnan(before["noise_scale"]) and math.isnan(before["batch_size"])
    assert before["steps"] == 0.0 and before["examples"] == 0.0 and before["lr"] == 1e-3
