"""The wrapper writes its stats every `log_every` steps through the loggers it is given: real files."""

from __future__ import annotations

import math

import torch
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

import bscale


def test_wrapper_logs_to_tensorboard_and_jsonl_every_n_steps(tmp_path):
    torch.manual_seed(0)
    model = torch.nn.Linear(8, 1)
    tb = bscale.TensorBoardLogger(tmp_path / "tb")
    jsonl = bscale.JSONLLogger(tmp_path / "log.jsonl")
    opt = bscale.wrap(torch.optim.SGD(model.parameters(), lr=0.01), microbatch_size=4, loggers=[tb, jsonl], log_every=3)
    w = torch.randn(8, 1)
    for _ in range(10):
        for _ in range(3):
            x = torch.randn(4, 8)
            (torch.nn.functional.mse_loss(model(x), x @ w) / 3).backward()
        opt.step()
        opt.zero_grad()
    tb.close()
    jsonl.close()

    records = bscale.read_jsonl(tmp_path / "log.jsonl")
    assert [r["step"] for r in records] == [3, 6, 9]
    assert records[-1]["batch_size"] == 12
    assert math.isfinite(records[-1]["noise_scale"])

    acc = EventAccumulator(str(tmp_path / "tb"))
    acc.Reload()
    events = acc.Scalars("bscale/noise_scale")
    assert [e.step for e in events] == [3, 6, 9]
    # TensorBoard stores float32.
    assert math.isclose(events[-1].value, records[-1]["noise_scale"], rel_tol=1e-6)
