"""`measure_every=N`: one step in N is measured; the others run without the statistics' passes over the gradients.

Measured: every step until the first reading (step 0 here), then the last of every N (steps N−1, 2N−1, ...).
The wrapper only observes here (no rule), so the parameters follow the same trajectory whatever N is, and a measured
step sees exactly the gradients the every-step run saw: its readings must be those of an estimator fed the
every-step run's per-step estimates at the measured steps, each weighted by the examples since the one before.
"""

from __future__ import annotations

import math
from unittest import mock

import pytest
import torch

import bscale
from bscale.estimate import NoiseScaleEstimator

D, MICRO, K = 12, 16, 4


def _measured(t: int, every: int) -> bool:
    return t == 0 or (t + 1) % every == 0


def _same(a: float, b: float) -> bool:
    return a == b or (math.isnan(a) and math.isnan(b))


def _model(seed: int = 0) -> torch.nn.Module:
    torch.manual_seed(seed)
    return torch.nn.Sequential(torch.nn.Linear(D, 8), torch.nn.Tanh(), torch.nn.Linear(8, 1))


def _batch(step: int, micro: int) -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(1000 * step + micro)
    x = torch.randn(MICRO + (micro == 0) * 4, D, generator=gen)  # unequal microbatches: examples ≠ k·b
    return x, x[:, :1] * 0.5 + 0.3 * torch.randn(x.shape[0], 1, generator=gen)


def _step(model: torch.nn.Module, opt: bscale.ScaledOptimizer, step: int, k: int = K, clip: bool = False) -> None:
    """One step of `k` microbatches; `clip`: clip .grad in place before step() (a step short of the expected count
    is then read too late, and left out)."""
    for j in range(k):
        x, y = _batch(step, j)
        opt.microbatch_size = x.shape[0]
        (torch.nn.functional.mse_loss(model(x), y) / k).backward()
    if clip:
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1e-3)
    opt.step()
    opt.zero_grad()


def _run(steps: int, **kw) -> tuple[torch.nn.Module, bscale.ScaledOptimizer, list[dict[str, float]]]:
    model = _model()
    opt = bscale.wrap(torch.optim.AdamW(model.parameters(), lr=1e-2), microbatch_size=MICRO, beta=0.9, **kw)
    rows = []
    for t in range(steps):
        _step(model, opt, t)
        rows.append(opt.stats)
    return model, opt, rows


def test_measured_steps_feed_the_estimator_weighted_by_examples_since_the_last():
    steps, every = 11, 3
    model1, _, rows1 = _run(steps)
    model3, opt3, rows3 = _run(steps, measure_every=every)
    assert all(torch.equal(a, b) for a, b in zip(model1.parameters(), model3.parameters(), strict=True))
    # beta counts steps of the first measured step's own batch, not of the examples pooled into its weight.
    expected = NoiseScaleEstimator(0.9, ref_batch=rows1[0]["batch_size"])
    pending = 0.0
    for t, row in enumerate(rows1):
        pending += row["batch_size"]
        if _measured(t, every):  # steps 0, 2, 5, 8
            expected.add(row["step_grad_sq"], row["step_trace_sigma"], pending)
            pending = 0.0
        reading = expected.reading()
        # Between measurements the readings stand; the counters move on with every step.
        want = reading.as_dict()
        for key in ("noise_scale", "noise_scale_stderr", "grad_sq", "trace_sigma", "trace_sigma_stderr"):
            assert _same(rows3[t][key], want[key]), (t, key)
        for key in ("examples", "steps", "batch_size", "microbatches"):
            assert rows3[t][key] == rows1[t][key], (t, key)
    assert opt3.estimator.steps == 4
    assert opt3.estimator.ref_batch == rows1[0]["batch_size"]
    assert opt3.estimator.examples == sum(r["batch_size"] for r in rows1[:9])
    assert opt3._pending_examples == sum(r["batch_size"] for r in rows1[9:])


