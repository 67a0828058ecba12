"""ExampleSchedule and warmup_cosine: a learning-rate schedule that ends where planned as the batch grows."""

from __future__ import annotations

import io
import math

import pytest
import torch
from torch.optim.lr_scheduler import LambdaLR, LRScheduler

import bscale
from bscale import ExampleSchedule, WarmupCosine, warmup_cosine


def make_opt(lr: float = 1.0, groups: int = 1) -> torch.optim.Optimizer:
    params = [{"params": [torch.nn.Parameter(torch.zeros(2))], "lr": lr * (g + 1)} for g in range(groups)]
    return torch.optim.SGD(params, lr=lr)


def test_warmup_cosine_closed_form():
    f = warmup_cosine(100, 1100, min_ratio=0.1)
    assert f(0) == 0.0
    assert f(50) == pytest.approx(0.5)
    assert f(100) == pytest.approx(1.0)
    assert f(600) == pytest.approx(0.1 + 0.9 * 0.5)  # half-way through the decay: cos(π/2) = 0
    assert f(100 + 1000 / 3) == pytest.approx(0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi / 3)))
    assert f(1100) == pytest.approx(0.1)
    assert f(10**9) == pytest.approx(0.1)
    assert warmup_cosine(0, 10)(0) == 1.0  # no warmup


