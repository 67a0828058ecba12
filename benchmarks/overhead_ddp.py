"""Step-time overhead of bscale.wrap under 2-rank DDP (gloo, CPU), bare and wrapped interleaved in one run.

Each rank holds three DDP copies of the same model: one stepped by a bare AdamW, one by a wrapped AdamW
(``bscale.wrap``: its statistics in one small all-reduce of their own per step) and one by an AdamW wrapped
with ``ddp=model`` (the statistics ride DDP's last gradient bucket: no collective of their own). A repetition
times a block of consecutive full steps of each on identical data (k microbatches, ``no_sync()`` on all but
the last, clipping, step, zero_grad), in rotating order, with a barrier before each block. Timing blocks
rather than single steps matters: the wrapper's all-reduce inside ``step()`` waits for the slower rank, a wait
that a bare loop pays at DDP's all-reduce of the next step instead; within a block every variant pays it once
per step. Each wrapped variant's row reports rank 0's median of per-repetition (wrapped / bare) ratios of
block times, and the per-step medians.

    python benchmarks/overhead_ddp.py           # prints the markdown rows
    python benchmarks/overhead_ddp.py --quick

``benchmarks/overhead.py`` imports :func:`run` and adds these rows to its table.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from _stats import median_ci, quartiles  # benchmarks/_stats.py
from torch import nn

WORLD = 2
HEADER = (
    "| workload | k | bare ms | wrapped ms | ratio [IQR] | 95% CI of the median | persistent extra | transient peak "
    "| per-param copy |"
)


def _mlp() -> tuple[nn.Module, Any, Any, int]:
    model = nn.Sequential(nn.Linear(64, 512), nn.ReLU(), nn.Linear(512, 512), nn.ReLU(), nn.Linear(512, 10))

    def batches(gen: torch.Generator, k: int, micro: int = 64) -> list[tuple[torch.Tensor, torch.Tensor]]:
        return [(torch.randn(micro, 64, generator=gen), torch.randint(10, (micro,), generator=gen)) for _ in range(k)]

    def loss_fn(m: nn.Module, xy: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
        return nn.functional.cross_entropy(m(xy[0]), xy[1])

    return model, batches, loss_fn, 64


def _transformer() -> tuple[nn.Module, Any, Any, int]:
    from bscale.demo import CharData, CharTransformer, ModelConfig, load_text

    data = CharData(load_text(), context=64, seed=0)
    model = CharTransformer(ModelConfig(vocab=data.vocab))

    def batches(gen: torch.Generator, k: int, micro: int = 16) -> list[tuple[torch.Tensor, ...]]:
        return [data.batch(micro) for _ in range(k)]

    def loss_fn(m: nn.Module, xy: tuple[torch.Tensor, ...]) -> torch.Tensor:
        return m(*xy)[1]

    return model, batches, loss_fn, 16 * 64  # examples are tokens: 16 sequences of 64


WORKLOADS = {
    "mlp": ("MLP (300k params), AdamW", _mlp),
    "transformer": ("char transformer, AdamW", _transformer),
}


def _step(ddp: nn.Module, opt: torch.optim.Optimizer, micro: list, loss_fn: Any, k: int) -> None:
    for j, xy in enumerate(micro):
        with ddp.no_sync() if j < k - 1 else contextlib.nullcontext():
            (loss_fn(ddp, xy) / k).backward()
    torch.nn.utils.clip_grad_norm_(ddp.parameters(), 1.0)
    opt.step()
    opt.zero_grad(set_to_none=True)


def _worker(rank: int, init_file: str, out: str, workload: str, k: int, reps: int, warmup: int, block: int) -> None:
    import bscale

    torch.set_num_threads(1)  # one core per rank on a 2-core machine: steadier timings
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=WORLD)
    name, factory = WORKLOADS[workload]
    torch.manual_seed(0)
    model, batches, loss_fn, micro_size = factory()
    # Every arm trains a deep copy: a copy's tensors sit elsewhere in memory than the factory's and run ~1%
    # faster here, so no arm gets the original.
    models = [copy.deepcopy(model) for _ in range(3)]
    ddps = [nn.parallel.DistributedDataParallel(m) for m in models]
    opts = [
        torch.optim.AdamW(models[0].parameters(), lr=1e-4),
        bscale.wrap(torch.optim.AdamW(models[1].parameters(), lr=1e-4), microbatch_size=micro_size),
        bscale.wrap(torch.optim.AdamW(models[2].parameters(), lr=1e-4), microbatch_size=micro_size, ddp=ddps[2]),
    ]
    arms = list(zip(ddps, opts, strict=True))
    gen = torch.Generator().manual_seed(1 + rank)
    times: list[list[float]] = [[], [], []]
    for rep in range(warmup + reps):
        steps = [batches(gen, k) for _ in range(block)]
        spent = [0.0, 0.0, 0.0]
        for i in range(3):
            arm = (rep + i) % 3  # rotating order: each arm runs first, second and third equally often
            m, o = arms[arm]
            dist.barrier()
            t0 = time.perf_counter()
            for micro in steps:
                _step(m, o, micro, loss_fn, k)
            spent[arm] = (time.perf_counter() - t0) / block
        if rep >= warmup:
            for arm in range(3):
                times[arm].append(spent[arm])
    if rank == 0:
        n_params = sum(p.numel() for p in model.parameters())
        rows = []
        for arm, label in ((1, ""), (2, ", `ddp=model`")):
            ratios = [w / b for w, b in zip(times[arm], times[0], strict=True)]
            mem = opts[arm].memory_bytes()
            rows.append(
                {
                    "workload": f"{name}, DDP {WORLD}×gloo{label}",
                    "k": k,
                    "params": n_params,
                    "bare_ms": 1e3 * statistics.median(times[0]),
                    "wrapped_ms": 1e3 * statistics.median(times[arm]),
                    "ratio": quartiles(ratios),
                    "ci": median_ci(ratios),
                    "persistent_bytes": mem["persistent"],
                    "transient_bytes": mem["transient_peak"],
                    "param_bytes": n_params * 4,
                    "noise_scale": opts[arm].stats.get("noise_scale", float("nan")),
                }
            )
        torch.save(rows, out)
    dist.barrier()
    dist.destroy_process_group()


def run(
    reps: int = 60, k: int = 4, warmup: int = 3, workloads: tuple[str, ...] = ("mlp",), block: int = 5
) -> list[dict[str, Any]]:
    """Spawn a 2-rank gloo job per workload; two rows per workload (wrapped, and wrapped with ``ddp=``), keyed
    like overhead.py's table rows."""
    rows = []
    for workload in workloads:
        with tempfile.TemporaryDirectory() as d:
            out = str(Path(d) / "row.pt")
            args = (str(Path(d) / "init"), out, workload, k, reps, warmup, block)
            mp.spawn(_worker, args=args, nprocs=WORLD)
            rows.extend(torch.load(out, weights_only=False))
    return rows


