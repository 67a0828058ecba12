"""Adaptive batch growth against fixed batch sizes: steps and examples to a target loss, on two real tasks.

For each task, runs at several fixed batch sizes (each at its best learning rate from a grid of three, AdamW)
train until a held-out loss reaches a target; their steps S and examples E give McCandlish's hyperbola
``S = S_min (1 + B_crit/B)`` (fitted with ``bscale.fit_critical_batch``, both methods). Then one run starts
at the smallest batch with that batch's tuned learning rate and lets ``bscale.BatchSizeController`` grow the
batch from the live noise scale (a fixed microbatch, more accumulation steps), once for each learning-rate
rule of the wrapper (``--rules``): the noise-aware Adam law (``rule="noise"``, Surge eq. 2 with the live
B_simple as B_noise) and the square-root rule (``rule="sqrt"``, lr·√(B/B_0), Malladi; β and eps unchanged).
The target: the adaptive run's (steps, examples) point lies inside the fixed-batch Pareto front, i.e. it
takes fewer steps than every fixed run that used no more examples.

Learning rates are chosen on a tuning seed that is not one of the reported seeds; every reported number is the
mean over the evaluation seeds, each with its own initialisation and data order.

    python benchmarks/adaptive_batch.py            # writes benchmarks/results/adaptive_batch.{md,png}
    python benchmarks/adaptive_batch.py --quick    # smoke run (fewer sizes, one seed) into a temp folder
    python benchmarks/adaptive_batch.py --reuse-fixed RAW.pkl  # adaptive runs only, fixed ones from RAW.pkl
"""

from __future__ import annotations

import argparse
import math
import multiprocessing as mp
import pickle
import platform
import sys
import tempfile
import time
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, ClassVar

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

import bscale
from bscale.demo import CharTransformer, ModelConfig, load_text

RESULTS = Path(__file__).parent / "results"
TUNING_SEED = 100  # learning rates are picked on this seed; the reported seeds are 0, 1, ...
LR_FACTORS = (1.0, 2.0, 0.5)  # the grid around each batch's centre; the centre runs first (see _tune)


# ---- tasks -------------------------------------------------------------------------------------------------


@dataclass(kw_only=True)
class TaskConfig:
    """One task: its batch sizes, learning-rate grid, target and budget. Batches are in ``unit``."""

    name: str
    title: str
    unit: str
    micro: int
    """Examples per microbatch of the adaptive run (the smallest batch is two of them)."""
    batches: list[int]
    """The fixed batch sizes, smallest first; the smallest is also where the adaptive run starts."""
    lr_small: float
    """Centre of the lr grid at the smallest batch; batch B centres at lr_small·√(B/B_0) (sqrt rule)."""
    target: float
    """Held-out loss to reach (nats per example)."""
    eval_every: int
    """Examples between two held-out evaluations (at least one per step)."""
    max_examples: int
    """Budget of one run; a run that misses the target within it counts as not reaching it."""


CHAR = TaskConfig(
    name="char",
    title="char transformer on pydoc topics (1 layer, width 64, context 32)",
    unit="tokens",
    micro=128,  # 4 sequences of 32 tokens
    batches=[256, 512, 1024, 2048, 4096],
    lr_small=1.5e-3,
    target=2.0,  # nats/token; a unigram model sits near 3.3, the runs flatten out near 1.7
    eval_every=8192,
    max_examples=2_500_000,
)
DIGITS = TaskConfig(
    name="digits",
    title="MLP 64-64-10 on scikit-learn digits",
    unit="samples",
    micro=4,
    batches=[8, 16, 32, 64, 128, 256],
    lr_small=1.2e-2,
    target=0.15,  # held-out cross-entropy; the best runs bottom out near 0.1 before they overfit
    eval_every=128,
    max_examples=200_000,
)
MNIST1D = TaskConfig(
    name="mnist1d",
    title="MLP 40-256-256-10 on mnist1d (16,000 training samples)",
    unit="samples",
    micro=16,
    # The fitted B_crit sits near 600 samples at this target (and changes little between held-out losses 1.1
    # and 0.75), so the batches straddle it: from well below, where steps halve as the batch doubles, to well
    # above, where they barely fall.
    batches=[32, 64, 128, 256, 512, 1024, 2048],
    lr_small=3e-3,
    target=0.85,  # held-out cross-entropy; the curves are still steep here and flatten out near 0.55-0.6
    eval_every=512,
    max_examples=400_000,
)
TASKS = {t.name: t for t in (CHAR, DIGITS, MNIST1D)}
QUICK = {
    "char": dict(batches=[256, 512, 1024, 2048], target=2.3, max_examples=800_000),
    "digits": dict(batches=[8, 32, 64, 256], target=0.25, max_examples=60_000),
    "mnist1d": dict(batches=[32, 128, 512, 2048], target=1.0, max_examples=200_000),
}


class _Char:
    """Random 32-token windows of Python's documentation; a fixed held-out set from its last 5%."""

    context = 32
    _cache: ClassVar[dict[str, Any]] = {}

    def __init__(self) -> None:
        if "data" not in self._cache:
            text = load_text()
            stoi = {c: i for i, c in enumerate(sorted(set(text)))}
            data = torch.tensor([stoi[c] for c in text], dtype=torch.long)
            self._cache["data"], self._cache["vocab"] = data, len(stoi)
        data = self._cache["data"]
        n = int(0.95 * len(data))
        self.train, self.val, self.vocab = data[:n], data[n:], self._cache["vocab"]
        # 128 windows = 4096 held-out tokens, the same for every run: one yardstick for the target.
        self.eval_x, self.eval_y = self._windows(self.val, 128, torch.Generator().manual_seed(1234))

    def _windows(self, data, n, gen):
        ix = torch.randint(len(data) - self.context - 1, (n,), generator=gen)
        rows = ix[:, None] + torch.arange(self.context)
        return data[rows], data[rows + 1]

    def model(self) -> nn.Module:
        return CharTransformer(ModelConfig(vocab=self.vocab, context=self.context, width=64, heads=4, layers=1))

    def sample(self, n_tokens: int, gen: torch.Generator):
        return self._windows(self.train, n_tokens // self.context, gen)

    @staticmethod
    def loss(model, x, y) -> torch.Tensor:
        return model(x, y)[1]


class _Digits:
    """scikit-learn's 8×8 digits scaled to [0, 1]; 80% train (sampled with replacement), 20% held out."""

    def __init__(self) -> None:
        from sklearn.datasets import load_digits
        from sklearn.model_selection import train_test_split

        x, y = load_digits(return_X_y=True)
        xtr, xte, ytr, yte = train_test_split(x / 16.0, y, test_size=0.2, random_state=0, stratify=y)
        self.x, self.y = torch.tensor(xtr, dtype=torch.float32), torch.tensor(ytr)
        self.eval_x, self.eval_y = torch.tensor(xte, dtype=torch.float32), torch.tensor(yte)

    def model(self) -> nn.Module:
        return nn.Sequential(nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 10))

    def sample(self, n: int, gen: torch.Generator):
        # With replacement: every batch is i.i.d., as the noise-scale model assumes.
        ix = torch.randint(len(self.x), (n,), generator=gen)
        return self.x[ix], self.y[ix]

    @staticmethod
    def loss(model, x, y) -> torch.Tensor:
        return F.cross_entropy(model(x), y)


