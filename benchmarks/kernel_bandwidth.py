"""Achieved memory bandwidth of the gradient-statistics kernels against the device's copy bandwidth.

Each path is timed on the same inputs; bytes are what a single fused pass must move (reads + writes of the
gradients and buffers, outputs of a few floats ignored). Rows:

- ``copy``: ``dst.copy_(src)``, float32, the device's practical bandwidth (8 bytes per element).
- ``sq_norms`` / ``accumulate`` (4 B/elem), ``accumulate+coord`` (12 B/elem: g read, coord_sq read+write),
  ``coordinate_stats`` (16 B/elem: S, coord_sq, v read, coord_sq zeroed): the torch path, the Triton path
  (CUDA only), and a *floor*: the one-pass torch op moving the same bytes without doing the statistic
  (``_foreach_norm`` for norms, ``_foreach_addcmul_`` with the same operands for the others). The ratio
  column is time / floor time.
- ``coordinate_stats`` also has an *eager* row: the same statistics written in plain eager torch, one op per
  term (:func:`plain_coordinate_stats`), the torch equivalent a user would write.

Medians of interleaved repeats (every path once per round, so drifting clocks and neighbours hit all alike).

    python benchmarks/kernel_bandwidth.py            # full run, writes benchmarks/results/kernel_bandwidth.md
    python benchmarks/kernel_bandwidth.py --quick    # small sizes, a few seconds
"""

from __future__ import annotations

import argparse
import platform
import shlex
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import bscale.kernels as K  # noqa: E402
from bscale.kernels.dispatch import triton_available  # noqa: E402


def gpt2_small_shapes(layers: int = 12, vocab: int = 50257, ctx: int = 1024, d: int = 768) -> list[tuple[int, ...]]:
    """Parameter shapes of GPT-2 small (124M parameters with the defaults)."""
    shapes: list[tuple[int, ...]] = [(vocab, d), (ctx, d)]
    for _ in range(layers):
        shapes += [(d,), (d,)]  # ln_1
        shapes += [(d, 3 * d), (3 * d,), (d, d), (d,)]  # attn c_attn, c_proj
        shapes += [(d,), (d,)]  # ln_2
        shapes += [(d, 4 * d), (4 * d,), (4 * d, d), (d,)]  # mlp c_fc, c_proj
    shapes += [(d,), (d,)]  # ln_f
    return shapes


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _time(fn: Callable[[], object], device: torch.device) -> float:
    _sync(device)
    t0 = time.perf_counter()
    fn()
    _sync(device)
    return time.perf_counter() - t0


def measure(cases: dict[str, Callable[[], object]], device: torch.device, repeats: int) -> dict[str, float]:
    """Median seconds per case over `repeats` interleaved rounds, after one warm-up call each."""
    for fn in cases.values():
        fn()
    samples: dict[str, list[float]] = {name: [] for name in cases}
    for _ in range(repeats):
        for name, fn in cases.items():
            samples[name].append(_time(fn, device))
    return {name: statistics.median(v) for name, v in samples.items()}


