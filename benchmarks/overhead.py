"""Step-time overhead and extra memory of bscale.wrap against the bare optimizer, measured interleaved in one run.

Each repetition times one full training step (k microbatch forward/backward passes, clipping, step, zero_grad) of
the bare optimizer and of the wrapped one on identical copies of the model and identical data, alternating which
goes first; the table reports the median of the per-repetition ratios, so drifts of a shared machine cancel.

    python benchmarks/overhead.py            # writes benchmarks/results/overhead.md
    python benchmarks/overhead.py --quick    # fewer repetitions
"""

from __future__ import annotations

import argparse
import copy
import platform
import statistics
import sys
import time
from pathlib import Path

import torch
from torch import nn

import bscale
from bscale.demo import CharData, CharTransformer, ModelConfig, load_text

RESULTS = Path(__file__).parent / "results" / "overhead.md"


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def _transformer(device):
    data = CharData(load_text(), context=64, seed=0)
    model = CharTransformer(ModelConfig(vocab=data.vocab)).to(device)

    def batches(k, micro=16):
        return [tuple(t.to(device) for t in data.batch(micro)) for _ in range(k)]

    def loss_fn(m, xy):
        return m(*xy)[1]

    return model, batches, loss_fn, 16 * 64


def _mlp(device):
    model = nn.Sequential(nn.Linear(64, 512), nn.ReLU(), nn.Linear(512, 512), nn.ReLU(), nn.Linear(512, 10)).to(device)
    gen = torch.Generator().manual_seed(0)

    def batches(k, micro=64):
        return [
            (
                torch.randn(micro, 64, generator=gen).to(device),
                torch.randint(10, (micro,), generator=gen).to(device),
            )
            for _ in range(k)
        ]

    def loss_fn(m, xy):
        return nn.functional.cross_entropy(m(xy[0]), xy[1])

    return model, batches, loss_fn, 64


def _step(model, opt, micro, loss_fn, k):
    for xy in micro:
        (loss_fn(model, xy) / k).backward()
    torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
    opt.step()
    opt.zero_grad(set_to_none=True)


def measure(name: str, factory, *, k: int, reps: int, warmup: int, device: torch.device, **wrap_kwargs):
    model, batches, loss_fn, micro_size = factory(device)
    bare_model = copy.deepcopy(model)
    bare = torch.optim.AdamW(bare_model.parameters(), lr=1e-4)
    wrapped = bscale.wrap(torch.optim.AdamW(model.parameters(), lr=1e-4), microbatch_size=micro_size, **wrap_kwargs)
    ratios, cpu_ratios, t_bare, t_wrap = [], [], [], []
    for rep in range(warmup + reps):
        micro = batches(k)
        order = [(bare_model, bare), (model, wrapped)]
        if rep % 2:
            order.reverse()
        times = {}
        for m, o in order:
            _sync(device)
            t0, c0 = time.perf_counter(), time.thread_time()
            _step(m, o, micro, loss_fn, k)
            _sync(device)
            times[id(o)] = time.perf_counter() - t0
            # This thread's CPU time: with one torch thread it is the step's own work, and other processes on
            # a shared machine do not inflate it the way they inflate wall time.
            times[-id(o)] = time.thread_time() - c0
        if rep >= warmup:
            t_bare.append(times[id(bare)])
            t_wrap.append(times[id(wrapped)])
            ratios.append(times[id(wrapped)] / times[id(bare)])
            cpu_ratios.append(times[-id(wrapped)] / times[-id(bare)])
    n_params = sum(p.numel() for p in model.parameters())
    mem = wrapped.memory_bytes()
    return {
        "workload": name,
        "k": k,
        "params": n_params,
        "bare_ms": 1e3 * statistics.median(t_bare),
        "wrapped_ms": 1e3 * statistics.median(t_wrap),
        "ratio": statistics.median(ratios),
        "ratio_q1": statistics.quantiles(ratios, n=4)[0],
        "ratio_q3": statistics.quantiles(ratios, n=4)[2],
        "cpu_ratio": statistics.median(cpu_ratios),
        "cpu_q1": statistics.quantiles(cpu_ratios, n=4)[0],
        "cpu_q3": statistics.quantiles(cpu_ratios, n=4)[2],
        "persistent_bytes": mem["persistent"],
        "transient_bytes": mem["transient_peak"],
        "param_bytes": n_params * 4,
        "noise_scale": wrapped.stats.get("noise_scale", float("nan")),
    }


