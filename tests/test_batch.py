"""BatchSizeController and StepCostMeter on scripted readings with known answers."""

from __future__ import annotations

import io
import math
import weakref

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import bscale
from bscale import BatchSizeController, StepCostMeter

NAN = math.nan


def reading(noise_scale: float, step: int, examples: int, rel_stderr: float = 0.05) -> dict[str, float]:
    return {
        "noise_scale": noise_scale,
        "noise_scale_stderr": rel_stderr * noise_scale,
        "batch_size": NAN,
        "examples": examples,
        "steps": step,
    }


_steps_fed: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def feed(ctl: BatchSizeController, noise_scales, rel_stderr: float = 0.05, examples_per_step: int = 100):
    """Feed a scripted noise-scale sequence (continuing the step count); return the batch after each step."""
    out = []
    for ns in noise_scales:
        i = _steps_fed[ctl] = _steps_fed.get(ctl, 0) + 1
        out.append(ctl.observe(reading(ns, i, i * examples_per_step, rel_stderr)))
    return out


# ---- policies ----


def test_noise_policy_follows_the_estimate_on_the_grid():
    ctl = BatchSizeController(min_batch=32, max_batch=1024, multiple_of=32)
    # nan: no estimate; 10, 38: inside the 1.25 band above 32; 50 -> 32 after rounding down (no change);
    # 100 -> 96; 130 >= 1.25 x 96 -> 128; 150 < 160 holds; 500 -> 480; 5000 -> clamped to 1024.
    got = feed(ctl, [NAN, 10, 38, 50, 100, 130, 150, 500, 5000])
    assert got == [32, 32, 32, 32, 96, 128, 128, 480, 1024]
    assert [(c.step, c.old, c.new) for c in ctl.changes] == [
        (5, 32, 96),
        (6, 96, 128),
        (8, 128, 480),
        (9, 480, 1024),
    ]
    assert ctl.batch_size == 1024


def test_scale_calibrates_the_estimate():
    ctl = BatchSizeController(min_batch=8, max_batch=10_000, scale=10.0, hysteresis=1.0)
    assert feed(ctl, [50.0]) == [500]


def test_min_batch_not_a_multiple_is_rounded_up_and_targets_rounded_down():
    ctl = BatchSizeController(min_batch=40, max_batch=300, multiple_of=32, grow_only=False, hysteresis=1.0)
    assert ctl.batch_size == 64  # 40 rounded up to a multiple of 32
    assert feed(ctl, [95.9, 200, 20, 1e9]) == [
        64,
        192,
        64,
        288,
    ]  # 95.9 -> 64; 20 -> floor 0, kept at 64; max 288


def test_cost_policy_uses_the_square_root_law():
    # McCandlish App. D: B = sqrt(r · B_noise); r = 100 examples, B_noise = 10_000 -> 1000.
    ctl = BatchSizeController("cost", min_batch=10, max_batch=100_000, step_cost=100.0, multiple_of=10)
    assert feed(ctl, [10_000.0]) == [1000]
    assert feed(ctl, [40_000.0]) == [2000]
    assert "sqrt" in ctl.changes[-1].reason


def test_double_policy_is_merrills_schedule():
    ctl = BatchSizeController("double", min_batch=64, max_batch=1024)
    assert ctl.hysteresis == 2.0
    # 127 < 2 x 64 holds; 128 doubles once; a far larger estimate doubles once per decision, not at once.
    assert feed(ctl, [127, 128, 10_000, 10_000, 10_000, 10_000]) == [64, 128, 256, 512, 1024, 1024]


def test_double_policy_halves_without_oscillating():
    ctl = BatchSizeController("double", min_batch=16, max_batch=1024, initial_batch=256, grow_only=False)
    # Halve only once B_est < B / (2h) = 64; the halved batch is then far from doubling again.
    got = feed(ctl, [65.0, 63.0] + [63.0] * 5)
    assert got == [256, 128, 128, 128, 128, 128, 128]
    assert feed(ctl, [31.0]) == [64]


@pytest.mark.parametrize("policy", ["noise", "double"])
def test_steady_estimate_settles(policy):
    ctl = BatchSizeController(policy, min_batch=8, max_batch=1 << 16, grow_only=False, hysteresis=1.0)
    got = feed(ctl, [3000.0] * 30)
    assert len(set(got[-20:])) == 1, got  # no oscillation at the boundary of the band


# ---- gates ----


def test_hysteresis_band():
    ctl = BatchSizeController(min_batch=100, max_batch=10_000, hysteresis=2.0)
    assert feed(ctl, [199.0, 200.0]) == [100, 200]