class _Mnist1d(_Digits):
    """mnist1d (Greydanus), generated offline: 1-D signals of length 40, 16,000 train (sampled with
    replacement), 4,000 held out."""

    def __init__(self) -> None:
        from mnist1d.data import get_dataset_args, make_dataset

        args = get_dataset_args()
        # 4x the default 5,000 samples: a larger held-out set steadies the target test, and a larger train
        # set keeps the held-out loss falling well past the target instead of turning up from overfitting.
        args.num_samples = 20_000
        d = make_dataset(args)
        self.x, self.y = torch.tensor(d["x"], dtype=torch.float32), torch.tensor(d["y"])
        self.eval_x, self.eval_y = torch.tensor(d["x_test"], dtype=torch.float32), torch.tensor(d["y_test"])

    def model(self) -> nn.Module:
        return nn.Sequential(nn.Linear(40, 256), nn.ReLU(), nn.Linear(256, 256), nn.ReLU(), nn.Linear(256, 10))


_DATA: dict[str, Any] = {}
_SOURCES = {"char": _Char, "digits": _Digits, "mnist1d": _Mnist1d}


def _data(name: str):
    if name not in _DATA:
        _DATA[name] = _SOURCES[name]()
    return _DATA[name]


def _eval(task: TaskConfig, model: nn.Module) -> float:
    d = _data(task.name)
    with torch.no_grad():
        return float(d.loss(model, d.eval_x, d.eval_y))


# How the "chosen" controller settings were picked (before the reported seeds were run) and what else was
# tried; written into the report as they are.
_NOTES = f"""
The chosen settings differ from the library defaults in one place, max_rel_stderr 0.5 instead of 0.3, picked
on one tuning seed. On tuning seed {TUNING_SEED}, against fixed runs at the centre of each lr grid, the char
task's adaptive run took 316 steps / 369k tokens with the defaults, not inside the front (the fixed batch of
1,024 took 300 steps / 308k tokens), and 290 steps / 372k tokens with max_rel_stderr 0.5 (inside). The looser
gate lets the batch leave B_0 after ~45 steps instead of ~110 on that seed. On the reported char seeds both
settings leave B_0 at the same step (column 'steps at B_0'): there the first readings stay below 1.25·B_0
until then, so the gate is not what holds the batch.

The second task is mnist1d, not scikit-learn's digits (still available as `--tasks digits`). On digits the
fixed-batch runs were too noisy to judge against (at a batch of 32: 120, 202 and 429 steps on seeds 0-2; the
samples to target not monotone in B; hyperbola rms log residual 0.23), and none of six controller settings tried
on tuning seeds {TUNING_SEED}-{TUNING_SEED + 2} was inside its front. On mnist1d (20,000 generated samples, 16,000
for training) the steps to target vary by about 6% across seeds at every batch and the hyperbola fits with an rms
log residual of 0.04, with B_crit ≈ 555 samples inside the range of fixed batches. Its settings (model, batches,
lr_small, target) were chosen from fixed runs before any adaptive run; the controller settings were not re-tuned.

Both rules run with the controller settings above, picked on tuning seed {TUNING_SEED} with rule `noise`;
nothing was picked or re-tuned for rule `sqrt`, on any seed. In the run reported here, rule `sqrt` is the
variant that meets the target on both tasks: on char it is inside the front on the mean (266 steps / 266k
tokens) and on each of the three seeds, takes 0.83× the steps the fitted hyperbola needs at its tokens, and
also beats the fixed batch of 1,024 on both axes (292 steps / 299k tokens); on mnist1d it is inside the front
on the mean (205 steps / 42k samples, against 305 / 39k at a fixed batch of 128 and 172 / 44k at 256), 0.92×
the fit, and on seeds 0 and 2 (seed 1: 184 steps / 43.1k samples against that seed's fixed 256 at 160 / 40.9k).
Rule `noise` passes on char on the mean (283 steps / 385k tokens) but on one seed of three, at 1.35× the fit,
and misses on mnist1d (222 steps / 62k samples, 1.94× the fit). The library-defaults rows tell the same story
per rule.

What separates the rules is the lr after the batch has grown (column 'lr at target'): rule `noise` ends at
0.49-0.60× the tuned lr of the nearest fixed batch on char and 0.48-0.80× on mnist1d, rule `sqrt` at
0.92-1.08× (chosen settings). The tuned-lr tables say why. On char the tuned lrs sit on the square-root rule at
every batch from 256 to 4,096 tokens and show no peak near the live B_noise (about 1,800 tokens at the target,
close to the fitted B_crit of 1,400): Surge eq. 2 fits them best as B_noise → ∞ and stays within the grid's ×√2
of them only for B_noise ≳ 9,000 tokens, about 5× the live B_simple. On mnist1d they follow the square-root
rule up to 512 samples and then fall (0.0085 at 1,024 and 0.012 at 2,048, against 0.017 and 0.024 on the
square-root rule): a Surge-like peak, which eq. 2 fits best at B_noise ≈ 1,530 samples (rms log residual
0.135), 3.1× the live B_simple at the target (about 490) and 2.8× the fitted B_crit. So on both tasks
B_simple (like the McCandlish B_crit it matches) sits 3-5× or more below the B_noise of the Adam law, in the
same direction as Merrill et al.'s finding that the gradient noise scale underestimates the critical batch.
The live B_simple served to decide when to grow the batch (the sqrt variant passes on both tasks), but as the
peak of the Adam lr law it puts the peak too early: on these tasks a run that grows its batch does better with
rule `sqrt`.

Steps are optimizer steps; an adaptive step of k microbatches is one step. Wall time is not compared.
"""
NOTES = ["- " + " ".join(par.split()) for par in _NOTES.strip().split("\n\n")]


# ---- runs --------------------------------------------------------------------------------------------------


@dataclass
class Run:
    """One run: steps and examples to the target (``inf`` if missed), the held-out curve and, if adaptive, the
    per-step readings."""

    batch: int
    lr: float
    seed: int
    steps: float = math.inf
    examples: float = math.inf
    evals: list[tuple[int, float, float]] = field(default_factory=list)  # (steps, examples, loss)
    trace: list[tuple[int, float, int, float, float, float]] = field(default_factory=list)
    changes: list[tuple] = field(default_factory=list)
    seconds: float = 0.0