def markdown_row(r: dict[str, Any]) -> str:
    """One row in the column layout of benchmarks/overhead.py's table."""
    return (
        f"| {r['workload']} | {r['k']} | {r['bare_ms']:.1f} | {r['wrapped_ms']:.1f} | "
        f"{r['ratio'][1]:.3f} [{r['ratio'][0]:.3f}, {r['ratio'][2]:.3f}] | {r['ci'][0]:.3f}–{r['ci'][1]:.3f} | "
        f"{r['persistent_bytes'] / 1024:.1f} KiB | {r['transient_bytes'] / 1024:.1f} KiB | "
        f"{r['persistent_bytes'] / r['param_bytes']:.2%} of fp32 params |"
    )


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true", help="15 repetitions instead of 60")
    p.add_argument("--block", type=int, default=5, help="consecutive steps timed together (default: 5)")
    p.add_argument("--reps", type=int, default=None)
    p.add_argument("--k", type=int, default=4, help="microbatches per rank per step (default: 4)")
    p.add_argument("--workloads", nargs="+", choices=sorted(WORKLOADS), default=["mlp"])
    args = p.parse_args(argv)
    reps = args.reps or (15 if args.quick else 60)
    rows = run(reps=reps, k=args.k, workloads=tuple(args.workloads), block=args.block)
    print(HEADER)
    print("|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        print(markdown_row(r))
    return 0


if __name__ == "__main__":
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # run from a checkout without installing
    raise SystemExit(main())