@torch.no_grad()
def plain_coordinate_stats(
    sums: list[torch.Tensor], coord: list[torch.Tensor], k: int, b: float, v: list[torch.Tensor], edges: torch.Tensor
) -> torch.Tensor:
    """The statistics of `coordinate_stats` as a user would write them in eager torch: float32, one op per
    term on each whole tensor, the histogram by `bucketize`, and `coord` zeroed after. The *eager* baseline.

    Returns Σ μ̂², Σ σ̂², Σ μ̂²/σ̂, Σ σ̂, the count inside the regime, Σ P²m2, Σ P²μ̂², then the histogram."""
    big_b, terms, hist = k * b, [], torch.zeros(edges.numel() + 1, device=edges.device)
    for s, c, a in zip(sums, coord, v, strict=True):
        mu = s / k
        m2 = c / k
        sigma_sq = (m2 - mu * mu).clamp_min_(0.0).mul_(b * k / (k - 1))
        sigma = sigma_sq.sqrt()
        p_sq = (a.sqrt() + 1e-8).reciprocal_().square_()
        mu_sq = mu * mu
        live = (mu != 0) | (sigma_sq > 0)  # a coordinate with no gradient has no SNR: counted apart
        snr = torch.where(sigma > 0, mu.abs() / sigma, torch.inf)[live]
        inside = ((mu == 0) | (big_b * 2.0 * mu_sq < torch.pi * sigma_sq))[live]
        terms.append(
            torch.stack(
                [
                    mu_sq.sum(),
                    sigma_sq.sum(),
                    torch.where(sigma > 0, mu_sq / sigma, 0.0).sum(),
                    sigma.sum(),
                    inside.sum(dtype=torch.float32),
                    (p_sq * m2).sum(),
                    (p_sq * mu_sq).sum(),
                ]
            )
        )
        hist += torch.bincount(torch.bucketize(snr, edges, right=True), minlength=hist.numel())
        c.zero_()
    return torch.cat([torch.stack(terms).sum(0), hist])


def bench_workload(shapes: list[tuple[int, ...]], device: torch.device, repeats: int) -> list[dict]:
    """Time every path on one set of float32 parameter shapes; return table rows."""
    n = sum(torch.Size(s).numel() for s in shapes)
    grads = [torch.randn(s, device=device) for s in shapes]
    coord = [torch.rand(s, device=device) for s in shapes]
    sums = [torch.randn(s, device=device) for s in shapes]
    v = [torch.rand(s, device=device) for s in shapes]
    out = torch.zeros(len(shapes), device=device)
    slots = torch.arange(len(shapes), device=device)
    src, dst = torch.randn(n, device=device), torch.empty(n, device=device)
    edges = torch.logspace(-3, 1, 17, device=device)
    backends = ["torch"] + (["triton"] if device.type == "cuda" and triton_available() else [])

    ops: dict[str, tuple[int, Callable[[], object], dict[str, Callable[[], object]]]] = {
        "sq_norms": (
            4,
            lambda: torch._foreach_norm(grads),
            {b: (lambda b=b: K.sq_norms(grads, backend=b)) for b in backends},
        ),
        "accumulate": (
            4,
            lambda: torch._foreach_norm(grads),
            {b: (lambda b=b: K.accumulate_sq_norms(grads, out, slots, backend=b)) for b in backends},
        ),
        "accumulate+coord": (
            12,
            lambda: torch._foreach_addcmul_(coord, grads, grads),
            {b: (lambda b=b: K.accumulate_sq_norms(grads, out, slots, coord_sq=coord, backend=b)) for b in backends},
        ),
        "coordinate_stats": (
            16,
            lambda: torch._foreach_addcmul_(coord, sums, v),
            {
                "eager": lambda: plain_coordinate_stats(sums, coord, 8, 4.0, v, edges),
                **{
                    b: (lambda b=b: K.coordinate_stats(sums, coord, 8, 4.0, exp_avg_sq=v, reset=True, backend=b))
                    for b in backends
                },
            },
        ),
    }
    rows = []
    copy_s = measure({"copy": lambda: dst.copy_(src)}, device, repeats)["copy"]
    copy_bw = 8 * n / copy_s
    rows.append({"op": "copy", "path": "dst.copy_(src)", "n": n, "s": copy_s, "bw": copy_bw, "ratio": None})
    for op, (bytes_per, floor_fn, paths) in ops.items():
        cases = {"floor": floor_fn, **paths}
        times = measure(cases, device, repeats)
        for path, sec in times.items():
            bw = bytes_per * n / sec
            ratio = None if path == "floor" else sec / times["floor"]
            rows.append({"op": op, "path": path, "n": n, "s": sec, "bw": bw, "ratio": ratio, "copy_bw": copy_bw})
    return rows