SMOOTH = 3  # held-out evaluations averaged (trailing mean) before the target test: see _Tracker


class _Tracker:
    """Held-out evaluations of one run and the first crossing of the target by their trailing mean.

    The mean of the last ``SMOOTH`` evaluations, not a single one: at the learning rates that are fastest to a
    target, small-batch runs fluctuate by more than the distance to the target, and a single evaluation would
    reward a lucky dip. Every run is evaluated on the same examples schedule, so the lag this adds (about one
    evaluation interval, in examples) is the same for all of them.
    """

    def __init__(self, target: float, loss0: float):
        self.target = target
        self.evals = [(0, 0.0, loss0)]
        self.smooth = [(0, 0.0, loss0)]

    def add(self, steps: int, examples: float, loss: float) -> tuple[float, float] | None:
        """Record one evaluation; return (steps, examples) at the crossing, interpolated, once it happens."""
        self.evals.append((steps, examples, loss))
        recent = [l for _, _, l in self.evals[-SMOOTH:]]
        self.smooth.append((steps, examples, sum(recent) / len(recent)))
        (s0, e0, l0), (s1, e1, l1) = self.smooth[-2:]
        if l1 <= self.target < l0:
            f = (l0 - self.target) / (l0 - l1)
            return s0 + f * (s1 - s0), e0 + f * (e1 - e0)
        return None


def _start(task: TaskConfig, seed: int) -> tuple[nn.Module, torch.Generator]:
    torch.manual_seed(seed)
    model = _data(task.name).model()
    return model, torch.Generator().manual_seed(10_000 + seed)


def fixed_run(task: TaskConfig, batch: int, lr: float, seed: int, stop_after: float = math.inf) -> Run:
    """Train at a fixed batch (one backward per step) until the target, the budget or ``stop_after`` steps."""
    t0 = time.perf_counter()
    model, gen = _start(task, seed)
    d = _data(task.name)
    opt = torch.optim.AdamW(model.parameters(), lr=lr)
    track = _Tracker(task.target, _eval(task, model))
    run = Run(batch, lr, seed, evals=track.evals)
    every = max(1, round(task.eval_every / batch))
    step = 0
    while step * batch < task.max_examples and step < stop_after:
        x, y = d.sample(batch, gen)
        d.loss(model, x, y).backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        step += 1
        if step % every == 0:
            hit = track.add(step, float(step * batch), _eval(task, model))
            if hit is not None:
                run.steps, run.examples = hit
                break
    run.seconds = time.perf_counter() - t0
    return run


@dataclass(kw_only=True)
class Policy:
    """The adaptive run's controller and wrapper settings (the benchmark's command-line options)."""

    rule: str = "noise"  # the wrapper's lr rule as the batch grows: "noise" (Surge law) or "sqrt"
    policy: str = "noise"
    scale: float = 1.0
    hysteresis: float | None = None
    max_rel_stderr: float = 0.3
    beta: float = 0.99
    max_batch: int | None = None  # None: the largest fixed batch


def adaptive_run(task: TaskConfig, lr: float, seed: int, pol: Policy) -> Run:
    """Start at the smallest batch with its tuned lr; the controller grows the accumulation count."""
    t0 = time.perf_counter()
    model, gen = _start(task, seed)
    d = _data(task.name)
    ctl = bscale.BatchSizeController(
        pol.policy,
        min_batch=task.batches[0],
        max_batch=pol.max_batch or task.batches[-1],
        multiple_of=task.micro,
        scale=pol.scale,
        hysteresis=pol.hysteresis,
        max_rel_stderr=pol.max_rel_stderr,
    )
    opt = bscale.wrap(
        torch.optim.AdamW(model.parameters(), lr=lr),
        microbatch_size=task.micro,
        rule=pol.rule,
        beta=pol.beta,
        controller=ctl,
    )
    track = _Tracker(task.target, _eval(task, model))
    run = Run(task.batches[0], lr, seed, evals=track.evals)
    step, since_eval = 0, 0.0
    while opt.examples < task.max_examples:
        k = opt.accumulation_steps()
        for _ in range(k):
            x, y = d.sample(task.micro, gen)
            (d.loss(model, x, y) / k).backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        step += 1
        s = opt.stats
        run.trace.append(
            (
                step,
                s["examples"],
                int(s["batch_size"]),
                s["noise_scale"],
                s["noise_scale_stderr"],
                s["lr_scale"],
            )
        )
        since_eval += s["batch_size"]
        if since_eval >= task.eval_every:
            since_eval = 0.0
            hit = track.add(step, s["examples"], _eval(task, model))
            if hit is not None:
                run.steps, run.examples = hit
                break
    run.changes = [tuple(c) for c in ctl.changes]
    run.seconds = time.perf_counter() - t0
    return run


# ---- jobs (one process each, one thread each: the machine is shared) ---------------------------------------


def _init_worker() -> None:
    torch.set_num_threads(1)


def _tune_and_measure(args) -> dict[str, Any]:
    """Pick the lr for one batch on the tuning seed, then measure the evaluation seeds at that lr."""
    task, batch, seeds = args
    centre = task.lr_small * math.sqrt(batch / task.batches[0])
    grid: list[Run] = []
    best: Run | None = None
    factors = list(LR_FACTORS)
    while factors:
        f = factors.pop(0)
        # A grid run that has not reached the target after the best run's steps cannot be the best: stop it.
        r = fixed_run(task, batch, centre * f, TUNING_SEED, stop_after=best.steps if best else math.inf)
        grid.append(r)
        if best is None or r.steps < best.steps:
            best = r
        if not factors and len(grid) == len(LR_FACTORS):
            # Best at an end of the grid: one more factor of 2 beyond it, so that no fixed batch is
            # handicapped by a grid that stopped short of its optimum.
            lrs = sorted(g.lr for g in grid)
            if best.lr == lrs[0]:
                factors.append(min(LR_FACTORS) / 2)
            elif best.lr == lrs[-1]:
                factors.append(max(LR_FACTORS) * 2)
    assert best is not None
    runs = [fixed_run(task, batch, best.lr, seed) for seed in seeds] if math.isfinite(best.steps) else []
    return {"task": task.name, "batch": batch, "grid": grid, "lr": best.lr, "runs": runs}


def _adaptive_job(args) -> dict[str, Any]:
    task, lr, seed, name, pol = args
    return {"task": task.name, "policy": name, "run": adaptive_run(task, lr, seed, pol)}


# ---- analysis ----------------------------------------------------------------------------------------------


