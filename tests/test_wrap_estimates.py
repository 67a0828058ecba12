"""What `bscale.wrap` measures: unclipped, unscaled, unit-free readings that match closed forms."""

from __future__ import annotations

import math
import warnings

import pytest
import torch

import bscale
from bscale import wrap


def _model(seed: int = 0) -> torch.nn.Module:
    torch.manual_seed(seed)
    return torch.nn.Sequential(torch.nn.Linear(6, 5), torch.nn.Tanh(), torch.nn.Linear(5, 1))


def _data(steps: int, k: int, b: int = 4, seed: int = 1):
    """``steps`` lists of ``k`` microbatches of ``b`` examples; a learnable target keeps |G|² well above 0."""
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(6, 1, generator=torch.Generator().manual_seed(99))
    out = []
    for _ in range(steps):
        xs = [torch.randn(b, 6, generator=g) for _ in range(k)]
        out.append([(x, x @ w + 0.3 * torch.randn(b, 1, generator=g)) for x in xs])
    return out


def _loss(model, x, y):
    return ((model(x) - y) ** 2).mean()


def _hand_estimates(model, microbatches, sizes=None):
    """Two-batch estimates from per-microbatch gradients computed by hand (no wrapper), in float64."""
    params = [p for p in model.parameters() if p.requires_grad]
    grads = []
    for x, y in microbatches:
        gs = torch.autograd.grad(_loss(model, x, y), params, allow_unused=True)
        grads.append(
            torch.cat([(torch.zeros_like(p) if g is None else g).flatten() for p, g in zip(params, gs, strict=True)])
        )
    return bscale.microbatch_estimates(grads, sizes)


# ---- what is read, and when --------------------------------------------------------------------------------


def _run(data, *, clip=None):
    model = _model()
    opt = wrap(torch.optim.SGD(model.parameters(), lr=0.0), microbatch_size=4)
    for microbatches in data:
        for x, y in microbatches:
            (_loss(model, x, y) / len(microbatches)).backward()
        if clip is not None:
            torch.nn.utils.clip_grad_norm_(model.parameters(), clip)
        opt.step()
        opt.zero_grad()
    return opt


def test_gradient_clipping_does_not_change_the_estimate():
    data = _data(6, 3)
    plain = _run(data)
    # lr = 0 keeps both runs at one point: a difference could only come from reading clipped gradients.
    clipped = _run(data, clip=1e-3)
    assert plain.noise_scale is not None
    assert clipped.estimator.state_dict() == plain.estimator.state_dict()
    assert clipped.stats["noise_scale"] == plain.stats["noise_scale"]


def _amp_run(data, *, fused, amp, pass_scaler=True, inf_at=None, skip=None, per_coordinate=False):
    model = _model()
    inner = torch.optim.AdamW(model.parameters(), lr=1e-2, fused=fused, foreach=None if fused else False)
    # A small growth_interval makes the scale change during the run (1024, 2048, ..., halved on overflow).
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**10, growth_interval=2) if amp else None
    opt = wrap(
        inner,
        microbatch_size=4,
        beta=0.9,
        grad_scaler=scaler if pass_scaler else None,
        per_coordinate=per_coordinate,
    )
    for step, microbatches in enumerate(data):
        if step == skip:
            continue
        for j, (x, y) in enumerate(microbatches):
            loss = _loss(model, x, y) / len(microbatches)
            if step == inf_at and j == 1:
                loss = loss * math.inf  # an overflow on one microbatch
            (scaler.scale(loss) if amp else loss).backward()
        if amp:
            scaler.step(opt)
            scaler.update()
        else:
            opt.step()
        opt.zero_grad()
    return opt, [p.detach().clone() for p in model.parameters()]


def _fused_adamw_on_cpu_supported() -> bool:
    try:
        p = torch.zeros(2, requires_grad=True)
        p.grad = torch.ones(2)
        torch.optim.AdamW([p], lr=1e-2, fused=True).step()
    except (RuntimeError, ValueError):
        return False
    return True


_FUSED = [
    False,
    pytest.param(True, marks=pytest.mark.skipif(not _fused_adamw_on_cpu_supported(), reason="no fused")),
]