def test_unmeasured_steps_take_no_norms():
    model = _model()
    opt = bscale.wrap(torch.optim.SGD(model.parameters(), lr=1e-2), microbatch_size=MICRO, measure_every=4)
    calls = []
    real = torch._foreach_norm
    with mock.patch.object(torch, "_foreach_norm", side_effect=lambda *a, **k: calls.append(1) or real(*a, **k)):
        for t in range(8):
            before = len(calls)
            _step(model, opt, t)
            # Measured (steps 0, 3 and 7): one op per backward and one for .grad (after every backward in the first
            # step, whose count is not known yet); unmeasured: none.
            assert len(calls) - before == {0: 2 * K, 3: K + 1, 7: K + 1}.get(t, 0), t
    assert opt.steps == 8 and opt.noise_scale is not None


def test_per_coordinate_buffers_stay_untouched_on_unmeasured_steps():
    _, _, rows1 = _run(7, per_coordinate=True)
    model = _model()
    opt = bscale.wrap(
        torch.optim.AdamW(model.parameters(), lr=1e-2), microbatch_size=MICRO, beta=0.9, per_coordinate=True,
        measure_every=3,
    )  # fmt: skip
    rows = []
    for t in range(7):
        for j in range(K):
            x, y = _batch(t, j)
            opt.microbatch_size = x.shape[0]
            (torch.nn.functional.mse_loss(model(x), y) / K).backward()
            if not _measured(t, 3):
                assert all(not buf.any() for buf in opt._coord_sq.values()), t
        opt.step()
        opt.zero_grad()
        rows.append(opt.stats)
    # Per-step snapshots: the measured step's, standing until the next measurement.
    for t in range(7):
        measured = max(m for m in range(t + 1) if _measured(m, 3))
        for key in ("coord/sum_sigma_sq", "coord/sum_mu_sq", "coord/frac_small_batch", "coord/snr_hist/5"):
            assert rows[t][key] == rows1[measured][key], (t, key)
    # The Adam-preconditioned estimator is fed at the measured steps only (2 and 5: Adam has no v at step 0).
    assert opt._layer_estimators["__adam_preconditioned__"].steps == 2


def _wrapped(model: torch.nn.Module, **kw) -> bscale.ScaledOptimizer:
    return bscale.wrap(torch.optim.AdamW(model.parameters(), lr=1e-2), microbatch_size=MICRO, beta=0.9, **kw)


def test_resume_between_measurements_matches_an_uninterrupted_run(tmp_path):
    steps, every, cut = 9, 4, 6  # measured: 0, 3, 7; saved after step 5, steps 4 and 5's examples pending
    kw = {"measure_every": every, "per_coordinate": True}
    _, opt_full, rows_full = _run(steps, **kw)
    model = _model()
    opt = _wrapped(model, **kw)
    for t in range(cut):
        _step(model, opt, t)
    assert opt._pending_examples > 0
    torch.save({"model": model.state_dict(), "opt": opt.state_dict()}, tmp_path / "ckpt.pt")
    ckpt = torch.load(tmp_path / "ckpt.pt", map_location="cpu")
    model2 = _model(seed=5)
    model2.load_state_dict(ckpt["model"])
    opt2 = _wrapped(model2, **kw)
    opt2.load_state_dict(ckpt["opt"])
    for t in range(cut, steps):
        _step(model2, opt2, t)
        # Every key, the last measurement's per-coordinate readings included, as in the uninterrupted run.
        assert set(opt2.stats) == set(rows_full[t]), t
        assert all(_same(opt2.stats[k], v) for k, v in rows_full[t].items()), t
    assert opt2.estimator.state_dict() == opt_full.estimator.state_dict()