def _mean(xs) -> float:
    xs = list(xs)
    return float(np.mean(xs)) if xs and all(math.isfinite(x) for x in xs) else math.inf


def _fits(batches, steps) -> dict[str, Any]:
    out = {}
    for method in ("linear", "hyperbola"):
        try:
            out[method] = bscale.fit_critical_batch(batches, steps, method=method)
        except ValueError as e:
            out[method] = str(e)
    return out


def _front_check(fixed: list[tuple[int, float, float]], s_a: float, e_a: float) -> tuple[bool, list, str]:
    """Fewer steps than every fixed run that used no more examples? Returns (pass, runs compared, note)."""
    if not math.isfinite(s_a):
        return False, [], " (the adaptive run missed the target within the budget)"
    cheaper = [(b, s, e) for b, s, e in fixed if e <= e_a]
    ok = all(s_a < s for _, s, _ in cheaper)
    note = "" if cheaper else " (no fixed run used as few examples: nothing to compare on steps)"
    return ok, cheaper, note


def _on_hyperbola(fit, e: float) -> float:
    """The fitted steps at ``e`` examples: (S/S_min − 1)(E/E_min − 1) = 1, inf at or left of E_min."""
    if not hasattr(fit, "s_min") or e <= fit.e_min:
        return math.inf
    return fit.s_min * (1.0 + 1.0 / (e / fit.e_min - 1.0))


def _reading_at(trace, step: float) -> tuple[float, float, int]:
    """(B_noise, stderr, batch) of the adaptive run at the step nearest ``step``."""
    i = min(len(trace) - 1, max(0, round(step) - 1))
    return trace[i][3], trace[i][4], trace[i][2]


def _first_reading(trace) -> tuple[int, float, float, float] | None:
    """(step, examples, B_noise, stderr) of the first reading that has a standard error."""
    for step, ex, _, ns, se, _ in trace:
        if math.isfinite(ns) and math.isfinite(se):
            return step, ex, ns, se
    return None


def _fmt(x: float, digits: int = 3) -> str:
    if not math.isfinite(x):
        return "—" if math.isnan(x) else "∞"
    return f"{x:.{digits}g}" if abs(x) < 10**digits else f"{x:,.0f}"


def _summarise(task: TaskConfig, fixed_jobs: list[dict], policies: list[tuple[str, Policy, list[Run]]]):
    fixed_jobs = sorted(fixed_jobs, key=lambda j: j["batch"])
    fixed = []
    for j in fixed_jobs:
        s = _mean(r.steps for r in j["runs"])
        if math.isfinite(s):
            fixed.append((j["batch"], s, _mean(r.examples for r in j["runs"]), j["runs"]))
    fits = _fits([f[0] for f in fixed], [f[1] for f in fixed]) if len(fixed) >= 2 else {}
    ada = []
    for name, pol, runs in policies:
        runs = sorted(runs, key=lambda r: r.seed)
        s, e = _mean(r.steps for r in runs), _mean(r.examples for r in runs)
        ok, compared, note = _front_check([(b, st, ex) for b, st, ex, _ in fixed], s, e)
        per_seed = []
        for r in runs:
            pts = [(b, rr.steps, rr.examples) for b, _, _, fr in fixed for rr in fr if rr.seed == r.seed]
            per_seed.append((r.seed, _front_check(pts, r.steps, r.examples)[0]))
        ada.append(
            {
                "name": name,
                "pol": pol,
                "runs": runs,
                "s": s,
                "e": e,
                "ok": ok,
                "compared": compared,
                "note": note,
                "per_seed": per_seed,
            }
        )
    return {"task": task, "jobs": fixed_jobs, "fixed": fixed, "fits": fits, "adaptive": ada}


# ---- report ------------------------------------------------------------------------------------------------


def _plot(path: Path, summaries: list[dict[str, Any]]) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(len(summaries), 2, figsize=(13, 4.8 * len(summaries)), squeeze=False)
    markers = [("C3", "*", 200), ("C2", "P", 120), ("C4", "D", 60), ("C1", "X", 60)]
    for row, sm in zip(axes, summaries, strict=True):
        task = sm["task"]
        ax = row[0]
        for b, s, e, per_seed in sm["fixed"]:
            ax.scatter([r.examples for r in per_seed], [r.steps for r in per_seed], s=10, color="C0", alpha=0.35)
            ax.scatter([e], [s], color="C0", zorder=3)
            ax.annotate(f"B={b:,}", (e, s), textcoords="offset points", xytext=(5, 4), fontsize=8)
        for method, style in (("hyperbola", "-"), ("linear", "--")):
            fit = sm["fits"].get(method)
            if hasattr(fit, "s_min"):
                bs = np.geomspace(sm["fixed"][0][0] / 4, sm["fixed"][-1][0] * 4, 200)
                ss, ee = bscale.steps_examples_tradeoff(bs, fit.s_min, fit.e_min)
                ax.plot(
                    ee,
                    ss,
                    style,
                    color="C7",
                    lw=1,
                    label=f"fit ({method}): B_crit = {fit.b_crit:,.0f}, S_min = {fit.s_min:.0f}",
                )
        for a, (color, marker, size) in zip(sm["adaptive"], markers, strict=False):
            runs = [r for r in a["runs"] if math.isfinite(r.steps)]
            ax.scatter(
                [r.examples for r in runs],
                [r.steps for r in runs],
                s=size / 8,
                color=color,
                alpha=0.5,
                marker=marker,
            )
            if math.isfinite(a["s"]):
                ax.scatter(
                    [a["e"]],
                    [a["s"]],
                    color=color,
                    marker=marker,
                    s=size,
                    zorder=4,
                    label=f"adaptive, {a['name']} (mean of {len(a['runs'])} seeds)",
                )
        ax.set(
            xscale="log",
            yscale="log",
            xlabel=f"{task.unit} to target",
            ylabel="steps to target",
            title=f"{task.name}: steps vs {task.unit} to held-out loss {task.target} (small dots: seeds)",
        )
        ax.legend(fontsize=8)
        ax.grid(alpha=0.3, which="both")

        ax = row[1]
        mains = [
            (a, color)
            for a, (color, _, _) in zip(sm["adaptive"], markers, strict=False)
            if a["name"].startswith("chosen")
        ]
        for a, color in mains:
            for i, r in enumerate(a["runs"]):
                tr = np.array([(t[1], t[2], t[3], t[4]) for t in r.trace], dtype=float)
                first = i == 0
                ax.step(
                    tr[:, 0],
                    tr[:, 1],
                    where="post",
                    color=color,
                    lw=1.2,
                    label=f"batch, {a['name']}" if first else None,
                )
                ok = np.isfinite(tr[:, 2])
                ax.plot(
                    tr[ok, 0],
                    tr[ok, 2],
                    color=color,
                    lw=0.7,
                    alpha=0.6,
                    ls="--",
                    label=f"live B_noise, {a['name']}" if first else None,
                )
                if math.isfinite(r.examples):
                    ax.axvline(r.examples, color=color, ls=":", lw=0.8)
        for method, style in (("hyperbola", "-"), ("linear", "--")):
            fit = sm["fits"].get(method)
            if hasattr(fit, "b_crit"):
                ax.axhline(fit.b_crit, color="C7", ls=style, lw=1, label=f"B_crit fit ({method})")
        # Log axis from half the smallest batch or reading drawn (a reading before the first is NaN).
        drawn = [v for a, _ in mains for r in a["runs"] for t in r.trace for v in t[2:4] if v > 0]
        ax.set_ylim(bottom=0.5 * min(drawn))
        ax.set(
            yscale="log",
            xlabel=f"{task.unit} seen",
            ylabel=task.unit,
            title=f"{task.name}: adaptive batch, live B_noise (chosen); dotted: target reached",
        )
        ax.legend(fontsize=8)
        ax.grid(alpha=0.3, which="both")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _describe(pol: Policy, with_rule: bool = True) -> str:
    return (
        (f"wrapper rule `{pol.rule}`, " if with_rule else "")
        + f"policy `{pol.policy}`, scale {pol.scale:g}, hysteresis "
        f"{pol.hysteresis if pol.hysteresis is not None else 'default'}, max_rel_stderr "
        f"{pol.max_rel_stderr:g}, wrapper beta {pol.beta:g}"
    )


