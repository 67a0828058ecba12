"""Learning-rate rules applied by `bscale.wrap` inside ``step()``, the reported optimal LR, torch.compile."""

from __future__ import annotations

import math
import os
import tempfile

import pytest
import torch

from bscale import laws, wrap


def _model(seed: int = 0) -> torch.nn.Module:
    torch.manual_seed(seed)
    return torch.nn.Sequential(torch.nn.Linear(4, 3), torch.nn.Tanh(), torch.nn.Linear(3, 1))


def _microbatches(g: torch.Generator, k: int, b: int):
    w = torch.tensor([[1.0], [-2.0], [0.5], [1.5]])  # a learnable target: |G|² well above 0
    out = []
    for _ in range(k):
        x = torch.randn(b, 4, generator=g)
        out.append((x, x @ w + 0.3 * torch.randn(b, 1, generator=g)))
    return out


def _train(model, opt, steps: int, k: int = 4, b: int = 8, seed: int = 1):
    g = torch.Generator().manual_seed(seed)
    for _ in range(steps):
        microbatches = _microbatches(g, k, b)
        for x, y in microbatches:
            (((model(x) - y) ** 2).mean() / k).backward()
        opt.step()
        opt.zero_grad()


def _record_inner_groups(inner: torch.optim.Optimizer, wrapper) -> list[dict]:
    """What the wrapped optimizer's step sees (a step pre-hook on the *inner* optimizer)."""
    seen = []

    def hook(o, args, kwargs):
        group = o.param_groups[0]
        seen.append(
            {
                "lr": group["lr"],
                "betas": group.get("betas"),
                "eps": group.get("eps"),
                "noise_scale": wrapper.noise_scale,
            }
        )

    inner.register_step_pre_hook(hook)
    return seen


@pytest.mark.parametrize(("rule", "factor"), [("linear", 2.0), ("sqrt", math.sqrt(2.0))])
def test_fixed_rules_scale_the_inner_lr_and_restore_it(rule, factor):
    model = _model()
    inner = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    opt = wrap(inner, microbatch_size=8, rule=rule, ref_batch=16)  # 4 microbatches of 8: twice ref_batch
    seen = _record_inner_groups(inner, opt)
    _train(model, opt, steps=3)
    assert [s["lr"] for s in seen] == [0.1 * factor] * 3
    assert opt.param_groups[0]["lr"] == 0.1  # the user's value, exactly
    assert opt.stats["lr_scale"] == factor and opt.stats["lr"] == pytest.approx(0.1 * factor)


def test_rules_leave_the_lr_alone_at_the_reference_batch():
    model = _model()
    inner = torch.optim.SGD(model.parameters(), lr=0.1)
    opt = wrap(inner, microbatch_size=8, rule="linear")  # ref_batch defaults to the first step's batch
    seen = _record_inner_groups(inner, opt)
    _train(model, opt, steps=2)
    assert [s["lr"] for s in seen] == [0.1, 0.1] and opt.ref_batch == 32.0


@pytest.mark.parametrize(
    "make",
    [lambda p: torch.optim.SGD(p, lr=0.1), lambda p: torch.optim.Adam(p, lr=0.01)],
    ids=["sgd", "adam"],
)
def test_noise_rule_matches_laws(make):
    model = _model()
    inner = make(model.parameters())
    lr = inner.param_groups[0]["lr"]
    opt = wrap(inner, microbatch_size=8, rule="noise", ref_batch=16, beta=0.5)
    seen = _record_inner_groups(inner, opt)
    _train(model, opt, steps=6)
    # The scale uses the reading that includes the step's own gradients (updated before the inner step).
    assert any(s["noise_scale"] is not None for s in seen)
    for s in seen:
        expected = laws.lr_scale(32.0, 16.0, s["noise_scale"], rule="noise", optimizer=opt.law)
        assert s["lr"] == pytest.approx(lr * expected, rel=1e-12)
    assert len({s["lr"] for s in seen}) > 1  # the factor follows the reading
    assert opt.param_groups[0]["lr"] == lr


def test_scale_adam_hparams_uses_the_sqrt_rule_and_restores():
    model = _model()
    inner = torch.optim.Adam(model.parameters(), lr=0.01, betas=(0.9, 0.999), eps=1e-8)
    opt = wrap(inner, microbatch_size=8, rule="sqrt", ref_batch=16, scale_adam_hparams=True)
    seen = _record_inner_groups(inner, opt)
    _train(model, opt, steps=2)
    expected = laws.sqrt_rule(2.0, 0.01, betas=(0.9, 0.999), eps=1e-8)
    for s in seen:
        assert s["lr"] == pytest.approx(expected.lr)
        assert s["betas"] == pytest.approx(expected.betas) and s["betas"] == pytest.approx((0.8, 0.998))
        assert s["eps"] == pytest.approx(1e-8 / math.sqrt(2.0))
    group = opt.param_groups[0]
    assert (group["lr"], group["betas"], group["eps"]) == (0.01, (0.9, 0.999), 1e-8)


