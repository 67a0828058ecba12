"""Live gradient noise scale on scikit-learn's digits: an MLP, AdamW, 4 microbatches per step.

    python examples/quickstart.py

The loop is a plain PyTorch loop; the two bscale lines are marked.
"""

from __future__ import annotations

import torch
from sklearn.datasets import load_digits
from torch import nn

import bscale

torch.manual_seed(0)
X, y = load_digits(return_X_y=True)
X = torch.tensor(X / 16.0, dtype=torch.float32)
y = torch.tensor(y)

model = nn.Sequential(nn.Linear(64, 128), nn.ReLU(), nn.Linear(128, 10))
micro, accum = 16, 4
opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
opt = bscale.wrap(opt, microbatch_size=micro)  # bscale line 1
sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=300)

for step in range(300):
    idx = torch.randint(len(X), (micro * accum,))
    for xb, yb in zip(X[idx].chunk(accum), y[idx].chunk(accum), strict=True):
        loss = nn.functional.cross_entropy(model(xb), yb) / accum
        loss.backward()
    torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
    opt.step()
    opt.zero_grad(set_to_none=True)
    sched.step()
    if (step + 1) % 50 == 0:
        s = opt.stats  # bscale line 2
        print(
            f"step {step + 1}: loss {loss.item() * accum:.3f}  "
            f"B_noise {bscale.format_noise_scale(s['noise_scale'], s['noise_scale_stderr'])} examples  "
            f"(batch {int(s['batch_size'])}); Adam's optimal LR would peak at {s['lr_max']:.2e} "
            f"with a batch of {s['peak_batch']:.0f}"
        )