def _fixed_table(sm, seeds) -> list[str]:
    task: TaskConfig = sm["task"]
    lines = [
        f"| batch ({task.unit}) | lr grid, tuning seed: steps to target | lr | "
        + " | ".join(f"steps, seed {s}" for s in seeds)
        + f" | mean steps | mean {task.unit} |",
        "|---:|---|---:|" + "---:|" * len(seeds) + "---:|---:|",
    ]
    for j in sm["jobs"]:
        grid = ", ".join(
            f"{r.lr:.2g}: {_fmt(r.steps, 4)}" + ("" if math.isfinite(r.steps) else " (stopped)")
            for r in sorted(j["grid"], key=lambda r: r.lr)
        )
        edge = " (edge)" if j["lr"] in (min(r.lr for r in j["grid"]), max(r.lr for r in j["grid"])) else ""
        runs = j["runs"]
        per = " | ".join(_fmt(r.steps, 4) for r in runs) if runs else " | ".join("—" for _ in seeds)
        lines.append(
            f"| {j['batch']:,} | {grid} | {j['lr']:.2g}{edge} | {per} | "
            f"{_fmt(_mean(r.steps for r in runs), 4)} | {_fmt(_mean(r.examples for r in runs), 4)} |"
        )
    return [*lines, ""]


def _live_noise_at_target(sm) -> list[float]:
    """The live B_noise at the target of every run of the chosen settings (all rules)."""
    return [
        _reading_at(r.trace, r.steps)[0]
        for a in sm["adaptive"]
        if a["name"].startswith("chosen")
        for r in a["runs"]
        if math.isfinite(r.steps) and math.isfinite(_reading_at(r.trace, r.steps)[0])
    ]


def _surge_shape(b, noise):
    """Surge eq. 2 up to its peak value: 1/(√(B_noise/B) + √(B/B_noise)), largest (½) at B = B_noise."""
    return 1.0 / (np.sqrt(noise / b) + np.sqrt(b / noise))


def _lr_section(sm) -> list[str]:
    """The tuned lr of each fixed batch beside each rule's lr from B_0, and a fit of Surge eq. 2 to them."""
    task: TaskConfig = sm["task"]
    jobs = [j for j in sm["jobs"] if j["runs"]]
    if len(jobs) < 2:
        return []
    b0, lr0 = jobs[0]["batch"], jobs[0]["lr"]
    live = _live_noise_at_target(sm)
    noise = float(np.mean(live)) if live else math.inf
    lines = [
        f"Tuned lr against batch, beside the lr each rule gives from B_0 = {b0:,} (lr_0 = {lr0:.2g}); the "
        f"`noise` rule with B_noise = {_fmt(noise)} {task.unit}, the mean live B_simple at the target of the "
        "chosen adaptive runs (both rules). The tuned lrs come from a factor-of-2 grid: read them to within "
        "×√2.",
        "",
        f"| batch ({task.unit}) | tuned lr | sqrt rule | tuned / sqrt | noise rule (Surge) | tuned / noise | "
        "grid lr nearest the noise rule's: steps on the tuning seed (best) |",
        "|---:|---:|---:|---:|---:|---:|---|",
    ]
    b = np.array([j["batch"] for j in jobs], dtype=float)
    lr = np.array([j["lr"] for j in jobs])
    sq = lr0 * np.sqrt(b / b0)
    su = lr0 * np.asarray(bscale.lr_scale(b, b0, noise, rule="noise", optimizer="adam"), dtype=float)
    for j, s_, u_ in zip(jobs, sq, su, strict=True):
        ratios = f"{j['lr'] / s_:.2f} | {u_:.2g} | {j['lr'] / u_:.2f}"
        near = min(j["grid"], key=lambda r: abs(math.log(r.lr / u_)))
        best_steps = min(r.steps for r in j["grid"])
        grid_s = f"{near.lr:.2g}: {_fmt(near.steps, 4)}" + ("" if math.isfinite(near.steps) else " (stopped)")
        lines.append(f"| {j['batch']:,} | {j['lr']:.2g} | {s_:.2g} | {ratios} | {grid_s} ({_fmt(best_steps, 4)}) |")
    # Surge eq. 2 fitted to the tuned lrs in log space over a grid of B_noise (lr_peak in closed form at
    # each): the smallest rms log residual says which B_noise the measured lrs are consistent with.
    grid = np.geomspace(b[0] / 4, b[-1] * 256, 400)
    rms = []
    for n in grid:
        r = np.log(lr) - np.log(_surge_shape(b, n))
        rms.append(float(np.sqrt(np.mean((r - r.mean()) ** 2))))
    best = int(np.argmin(rms))
    r_sqrt = np.log(lr) - 0.5 * np.log(b)
    rms_sqrt = float(np.sqrt(np.mean((r_sqrt - r_sqrt.mean()) ** 2)))
    r_live = np.log(lr) - np.log(_surge_shape(b, noise)) if math.isfinite(noise) else None
    rms_live = float(np.sqrt(np.mean((r_live - r_live.mean()) ** 2))) if r_live is not None else math.nan
    # The smallest B_noise at which the wrapper's noise rule from B_0 stays within the grid's resolution
    # (×√2) of every tuned lr: below it the measured lrs rule the law out.
    within = [
        n
        for n in grid
        if np.all(np.abs(np.log(lr / (lr0 * np.asarray(bscale.lr_scale(b, b0, n), dtype=float)))) <= 0.5 * math.log(2))
    ]
    edge = best == len(grid) - 1
    best_s = (
        f"no finite best: the residual keeps falling up to B_noise = {grid[-1]:,.0f}, the square-root limit"
        if edge
        else f"best at B_noise = {grid[best]:,.0f} {task.unit} (rms {rms[best]:.3f})"
    )
    lines += [
        "",
        f"Surge eq. 2, lr(B) = 2·lr_peak/(√(B_noise/B) + √(B/B_noise)), fitted to the tuned lrs (lr_peak "
        f"free, rms log residual): with B_noise = {_fmt(noise)} (live) {rms_live:.3f}; {best_s}; the "
        f"square-root rule alone (B_noise → ∞) {rms_sqrt:.3f}. "
        + (
            f"The noise rule from B_0 stays within ×√2 of every tuned lr only for B_noise ≥ {within[0]:,.0f} "
            f"{task.unit}, {within[0] / noise:.1f}× the live value."
            if within and math.isfinite(noise)
            else "No B_noise puts the noise rule from B_0 within ×√2 of every tuned lr (nor the square-root "
            "rule, its B_noise → ∞ limit)."
        ),
        "",
    ]
    return lines