def test_scale_adam_hparams_out_of_range_is_a_runtime_error():
    model = _model()
    inner = torch.optim.Adam(model.parameters(), lr=0.01)
    # κ = 32/2 = 16 > 1/(1 - 0.9): β1 would become negative.
    opt = wrap(inner, microbatch_size=8, rule="sqrt", ref_batch=2, scale_adam_hparams=True)
    with pytest.raises(RuntimeError, match="scale_adam_hparams=False or a larger ref_batch"):
        _train(model, opt, steps=1)
    assert opt.param_groups[0]["betas"] == (0.9, 0.999) and opt.param_groups[0]["lr"] == 0.01


@pytest.mark.parametrize(
    "make",
    [lambda p: torch.optim.SGD(p, lr=0.1), lambda p: torch.optim.AdamW(p, lr=0.01)],
    ids=["sgd", "adamw"],
)
def test_optimal_lr_and_peak_batch_are_reported(make):
    model = _model()
    inner = make(model.parameters())
    lr = inner.param_groups[0]["lr"]
    opt = wrap(inner, microbatch_size=8, beta=0.5)  # observe only: no rule
    _train(model, opt, steps=4, k=2)  # batch 16: the reference (the first step's batch)
    _train(model, opt, steps=2, k=4, seed=2)  # batch 32
    stats = opt.stats
    ns = opt.noise_scale
    assert ns is not None and stats["batch_size"] == 32.0 and opt.ref_batch == 16.0
    assert stats["optimal_lr"] == pytest.approx(lr * laws.lr_scale(32.0, 16.0, ns, rule="noise", optimizer=opt.law))
    assert stats["peak_batch"] == laws.peak_batch(ns, optimizer=opt.law)
    assert stats["peak_batch"] == (math.inf if opt.law == "sgd" else pytest.approx(ns))
    assert stats["lr_scale"] == 1.0 and opt.param_groups[0]["lr"] == lr


@pytest.mark.parametrize("kind", ["sgd", "adamw"])
def test_without_measurable_noise_the_reported_optimal_lr_is_the_one_applied(kind):
    # Every microbatch the same: tr(Σ) = 0 and B_noise reads 0. The applied LR scale takes the law's B_noise → 0
    # limit; the reported optimal LR must be that same value (it read NaN), the peak LR has no bound.
    model = _model()
    inner = torch.optim.SGD(model.parameters(), lr=0.1) if kind == "sgd" else torch.optim.AdamW(model.parameters())
    lr = inner.param_groups[0]["lr"]
    opt = wrap(inner, microbatch_size=8, rule="noise", ref_batch=8, beta=0.5)
    x, y = torch.randn(8, 4, generator=torch.Generator().manual_seed(0)), torch.zeros(8, 1)
    for _ in range(3):
        for _ in range(4):
            (torch.nn.functional.mse_loss(model(x), y) / 4).backward()
        opt.step()
        opt.zero_grad()
    stats = opt.stats
    assert stats["noise_scale"] == 0.0 and stats["batch_size"] == 32.0
    expected = 1.0 if kind == "sgd" else 0.5  # the linear rule's limit 1 (SGD), √(8/32) (Adam)
    assert stats["lr_scale"] == pytest.approx(expected) and stats["optimal_lr"] == pytest.approx(lr * expected)
    assert math.isnan(stats["lr_max"]) and stats["peak_batch"] == (math.inf if kind == "sgd" else 0.0)


@pytest.mark.slow
def test_torch_compile_model(tmp_path, monkeypatch):
    # The compiler's files go under tmp_path (its precompiled header ignores TORCHINDUCTOR_CACHE_DIR).
    monkeypatch.setenv("TMPDIR", str(tmp_path))
    monkeypatch.setenv("TORCHINDUCTOR_CACHE_DIR", str(tmp_path / "inductor"))
    monkeypatch.setattr(tempfile, "tempdir", None)
    # aot_eager traces forward and backward into one autograd Function as inductor does, so the gradient
    # hooks see the same thing, without a C++ build (20-60 s on 2 cores);
    # BSCALE_TEST_COMPILE_BACKEND=inductor runs the full path.
    backend = os.environ.get("BSCALE_TEST_COMPILE_BACKEND", "aot_eager")
    torch._dynamo.reset()
    results = []
    for compiled in (False, True):
        model = _model()
        forward = torch.compile(model, backend=backend) if compiled else model
        opt = wrap(torch.optim.SGD(model.parameters(), lr=0.05), microbatch_size=8, beta=0.5)
        _train(forward, opt, steps=4, k=3)
        results.append((opt, [p.detach().clone() for p in model.parameters()]))
    (eager, p_eager), (comp, p_comp) = results
    assert comp.stats["microbatches"] == 3.0 and comp.noise_scale is not None
    assert comp.noise_scale == pytest.approx(eager.noise_scale, rel=1e-4)
    assert all(torch.allclose(a, b, atol=1e-6) for a, b in zip(p_eager, p_comp, strict=True))
    torch._dynamo.reset()