def _fmt_rows(rows: list[dict]) -> list[str]:
    lines = [
        "| op | path | elements | median time | GB/s | % of copy | time / floor |",
        "|---|---|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        copy_bw = r.get("copy_bw", r["bw"])
        ratio = "" if r["ratio"] is None else f"{r['ratio']:.2f}×"
        lines.append(
            f"| {r['op']} | {r['path']} | {r['n']:.3g} | {r['s'] * 1e3:.3f} ms | {r['bw'] / 1e9:.2f} | "
            f"{100 * r['bw'] / copy_bw:.0f}% | {ratio} |"
        )
    return lines


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="small sizes and few repeats (seconds)")
    parser.add_argument("--device", default=None, help="cuda or cpu (default: cuda when available)")
    parser.add_argument("--repeats", type=int, default=None, help="interleaved rounds per case")
    parser.add_argument("--max-elements", type=float, default=None, help="largest single-tensor size")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    parser.add_argument("--output", type=Path, default=ROOT / "benchmarks" / "results" / "kernel_bandwidth.md")
    args = parser.parse_args(argv)

    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    if args.threads:
        torch.set_num_threads(args.threads)
    repeats = args.repeats or (3 if args.quick else 7)
    # 1e8 float32 elements: ~2.4 GB of buffers (six tensors), ~1 s per coordinate_stats call on one CPU core.
    default_max = 1e6 if args.quick else 1e8
    max_elements = int(args.max_elements or default_max)
    sizes = [s for s in (10**4, 10**5, 10**6, 10**7, 10**8) if s <= max_elements]
    mix = gpt2_small_shapes(layers=1, vocab=4096) if args.quick else gpt2_small_shapes()

    sections: list[tuple[str, list[dict]]] = []
    for size in sizes:
        print(f"single tensor of {size:.0e} elements", flush=True)
        sections.append((f"One float32 tensor of {size:.0e} elements", bench_workload([(size,)], device, repeats)))
    mix_n = sum(torch.Size(s).numel() for s in mix)
    print(f"GPT-2 small mix: {len(mix)} tensors, {mix_n:.3g} elements", flush=True)
    title = "GPT-2 small parameter shapes" + (" (quick: 1 layer, vocab 4096)" if args.quick else "")
    sections.append((f"{title}: {len(mix)} tensors, {mix_n:,} elements", bench_workload(mix, device, repeats)))

    command = "python " + " ".join(shlex.quote(a) for a in ["benchmarks/kernel_bandwidth.py", *(argv or sys.argv[1:])])
    if device.type == "cuda":
        dev_line = f"{torch.cuda.get_device_name(device)} (CUDA {torch.version.cuda})"
    else:
        dev_line = f"CPU {platform.processor() or platform.machine()}, {torch.get_num_threads()} torch threads"
    lines = [
        "# Kernel bandwidth",
        "",
        f"Command: `{command}`",
        "",
        f"Device: {dev_line}; torch {torch.__version__}; "
        f"triton {'available' if triton_available() else 'not installed'}; "
        f"median of {repeats} interleaved rounds.",
        "",
        "Bytes counted per element: copy 8, sq_norms/accumulate 4, accumulate+coord 12, coordinate_stats 16 "
        "(with Adam's v, reset on). *floor* is the one-pass torch op moving the same bytes without the "
        "statistic; *eager* computes coordinate_stats' statistics in plain eager torch, one op per term; "
        "*time / floor* is the path's median time over the floor's.",
        "",
    ]
    if device.type != "cuda":
        lines += [
            "**GPU: not measured: no GPU available in this run.** The Triton rows appear when the same "
            "command "
            "runs on a CUDA device.",
            "",
        ]
    for title, rows in sections:
        lines += [f"## {title}", "", *_fmt_rows(rows), ""]
    args.output.parent.mkdir(parents=True, exist_ok=True)
    args.output.write_text("\n".join(lines))
    print("\n".join(lines))


if __name__ == "__main__":
    main()