def _diagnosis(sm, a) -> str:
    """Where the adaptive run's steps went: at B_0, and at which lr relative to the tuned one."""
    task: TaskConfig = sm["task"]
    at_b0, lr_ratio, ns_ratio = [], [], []
    fit = sm["fits"].get("hyperbola")
    for r in a["runs"]:
        if not math.isfinite(r.steps):
            continue
        at_b0.append(r.changes[0][0] if r.changes else len(r.trace))
        i = min(len(r.trace), round(r.steps)) - 1
        ns, _, b_at = _reading_at(r.trace, r.steps)
        near = _nearest_fixed(sm, b_at)
        if near:
            lr_ratio.append(r.lr * r.trace[i][5] / near["lr"])
        if hasattr(fit, "b_crit") and math.isfinite(ns):
            ns_ratio.append(ns / fit.b_crit)
    if not at_b0:
        return f"- {task.name} ({a['name']}): no adaptive run reached the target."
    text = (
        f"- {task.name} ({a['name']}): {np.mean(at_b0):.0f} of {a['s']:.0f} steps (means) were taken at "
        f"B_0 = {task.batches[0]:,} before the first change"
    )
    if lr_ratio:
        text += f"; at the target the lr was {np.mean(lr_ratio):.2f}× the tuned lr of the nearest fixed batch"
    if ns_ratio:
        text += f"; B_noise at the target was {np.mean(ns_ratio):.2f}× the fitted B_crit (hyperbola)"
    return text + "."


def _verdict(a) -> str:
    if not a["ok"]:
        return "FAIL"
    return "PASS" if a["compared"] else "PASS (vacuous: fewer examples than every fixed run)"


def _nearest_fixed(sm, batch: float) -> dict | None:
    jobs = [j for j in sm["jobs"] if j["runs"]]
    return min(jobs, key=lambda j: abs(math.log(j["batch"] / batch))) if jobs and batch > 0 else None


def _adaptive_section(sm, a) -> list[str]:
    task: TaskConfig = sm["task"]
    lines = [
        f"### Adaptive, {a['name']}: {_describe(a['pol'])}",
        "",
        f"| seed | steps | {task.unit} | batch at target | lr at target (tuned lr there) | steps at B_0 | "
        f"first B_noise reading (at {task.unit} seen) | B_noise at target | "
        "batch changes (step: new batch) |",
        "|---:|---:|---:|---:|---|---:|---|---|---|",
    ]
    for r in a["runs"]:
        first = _first_reading(r.trace)
        ns, se, b_at = _reading_at(r.trace, r.steps if math.isfinite(r.steps) else len(r.trace))
        first_s = f"{_fmt(first[2])} ± {_fmt(first[3], 2)} (at {first[1]:,.0f})" if first else "none"
        changes = ", ".join(f"{c[0]}: {c[3]:,}" for c in r.changes) or "none"
        i = min(len(r.trace), round(r.steps) if math.isfinite(r.steps) else len(r.trace)) - 1
        lr_at = r.lr * r.trace[i][5]
        near = _nearest_fixed(sm, b_at)
        tuned = f" ({near['lr']:.2g} at {near['batch']:,})" if near else ""
        at_b0 = r.changes[0][0] if r.changes else len(r.trace)
        lines.append(
            f"| {r.seed} | {_fmt(r.steps, 4)} | {_fmt(r.examples, 4)} | {b_at:,} | {lr_at:.2g}{tuned} | "
            f"{at_b0} | {first_s} | {_fmt(ns)} ± {_fmt(se, 2)} | {changes} |"
        )
    lines.append("")
    cmp = "; ".join(f"B={b:,}: {s:.0f} steps, {e:,.0f} {task.unit}" for b, s, e in a["compared"]) or "none"
    verdict = _verdict(a)
    lines += [
        f"**Check ({task.name}, {a['name']}): {verdict}.** Adaptive mean: {_fmt(a['s'], 4)} steps, "
        f"{_fmt(a['e'], 4)} {task.unit}. Fixed runs (means) that used no more {task.unit}: {cmp}{a['note']}.",
        "",
    ]
    per_seed = [f"seed {seed} {'pass' if ok else 'fail'}" for seed, ok in a["per_seed"]]
    lines.append("Per seed (each adaptive run against the fixed runs of its seed): " + ", ".join(per_seed) + ".")
    fit = sm["fits"].get("hyperbola")
    if hasattr(fit, "s_min") and math.isfinite(a["e"]):
        s_fit = _on_hyperbola(fit, a["e"])
        where = (
            f"the fitted hyperbola needs {_fmt(s_fit, 4)} steps at {a['e']:,.0f} {task.unit}; the adaptive "
            f"run took {a['s'] / s_fit:.2f}× that"
            if math.isfinite(s_fit)
            else f"{a['e']:,.0f} {task.unit} is at or below the fitted E_min = {fit.e_min:,.0f}: on the "
            "fit no fixed batch reaches the target with so few"
        )
        lines.append(f"Against the fit (hyperbola): {where}.")
    return [*lines, ""]