@pytest.mark.parametrize("every", [1, 2])
def test_resume_before_a_short_clipped_step_matches_an_uninterrupted_run(tmp_path, every):
    # Odd steps run 2 microbatches and are clipped before step(): left out in the uninterrupted run, since .grad is
    # read at the expected count, too late. A resumed wrapper must expect the same count, and so leave them out too.
    def run(cut):
        model = _model()
        opt = _wrapped(model, measure_every=every)
        rows = []
        for t in range(6):
            if t == cut:
                torch.save({"model": model.state_dict(), "opt": opt.state_dict()}, tmp_path / "ckpt.pt")
                ckpt = torch.load(tmp_path / "ckpt.pt")
                model = _model(seed=5)
                model.load_state_dict(ckpt["model"])
                opt = _wrapped(model, measure_every=99)  # the checkpoint's cadence is restored
                opt.load_state_dict(ckpt["opt"])
            _step(model, opt, t, k=2 if t % 2 else K, clip=True)
            rows.append(opt.stats)
        return rows, opt

    want, _ = run(cut=-1)
    for cut in (1, 3):
        got, opt = run(cut)
        assert opt.measure_every == every
        for t in range(6):
            assert all(_same(got[t][k], v) for k, v in want[t].items()), (cut, t)


def _spy_weights(opt: bscale.ScaledOptimizer) -> list[float]:
    """The examples each estimator update is weighted by."""
    weights: list[float] = []
    add = opt.estimator.add
    opt.estimator.add = lambda g, t, b: weights.append(b) or add(g, t, b)
    return weights


@pytest.mark.parametrize("every", [1, 2])
def test_a_step_left_out_weighs_the_next_measurement(every):
    # Step 3 (measured either way) runs one microbatch short and is clipped before step(): .grad is read too late,
    # so the step is left out, and its examples join the next measurement's weight.
    model = _model()
    opt = _wrapped(model, measure_every=every)
    weights = _spy_weights(opt)
    sizes = []
    for t in range(6):
        _step(model, opt, t, k=K - 1 if t == 3 else K, clip=True)
        sizes.append(opt.stats["batch_size"])
    if every == 1:
        want = [sizes[0], sizes[1], sizes[2], sizes[3] + sizes[4], sizes[5]]
    else:  # steps 0, 1, 3, 5 due; 3 left out, so 4 measured in its place
        want = [sizes[0], sizes[1], sizes[2] + sizes[3] + sizes[4], sizes[5]]
    assert weights == want


def test_an_unmeasured_short_first_step_of_a_resumed_wrapper_counts(tmp_path):
    # A fresh wrapper loads a checkpoint between measurements, and its first step runs one microbatch fewer than
    # the controller's count (an epoch's end): the step's examples and LR scale are those of its real batch.
    def make(model):
        ctl = bscale.BatchSizeController("double", min_batch=4 * MICRO, max_batch=64 * MICRO, multiple_of=MICRO)
        return bscale.wrap(torch.optim.SGD(model.parameters(), lr=1e-2), microbatch_size=MICRO, measure_every=3,
                           controller=ctl, rule="linear", ref_batch=2 * MICRO)  # fmt: skip

    model = _model()
    opt = make(model)
    for t in range(4):
        k = opt.accumulation_steps()
        for j in range(k):
            x, y = _batch(t, j)
            x, y = x[:MICRO], y[:MICRO]
            (torch.nn.functional.mse_loss(model(x), y) / k).backward()
        opt.step()
        opt.zero_grad()
    torch.save(opt.state_dict(), tmp_path / "opt.pt")
    opt2 = make(model)
    opt2.load_state_dict(torch.load(tmp_path / "opt.pt"))
    assert not opt2._measuring
    k = opt2.accumulation_steps() - 1
    for j in range(k):
        x, y = _batch(9, j)
        (torch.nn.functional.mse_loss(model(x[:MICRO]), y[:MICRO]) / k).backward()
    before = opt2.examples
    opt2.step()
    assert opt2.examples - before == k * MICRO
    assert opt2.stats["batch_size"] == k * MICRO and opt2.stats["lr_scale"] == k / 2


def test_a_bare_checkpoint_drops_the_pending_examples():
    model = _model()
    opt = _wrapped(model, measure_every=4)
    for t in range(2):
        _step(model, opt, t)
    assert opt._pending_examples > 0
    bare = torch.optim.AdamW(model.parameters(), lr=1e-2)
    opt.load_state_dict(bare.state_dict())
    assert opt._pending_examples == 0.0 and opt.estimator.steps == 0