@pytest.mark.parametrize("fused", _FUSED, ids=["forloop", "fused"])
def test_grad_scaler_readings_are_unscaled(fused):
    data = _data(8, 3)
    plain, p_plain = _amp_run(data, fused=fused, amp=False)
    scaled, p_scaled = _amp_run(data, fused=fused, amp=True)
    assert plain.noise_scale is not None
    # Power-of-two scales commute with float rounding: the same numbers up to the last bit or so.
    for key in ("noise_scale", "grad_sq", "trace_sigma", "step_grad_sq", "step_trace_sigma"):
        assert scaled.stats[key] == pytest.approx(plain.stats[key], rel=1e-6), key
    assert all(torch.equal(a, b) for a, b in zip(p_plain, p_scaled, strict=True))


@pytest.mark.parametrize("per_coordinate", [False, True], ids=["default", "per_coordinate"])
@pytest.mark.parametrize("fused", _FUSED, ids=["forloop", "fused"])
def test_grad_scaler_overflow_step_leaves_the_estimator_untouched(fused, per_coordinate):
    data = _data(6, 3)
    overflowed, p_overflowed = _amp_run(data, fused=fused, amp=True, inf_at=3, per_coordinate=per_coordinate)
    skipped, p_skipped = _amp_run(data, fused=fused, amp=True, skip=3, per_coordinate=per_coordinate)
    assert overflowed.estimator.steps == 5
    # The estimator, the counters, all of it.
    assert overflowed.state_dict()["bscale"] == skipped.state_dict()["bscale"]
    assert overflowed.stats == skipped.stats
    assert all(torch.equal(a, b) for a, b in zip(p_overflowed, p_skipped, strict=True))


def test_frozen_parameters_are_skipped():
    data = _data(1, 3)
    model = _model()
    model[0].requires_grad_(False)
    expected = _hand_estimates(model, data[0], [4.0] * 3)
    opt = wrap(torch.optim.SGD(model.parameters(), lr=0.0), microbatch_size=4, beta=0.0)
    for x, y in data[0]:
        (_loss(model, x, y) / 3).backward()
    opt.step()
    assert all(p.grad is None for p in model[0].parameters())
    assert opt.estimator.last_grad_sq == pytest.approx(expected.grad_sq, rel=1e-5)
    assert opt.estimator.last_trace_sigma == pytest.approx(expected.trace_sigma, rel=1e-5)


@pytest.mark.parametrize("per_coordinate", [False, True], ids=["default", "per_coordinate"])
def test_parameters_unfrozen_later_are_measured_from_the_next_step(per_coordinate):
    data = _data(4, 3)
    model = _model()
    model[0].requires_grad_(False)  # frozen when wrapped (a fine-tuning schedule that unfreezes layers later)
    opt = wrap(torch.optim.Adam(model.parameters(), lr=0.0), microbatch_size=4, per_coordinate=per_coordinate)
    for step, microbatches in enumerate(data):
        if step == 2:
            model[0].requires_grad_(True)
        for x, y in microbatches:
            (_loss(model, x, y) / 3).backward()
        expected = _hand_estimates(model, microbatches, [4.0] * 3)  # every parameter that requires grad
        opt.step()
        opt.zero_grad()
        got = (opt.stats["step_grad_sq"], opt.stats["step_trace_sigma"])
        if step == 2:  # unfrozen during this step: it is measured without them, its sums and norms alike
            model[0].requires_grad_(False)
            expected = _hand_estimates(model, microbatches, [4.0] * 3)
            model[0].requires_grad_(True)
        assert got == pytest.approx((expected.grad_sq, expected.trace_sigma), rel=1e-5), step


def test_model_moved_to_float64_after_wrapping():
    data = _data(3, 3)
    runs = []
    for moved_after in (True, False):
        model = _model()
        if not moved_after:
            model.double()
        opt = wrap(torch.optim.SGD(model.parameters(), lr=0.0), microbatch_size=4)
        if moved_after:
            model.double()  # the same Parameter objects, now float64
        for microbatches in data:
            for x, y in microbatches:
                (_loss(model, x.double(), y.double()) / 3).backward()
            opt.step()
            opt.zero_grad()
        runs.append(opt.estimator.state_dict())
    assert runs[0] == runs[1]


