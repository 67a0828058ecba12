"""|.grad|² is read once per step, at the expected last backward; a changed accumulation count falls back safely."""

from __future__ import annotations

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
