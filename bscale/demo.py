"""The main job: a small character-level transformer on Python's own documentation, with live B_noise.

The text is ``pydoc_data.topics`` (present on every Python), so nothing is downloaded. AdamW trains through
:func:`bscale.wrap` with gradient accumulation; a progress bar shows the loss, the live noise scale with its standard
error and the LR scale; a JSONL log and a PNG plot of B_noise (and the batch size, when it grows) over the tokens
seen are written to ``--out``.
"""

from __future__ import annotations

import argparse
import math
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from einops import rearrange
from torch import nn

__all__ = ["CharTransformer", "load_text", "main", "run_demo"]


def load_text(max_chars: int | None = None) -> str:
    """Python's own documentation topics as one string (ships with CPython in ``pydoc_data``)."""
    from pydoc_data.topics import topics

    text = "\n\n".join(topics[k] for k in sorted(topics))
    return text if max_chars is None else text[:max_chars]


@dataclass(kw_only=True)
class ModelConfig:
    """Size of the character-level transformer."""

    vocab: int
    """Number of distinct characters."""
    context: int = 64
    """Tokens of context per sequence."""
    width: int = 96
    """Embedding width."""
    heads: int = 4
    """Attention heads."""
    layers: int = 2
    """Transformer blocks."""


class _Block(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.heads = cfg.heads
        self.ln1 = nn.LayerNorm(cfg.width)
        self.qkv = nn.Linear(cfg.width, 3 * cfg.width)
        self.proj = nn.Linear(cfg.width, cfg.width)
        self.ln2 = nn.LayerNorm(cfg.width)
        self.mlp = nn.Sequential(nn.Linear(cfg.width, 4 * cfg.width), nn.GELU(), nn.Linear(4 * cfg.width, cfg.width))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        q, k, v = rearrange(self.qkv(self.ln1(x)), "b t (three h d) -> three b h t d", three=3, h=self.heads)
        att = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        x = x + self.proj(rearrange(att, "b h t d -> b t (h d)"))
        return x + self.mlp(self.ln2(x))


class CharTransformer(nn.Module):
    """A GPT-style decoder over characters (pre-norm blocks, learned positions, tied embeddings)."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.cfg = cfg
        self.tok = nn.Embedding(cfg.vocab, cfg.width)
        self.pos = nn.Parameter(torch.zeros(cfg.context, cfg.width))
        self.blocks = nn.ModuleList(_Block(cfg) for _ in range(cfg.layers))
        self.ln_f = nn.LayerNorm(cfg.width)
        nn.init.normal_(self.tok.weight, std=0.02)

    def forward(self, idx: torch.Tensor, targets: torch.Tensor | None = None):
        x = self.tok(idx) + self.pos[: idx.shape[1]]
        for blk in self.blocks:
            x = blk(x)
        logits = self.ln_f(x) @ self.tok.weight.t()
        if targets is None:
            return logits
        return logits, F.cross_entropy(logits.flatten(0, 1), targets.flatten())


class CharData:
    """Random windows of the encoded text (train split) and a fixed validation set."""

    def __init__(self, text: str, context: int, seed: int = 0):
        chars = sorted(set(text))
        self.stoi = {c: i for i, c in enumerate(chars)}
        data = torch.tensor([self.stoi[c] for c in text], dtype=torch.long)
        n = int(0.95 * len(data))
        self.train, self.val = data[:n], data[n:]
        self.context = context
        self.vocab = len(chars)
        self.gen = torch.Generator().manual_seed(seed)

    def batch(self, n: int, split: str = "train") -> tuple[torch.Tensor, torch.Tensor]:
        data = self.train if split == "train" else self.val
        ix = torch.randint(len(data) - self.context - 1, (n,), generator=self.gen)
        x = torch.stack([data[i : i + self.context] for i in ix.tolist()])
        y = torch.stack([data[i + 1 : i + 1 + self.context] for i in ix.tolist()])
        return x, y


def run_demo(
    *,
    steps: int = 300,
    microbatch: int = 4,
    accum: int = 2,
    lr: float = 2e-3,
    grow: bool = True,
    max_accum: int = 64,
    out: str | Path = "bscale-demo",
    seed: int = 0,
    threads: int | None = None,
    progress: bool = True,
    per_coordinate: bool = False,
) -> dict[str, float]:
    """Train the character transformer with live B_noise; returns the final ``opt.stats`` (plus ``loss``).

    Batch sizes are counted in tokens (``sequences × context``). With ``grow`` the batch follows the noise scale
    (the accumulation count rises, the microbatch stays fixed), and the LR follows the noise-aware Adam law.
    With ``per_coordinate`` the wrapper also measures Adam's per-coordinate statistics: the progress bar shows the
    share of coordinates inside Surge's small-batch regime, and the plot adds it and the Adam-preconditioned noise
    scale.
    """
    from tqdm import tqdm

    import bscale

    if threads:
        torch.set_num_threads(threads)
    torch.manual_seed(seed)
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    data = CharData(load_text(), context=64, seed=seed)
    cfg = ModelConfig(vocab=data.vocab)
    model = CharTransformer(cfg)
    tokens_per_micro = microbatch * cfg.context
    controller = None
    if grow and hasattr(bscale, "BatchSizeController"):
        controller = bscale.BatchSizeController(
            "double",
            min_batch=accum * tokens_per_micro,
            max_batch=max_accum * tokens_per_micro,
            multiple_of=tokens_per_micro,
            initial_batch=accum * tokens_per_micro,
        )
    log_path = out / "log.jsonl"
    if log_path.exists():
        log_path.unlink()
    logger = bscale.JSONLLogger(log_path)
    opt = bscale.wrap(
        torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.0, betas=(0.9, 0.99)),
        microbatch_size=tokens_per_micro,
        rule="noise" if grow else None,
        named_parameters=model.named_parameters(),
        controller=controller,
        per_coordinate=per_coordinate,
    )
    bar = tqdm(range(steps), disable=not progress, dynamic_ncols=True, desc="bscale demo")
    t0 = time.perf_counter()
    k = accum
    stats: dict[str, float] = {}
    for step in bar:
        total = 0.0
        for _ in range(k):
            x, y = data.batch(microbatch)
            _, loss = model(x, y)
            (loss / k).backward()
            total += loss.item() / k
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        stats = opt.stats
        stats["loss"] = total
        stats["accumulation_steps"] = float(k)
        logger.log(stats, step + 1)
        regime = stats.get("coord/frac_small_batch")
        bar.set_postfix_str(
            f"loss {total:.3f} | B_noise {bscale.format_noise_scale(stats['noise_scale'], stats['noise_scale_stderr'])}"
            f" tok | batch {int(stats['batch_size'])} | lr×{stats['lr_scale']:.2f}"
            + ("" if regime is None else f" | small-batch regime {regime:.0%}")
            + ("" if regime is None else f" (pure noise {stats['coord/frac_small_batch_noise_only']:.0%})")
        )
        if controller is not None:
            k = opt.accumulation_steps()
    logger.close()
    with torch.no_grad():
        x, y = data.batch(64, "val")
        stats["val_loss"] = float(model(x, y)[1])
    stats["seconds"] = time.perf_counter() - t0
    png = bscale.plot_run(log_path, out / "noise_scale.png", title="bscale demo: char transformer on pydoc topics")
    if progress:
        ns, se = stats["noise_scale"], stats["noise_scale_stderr"]
        print(
            f"final loss {stats['loss']:.3f} (val {stats['val_loss']:.3f}); B_noise "
            f"{bscale.format_noise_scale(ns, se)} tokens; batch {int(stats['batch_size'])} tokens; "
            f"{stats['seconds']:.0f} s"
        )
        print(f"wrote {log_path} and {png}")
        if not math.isfinite(ns):
            print(f"(no noise-scale reading: {opt.reason})")
    return stats


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="bscale demo", description=__doc__.splitlines()[0])
    add_arguments(p)
    args = p.parse_args(argv)
    return run_from_args(args)


def add_arguments(p: argparse.ArgumentParser) -> None:
    """The demo's command-line options (shared by ``bscale demo`` and ``python -m bscale.demo``)."""
    from .cli import _positive_real, _positive_whole

    p.add_argument(
        "--steps", type=_positive_whole("--steps", "steps"), default=300, help="optimizer steps (default: 300)"
    )
    p.add_argument(
        "--microbatch", type=_positive_whole("--microbatch", "sequences"), default=4,
        help="sequences per backward (default: 4)",
    )  # fmt: skip
    p.add_argument(
        "--accum", type=_positive_whole("--accum", "microbatches"), default=2,
        help="initial microbatches per step (default: 2)",
    )  # fmt: skip
    p.add_argument(
        "--max-accum", type=_positive_whole("--max-accum", "microbatches"), default=64,
        help="largest accumulation when growing, at least --accum (default: 64)",
    )  # fmt: skip
    p.add_argument(
        "--lr", type=_positive_real("--lr", "a finite positive learning rate"), default=2e-3,
        help="AdamW learning rate at the initial batch (default: 2e-3)",
    )  # fmt: skip
    p.add_argument("--no-grow", action="store_true", help="keep the batch fixed (observe only)")
    p.add_argument("--out", default="bscale-demo", help="output folder for log.jsonl and noise_scale.png")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.add_argument(
        "--per-coordinate",
        action="store_true",
        help="also measure Adam's per-coordinate statistics (Surge's small-batch regime, preconditioned B_noise)",
    )


def run_from_args(args: argparse.Namespace) -> int:
    if not args.no_grow and args.max_accum < args.accum:
        print(
            f"bscale demo: error: --max-accum ({args.max_accum}) must be at least --accum ({args.accum}), "
            "or pass --no-grow",
            file=sys.stderr,
        )
        return 2
    run_demo(
        steps=args.steps,
        microbatch=args.microbatch,
        accum=args.accum,
        lr=args.lr,
        grow=not args.no_grow,
        max_accum=args.max_accum,
        out=args.out,
        seed=args.seed,
        progress=not args.quiet,
        per_coordinate=args.per_coordinate,
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