def test_a_rule_scales_the_lr_from_a_measurement_from_the_first_step():
    # Without a reading the noise-aware rule has no B_noise (it would scale like the linear rule): the first step,
    # and the first after a bare optimizer's checkpoint, are measured whatever measure_every says.
    model = _model()
    opt = _wrapped(model, measure_every=10, rule="noise", ref_batch=MICRO)
    scales = []
    for t in range(4):
        _step(model, opt, t)
        scales.append(opt.stats["lr_scale"])
    model1 = _model()
    opt1 = _wrapped(model1, rule="noise", ref_batch=MICRO)
    _step(model1, opt1, 0)
    assert scales[0] == opt1.stats["lr_scale"]  # as measuring every step
    assert abs(scales[0] - math.sqrt(opt.stats["batch_size"] / MICRO)) > 0.5  # not Adam's rule without a reading
    assert scales[1:] == [scales[0]] * 3  # B_noise stands between measurements
    opt.load_state_dict(torch.optim.AdamW(model.parameters(), lr=1e-2).state_dict())
    assert opt.noise_scale is None and opt._measuring
    _step(model, opt, 4)
    assert opt.estimator.steps == 1 and not opt._measuring


def test_a_measured_step_left_out_hands_the_measurement_to_the_next():
    # Every other step runs 2 microbatches and is clipped before step(): read too late, it is left out. With
    # measure_every=2 the measured steps would all be those; the step after each is measured instead.
    model = _model()
    opt = _wrapped(model, measure_every=2)
    for t in range(12):
        _step(model, opt, t, k=2 if t % 2 else K, clip=True)
    # Step 0 measured; then 1, 3, 5, ... are due, left out, and 2, 4, 6, ... measured in their place.
    assert opt.estimator.steps == 6
    assert opt.reason is None


def test_reason_speaks_of_measured_steps():
    model = _model()
    opt = _wrapped(model, measure_every=3)
    reasons = []
    for t in range(6):
        _step(model, opt, t)
        reasons.append(opt.reason)
    assert reasons[:2] == ["standard errors need at least 2 measured steps (measure_every=3: one step in 3)"] * 2
    assert reasons[2:] == [None] * 4 and opt.stats["noise_scale_stderr"] > 0


def test_reason_keeps_the_estimators_other_causes():
    # Pure-noise targets at a zero model: |G|² is 0, so a single step's estimate is as often negative, and the
    # reason then says so with measure_every as without it.
    seen = set()
    for seed in range(8):
        reasons = []
        for every in (1, 2):
            torch.manual_seed(seed)
            model = torch.nn.Linear(D, 1)
            torch.nn.init.zeros_(model.weight)
            torch.nn.init.zeros_(model.bias)
            opt = bscale.wrap(torch.optim.SGD(model.parameters(), lr=0.0), microbatch_size=MICRO, measure_every=every)
            for _ in range(K):
                (torch.nn.functional.mse_loss(model(torch.randn(MICRO, D)), torch.randn(MICRO, 1)) / K).backward()
            opt.step()
            reasons.append(opt.reason)
        seen.add(reasons[0])
        if reasons[0] == "standard errors need at least 2 steps":
            assert reasons[1] == "standard errors need at least 2 measured steps (measure_every=2: one step in 2)"
        else:
            assert reasons[1] == reasons[0]
    assert len(seen) == 2  # both causes occurred


def test_measure_every_can_change_between_steps():
    model = _model()
    opt = _wrapped(model)
    for t in range(3):
        _step(model, opt, t)
    assert opt.estimator.steps == 3
    opt.measure_every = 4  # from step 3 on: 3 and 7 measured (the last of every 4)
    for t in range(3, 9):
        _step(model, opt, t)
    assert opt.estimator.steps == 5
    with pytest.raises(ValueError, match="measure_every"):
        opt.measure_every = 0
    assert opt.measure_every == 4


@pytest.mark.parametrize("bad", [0, -2, 1.5, True, "3", None])
def test_measure_every_must_be_a_positive_integer(bad):
    model = _model()
    with pytest.raises(ValueError, match="measure_every"):
        bscale.wrap(torch.optim.SGD(model.parameters(), lr=0.1), microbatch_size=MICRO, measure_every=bad)