def _report(path: Path, png: Path, summaries, args, seeds, wall: float) -> list[str]:
    verdicts = []
    for sm in summaries:
        fit = sm["fits"].get("hyperbola")
        for a in sm["adaptive"]:
            s_fit = _on_hyperbola(fit, a["e"]) if math.isfinite(a["e"]) else math.inf
            vs_fit = f", {a['s'] / s_fit:.2f}× the fitted steps at its examples" if math.isfinite(s_fit) else ""
            n_ok = sum(ok for _, ok in a["per_seed"])
            verdicts.append(
                f"{sm['task'].name} ({a['name']}): {_verdict(a)} on the mean, {n_ok} of {len(a['per_seed'])} "
                f"seeds pass alone{vs_fit}"
            )
    lines = [
        "# Adaptive batch growth against fixed batch sizes",
        "",
        "```",
        "python " + " ".join([Path(args.argv0).as_posix(), *args.argv]),
        "```",
        "",
        f"torch {torch.__version__}, Python {platform.python_version()}, {platform.machine()}; one thread "
        "per "
        f"process, {args.workers} processes on a shared, loaded machine; wall time {wall / 60:.1f} min"
        + (
            " (adaptive runs only: the fixed-batch runs, which do not depend on the adaptive settings, were "
            "reused from the raw results of an earlier run of this script with the same tasks and seeds, "
            "`--reuse-fixed`)."
            if getattr(args, "reuse_fixed", None)
            else "."
        ),
        "",
        "**Result:** " + "; ".join(verdicts) + ". (Check: the adaptive run's mean (steps, examples) to the "
        "target takes fewer steps than every fixed batch whose mean used no more examples.)",
        "",
        "## Method",
        "",
        "- Every run trains with AdamW (weight decay 0.01, default betas) from the initialisation and data "
        "order "
        "of its seed. Fixed runs take one backward of B examples per step.",
        "- **Steps to target** come from a fixed held-out set evaluated every `eval_every` examples (at "
        "least "
        f"once per step): the first crossing of the target by the mean of the last {SMOOTH} evaluations, "
        "interpolated linearly between evaluations; examples to target likewise. The mean keeps a lucky dip "
        "of a noisy small-batch run from counting as reaching the target; the lag it adds is about one "
        "evaluation "
        "interval in examples, the same for every run.",
        "- The learning rate of each fixed batch is the best of {0.5, 1, 2} × lr_small·√(B/B_0) on tuning "
        f"seed {TUNING_SEED}, with one more factor of 2 beyond the grid's end when the best lr lies at an "
        'end (a grid run is stopped once it has taken more steps than the best so far; "(edge)" marks a '
        "best lr still at the end of the grid); the reported seeds "
        f"{', '.join(map(str, seeds))} then run at that lr. S_min, E_min, B_crit come from "
        "`bscale.fit_critical_batch` on the mean steps.",
        "- The adaptive run starts at the smallest batch (two microbatches) with that batch's tuned lr: "
        "`bscale.wrap(AdamW, microbatch_size=micro, rule=rule, controller=BatchSizeController(..., "
        "min_batch=B_0, max_batch=largest fixed batch, multiple_of=micro))`; each step accumulates "
        "`opt.accumulation_steps()` microbatches, and the wrapper sets the lr inside the step relative to "
        "B_0 by its `rule`: `noise`, the noise-aware Adam law lr_0·√(B/B_0)·(B_noise + B_0)/(B_noise + B) "
        "(Surge eq. 2) with the live B_noise, or `sqrt`, the square-root rule lr_0·√(B/B_0) "
        "(Malladi), with β and eps left as they are in both. The B_noise is the live "
        "B_simple = tr(Σ)/|G|² (McCandlish eq. 2.9) in the task's unit, shown as read (value ± standard "
        "error); it drives the controller under both rules.",
        f"- Controller settings: **chosen** = {_describe(summaries[0]['adaptive'][0]['pol'], False)}; "
        f"picked before the reported seeds were run, from runs on tuning seed {TUNING_SEED} of the char task "
        "with rule `noise` (see Notes). The `sqrt` variant runs with the same controller settings, not "
        "re-tuned. "
        "**library defaults** = the controller's and wrapper's own defaults (same rule), for comparison.",
        "",
    ]
    for sm in summaries:
        task: TaskConfig = sm["task"]
        lines += [
            f"## {task.title}",
            "",
            f"Unit: {task.unit}; target held-out loss {task.target}; microbatch {task.micro} {task.unit}; "
            f"evaluation every {task.eval_every:,} {task.unit}; budget {task.max_examples:,} {task.unit} "
            "per run.",
            "",
            *_fixed_table(sm, seeds),
            "Fit of S = S_min (1 + B_crit/B) to the mean steps:",
            "",
            "| method | S_min | E_min | B_crit | rms log residual |",
            "|---|---:|---:|---:|---:|",
        ]
        for method, fit in sm["fits"].items():
            if hasattr(fit, "s_min"):
                lines.append(
                    f"| {method} | {fit.s_min:.1f} | {fit.e_min:,.0f} | {fit.b_crit:,.0f} | {fit.residual:.3f} |"
                )
            else:
                lines.append(f"| {method} | fit failed: {fit} | | | |")
        lines.append("")
        crit = ", ".join(f"{m} {f.b_crit:,.0f}" for m, f in sm["fits"].items() if hasattr(f, "b_crit"))
        for main in [a for a in sm["adaptive"] if a["name"].startswith("chosen")]:
            firsts = [f for f in (_first_reading(r.trace) for r in main["runs"]) if f]
            at = [_reading_at(r.trace, r.steps) for r in main["runs"] if math.isfinite(r.steps)]
            lines += [
                f"B_crit from the fit ({crit} {task.unit}) beside the live B_noise of the adaptive runs "
                f"({main['name']}): "
                f"first reading {', '.join(_fmt(f[2]) for f in firsts)}; at the target "
                f"{', '.join(_fmt(x[0]) for x in at)} {task.unit} (one value per seed).",
                "",
            ]
        lines += _lr_section(sm)
        for a in sm["adaptive"]:
            lines += _adaptive_section(sm, a)
    lines += ["## What limits the adaptive runs (computed from the tables above)", ""]
    for sm in summaries:
        lines += [_diagnosis(sm, a) for a in sm["adaptive"]]
    lines += ["", "## Notes", "", *NOTES, "", f"![steps vs examples and the adaptive batch]({png.name})", ""]
    path.write_text("\n".join(lines))
    return verdicts


# ---- main --------------------------------------------------------------------------------------------------