def _cpu(r: dict) -> str:
    if "cpu_ratio" not in r:
        return "–"  # multi-process rows: waiting on the other rank is not CPU time
    return f"{r['cpu_ratio']:.3f} [{r['cpu_q1']:.3f}, {r['cpu_q3']:.3f}]"


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true")
    p.add_argument("--reps", type=int, default=None)
    p.add_argument("--threads", type=int, default=1, help="torch threads (default 1: steadier on a shared machine)")
    p.add_argument("--out", default=str(RESULTS))
    p.add_argument("--skip-ddp", action="store_true")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    reps = args.reps or (15 if args.quick else 60)
    rows = []
    configs = [
        ("char transformer (240k params), AdamW", _transformer, 4, {}),
        ("MLP (300k params), AdamW", _mlp, 4, {}),
    ]
    if hasattr(bscale.kernels, "coordinate_stats"):
        configs.append(("char transformer, per-coordinate mode", _transformer, 4, {"per_coordinate": True}))
    for name, factory, k, kw in configs:
        rows.append(measure(name, factory, k=k, reps=reps, warmup=3, device=device, **kw))
        print(rows[-1], file=sys.stderr)
    ddp_rows = []
    if not args.skip_ddp:
        try:
            from overhead_ddp import run as run_ddp  # benchmarks/overhead_ddp.py
        except ImportError:
            run_ddp = None
        if run_ddp is not None:
            ddp_rows = run_ddp(reps=reps)
    cmd = " ".join(["python benchmarks/overhead.py", *(argv if argv is not None else sys.argv[1:])])
    lines = [
        "# Step-time overhead and memory of `bscale.wrap`",
        "",
        f"Command: `{cmd}` (threads={args.threads}, {reps} interleaved repetitions after 3 warm-up steps)",
        f"Machine: {platform.platform()}, {device.type}, torch {torch.__version__}, "
        f"{torch.get_num_threads()} thread(s).",
        "",
        "Each step: k microbatch forward/backward passes, `clip_grad_norm_`, `step()`, `zero_grad()`. Ratio = median",
        "of per-repetition (wrapped / bare) step times, bare and wrapped alternating order; IQR in brackets.",
        "The CPU-time ratio uses this thread's CPU time (one torch thread), which other processes on the shared",
        "machine do not inflate; wall time includes them.",
        "Target: ratio ≤ 1.02 in the default mode, ≤ 1.05 with per-coordinate statistics.",
        "",
        "| workload | k | bare ms | wrapped ms | ratio [IQR] | CPU-time ratio [IQR] | persistent extra "
        "| transient peak | per-param copy |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows + ddp_rows:
        lines.append(
            f"| {r['workload']} | {r['k']} | {r['bare_ms']:.1f} | {r['wrapped_ms']:.1f} | "
            f"{r['ratio']:.3f} [{r['ratio_q1']:.3f}, {r['ratio_q3']:.3f}] | {_cpu(r)} | "
            f"{r['persistent_bytes'] / 1024:.1f} KiB | "
            f"{r['transient_bytes'] / 1024:.1f} KiB | {r['persistent_bytes'] / r['param_bytes']:.2%} of fp32 params |"
        )
    lines += [
        "",
        "Memory: *persistent* is what the wrapper keeps between steps (two float32 scalars per parameter tensor;",
        "in per-coordinate mode one float32 copy of the parameters). *Transient peak* is the microbatch gradients",
        "held until their bucket's fused launch (bounded by `bucket_mb`, default 32 MiB); on the first microbatch",
        "these are the `.grad` tensors themselves, so only later microbatches extend a gradient's lifetime.",
    ]
    Path(args.out).write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.path.insert(0, str(Path(__file__).parent))
    raise SystemExit(main())
