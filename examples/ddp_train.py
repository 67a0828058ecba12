"""Data-parallel training with a live gradient noise scale, checkpoints, and resumption after a lost rank.

    torchrun --nproc_per_node=2 examples/ddp_train.py                      # CPU (gloo) or GPUs (nccl)
    torchrun --nproc_per_node=2 --max-restarts=1 examples/ddp_train.py --fail-at-step 60 --ckpt-dir runs/ddp_fail

A small MLP learns scikit-learn's digits. Each step every rank runs ``--accum`` microbatches, all but the
last under ``no_sync()``, so gradients cross ranks once per step; bscale takes the per-rank microbatch
gradients as the small batch and the synchronised gradient as the big one (k = world × accum microbatches),
and its few scalars per step travel in DDP's own gradient all-reduce (``ddp=``). Rank 0 prints B_noise ± its
standard error and saves model and optimizer state every ``--ckpt-every`` steps (the optimizer's state dict
carries the estimator); a restarted job (or a new run in the same ``--ckpt-dir``) resumes from the last
checkpoint. Every microbatch is drawn from a generator seeded by
(seed, step, rank, microbatch), so a resumed run repeats the uninterrupted one exactly.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import os
import sys
from datetime import timedelta
from pathlib import Path

import torch
import torch.distributed as dist
from torch import nn

import bscale


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--steps", type=int, default=200, help="optimizer steps in all (default: 200)")
    p.add_argument("--accum", type=int, default=2, help="microbatches per rank per step (default: 2)")
    p.add_argument("--micro-batch", type=int, default=16, help="examples per microbatch (default: 16)")
    p.add_argument("--lr", type=float, default=0.05, help="learning rate at the first step's batch (default: 0.05)")
    p.add_argument("--optimizer", choices=("sgd", "adamw"), default="sgd")
    p.add_argument(
        "--rule",
        choices=("none", "noise", "linear", "sqrt"),
        default="none",
        help="learning-rate scaling rule applied by bscale (default: none, observe only)",
    )
    p.add_argument("--ckpt-dir", default="runs/ddp_train", help="checkpoints go here (default: runs/ddp_train)")
    p.add_argument("--ckpt-every", type=int, default=50, help="save every N steps (default: 50)")
    p.add_argument("--log-every", type=int, default=10, help="print every N steps (default: 10)")
    p.add_argument(
        "--fail-at-step",
        type=int,
        default=-1,
        help="rank 1 exits with an error before this step, once (a marker file remembers it)",
    )
    p.add_argument("--out-json", default=None, help="rank 0 writes the final readings here")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--debug", action="store_true", help="check every step that all ranks agree (bscale debug)")
    return p.parse_args(argv)


def load_digits(device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    from sklearn.datasets import load_digits as sk_digits

    data = sk_digits()
    x = torch.tensor(data.data, dtype=torch.float32) / 16.0  # pixel values 0..16 → 0..1
    y = torch.tensor(data.target, dtype=torch.long)
    return x.to(device), y.to(device)


def microbatch(x: torch.Tensor, y: torch.Tensor, seed: int, step: int, rank: int, micro: int, size: int):
    """Examples drawn i.i.d. with replacement (as the estimator assumes), reproducible from their position."""
    g = torch.Generator().manual_seed(((seed * 1_000_003 + step) * 1_009 + rank) * 101 + micro)
    idx = torch.randint(len(x), (size,), generator=g).to(x.device)
    return x[idx], y[idx]


def init_distributed(backend: str) -> None:
    """``init_process_group`` that survives a torchrun restart.

    torchrun (2.13, ``--standalone``) hands restarted workers the same key-value store, still holding the
    dead attempt's keys; a restarted rank can read a dead peer's address from them and wait on it forever.
    Prefixing the store with the attempt number gives every attempt fresh keys.
    """
    attempt = os.environ.get("TORCHELASTIC_RESTART_COUNT")
    if attempt is None or os.environ.get("TORCHELASTIC_USE_AGENT_STORE") != "True":
        dist.init_process_group(backend)
        return
    store = dist.TCPStore(
        os.environ["MASTER_ADDR"],
        int(os.environ["MASTER_PORT"]),
        is_master=False,
        timeout=timedelta(minutes=5),
    )
    dist.init_process_group(
        backend,
        store=dist.PrefixStore(f"attempt{attempt}/", store),
        rank=int(os.environ["RANK"]),
        world_size=int(os.environ["WORLD_SIZE"]),
    )


def save_checkpoint(path: Path, model: nn.Module, opt: torch.optim.Optimizer, step: int) -> None:
    tmp = path.with_suffix(".tmp")
    torch.save({"model": model.state_dict(), "optimizer": opt.state_dict(), "step": step}, tmp)
    os.replace(tmp, path)  # atomic: a rank lost mid-save never leaves a torn checkpoint behind


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    use_cuda = torch.cuda.is_available()
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if use_cuda:
        torch.cuda.set_device(local_rank)
    init_distributed("nccl" if use_cuda else "gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    device = torch.device("cuda", local_rank) if use_cuda else torch.device("cpu")

    x, y = load_digits(device)
    torch.manual_seed(args.seed)
    model = nn.Sequential(nn.Linear(64, 128), nn.ReLU(), nn.Linear(128, 10)).to(device)
    if args.optimizer == "sgd":
        inner = torch.optim.SGD(model.parameters(), lr=args.lr, momentum=0.9)
    else:
        inner = torch.optim.AdamW(model.parameters(), lr=args.lr)
    ddp = nn.parallel.DistributedDataParallel(model, device_ids=[local_rank] if use_cuda else None)
    opt = bscale.wrap(
        inner,
        microbatch_size=args.micro_batch,
        rule=None if args.rule == "none" else args.rule,
        named_parameters=model.named_parameters(),
        ddp=ddp,  # the statistics travel with DDP's gradient all-reduce: no collective of their own
        debug=args.debug,
    )

    ckpt_dir = Path(args.ckpt_dir)
    ckpt = ckpt_dir / "last.pt"
    start = 0
    if ckpt.exists():
        state = torch.load(ckpt, map_location=device)
        model.load_state_dict(state["model"])  # in place: the DDP wrapper holds these same parameters
        opt.load_state_dict(state["optimizer"])  # includes bscale's estimator and counters
        start = state["step"]
        if rank == 0:
            print(f"resumed from step {start} ({ckpt})", flush=True)
    if rank == 0:
        print(f"{world} ranks × {args.accum} microbatches of {args.micro_batch} examples per step", flush=True)
    ckpt_dir.mkdir(parents=True, exist_ok=True)

    marker = ckpt_dir / "failed_once"
    for step in range(start, args.steps):
        if step == args.fail_at_step and rank == 1 and not marker.exists():
            marker.touch()
            print(f"rank 1: simulated failure before step {step}", file=sys.stderr, flush=True)
            sys.exit(1)
        total = 0.0
        for micro in range(args.accum):
            xb, yb = microbatch(x, y, args.seed, step, rank, micro, args.micro_batch)
            # Only the last microbatch synchronises gradients; bscale reads each microbatch before that.
            sync = contextlib.nullcontext() if micro == args.accum - 1 else ddp.no_sync()
            with sync:
                loss = nn.functional.cross_entropy(ddp(xb), yb) / args.accum
                loss.backward()
            total += loss.detach()
        opt.step()
        opt.zero_grad(set_to_none=True)
        done = step + 1
        if rank == 0 and (done % args.log_every == 0 or done == args.steps):
            s = opt.stats
            ns, se = s["noise_scale"], s["noise_scale_stderr"]
            reading = f"B_noise {ns:7.1f} ± {se:5.1f}" if math.isfinite(ns) else f"B_noise  n/a ({opt.reason})"
            print(
                f"step {done:5d}  loss {float(total):.4f}  batch {s['batch_size']:.0f}  {reading}  "
                f"lr_scale {s['lr_scale']:.3f}",
                flush=True,
            )
        if done % args.ckpt_every == 0 or done == args.steps:
            if rank == 0:
                save_checkpoint(ckpt, model, opt, done)
            dist.barrier()  # no rank runs ahead of a checkpoint it could be asked to resume from

    if rank == 0 and args.out_json:
        Path(args.out_json).write_text(json.dumps({**opt.stats, "steps": float(opt.steps)}, indent=1))
    dist.destroy_process_group()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
