"""Adaptive batch growth end to end: the wrapper, a batch-size controller and an example schedule in a loop.

Every step below takes exactly ``opt.accumulation_steps()`` microbatches, as a user's loop would; the tests
check what the wrapped optimizer sees inside its step (learning rate, betas, eps) against the closed-form
rules, and that a checkpoint taken mid-growth resumes bit for bit.
"""

from __future__ import annotations

import io
import math

import numpy as np
import pytest
import torch

import bscale
from bscale import BatchSizeController, ExampleSchedule, laws, warmup_cosine, wrap

MICRO = 4  # examples per backward; a power of two keeps the harmonic-mean batch k·b exact in binary
D_IN = 8


def _mlp(seed: int = 0) -> torch.nn.Module:
    torch.manual_seed(seed)
    return torch.nn.Sequential(torch.nn.Linear(D_IN, 16), torch.nn.Tanh(), torch.nn.Linear(16, 1))


_W_TEACHER = torch.randn(D_IN, 1, generator=torch.Generator().manual_seed(99))


def _microbatch(step: int, j: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Microbatch ``j`` of step ``step``: a pure function of both, so any batch history sees the same data."""
    g = torch.Generator().manual_seed(10_000 * step + j)
    x = torch.randn(MICRO, D_IN, generator=g)
    return x, torch.tanh(x @ _W_TEACHER) + 0.5 * torch.randn(MICRO, 1, generator=g)


def _train_step(model: torch.nn.Module, opt: bscale.ScaledOptimizer, step: int) -> int:
    """One step of ``opt.accumulation_steps()`` microbatches (loss / k, as nanoGPT does); returns k."""
    k = opt.accumulation_steps()
    for j in range(k):
        x, y = _microbatch(step, j)
        (torch.nn.functional.mse_loss(model(x), y) / k).backward()
    opt.step()
    opt.zero_grad()
    return k


class _Script:
    """A controller that plays a fixed list of batch sizes, one per step, through the wrapper's calls."""

    def __init__(self, batches: list[int]):
        self.batches = list(batches)
        self.observed = 0

    @property
    def batch_size(self) -> int:
        return self.batches[min(self.observed, len(self.batches) - 1)]

    def observe(self, stats) -> int:
        self.observed += 1
        return self.batch_size

    def accumulation_steps(self, microbatch_size: int, world_size: int = 1) -> int:
        return self.batch_size // (microbatch_size * world_size)

    def state_dict(self) -> dict[str, int]:
        return {"observed": self.observed}

    def load_state_dict(self, state) -> None:
        self.observed = state["observed"]


def _record_inner_step(opt: bscale.ScaledOptimizer) -> list[list[dict]]:
    """What the wrapped optimizer holds while it steps: lr, betas, eps of every group, one list per step."""
    seen: list[list[dict]] = []

    def hook(inner, args, kwargs):
        seen.append([{k: g.get(k) for k in ("lr", "betas", "eps")} for g in inner.param_groups])

    opt.optimizer.register_step_pre_hook(hook)
    return seen


def _noise(stats: dict[str, float]) -> float | None:
    """The noise scale the step used (the reading after the step's update), None while there is none."""
    return None if math.isnan(stats["noise_scale"]) else stats["noise_scale"]


def _two_groups(model: torch.nn.Module, kind: str, **kw) -> torch.optim.Optimizer:
    first, second = model[0].parameters(), model[2].parameters()
    if kind == "sgd":
        return torch.optim.SGD([{"params": first, "lr": 0.05}, {"params": second, "lr": 0.02}])
    return torch.optim.AdamW([{"params": first, "lr": 3e-3, **kw}, {"params": second, "lr": 1e-3}])


# ---- the loop under a real controller ----------------------------------------------------------------------


def _regression_step(model, opt, w_star, g, micro: int) -> int:
    k = opt.accumulation_steps()
    x = torch.randn(k * micro, w_star.numel(), generator=g)
    y = x @ w_star + torch.randn(k * micro, generator=g)  # label noise s = 1
    for j in range(k):
        rows = slice(j * micro, (j + 1) * micro)
        (0.5 * (model(x[rows]).squeeze(-1) - y[rows]).pow(2).mean() / k).backward()
    opt.step()
    opt.zero_grad()
    return k


def test_controller_follows_a_known_noise_scale_and_each_step_uses_its_batch():
    # Linear regression, per-example loss ½(wᵀx − y)², x ~ N(0, I), y = w*ᵀx + ε, ε ~ N(0, 1): at
    # w = w* + δ, B_simple = (d(|δ|² + 1) + |δ|²)/|δ|² exactly (the closed form of test_wrap_estimates). The
    # model is placed at |δ| = 2, 1, 0.5, 0.35 in turn (B_simple ≈ 81, 129, 321, 587) and trained 40 steps at
    # each with a small lr, so the truth is known at every step and the controller must grow the batch from
    # 32 towards it.
    d, micro, base_lr = 64, 16, 1e-4
    g = torch.Generator().manual_seed(0)
    w_star = torch.randn(d, generator=g)
    direction = torch.randn(d, generator=g)
    direction /= direction.norm()
    model = torch.nn.Linear(d, 1, bias=False)

    def truth() -> float:
        dd = float((model.weight.detach()[0] - w_star).double().pow(2).sum())
        return (d * (dd + 1.0) + dd) / dd

    ctl = BatchSizeController(min_batch=2 * micro, max_batch=64 * micro, multiple_of=micro)
    sgd = torch.optim.SGD(model.parameters(), lr=base_lr)
    # beta = 0.95: a horizon of ~20 steps at the first batch (fewer at larger ones: it forgets per example).
    opt = wrap(sgd, microbatch_size=micro, rule="noise", beta=0.95, controller=ctl)
    seen = _record_inner_step(opt)
    readings = []
    for distance in (2.0, 1.0, 0.5, 0.35):
        with torch.no_grad():
            model.weight.copy_(w_star + distance * direction)
        for _ in range(40):
            planned = opt.batch_size
            k = _regression_step(model, opt, w_star, g, micro)
            s = opt.stats
            # The step used the controller's batch as k microbatches; the next one is the controller's answer.
            assert k * micro == planned == s["batch_size"] and s["microbatches"] == k
            assert opt.batch_size == ctl.batch_size == opt.accumulation_steps() * micro
            expected = base_lr * laws.lr_scale(planned, 2 * micro, _noise(s), rule="noise", optimizer="sgd")
            assert seen[-1][0]["lr"] == pytest.approx(expected, rel=1e-12)
            assert sgd.param_groups[0]["lr"] == base_lr  # the user's value is back after the step
            readings.append((s["noise_scale"], s["noise_scale_stderr"], truth()))
        ns, se, true = readings[-1]
        # At the end of each phase: the reading agrees with the closed form and the batch has followed it.
        # Overshoot is possible: the batch never shrinks after a high reading, and a reading that passes the
        # 30% standard-error gate can be high by about twice that.
        assert abs(ns - true) < 4 * se and se < 0.3 * ns, (distance, ns, se, true)
        assert 0.6 * true <= ctl.batch_size <= 1.7 * true, (distance, ctl.batch_size, true)

    assert len(ctl.changes) >= 4
    for change in ctl.changes:
        ns, se, true = readings[change.step - 1]
        assert se <= 0.3 * ns  # only readings that passed the standard-error gate move the batch
        # The noise policy: the reading rounded down to the grid, within [the old batch, max_batch].
        assert change.new == min(max(micro * math.floor(ns / micro), change.old), 64 * micro)
        # ... and those readings track the truth, with the lag of a ~20-step average after a jump and the
        # spread the gate allows (a standard error estimated from ~20 noisy steps can itself be low).
        recent = [t for _, _, t in readings[max(0, change.step - 20) : change.step]]
        assert 0.6 * min(recent) < ns < 2.0 * max(recent), (change, ns, recent)


@pytest.mark.parametrize("micro", [MICRO, float(MICRO), np.int64(MICRO)])
def test_accumulation_steps_takes_the_microbatch_size_in_any_integral_form(micro):
    ctl = BatchSizeController(min_batch=2 * MICRO, max_batch=16 * MICRO, multiple_of=MICRO, initial_batch=12)
    opt = wrap(torch.optim.SGD(_mlp().parameters(), lr=0.1), microbatch_size=micro, controller=ctl)
    assert opt.accumulation_steps() == 3 and opt.batch_size == 12
    opt.microbatch_size = 2 * MICRO  # 12 is no multiple of 8: the controller says how to fix it
    with pytest.raises(ValueError, match="not a multiple of microbatch_size"):
        opt.accumulation_steps()


def _clipped_step(model, opt, sizes: list[int], step: int, k: int | None = None) -> list[int]:
    """One nanoGPT step of microbatches of `sizes` (``opt.microbatch_size`` set before each backward), the loss
    divided by ``opt.accumulation_steps()`` asked before each backward (or by `k`), then a clip and the step.
    Returns the divisors used."""
    divisors = []
    for j, n in enumerate(sizes):
        x, y = _microbatch(step, j)
        opt.microbatch_size = n
        divisors.append(opt.accumulation_steps() if k is None else k)
        (torch.nn.functional.mse_loss(model(x[:n]), y[:n]) / divisors[-1]).backward()
    torch.nn.utils.clip_grad_norm_(model.parameters(), 1e-3)  # .grad is no longer the unclipped sum after this
    opt.step()
    opt.zero_grad()
    return divisors


@pytest.mark.parametrize("short", [1, 2, 3])
def test_a_short_last_microbatch_of_an_epoch_does_not_change_the_count(short):
    # Microbatches of 4 in a batch of 16, and the epoch's last microbatch is short (1, 2 or 3 examples): the count
    # stays 4 inside that step and after it, even while microbatch_size still holds the short size. (The short
    # size made it 16 (1), 8 (2) or a ValueError (3) before.) Every step, the one after the short microbatch
    # included, is read before the clip and reaches the estimator.
    ctl = BatchSizeController(min_batch=4 * MICRO, max_batch=4 * MICRO, multiple_of=MICRO)
    model = _mlp()
    opt = wrap(torch.optim.SGD(model.parameters(), lr=0.01), microbatch_size=MICRO, controller=ctl)
    for step in range(5):
        sizes = [MICRO] * 3 + [short if step == 2 else MICRO]
        updates = opt.estimator.steps
        assert _clipped_step(model, opt, sizes, step) == [4] * 4
        assert opt.estimator.steps == updates + 1, step
        assert opt.stats["batch_size"] == sum(sizes)
        assert opt.accumulation_steps() == 4 == opt.accumulation_steps(microbatch_size=MICRO)
    assert opt.accumulation_steps(microbatch_size=2 * MICRO) == 2  # a full microbatch of another size, if asked


@pytest.mark.parametrize("where", ["first", "last"])
@pytest.mark.parametrize("short", [1, 3])
def test_a_short_microbatch_anywhere_in_the_step_or_in_a_skipped_step_keeps_the_count(where, short):
    # An epoch's short last microbatch can open a step as well as close one; and a step can end without step()
    # (discarded by zero_grad, or GradScaler skipping it): none of these lowers the full microbatch.
    ctl = BatchSizeController(min_batch=4 * MICRO, max_batch=4 * MICRO, multiple_of=MICRO)
    model = _mlp()
    opt = wrap(torch.optim.SGD(model.parameters(), lr=0.01), microbatch_size=MICRO, controller=ctl)
    sizes = [short] + [MICRO] * 3 if where == "first" else [MICRO] * 3 + [short]
    for j, n in enumerate(sizes):  # a step abandoned after its microbatches
        opt.microbatch_size = n
        assert opt.accumulation_steps() == 4
        x, y = _microbatch(0, j)
        torch.nn.functional.mse_loss(model(x[:n]), y[:n]).backward()
    opt.zero_grad()
    assert opt.accumulation_steps() == 4
    for step in range(1, 4):
        updates = opt.estimator.steps
        assert _clipped_step(model, opt, sizes if step == 2 else [MICRO] * 4, step) == [4] * 4
        assert opt.estimator.steps == updates + 1


@pytest.mark.parametrize("short", [1, 3])
def test_a_short_microbatch_opening_the_step_after_the_batch_was_lowered_keeps_the_count(short):
    # Plain accumulation (the microbatch stays 4) and the controller lowers the batch 64 -> 8: the next step opens
    # with an epoch's short microbatch. Its size is no sampler following the batch (1·16 ≠ 8): the count stays 2.
    ctl = _Script([16 * MICRO, 2 * MICRO, 2 * MICRO])
    model = _mlp()
    opt = wrap(torch.optim.SGD(model.parameters(), lr=0.01), microbatch_size=MICRO, controller=ctl)
    assert _clipped_step(model, opt, [MICRO] * 16, 0) == [16] * 16
    for step in (1, 2):
        updates = opt.estimator.steps
        sizes = [short, MICRO] if step == 1 else [MICRO] * 2
        assert _clipped_step(model, opt, sizes, step) == [2, 2]
        assert opt.estimator.steps == updates + 1


def test_the_full_microbatch_survives_a_checkpoint():
    # Lowered (and passed) at step 1, the full microbatch is MICRO from then on; a run resumed from a checkpoint
    # into a wrapper built with the old size must count in the new one, as the uninterrupted run does.
    ctl = BatchSizeController(min_batch=8 * MICRO, max_batch=8 * MICRO, multiple_of=MICRO)
    model = _mlp()
    opt = wrap(torch.optim.SGD(model.parameters(), lr=0.01), microbatch_size=2 * MICRO, controller=ctl)
    _clipped_step(model, opt, [2 * MICRO] * 4, 0)
    _clipped_step(model, opt, [MICRO] * 8, 1, k=8)
    assert opt.accumulation_steps() == 8
    state = opt.state_dict()
    ctl2 = BatchSizeController(min_batch=8 * MICRO, max_batch=8 * MICRO, multiple_of=MICRO)
    resumed = wrap(torch.optim.SGD(model.parameters(), lr=0.01), microbatch_size=2 * MICRO, controller=ctl2)
    resumed.load_state_dict(state)
    resumed.microbatch_size = MICRO
    assert resumed.accumulation_steps() == 8


def test_a_lowered_microbatch_takes_its_count_when_passed_and_after_one_step():
    # The microbatch halves between steps (after an out-of-memory error, say). Set before the step, a smaller
    # size is not told apart from an epoch's short microbatch: the user passes it for the first step at it,
    # after which it is the full microbatch. The wrapper reads .grad before the clip either way.
    ctl = BatchSizeController(min_batch=8 * MICRO, max_batch=8 * MICRO, multiple_of=MICRO)
    model = _mlp()
    opt = wrap(torch.optim.SGD(model.parameters(), lr=0.01), microbatch_size=2 * MICRO, controller=ctl)
    assert _clipped_step(model, opt, [2 * MICRO] * 4, 0) == [4] * 4
    opt.microbatch_size = MICRO
    assert opt.accumulation_steps(microbatch_size=MICRO) == 8
    for step in (1, 2):
        updates = opt.estimator.steps
        assert _clipped_step(model, opt, [MICRO] * 8, step, k=8) == [8] * 8
        assert opt.estimator.steps == updates + 1
    assert opt.accumulation_steps() == 8


def test_a_microbatch_that_follows_the_batch_is_read_at_its_steps_last_backward():
    # A sampler moves the microbatch with the batch and the count stays 2 (sampler mode, as under DDP with one
    # backward per rank). Each step's count is the one for the microbatch it runs: asked before the step's
    # first backward, after the new size is set, and known to the wrapper by its first backward's end, so
    # .grad is read before the clip at every step. (Before, the count for the next step was taken at step()
    # from the old microbatch, twice too many: every step after a change was left out.)
    ctl = _Script([8, 16, 32, 64, 16, 8])  # up, then down (grow_only=False): the microbatch follows both ways
    model = _mlp()
    opt = wrap(torch.optim.SGD(model.parameters(), lr=0.01), microbatch_size=MICRO, controller=ctl)
    batches = []
    for step in range(6):
        micro = ctl.batch_size // 2
        batches.append(ctl.batch_size)
        updates = opt.estimator.steps
        opt.microbatch_size = micro
        assert opt.accumulation_steps() == 2
        x, y = _microbatch(step, 0)
        for _ in range(2):
            xs = torch.cat([x] * (micro // MICRO))[:micro]
            (torch.nn.functional.mse_loss(model(xs), torch.cat([y] * (micro // MICRO))[:micro]) / 2).backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1e-3)
        opt.step()
        opt.zero_grad()
        assert opt.estimator.steps == updates + 1, (step, batches)
    assert batches == [8, 16, 32, 64, 16, 8]


# ---- what the inner optimizer sees -------------------------------------------------------------------------


@pytest.mark.parametrize(
    "kind, rule, law",
    [
        ("adamw", "noise", "adam"),
        ("sgd", "noise", "sgd"),
        ("adamw", "linear", "adam"),
        ("adamw", "sqrt", "adam"),
    ],
)
def test_lr_inside_the_step_follows_the_rule_and_the_users_lr_comes_back(kind, rule, law):
    # The batch goes up and down (a scripted controller) while the user rewrites group["lr"] every step, as
    # nanoGPT does: inside step() each group's lr is the user's value times the rule's factor for the batch
    # used.
    batches = [8, 8, 16, 16, 32, 32, 64, 64, 24, 24, 128, 128, 8, 48] * 3
    model = _mlp()
    inner = _two_groups(model, kind)
    opt = wrap(inner, microbatch_size=MICRO, rule=rule, controller=_Script(batches), beta=0.8)
    assert opt.law == law
    seen = _record_inner_step(opt)
    bent = 0
    for step, planned in enumerate(batches):
        user = [g["lr"] * (1.0 - step / 100) for g in inner.param_groups]  # a hand-written decay
        for g, lr in zip(inner.param_groups, user, strict=True):
            g["lr"] = lr
        _train_step(model, opt, step)
        s = opt.stats
        assert s["batch_size"] == planned
        factor = laws.lr_scale(planned, batches[0], _noise(s), rule=rule, optimizer=law)
        for group_seen, lr in zip(seen[-1], user, strict=True):
            assert group_seen["lr"] == pytest.approx(lr * factor, rel=1e-12)
        assert [g["lr"] for g in inner.param_groups] == user
        assert s["lr_scale"] == pytest.approx(factor, rel=1e-12)
        limit = math.sqrt(planned / batches[0]) if law == "adam" else planned / batches[0]
        bent += rule == "noise" and abs(factor / limit - 1) > 0.02
    if rule == "noise":
        # The noise-aware law bent away from its small-batch limit on measured readings.
        assert bent >= 10


def test_adam_hparams_follow_the_square_root_rule_and_are_restored():
    batches = [8, 8, 16, 32, 64, 16, 8, 40, 8]  # κ up to 8: β1 = 0.9 stays valid (κ(1 − β1) < 1)
    model = _mlp()
    inner = _two_groups(model, "adamw", betas=(0.9, 0.99), eps=1e-6)
    user = [(g["lr"], tuple(g["betas"]), g["eps"]) for g in inner.param_groups]
    opt = wrap(inner, microbatch_size=MICRO, rule="sqrt", scale_adam_hparams=True, controller=_Script(batches))
    seen = _record_inner_step(opt)
    for step, planned in enumerate(batches):
        _train_step(model, opt, step)
        kappa = planned / batches[0]
        for group_seen, (lr, betas, eps) in zip(seen[-1], user, strict=True):
            want = bscale.sqrt_rule(kappa, lr, betas=betas, eps=eps)
            assert group_seen["lr"] == pytest.approx(want.lr, rel=1e-12)
            assert group_seen["betas"] == pytest.approx(want.betas, rel=1e-12)
            assert group_seen["eps"] == pytest.approx(want.eps, rel=1e-12)
            if kappa == 1.0:
                assert tuple(group_seen["betas"]) == betas and group_seen["eps"] == eps
        assert [(g["lr"], tuple(g["betas"]), g["eps"]) for g in inner.param_groups] == user


def test_a_batch_beyond_the_square_root_rule_raises_and_leaves_every_group_as_it_was():
    # Group 0 (β1 = 0.95) can take κ = 8; group 1 (β1 = 0.8) cannot: 8·(1 − 0.8) = 1.6 ≥ 1 would make β1 < 0.
    model = _mlp()
    inner = torch.optim.AdamW(
        [
            {"params": model[0].parameters(), "lr": 3e-3, "betas": (0.95, 0.99)},
            {"params": model[2].parameters(), "lr": 1e-3, "betas": (0.8, 0.99), "eps": 1e-7},
        ]
    )
    user = [(g["lr"], tuple(g["betas"]), g["eps"]) for g in inner.param_groups]
    opt = wrap(inner, microbatch_size=MICRO, rule="noise", scale_adam_hparams=True, controller=_Script([8, 8, 64]))
    _train_step(model, opt, 0)
    _train_step(model, opt, 1)
    before = [p.detach().clone() for p in model.parameters()]
    with pytest.raises(RuntimeError, match=r"cannot rescale Adam's betas.*beta1.*scale_adam_hparams=False"):
        _train_step(model, opt, 2)
    assert [(g["lr"], tuple(g["betas"]), g["eps"]) for g in inner.param_groups] == user
    assert all(torch.equal(a, b) for a, b in zip(before, model.parameters(), strict=True))  # no step was taken
    assert opt.steps == 2


# ---- checkpoint and resume ---------------------------------------------------------------------------------


def _resumable_run(model):
    # Merrill's doubling with a calibration of 4 (this MLP's noise scale is small), at most one change per
    # 200 examples: the batch doubles from 8 to 64 over 50 steps, so κ ≤ 8 keeps the square-root rule valid
    # for β1 = 0.9.
    ctl = BatchSizeController(
        "double",
        min_batch=2 * MICRO,
        max_batch=16 * MICRO,
        multiple_of=MICRO,
        scale=4.0,
        min_examples_between=200,
        max_rel_stderr=0.5,
    )
    inner = torch.optim.AdamW(model.parameters(), lr=3e-3, betas=(0.9, 0.99))
    opt = wrap(
        inner,
        microbatch_size=MICRO,
        rule="noise",
        scale_adam_hparams=True,
        controller=ctl,
        beta=0.9,
        named_parameters=model.named_parameters(),
    )
    return opt, ctl


def _snapshot(model, opt) -> tuple[dict, list[torch.Tensor]]:
    return opt.stats, [p.detach().clone() for p in model.parameters()]


def _same(a: float, b: float) -> bool:
    return a == b or (math.isnan(a) and math.isnan(b))


def test_resume_mid_growth_reproduces_the_uninterrupted_run_bitwise():
    steps, cut = 50, 30
    model = _mlp()
    opt, ctl = _resumable_run(model)
    straight = []
    for step in range(steps):
        _train_step(model, opt, step)
        straight.append(_snapshot(model, opt))
    changes = ctl.changes
    assert any(c.step <= cut for c in changes) and any(c.step > cut for c in changes)  # grows on both sides

    model = _mlp()
    opt, ctl = _resumable_run(model)
    resumed = []
    for step in range(cut):
        _train_step(model, opt, step)
        resumed.append(_snapshot(model, opt))
    buffer = io.BytesIO()
    torch.save({"model": model.state_dict(), "opt": opt.state_dict()}, buffer)
    buffer.seek(0)
    ckpt = torch.load(buffer, map_location="cpu")
    model = _mlp(seed=7)  # other weights, a fresh controller: everything must come from the checkpoint
    model.load_state_dict(ckpt["model"])
    opt, ctl = _resumable_run(model)
    opt.load_state_dict(ckpt["opt"])
    assert opt.batch_size == straight[cut][0]["batch_size"]  # the next step's batch came with the checkpoint
    for step in range(cut, steps):
        _train_step(model, opt, step)
        resumed.append(_snapshot(model, opt))

    assert ctl.changes == changes
    for (r1, p1), (r2, p2) in zip(straight, resumed, strict=True):
        assert r1.keys() == r2.keys()
        differ = {k: (r1[k], r2[k]) for k in r1 if not _same(r1[k], r2[k])}
        assert not differ, differ
        assert all(torch.equal(a, b) for a, b in zip(p1, p2, strict=True))


# ---- a schedule in examples under growth -------------------------------------------------------------------


def test_example_schedule_driven_by_the_wrappers_count_ends_where_planned():
    warmup, total, base = 400, 4_000, 3e-3
    model = _mlp()
    inner = torch.optim.AdamW(model.parameters(), lr=base)
    ctl = BatchSizeController(min_batch=2 * MICRO, max_batch=32 * MICRO, multiple_of=MICRO, scale=4.0)
    opt = wrap(inner, microbatch_size=MICRO, rule="noise", controller=ctl, beta=0.8)
    schedule = warmup_cosine(warmup, total, min_ratio=0.1)
    sched = ExampleSchedule(opt, schedule, examples=lambda: opt.stats["examples"], total_examples=total)
    seen = _record_inner_step(opt)
    counted, step, batches = 0, 0, []
    while not sched.finished:
        user_lr = inner.param_groups[0]["lr"]
        k = _train_step(model, opt, step)
        sched.step()
        step += 1
        counted += k * MICRO
        batches.append(k * MICRO)
        s = opt.stats
        assert s["examples"] == counted
        # Inside the step: the schedule's lr times the rule's factor; after it, the schedule at examples.
        factor = laws.lr_scale(k * MICRO, 2 * MICRO, _noise(s), rule="noise", optimizer="adam")
        assert seen[-1][0]["lr"] == pytest.approx(user_lr * factor, rel=1e-12)
        assert inner.param_groups[0]["lr"] == pytest.approx(base * schedule(counted), rel=1e-12)
        assert step < 10_000
    assert len(set(batches)) >= 3  # the batch grew during the schedule
    assert total <= counted < total + batches[-1]  # it ended on the step that reached the planned examples
    assert inner.param_groups[0]["lr"] == pytest.approx(0.1 * base, rel=1e-12)
    # A step-based schedule planned at the first batch would have been cut short far from its end.
    assert step < total // batches[0]