class _Branchy(torch.nn.Module):
    """``used`` always; ``sometimes`` only in the first microbatch of a step; ``never`` not at all."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.used = torch.nn.Linear(6, 1)
        self.sometimes = torch.nn.Linear(6, 1)
        self.never = torch.nn.Linear(6, 1)
        self.first = True

    def forward(self, x):
        return self.used(x) + (self.sometimes(x) if self.first else 0.0)


def test_parameters_without_a_gradient_are_fine():
    data = _data(3, 3)
    model, ref = _Branchy(), _Branchy()  # the same weights; ref is not wrapped (lr = 0 keeps them equal)
    opt = wrap(torch.optim.SGD(model.parameters(), lr=0.0), microbatch_size=4, beta=0.0)
    for microbatches in data:
        expected_grads = []
        for j, (x, y) in enumerate(microbatches):
            ref.first = j == 0
            params = list(ref.parameters())
            gs = torch.autograd.grad(_loss(ref, x, y), params, allow_unused=True)
            expected_grads.append(
                torch.cat(
                    [(torch.zeros_like(p) if g is None else g).flatten() for p, g in zip(params, gs, strict=True)]
                )
            )
        expected = bscale.microbatch_estimates(expected_grads, [4.0] * 3)
        for j, (x, y) in enumerate(microbatches):
            model.first = j == 0
            (_loss(model, x, y) / 3).backward()
        assert all(p.grad is None for p in model.never.parameters())
        opt.step()
        opt.zero_grad()
        assert opt.estimator.last_grad_sq == pytest.approx(expected.grad_sq, rel=1e-5)
        assert opt.estimator.last_trace_sigma == pytest.approx(expected.trace_sigma, rel=1e-5)
    assert opt.stats["steps"] == 3.0


# ---- conventions -------------------------------------------------------------------------------------------


def _convention_run(data, *, divide: bool, lr: float, **kw):
    model = _model()
    opt = wrap(torch.optim.SGD(model.parameters(), lr=lr), microbatch_size=4, **kw)
    for microbatches in data:
        for x, y in microbatches:
            loss = _loss(model, x, y)
            (loss / len(microbatches) if divide else loss).backward()
        opt.step()
        opt.zero_grad()
    return opt


def test_loss_mean_and_sum_conventions_agree():
    data = _data(10, 4)
    mean = _convention_run(data, divide=True, lr=0.05)
    # SGD with lr/4 on the summed loss takes the steps SGD with lr takes on loss / 4: the same trajectory.
    summed = _convention_run(data, divide=False, lr=0.05 / 4, loss_reduction="sum")
    assert mean.noise_scale is not None
    for key in ("noise_scale", "grad_sq", "trace_sigma"):
        assert summed.stats[key] == pytest.approx(mean.stats[key], rel=1e-4), key
    # Told the wrong convention, the ratio is still right but the absolute values are k² = 16 times too large.
    wrong = _convention_run(data, divide=False, lr=0.05 / 4)
    assert wrong.stats["noise_scale"] == pytest.approx(mean.stats["noise_scale"], rel=1e-4)
    assert wrong.stats["grad_sq"] == pytest.approx(16 * mean.stats["grad_sq"], rel=1e-4)
    assert wrong.stats["trace_sigma"] == pytest.approx(16 * mean.stats["trace_sigma"], rel=1e-4)


def test_unequal_last_microbatch_matches_the_harmonic_mean_estimator():
    sizes = [4, 4, 4, 1]
    g = torch.Generator().manual_seed(3)
    x, y = torch.randn(13, 6, generator=g), torch.randn(13, 1, generator=g)
    microbatches = list(zip(torch.split(x, sizes), torch.split(y, sizes), strict=True))
    expected = _hand_estimates(_model(), microbatches, sizes)
    # With the arithmetic mean size instead, the answer differs: the test can fail.
    arithmetic = _hand_estimates(_model(), microbatches, [3.25] * 4)
    assert not math.isclose(expected.trace_sigma, arithmetic.trace_sigma, rel_tol=0.05)

    model = _model()
    opt = wrap(torch.optim.SGD(model.parameters(), lr=0.0), microbatch_size=4, beta=0.0)
    for xm, ym in microbatches:
        opt.microbatch_size = len(xm)
        (_loss(model, xm, ym) / len(sizes)).backward()
    opt.step()
    harmonic = len(sizes) / sum(1 / s for s in sizes)
    # The reported batch is the examples the step saw; the two-batch formula itself uses B = k·(harmonic mean).
    assert opt.stats["batch_size"] == sum(sizes)
    assert opt.stats["examples"] == sum(sizes)
    assert opt.estimator.last_grad_sq == pytest.approx(expected.grad_sq, rel=1e-5)
    assert opt.estimator.last_trace_sigma == pytest.approx(expected.trace_sigma, rel=1e-5)
    assert len(sizes) * harmonic < 10 < sum(sizes)
    # ... but the averages forget by the examples seen (13 here, not k·b = 9.1), like the step's batch size.
    assert opt.estimator.examples == sum(sizes) == opt.estimator.ref_batch


def test_the_estimate_forgets_by_the_examples_each_step_saw():
    # beta = 0.5 at the first step's 16 examples; a step of 13 examples in unequal microbatches then discounts
    # the past by 0.5^(13/16), its examples, not by 0.5^(9.14/16), its two-batch B = k·(harmonic mean).
    model = _model()
    opt = wrap(torch.optim.SGD(model.parameters(), lr=0.0), microbatch_size=4, beta=0.5)
    g = torch.Generator().manual_seed(4)
    for sizes in ([4, 4, 4, 4], [4, 4, 4, 1]):
        for n in sizes:
            opt.microbatch_size = n
            (_loss(model, torch.randn(n, 6, generator=g), torch.randn(n, 1, generator=g)) / 4).backward()
        opt.step()
        opt.zero_grad()
    assert opt.estimator.ref_batch == 16 and opt.estimator.examples == 29
    assert opt.estimator.weight == pytest.approx(1.0 - 0.5 ** (1.0 + 13 / 16), rel=1e-12)


def _set_grads_to_none(model, opt):
    for p in model.parameters():
        p.grad = None


_DISCARDS = {
    "opt.zero_grad()": lambda model, opt: opt.zero_grad(),
    # Outside the wrapper: it sees the gradients set to None at the next backward.
    "model.zero_grad()": lambda model, opt: model.zero_grad(),
    "p.grad = None": _set_grads_to_none,
}


@pytest.mark.parametrize("discard", list(_DISCARDS))
def test_zero_grad_without_step_discards_the_statistics(discard):
    first, second = _data(2, 3)
    model = _model()
    discarded = wrap(torch.optim.SGD(model.parameters(), lr=0.0), microbatch_size=4, beta=0.0)
    for x, y in first:
        (_loss(model, x, y) / 3).backward()
    _DISCARDS[discard](model, discarded)  # e.g. a step abandoned for a bad batch
    for x, y in second:
        (_loss(model, x, y) / 3).backward()
    discarded.step()

    model = _model()
    clean = wrap(torch.optim.SGD(model.parameters(), lr=0.0), microbatch_size=4, beta=0.0)
    for x, y in second:
        (_loss(model, x, y) / 3).backward()
    clean.step()
    assert discarded.stats["microbatches"] == 3.0
    assert discarded.estimator.state_dict() == clean.estimator.state_dict()


def test_gradients_changed_in_place_between_backwards_are_not_discarded():
    # A clip after every backward (to log the norm, with a max_norm never reached) multiplies .grad in place by
    # 1: the gradients are still those of the step's microbatches.
    data = _data(3, 3)
    plain, clipped = (_model(), _model())
    opts = [wrap(torch.optim.SGD(m.parameters(), lr=0.0), microbatch_size=4) for m in (plain, clipped)]
    for microbatches in data:
        for model, opt in zip((plain, clipped), opts, strict=True):
            for x, y in microbatches:
                (_loss(model, x, y) / 3).backward()
                if model is clipped:
                    torch.nn.utils.clip_grad_norm_(model.parameters(), 1e9)
            opt.step()
            opt.zero_grad()
    assert opts[1].stats["microbatches"] == 3.0
    assert opts[1].estimator.state_dict() == opts[0].estimator.state_dict()


def test_one_microbatch_per_step_warns_once_and_training_continues():
    data = _data(4, 1)
    bare_model = _model()
    bare = torch.optim.SGD(bare_model.parameters(), lr=0.1)
    model = _model()
    opt = wrap(torch.optim.SGD(model.parameters(), lr=0.1), microbatch_size=4)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        for (microbatch,) in data:
            for m, o in ((bare_model, bare), (model, opt)):
                _loss(m, *microbatch).backward()
                o.step()
                o.zero_grad()
    ours = [w for w in caught if issubclass(w.category, RuntimeWarning) and "bscale" in str(w.message)]
    assert len(ours) == 1
    message = str(ours[0].message)
    assert "Accumulate 2 or more microbatches" in message and "data-parallel" in message
    assert ours[0].filename == __file__  # attributed to the line that called step(), not to torch
    assert all(torch.equal(a, b) for a, b in zip(bare_model.parameters(), model.parameters(), strict=True))
    assert opt.noise_scale is None
    assert "one microbatch per step" in opt.reason
    assert opt.stats["steps"] == 4.0 and math.isnan(opt.stats["noise_scale"])


# ---- known answers -----------------------------------------------------------------------------------------


def _regression_truth(delta: torch.Tensor, noise_std: float) -> dict[str, float]:
    """Per-example loss ½(wᵀx − y)², x ~ N(0, I), y = w*ᵀx + ε, ε ~ N(0, s²), at w = w* + δ.

    The per-example gradient is (δᵀx − ε)x, so G = δ and, by Isserlis' theorem,
    Σ = E[(δᵀx − ε)² x xᵀ] − δδᵀ = (|δ|² + s²) I + δδᵀ: tr Σ = d(|δ|² + s²) + |δ|², |G|² = |δ|².
    """
    d, dd = delta.numel(), float(delta.double().pow(2).sum())
    trace = d * (dd + noise_std**2) + dd
    return {"grad_sq": dd, "trace_sigma": trace, "noise_scale": trace / dd}


class _Regressions(torch.nn.Module):
    """Independent linear regressions, one ``nn.Linear`` each (``bias=False``), summed into one loss."""

    def __init__(self, dims: dict[str, int]):
        super().__init__()
        for name, d in dims.items():
            self.add_module(name, torch.nn.Linear(d, 1, bias=False))


def _known_answer_run(specs: dict[str, tuple[int, float, float]], *, steps=200, b=64, k=8, seed=0):
    """Train on ``specs`` {name: (d, |δ|, s)} at a fixed point (lr = 0); return the wrapper and the truths."""
    g = torch.Generator().manual_seed(seed)
    model = _Regressions({name: d for name, (d, _, _) in specs.items()})
    w_star, truths = {}, {}
    for name, (d, delta_norm, noise_std) in specs.items():
        w_star[name] = torch.randn(d, generator=g)
        delta = torch.randn(d, generator=g)
        delta = delta / delta.norm() * delta_norm
        getattr(model, name).weight.data.copy_((w_star[name] + delta)[None])
        truths[name] = _regression_truth(delta, noise_std)
    # beta close to 1: over 200 steps the bias-corrected average is nearly the plain mean of the steps.
    opt = wrap(
        torch.optim.SGD(model.parameters(), lr=0.0),
        microbatch_size=b,
        beta=0.999,
        named_parameters=model.named_parameters(),
    )
    for _ in range(steps):
        batch = {}
        for name, (d, _, noise_std) in specs.items():
            x = torch.randn(k * b, d, generator=g)
            batch[name] = (x, x @ w_star[name] + noise_std * torch.randn(k * b, generator=g))
        for j in range(k):
            rows = slice(j * b, (j + 1) * b)
            loss = sum(
                0.5 * (getattr(model, n)(x[rows]).squeeze(-1) - y[rows]).pow(2).mean() for n, (x, y) in batch.items()
            )
            (loss / k).backward()
        opt.step()
        opt.zero_grad()
    return opt, truths


def _per_module(model: torch.nn.Module):
    """SGD at lr 0 (the point stays fixed) with per-module readings and a short horizon."""
    return wrap(
        torch.optim.SGD(model.parameters(), lr=0.0),
        microbatch_size=8,
        beta=0.5,
        named_parameters=model.named_parameters(),
    )


def test_a_module_without_gradients_keeps_its_reading_and_is_not_fed_zeros():
    # Per-module readings; module "a" is frozen after 5 steps. Its estimator must not take the steps it had no
    # gradient in as zero gradients (that decayed its averages towards 0, until |G|² underflowed and the
    # standard error divided by zero, raising from opt.stats): it keeps its last reading.
    model = _Regressions({"a": 4, "b": 4})
    opt = _per_module(model)
    g = torch.Generator().manual_seed(5)
    for step in range(12):
        if step == 5:
            model.a.weight.requires_grad_(False)
        for _ in range(2):
            x = torch.randn(8, 4, generator=g)
            loss = sum(0.5 * (m(x).squeeze(-1) - x.sum(1)).pow(2).mean() for m in (model.a, model.b))
            (loss / 2).backward()
        opt.step()
        opt.zero_grad()
        if step == 4:
            frozen = {k: v for k, v in opt.stats.items() if k.startswith("layer/a/")}
    layers = opt._layer_estimators
    assert layers["a"].steps == 5 and layers["b"].steps == 12 == opt.estimator.steps
    assert {k: v for k, v in opt.stats.items() if k.startswith("layer/a/")} == frozen


def _expert_run(steps: range, state: dict | None = None):
    """Module "a" gets a gradient on even steps only (an expert routed to every other step); "b" on every step."""
    torch.manual_seed(0)
    model = _Regressions({"a": 4, "b": 4})
    opt = _per_module(model)
    if state is not None:
        opt.load_state_dict(state)
    for step in steps:
        g = torch.Generator().manual_seed(100 + step)
        for _ in range(2):
            x = torch.randn(8, 4, generator=g)
            used = (model.a, model.b) if step % 2 == 0 else (model.b,)
            loss = sum(0.5 * (m(x).squeeze(-1) - x.sum(1)).pow(2).mean() for m in used)
            (loss / 2).backward()
        opt.step()
        opt.zero_grad()
    return opt


def test_a_module_reached_every_other_step_forgets_by_every_example():
    # Its readings weigh the examples of the steps it missed into its next measurement, so that beta's horizon
    # is the same number of examples as the whole model's.
    opt = _expert_run(range(9))
    a, b = opt._layer_estimators["a"], opt._layer_estimators["b"]
    assert a.steps == 5 and b.steps == 9
    assert a.examples == b.examples == opt.examples == 9 * 16
    # Saved after a step "a" missed, the examples it missed are in the checkpoint: the resumed run's readings are
    # the uninterrupted one's.
    first = _expert_run(range(8))
    assert first.state_dict()["bscale"]["layer_pending"] == {"a": 16.0}
    resumed = _expert_run(range(8, 9), state=first.state_dict())
    assert resumed._layer_estimators["a"].state_dict() == a.state_dict()
    assert resumed.stats == opt.stats


@pytest.mark.slow
def test_known_answer_linear_regression():
    opt, truths = _known_answer_run({"lin": (32, 1.0, 1.0)})
    truth = truths["lin"]  # B_simple = (32·2 + 1)/1 = 65, against a batch of 512 in microbatches of 64
    stats = opt.stats
    for key in ("noise_scale", "grad_sq", "trace_sigma"):
        assert stats[key] == pytest.approx(truth[key], rel=0.05), (key, stats[key], truth[key])
    # The reported standard error is of the right size: the error is within a few of them.
    assert abs(stats["noise_scale"] - truth["noise_scale"]) < 4 * stats["noise_scale_stderr"]


@pytest.mark.slow
def test_per_layer_readings_on_independent_problems():
    specs = {"a": (16, 1.0, 1.0), "b": (32, 0.5, 0.5)}  # B_simple: 33 and 65
    opt, truths = _known_answer_run(specs, seed=1)
    stats = opt.stats
    for name in specs:
        assert stats[f"layer/{name}/noise_scale"] == pytest.approx(truths[name]["noise_scale"], rel=0.05), name
    whole = sum(t["trace_sigma"] for t in truths.values()) / sum(t["grad_sq"] for t in truths.values())
    assert stats["noise_scale"] == pytest.approx(whole, rel=0.05)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_large_and_small_gradients_give_the_hand_computed_estimate(dtype):
    """Large gradients are normed in their hook, small ones together when each backward ends (float64 ones by
    the general path): every route gives the per-microbatch closed form."""
    torch.manual_seed(5)
    layers = [torch.nn.Linear(6, 300), torch.nn.Tanh(), torch.nn.Linear(300, 256), torch.nn.Linear(256, 1)]
    model = torch.nn.Sequential(*layers).to(dtype)
    assert max(p.numel() for p in model.parameters()) >= 1 << 16 > min(p.numel() for p in model.parameters())
    g = torch.Generator().manual_seed(6)
    microbatches = [
        (torch.randn(4, 6, generator=g, dtype=dtype), torch.randn(4, 1, generator=g, dtype=dtype)) for _ in range(3)
    ]
    expected = _hand_estimates(model, microbatches, [4, 4, 4])
    opt = wrap(torch.optim.SGD(model.parameters(), lr=0.0), microbatch_size=4, beta=0.0)
    for x, y in microbatches:
        (_loss(model, x, y) / len(microbatches)).backward()
    opt.step()
    assert opt.estimator.last_grad_sq == pytest.approx(expected.grad_sq, rel=1e-4)
    assert opt.estimator.last_trace_sigma == pytest.approx(expected.trace_sigma, rel=1e-4)