def test_grow_only_never_shrinks():
    seq = [1000.0, 100.0, 10.0]
    grow = BatchSizeController(min_batch=10, max_batch=10_000, hysteresis=1.0)
    both = BatchSizeController(min_batch=10, max_batch=10_000, hysteresis=1.0, grow_only=False)
    assert feed(grow, seq) == [1000, 1000, 1000]
    assert feed(both, seq) == [1000, 100, 10]


def test_shrinking_waits_for_the_band():
    ctl = BatchSizeController(min_batch=10, max_batch=10_000, grow_only=False, hysteresis=2.0, initial_batch=400)
    assert feed(ctl, [201.0, 200.0]) == [400, 200]


def test_standard_error_gate():
    ctl = BatchSizeController(min_batch=10, max_batch=10_000, max_rel_stderr=0.3)
    assert feed(ctl, [1000.0], rel_stderr=0.31) == [10]
    assert ctl.observe({"noise_scale": 1000.0, "noise_scale_stderr": NAN, "examples": 1, "steps": 1}) == 10
    assert feed(ctl, [1000.0], rel_stderr=0.3) == [1000]


def test_gate_can_be_dropped():
    ctl = BatchSizeController(min_batch=10, max_batch=10_000, max_rel_stderr=None)
    assert ctl.observe({"noise_scale": 1000.0, "examples": 1, "steps": 1}) == 1000


@pytest.mark.parametrize("bad", [NAN, math.inf, -5.0, None])
def test_missing_or_invalid_estimate_holds(bad):
    ctl = BatchSizeController(min_batch=10, max_batch=10_000, max_rel_stderr=None)
    assert ctl.observe({"noise_scale": bad, "examples": 1, "steps": 1}) == 10
    assert ctl.changes == []


def test_min_examples_between_changes():
    ctl = BatchSizeController("double", min_batch=8, max_batch=1024, min_examples_between=250)
    # 100 examples per step: the first change waits for 250 examples from the start, each later one 250 more.
    got = feed(ctl, [1e6] * 9)
    assert got == [8, 8, 16, 16, 16, 32, 32, 32, 64]
    gaps = np.diff([0] + [c.examples for c in ctl.changes])
    assert (gaps >= 250).all()