def test_growing_batch_ends_the_schedule_at_the_planned_example_count():
    # The batch doubles every 25 steps from 32 to 1024. Planned in examples: warmup over 5_600, decay to 0.1
    # at 100_000. A step-based LambdaLR planned at the initial batch (175 and 3125 steps) ends late.
    warmup, total, base = 5_600, 100_000, 0.5
    ours_opt, ref_opt = make_opt(base), make_opt(base)
    ours = ExampleSchedule(ours_opt, warmup_cosine(warmup, total, 0.1), total_examples=total)
    by_steps = LambdaLR(ref_opt, warmup_cosine(warmup // 32, total // 32, 0.1))
    seen, step, log = 0, 0, []
    while not ours.finished:
        batch = min(32 * 2 ** (step // 25), 1024)
        ours_opt.step()
        ref_opt.step()
        seen += batch
        step += 1
        ours.step(seen)
        by_steps.step()
        log.append((seen, ours.get_last_lr()[0], by_steps.get_last_lr()[0]))
    assert seen >= total and seen - 1024 < total  # the loop ended on examples
    for x, lr, _ in log:  # ours is the planned function of examples, whatever the batch
        assert lr == pytest.approx(base * warmup_cosine(warmup, total, 0.1)(x))
    first_full = next(x for x, lr, _ in log if lr >= base * (1 - 1e-12))
    assert first_full == warmup  # 25·32 + 25·64 + 25·128 = 5_600: the warmup ends on that step
    assert next(x for x, _, lr in log if lr >= base * (1 - 1e-12)) > 3 * warmup  # by steps: late
    assert log[-1][1] == pytest.approx(0.1 * base)
    # The step-based schedule is still decaying when the planned examples have been seen: it ends late.
    assert log[-1][2] > 0.5 * base
    assert ours.progress == pytest.approx(seen / total)


def test_keeps_the_lr_scheduler_contract():
    opt = make_opt(0.1, groups=2)
    sched = ExampleSchedule(opt, [lambda x: 1.0, lambda x: x / 100])
    assert isinstance(sched, LRScheduler)
    assert sched.base_lrs == [0.1, 0.2] and sched.last_epoch == 0
    assert [g["initial_lr"] for g in opt.param_groups] == [0.1, 0.2]
    assert sched.get_last_lr() == [0.1, 0.0]  # construction applies the factor at examples_seen = 0
    opt.step()
    sched.step(50)
    assert sched.get_last_lr() == [pytest.approx(0.1), pytest.approx(0.1)]
    assert [g["lr"] for g in opt.param_groups] == sched.get_last_lr()
    assert sched.last_epoch == 1 and sched.examples_seen == 50


def test_reads_a_callable_clock():
    seen = {"n": 0}
    opt = make_opt()
    sched = ExampleSchedule(opt, lambda x: x / 10, examples=lambda: seen["n"], examples_seen=5)
    assert sched.get_last_lr() == [0.5]
    seen["n"] = 7
    opt.step()
    sched.step()
    assert sched.get_last_lr() == [pytest.approx(0.7)]


def test_a_tensor_count_gives_float_learning_rates():
    opt = make_opt()
    sched = ExampleSchedule(opt, lambda x: x / 10, examples_seen=torch.tensor(5))
    opt.step()
    sched.step(torch.tensor(8))
    assert type(opt.param_groups[0]["lr"]) is float and sched.get_last_lr() == [pytest.approx(0.8)]
    assert type(sched.examples_seen) is float
    # A Python int stays an int for the schedule function (which may index with it).
    table = [1.0, 0.5, 0.25]
    opt = make_opt()
    sched = ExampleSchedule(opt, lambda x: table[min(x // 1000, 2)], examples_seen=0)
    opt.step()
    sched.step(1500)
    assert sched.get_last_lr() == [pytest.approx(0.5)] and type(sched.examples_seen) is int


def test_tensor_learning_rate():
    p = torch.nn.Parameter(torch.zeros(2))
    opt = torch.optim.Adam([p], lr=torch.tensor(0.01))
    sched = ExampleSchedule(opt, lambda x: 0.5)
    assert isinstance(opt.param_groups[0]["lr"], torch.Tensor)
    assert float(opt.param_groups[0]["lr"]) == pytest.approx(0.005)
    assert sched.get_last_lr()[0] is not opt.param_groups[0]["lr"]


class Wrapper(torch.optim.Optimizer):
    """An optimizer that wraps another and shares its groups, as a scaling wrapper does."""

    def __init__(self, inner: torch.optim.Optimizer) -> None:
        self.inner = inner
        self.defaults = inner.defaults
        self._optimizer_step_pre_hooks = {}
        self._optimizer_step_post_hooks = {}

    @property
    def param_groups(self):
        return self.inner.param_groups

    @property
    def state(self):
        return self.inner.state

    def step(self, closure=None):
        return self.inner.step(closure)


def test_works_through_an_optimizer_subclass_wrapper():
    inner = make_opt(1.0)
    opt = Wrapper(inner)
    sched = ExampleSchedule(opt, warmup_cosine(10, 100))
    opt.step()
    sched.step(5)
    assert inner.param_groups[0]["lr"] == pytest.approx(0.5)


def roundtrip(state):
    buf = io.BytesIO()
    torch.save(state, buf)
    buf.seek(0)
    return torch.load(buf, weights_only=True)


def test_state_dict_round_trip_resumes_exactly():
    counts = [96 * k for k in range(1, 40)]
    opt = make_opt(0.3)
    whole = ExampleSchedule(opt, warmup_cosine(500, 3000, 0.05), total_examples=3000)
    expected = []
    for n in counts:
        opt.step()
        whole.step(n)
        expected.append(whole.get_last_lr())

    opt1 = make_opt(0.3)
    first = ExampleSchedule(opt1, warmup_cosine(500, 3000, 0.05), total_examples=3000)
    got = []
    for n in counts[:15]:
        opt1.step()
        first.step(n)
        got.append(first.get_last_lr())
    state = roundtrip(first.state_dict())
    assert state["lr_lambdas"] == [{"warmup_examples": 500, "total_examples": 3000, "min_ratio": 0.05}]

    opt2 = make_opt(0.3)
    opt2.load_state_dict(opt1.state_dict())
    lam = warmup_cosine(1, 2)  # restored from the state, as LambdaLR restores callable objects
    resumed = ExampleSchedule(opt2, lam, total_examples=1)
    resumed.load_state_dict(state)
    assert lam == WarmupCosine(500, 3000, 0.05) and resumed.total_examples == 3000
    assert resumed.examples_seen == counts[14] and resumed.last_epoch == 15
    for n in counts[15:]:
        opt2.step()
        resumed.step(n)
        got.append(resumed.get_last_lr())
    assert got == expected


def test_plain_functions_are_not_saved():
    sched = ExampleSchedule(make_opt(), lambda x: 1.0, examples=lambda: 0)
    state = sched.state_dict()
    assert state["lr_lambdas"] == [None] and "_examples_fn" not in state and "optimizer" not in state
    roundtrip(state)


def test_flat_namespace():
    assert bscale.ExampleSchedule is ExampleSchedule and bscale.warmup_cosine is warmup_cosine


@pytest.mark.parametrize(
    ("args", "match"),
    [
        ((-1, 10), "warmup_examples must be a non-negative, finite count"),
        ((10, 10), "total_examples must be finite and exceed warmup_examples=10"),
        ((0, math.inf), "total_examples must be finite"),
        ((0, 10, 1.5), r"min_ratio must lie in \[0, 1\]"),
        (("10", 100), "warmup_examples must be a number, got '10'"),
        ((10, 100, "0"), "min_ratio must be a number, got '0'"),
    ],
)
def test_bad_warmup_cosine(args, match):
    with pytest.raises(ValueError, match=match):
        warmup_cosine(*args)


def test_bad_schedule_arguments_and_calls():
    opt = make_opt(groups=2)
    with pytest.raises(TypeError, match="is not an Optimizer"):
        ExampleSchedule(object(), lambda x: 1.0)
    with pytest.raises(ValueError, match="lr_lambda has 1 callables for 2 parameter groups; pass one per group"):
        ExampleSchedule(opt, [lambda x: 1.0])
    with pytest.raises(ValueError, match="lr_lambda must be a callable"):
        ExampleSchedule(opt, 0.5)
    with pytest.raises(ValueError, match="examples must be a callable"):
        ExampleSchedule(opt, lambda x: 1.0, examples=10)
    with pytest.raises(ValueError, match="total_examples must be a positive, finite count"):
        ExampleSchedule(opt, lambda x: 1.0, total_examples=0)
    sched = ExampleSchedule(make_opt(), lambda x: 1.0)
    with pytest.raises(RuntimeError, match=r"call step\(examples_seen\) or construct the schedule with examples="):
        sched.step()
    with pytest.raises(ValueError, match="examples_seen must be a non-negative, finite count"):
        sched.step(-3)