def _load_fixed(path: Path, tasks: list[TaskConfig], seeds: list[int]) -> list[dict[str, Any]]:
    """The fixed-batch jobs of ``tasks`` from a raw-results file that ran the same task settings and seeds."""
    with open(path, "rb") as fh:
        raw = pickle.load(fh)
    if raw["seeds"] != seeds:
        raise SystemExit(f"--reuse-fixed: {path} ran seeds {raw['seeds']}, this run asks for {seeds}")
    saved = {t.name: t for t in raw["tasks"]}
    for t in tasks:
        if t.name not in saved or saved[t.name].__dict__ != t.__dict__:
            raise SystemExit(f"--reuse-fixed: {path} has no fixed runs of task {t.name!r} with these settings")
    fixed = [j for j in raw["fixed"] if j["task"] in {t.name for t in tasks}]
    print(f"reusing {len(fixed)} fixed-batch jobs from {path}")
    return fixed


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true", help="smoke run: fewer batch sizes, one seed, easier targets")
    p.add_argument("--tasks", nargs="+", default=["char", "mnist1d"], choices=list(TASKS))
    p.add_argument("--seeds", type=int, default=None, help="evaluation seeds 0..n-1 (default: 3, quick: 1)")
    p.add_argument("--workers", type=int, default=2, help="processes, one thread each (default: 2)")
    p.add_argument("--policy", default="noise", choices=["noise", "double"], help="controller policy")
    p.add_argument("--scale", type=float, default=1.0, help="controller calibration B_est = scale·B_noise")
    p.add_argument("--hysteresis", type=float, default=None, help="controller dead band (default: its own)")
    p.add_argument(
        "--max-rel-stderr",
        type=float,
        default=0.5,
        help="controller standard-error gate (default: 0.5; the controller's own default is 0.3)",
    )
    p.add_argument("--beta", type=float, default=0.99, help="wrapper smoothing per step at the first batch")
    p.add_argument(
        "--rules",
        nargs="+",
        default=["noise", "sqrt"],
        choices=["noise", "sqrt"],
        help="the wrapper's lr rules, one adaptive variant each, same controller (default: noise sqrt)",
    )
    p.add_argument(
        "--reuse-fixed",
        type=Path,
        default=None,
        help="take the fixed-batch runs from the raw results of a previous run with the same tasks and seeds "
        "(they do not depend on the adaptive settings); only the adaptive runs train",
    )
    p.add_argument(
        "--no-defaults-run",
        action="store_true",
        help="skip the comparison run with the controller's and wrapper's defaults",
    )
    p.add_argument(
        "--replot",
        type=Path,
        default=None,
        help="rebuild the report and plot from the raw results a previous run saved (no training)",
    )
    p.add_argument(
        "--out",
        type=Path,
        default=None,
        help="output folder (default: benchmarks/results; with --quick a temporary folder)",
    )
    args = p.parse_args(argv)
    if args.replot is not None:
        with open(args.replot, "rb") as fh:
            raw = pickle.load(fh)
        raw["out"].mkdir(parents=True, exist_ok=True)
        return _write(**raw)
    args.argv0, args.argv = sys.argv[0], sys.argv[1:] if argv is None else list(argv)
    torch.set_num_threads(1)
    n_seeds = args.seeds if args.seeds is not None else (1 if args.quick else 3)
    seeds = list(range(n_seeds))
    out = args.out or (Path(tempfile.mkdtemp(prefix="bscale-adaptive-")) if args.quick else RESULTS)
    out.mkdir(parents=True, exist_ok=True)
    tasks = []
    for name in args.tasks:
        tasks.append(TaskConfig(**{**TASKS[name].__dict__, **(QUICK[name] if args.quick else {})}))
    chosen = Policy(
        rule=args.rules[0],
        policy=args.policy,
        scale=args.scale,
        hysteresis=args.hysteresis,
        max_rel_stderr=args.max_rel_stderr,
        beta=args.beta,
    )
    policies = [(f"chosen, {r}", replace(chosen, rule=r)) for r in args.rules]
    if not args.no_defaults_run and chosen != Policy(rule=chosen.rule, max_rel_stderr=0.3):
        policies += [(f"library defaults, {r}", Policy(rule=r, max_rel_stderr=0.3)) for r in args.rules]
    reused = _load_fixed(args.reuse_fixed, tasks, seeds) if args.reuse_fixed is not None else None
    for t in tasks:
        _data(t.name)  # load once here: the forked workers share it

    t0 = time.perf_counter()
    # Largest batches first: they take longest per run, and the pool then fills in with the small jobs.
    jobs = sorted(((t, b, seeds) for t in tasks for b in t.batches), key=lambda j: (j[0].name != "char", -j[1]))
    with mp.get_context("fork").Pool(args.workers, initializer=_init_worker) as pool:
        fixed = list(reused or [])
        for res in pool.imap_unordered(_tune_and_measure, [] if reused else jobs):
            fixed.append(res)
            runs = ", ".join(_fmt(r.steps, 4) for r in res["runs"])
            print(
                f"[{time.perf_counter() - t0:6.0f}s] {res['task']} B={res['batch']}: lr {res['lr']:.2g}, steps {runs}",
                flush=True,
            )
        lr0 = {
            t.name: next(j["lr"] for j in fixed if j["task"] == t.name and j["batch"] == t.batches[0]) for t in tasks
        }
        ada_jobs = [(t, lr0[t.name], s, name, pol) for t in tasks for name, pol in policies for s in seeds]
        ada_jobs.sort(key=lambda j: j[0].name != "char")
        adaptive: dict[tuple[str, str], list[Run]] = {(t.name, n): [] for t in tasks for n, _ in policies}
        for res in pool.imap_unordered(_adaptive_job, ada_jobs):
            r = res["run"]
            adaptive[res["task"], res["policy"]].append(r)
            print(
                f"[{time.perf_counter() - t0:6.0f}s] {res['task']} adaptive ({res['policy']}) seed {r.seed}: "
                f"{_fmt(r.steps, 4)} steps, {_fmt(r.examples, 4)} examples, {len(r.changes)} changes",
                flush=True,
            )
    wall = time.perf_counter() - t0
    raw = dict(
        out=out,
        tasks=tasks,
        fixed=fixed,
        adaptive=adaptive,
        policies=policies,
        args=args,
        seeds=seeds,
        wall=wall,
    )
    # The raw runs, so the report and plot can be rebuilt (--replot) without training again.
    saved = Path(tempfile.gettempdir()) / "bscale-adaptive-batch-raw.pkl"
    with open(saved, "wb") as fh:
        pickle.dump(raw, fh)
    print(f"raw results saved to {saved}")
    return _write(**raw)


def _write(*, out, tasks, fixed, adaptive, policies, args, seeds, wall) -> int:
    summaries = [
        _summarise(
            t,
            [j for j in fixed if j["task"] == t.name],
            [(n, pol, adaptive[t.name, n]) for n, pol in policies],
        )
        for t in tasks
    ]
    md, png = out / "adaptive_batch.md", out / "adaptive_batch.png"
    _plot(png, summaries)
    verdicts = _report(md, png, summaries, args, seeds, wall)
    print(f"wrote {md} and {png}: " + "; ".join(verdicts))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