@settings(max_examples=60, deadline=None)
@given(
    lo=st.integers(1, 300),
    span=st.integers(0, 5000),
    m=st.integers(1, 64),
    policy=st.sampled_from(["noise", "cost", "double"]),
    grow_only=st.booleans(),
    h=st.floats(1.0, 3.0),
    between=st.integers(0, 500),
    seq=st.lists(st.tuples(st.floats(0, 1e5), st.floats(0, 0.6), st.integers(1, 300)), max_size=40),
)
def test_invariants_on_random_readings(lo, span, m, policy, grow_only, h, between, seq):
    hi = lo + span
    first, last = -(-lo // m) * m, hi // m * m
    if first > last:
        with pytest.raises(ValueError, match="no multiple of multiple_of"):
            BatchSizeController(policy, min_batch=lo, max_batch=hi, multiple_of=m)
        return
    kw = {"step_cost": 50.0} if policy == "cost" else {}
    ctl = BatchSizeController(
        policy,
        min_batch=lo,
        max_batch=hi,
        multiple_of=m,
        grow_only=grow_only,
        hysteresis=h,
        min_examples_between=between,
        **kw,
    )
    examples, prev = 0, ctl.batch_size
    for step, (ns, rel, batch) in enumerate(seq, start=1):
        examples += batch
        b = ctl.observe(reading(ns, step, examples, rel))
        assert first <= b <= last and b % m == 0
        if grow_only:
            assert b >= prev
        prev = b
    chain = [ctl.changes[0].old] + [c.new for c in ctl.changes] if ctl.changes else []
    assert all(c.old == p for c, p in zip(ctl.changes, chain, strict=False))
    assert all(c.old != c.new for c in ctl.changes)
    assert (np.diff([0] + [c.examples for c in ctl.changes]) >= between).all()


# ---- StepCostMeter ----


def test_meter_recovers_a_known_step_cost_exactly():
    meter = StepCostMeter()
    assert meter.step_cost is None
    for b in (64, 64, 128, 256, 512):
        meter.update(b, 0.2 + 0.001 * b)  # t0 = 0.2 s, t1 = 1 ms/example -> r = 200 examples
    assert meter.overhead_seconds == pytest.approx(0.2, rel=1e-9)
    assert meter.per_example_seconds == pytest.approx(0.001, rel=1e-9)
    assert meter.step_cost == pytest.approx(200.0, rel=1e-9)


def test_meter_matches_least_squares_on_noisy_timings():
    rng = np.random.default_rng(0)
    b = rng.choice([4096, 8192, 16384, 32768], size=400) + 1_000_000  # large, nearly constant B
    t = 0.05 + 2e-7 * b + rng.normal(0, 1e-4, size=b.size)
    meter = StepCostMeter()
    for bi, ti in zip(b.tolist(), t.tolist(), strict=True):
        meter.update(bi, ti)
    slope, intercept = np.polyfit(b.astype(np.float64), t, 1)
    assert meter.per_example_seconds == pytest.approx(slope, rel=1e-6)
    assert meter.step_cost == pytest.approx(intercept / slope, rel=1e-5)
    assert meter.step_cost == pytest.approx(0.05 / 2e-7, rel=0.1)


def test_meter_needs_two_batch_sizes_and_a_positive_slope():
    meter = StepCostMeter()
    for _ in range(5):
        meter.update(128, 1.0)
    assert meter.step_cost is None and meter.count == 5
    decreasing = StepCostMeter()
    decreasing.update(64, 2.0)
    decreasing.update(128, 1.0)
    assert decreasing.step_cost is None
    cheap = StepCostMeter()
    cheap.update(64, 0.063)
    cheap.update(128, 0.129)  # negative intercept: no overhead -> r = 0
    assert cheap.step_cost == 0.0


def test_cost_policy_with_a_meter():
    meter = StepCostMeter()
    ctl = BatchSizeController("cost", min_batch=16, max_batch=1 << 20, step_cost=meter, hysteresis=1.0)
    assert feed(ctl, [20_000.0]) == [16]  # the meter cannot fit yet: hold
    for b in (16, 32):
        meter.update(b, 0.2 + 0.001 * b)  # r = 200
    assert feed(ctl, [20_000.0]) == [2000]  # sqrt(200 · 20000)


# ---- state, accumulation, repr ----


def roundtrip(state):
    buf = io.BytesIO()
    torch.save(state, buf)
    buf.seek(0)
    return torch.load(buf, weights_only=True)


@pytest.mark.parametrize("policy", ["noise", "cost", "double"])
def test_resume_reproduces_an_uninterrupted_run(policy):
    rng = np.random.default_rng(1)
    seq = np.exp(np.linspace(np.log(50), np.log(50_000), 120) + rng.normal(0, 0.3, 120)).tolist()
    rels = rng.uniform(0.0, 0.5, 120).tolist()

    def make():
        cost = {}
        if policy == "cost":
            cost["step_cost"] = meter = StepCostMeter()
            meter.update(16, 0.1016)  # a calibration pair at a second batch size makes r identifiable
        return BatchSizeController(
            policy, min_batch=32, max_batch=8192, multiple_of=16, min_examples_between=300, **cost
        )

    def run(ctl, lo, hi):
        out = []
        for i in range(lo, hi):
            if isinstance(ctl.step_cost, StepCostMeter):
                ctl.step_cost.update(ctl.batch_size, 0.1 + 1e-4 * ctl.batch_size + 1e-3 * (i % 3))
            out.append(ctl.observe(reading(seq[i], i + 1, 100 * (i + 1), rels[i])))
        return out

    whole = make()
    expected = run(whole, 0, 120)
    first = make()
    got = run(first, 0, 60)
    resumed = make()
    resumed.load_state_dict(roundtrip(first.state_dict()))
    assert resumed.state_dict() == first.state_dict()
    got += run(resumed, 60, 120)
    assert got == expected
    assert resumed.changes == whole.changes and len(whole.changes) >= 2


def test_load_rejects_a_batch_off_the_grid():
    ctl = BatchSizeController(min_batch=32, max_batch=1024, multiple_of=32)
    state = ctl.state_dict() | {"batch_size": 48}
    with pytest.raises(ValueError, match="multiple_of=32"):
        ctl.load_state_dict(state)


def test_accumulation_steps():
    ctl = BatchSizeController(min_batch=64, max_batch=4096, multiple_of=64, initial_batch=896)
    assert ctl.accumulation_steps(32, world_size=2) == 14
    assert ctl.accumulation_steps(896) == 1
    with pytest.raises(ValueError, match=r"not a multiple of microbatch_size x world_size = 256.*multiple_of=256"):
        ctl.accumulation_steps(128, world_size=2)


def test_repr_and_changes_are_readable():
    ctl = BatchSizeController("double", min_batch=8, max_batch=64)
    feed(ctl, [100.0])
    assert repr(ctl).startswith("BatchSizeController(policy='double', batch_size=16,")
    step, examples, old, new, reason = ctl.changes[0]
    assert (step, examples, old, new) == (1, 100, 8, 16) and reason.startswith("double: B_est 100 >= 2 x 8")
    ctl.changes.clear()  # a copy: the log itself is unchanged
    assert len(ctl.changes) == 1
    assert "count=0" in repr(StepCostMeter())


def test_flat_namespace():
    assert bscale.BatchSizeController is BatchSizeController and bscale.StepCostMeter is StepCostMeter


# ---- bad input ----

OK = {"min_batch": 32, "max_batch": 1024}


@pytest.mark.parametrize(
    ("args", "kwargs", "match"),
    [
        (("adaptive",), OK, "Unknown policy 'adaptive'; choose one of 'noise', 'cost', 'double'"),
        ((), {"min_batch": 0, "max_batch": 8}, "min_batch must be a positive integer"),
        ((), {"min_batch": 8, "max_batch": 8.5}, "max_batch must be a positive integer"),
        ((), {"min_batch": 64, "max_batch": 32}, "min_batch=64 exceeds max_batch=32; swap them"),
        ((), OK | {"multiple_of": 0}, "multiple_of must be a positive integer"),
        ((), {"min_batch": 10, "max_batch": 50, "multiple_of": 64}, "raise max_batch to at least 64"),
        ((), OK | {"scale": 0.0}, "scale must be a positive, finite number"),
        ((), OK | {"scale": math.inf}, "scale must be a positive, finite number"),
        (("cost",), OK, "policy='cost' needs step_cost"),
        (("cost",), OK | {"step_cost": -1.0}, "step_cost must be a non-negative, finite number"),
        (("noise",), OK | {"step_cost": 10.0}, "step_cost is only used by policy='cost'"),
        ((), OK | {"min_examples_between": -1}, "min_examples_between must be a non-negative integer"),
        ((), OK | {"max_rel_stderr": 0.0}, "max_rel_stderr must be positive"),
        ((), OK | {"hysteresis": 0.5}, r"hysteresis must be a finite factor >= 1"),
        ((), OK | {"hysteresis": "2"}, r"hysteresis must be a finite factor >= 1 or None, got '2'"),
        ((), OK | {"max_rel_stderr": "0.3"}, r"max_rel_stderr must be a positive number or None, got '0.3'"),
        ((), OK | {"grow_only": "no"}, "grow_only must be True or False"),
        (
            (),
            OK | {"initial_batch": 48, "multiple_of": 32},
            r"initial_batch=48 must be a multiple of multiple_of=32",
        ),
        ((), OK | {"initial_batch": 2048}, r"in \[32, 1024\]"),
    ],
)
def test_bad_arguments(args, kwargs, match):
    with pytest.raises(ValueError, match=match):
        BatchSizeController(*args, **kwargs)


def test_bad_readings_and_calls():
    ctl = BatchSizeController(**OK)
    with pytest.raises(RuntimeError, match=r"missing \['noise_scale_stderr'\]; or pass max_rel_stderr=None"):
        ctl.observe({"noise_scale": 1.0, "examples": 1, "steps": 1})
    with pytest.raises(RuntimeError, match=r"missing \['examples', 'steps'\]"):
        ctl.observe({"noise_scale": 1.0, "noise_scale_stderr": 0.1})
    with pytest.raises(ValueError, match="microbatch_size must be a positive integer"):
        ctl.accumulation_steps(0)
    with pytest.raises(ValueError, match="construct with step_cost=StepCostMeter"):
        ctl.load_state_dict(ctl.state_dict() | {"step_cost_meter": StepCostMeter().state_dict()})
    meter = StepCostMeter()
    with pytest.raises(ValueError, match="batch_size must be a positive integer"):
        meter.update(0, 1.0)
    with pytest.raises(ValueError, match="seconds must be a non-negative, finite duration"):
        meter.update(8, math.nan)
    with pytest.raises(ValueError, match="stats\\['examples'\\] must be a non-negative, finite count"):
        ctl.observe({"noise_scale": 1.0, "noise_scale_stderr": 0.1, "examples": math.nan, "steps": 1})


def test_integral_sizes_of_any_type_are_accepted():
    # The wrapper reports batch_size as a float (stats are floats) and numpy gives np.int64: both name sizes.
    ctl = BatchSizeController(min_batch=np.int64(32), max_batch=1024.0, multiple_of=np.int32(32))
    assert (ctl.min_batch, ctl.max_batch, ctl.multiple_of) == (32, 1024, 32)
    assert all(type(v) is int for v in (ctl.min_batch, ctl.max_batch, ctl.multiple_of, ctl.batch_size))
    assert ctl.accumulation_steps(np.int64(8), 2.0) == 2
    meter = StepCostMeter()
    meter.update(128.0, 1.0)
    meter.update(np.int64(256), 1.5)
    assert meter.step_cost == pytest.approx(128.0)
