"""`measure_every=N`: one step in N is measured; the others run without the statistics' passes over the gradients.

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


def _same(a: float, b: float) -> bool:
    return a == b or (math.isnan(a) and math.isnan(b))


def _model(seed: int = 0) -> torch.nn.Module:
    torch.manual_seed(seed)
    return torch.nn.Sequential(torch.nn.Linear(D, 8), torch.nn.Tanh(), torch.nn.Linear(8, 1))


def _batch(step: int, micro: int) -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(1000 * step + micro)
    x = torch.randn(MICRO + (micro == 0) * 4, D, generator=gen)  # unequal microbatches: examples ≠ k·b
    return x, x[:, :1] * 0.5 + 0.3 * torch.randn(x.shape[0], 1, generator=gen)


def _step(model: torch.nn.Module, opt: bscale.ScaledOptimizer, step: int) -> None:
    for j in range(K):
        x, y = _batch(step, j)
        opt.microbatch_size = x.shape[0]
        (torch.nn.functional.mse_loss(model(x), y) / K).backward()
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
    expected = NoiseScaleEstimator(0.9)
    pending = 0.0
    for t, row in enumerate(rows1):
        pending += row["batch_size"]
        if t % every == 0:  # steps 0, 3, 6, 9 are measured
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
    assert opt3.estimator.examples == sum(r["batch_size"] for r in rows1[:10])
    assert opt3._unmeasured_examples == rows1[10]["batch_size"]


def test_unmeasured_steps_take_no_norms():
    model = _model()
    opt = bscale.wrap(torch.optim.SGD(model.parameters(), lr=1e-2), microbatch_size=MICRO, measure_every=4)
    calls = []
    real = torch._foreach_norm
    with mock.patch.object(torch, "_foreach_norm", side_effect=lambda *a, **k: calls.append(1) or real(*a, **k)):
        for t in range(8):
            before = len(calls)
            _step(model, opt, t)
            # Measured: one op per backward and one for .grad (after each backward on the first step, whose count is
            # not known yet); unmeasured: none.
            assert len(calls) - before == {0: 2 * K, 4: K + 1}.get(t, 0), t
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
            if t % 3:
                assert all(not buf.any() for buf in opt._coord_sq.values()), t
        opt.step()
        opt.zero_grad()
        rows.append(opt.stats)
    # Per-step snapshots: the measured step's, standing until the next measurement.
    for t in range(7):
        measured = t - t % 3
        for key in ("coord/sum_sigma_sq", "coord/sum_mu_sq", "coord/frac_small_batch", "coord/snr_hist/5"):
            assert rows[t][key] == rows1[measured][key], (t, key)
    assert math.isfinite(rows[-1]["adam_preconditioned/noise_scale"])


def test_resume_between_measurements_matches_an_uninterrupted_run(tmp_path):
    steps, every, cut = 9, 4, 6  # saved after step 5: one unmeasured step's examples pending
    _, opt_full, rows_full = _run(steps, measure_every=every, named_parameters=None)
    model = _model()
    opt = bscale.wrap(torch.optim.AdamW(model.parameters(), lr=1e-2), microbatch_size=MICRO, beta=0.9,
                      measure_every=every)  # fmt: skip
    for t in range(cut):
        _step(model, opt, t)
    assert opt._unmeasured_examples > 0
    torch.save({"model": model.state_dict(), "opt": opt.state_dict()}, tmp_path / "ckpt.pt")
    ckpt = torch.load(tmp_path / "ckpt.pt", map_location="cpu")
    model2 = _model(seed=5)
    model2.load_state_dict(ckpt["model"])
    opt2 = bscale.wrap(torch.optim.AdamW(model2.parameters(), lr=1e-2), microbatch_size=MICRO, beta=0.9,
                       measure_every=every)  # fmt: skip
    opt2.load_state_dict(ckpt["opt"])
    for t in range(cut, steps):
        _step(model2, opt2, t)
    assert all(_same(opt2.stats[k], v) for k, v in rows_full[-1].items())
    assert opt2.estimator.state_dict() == opt_full.estimator.state_dict()


@pytest.mark.parametrize("bad", [0, -2, 1.5, True, "3", None])
def test_measure_every_must_be_a_positive_integer(bad):
    model = _model()
    with pytest.raises(ValueError, match="measure_every"):
        bscale.wrap(torch.optim.SGD(model.parameters(), lr=0.1), microbatch_size=MICRO, measure_every=bad)
