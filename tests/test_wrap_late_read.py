"""|.grad|² is read once per step, at the expected last backward; a changed accumulation count falls back safely."""

from __future__ import annotations

import pytest
import torch

import bscale


def _run(counts, *, clip_at=(), eager=False, seed=0):
    torch.manual_seed(seed)
    model = torch.nn.Linear(6, 1)
    opt = bscale.wrap(torch.optim.SGD(model.parameters(), lr=0.01), microbatch_size=4)
    gen = torch.Generator().manual_seed(seed + 1)
    for step, k in enumerate(counts):
        if eager:
            opt._expected_k = None  # read after every backward: the reference behaviour
        for _ in range(k):
            x = torch.randn(4, 6, generator=gen)
            y = x.sum(1, keepdim=True) + torch.randn(4, 1, generator=gen)
            (torch.nn.functional.mse_loss(model(x), y) / k).backward()
        if step in clip_at:
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1e-3)
        opt.step()
        opt.zero_grad()
    return opt


def test_once_per_step_read_equals_reading_after_every_backward():
    counts = [4, 4, 3, 4, 5, 2, 4]
    lazy, eager = _run(counts), _run(counts, eager=True)
    assert lazy.estimator.state_dict() == eager.estimator.state_dict()
    assert lazy.stats["examples"] == eager.stats["examples"] == 4 * sum(counts)


def test_fewer_backwards_and_clipping_skips_only_that_step():
    counts = [4, 4, 3, 4]
    clipped = _run(counts, clip_at=(2,))
    # Step 2 (3 backwards where 4 were expected) had its .grad clipped before step(): it is left out.
    assert clipped.estimator.steps == len(counts) - 1
    # Clipping on a step whose count was expected changes nothing: the read happened before the clip.
    # (Compared up to the clipped step: the clipped update changes every later gradient.)
    assert _run([4, 4], clip_at=(1,)).estimator.state_dict() == _run([4, 4]).estimator.state_dict()


def _batches_and_scales(counts, *, clip, rule_kwargs):
    """Each step's (batch_size, lr_scale, examples) from a linear-rule run at lr 0 with `counts` microbatches."""
    torch.manual_seed(0)
    model = torch.nn.Linear(6, 1)
    opt = bscale.wrap(torch.optim.SGD(model.parameters(), lr=0.0), microbatch_size=4, **rule_kwargs)
    gen = torch.Generator().manual_seed(1)
    rows = []
    for k in counts:
        for _ in range(k):
            x = torch.randn(4, 6, generator=gen)
            (torch.nn.functional.mse_loss(model(x), x.sum(1, keepdim=True)) / k).backward()
        if clip:
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1e-3)
        opt.step()
        opt.zero_grad()
        rows.append((opt.stats["batch_size"], opt.stats["lr_scale"], opt.stats["examples"]))
    return rows, opt


@pytest.mark.filterwarnings("ignore:bscale. one microbatch per step:RuntimeWarning")  # the unclipped k = 1 step
def test_a_step_left_out_still_counts_its_examples_and_scales_its_lr_for_its_batch():
    counts = [3, 3, 2, 1, 3]  # a shorter accumulation (an epoch's end), clipped before step()
    clipped, opt = _batches_and_scales(counts, clip=True, rule_kwargs={"rule": "linear", "ref_batch": 12})
    plain, _ = _batches_and_scales(counts, clip=False, rule_kwargs={"rule": "linear", "ref_batch": 12})
    assert opt.estimator.steps == 3  # the two shorter steps could not be read
    assert clipped == plain
    assert [r[0] for r in clipped] == [4.0 * k for k in counts]
    assert clipped[-1][2] == 4.0 * sum(counts)


def test_a_grad_scaler_unscaling_before_a_shorter_step_leaves_that_step_out():
    # GradScaler's unscale (its unscale_(), or its step() on a non-fused optimizer) divides .grad in place
    # without bumping its version: a late read would take unscaled gradients for scaled ones.
    counts = [3, 3, 2, 3]
    readings = []
    for explicit_unscale in (False, True):
        torch.manual_seed(0)
        model = torch.nn.Linear(6, 1)
        scaler = torch.amp.GradScaler("cpu", init_scale=2.0**8)
        opt = bscale.wrap(torch.optim.AdamW(model.parameters(), lr=0.0), microbatch_size=4, grad_scaler=scaler)
        gen = torch.Generator().manual_seed(1)
        for k in counts:
            for _ in range(k):
                x = torch.randn(4, 6, generator=gen)
                scaler.scale(torch.nn.functional.mse_loss(model(x), x.sum(1, keepdim=True)) / k).backward()
            if explicit_unscale:
                scaler.unscale_(opt)
            scaler.step(opt)
            scaler.update()
            opt.zero_grad()
        assert opt.estimator.steps == 3
        readings.append(opt.estimator.state_dict())
    reference = _run_reference_without_the_short_step(counts)
    assert readings[0] == readings[1] == reference


def _run_reference_without_the_short_step(counts):
    """The same data without a scaler, with the shorter step's statistics left out by hand (skipped data, its
    examples still counted)."""
    torch.manual_seed(0)
    model = torch.nn.Linear(6, 1)
    opt = bscale.wrap(torch.optim.AdamW(model.parameters(), lr=0.0), microbatch_size=4)
    gen = torch.Generator().manual_seed(1)
    for step, k in enumerate(counts):
        for _ in range(k):
            x = torch.randn(4, 6, generator=gen)
            loss = torch.nn.functional.mse_loss(model(x), x.sum(1, keepdim=True)) / k
            if step != 2:
                loss.backward()
        if step != 2:
            opt.step()
            opt.zero_grad()
        else:  # the step left out was still trained on: its examples weigh the next reading
            opt._pending_examples += 4.0 * k
    return opt.estimator.state_dict()
