"""bscale under torch.distributed (gloo, 2 CPU processes): DDP and FSDP2 give one process's answer.

One spawned 2-rank job runs every scenario (a spawn costs seconds); the checks below read what each rank
saved. The reference is one process running the same W·A microbatches per step with gradient accumulation:
every data-parallel run must give its noise scale, standard error and learning-rate scale to float32 rounding.
"""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
import time
from pathlib import Path

import _dist_worker as W
import pytest
import torch
import torch.multiprocessing as mp

pytestmark = pytest.mark.distributed

WORLD, ACCUM = 2, 2
# Float32 gradients summed in another order (per rank, then averaged) than in one process: the readings are
# ratios of float64 sums of float32 squares, equal to ~1e-6; the noise scale's |G|² term cancels ~10x more.
RTOL = 1e-5
ROOT = Path(__file__).resolve().parent.parent


def _run_job(out: Path) -> None:
    mp.spawn(W.job, args=(WORLD, str(out / "init"), str(out), ACCUM), nprocs=WORLD, join=True)


@pytest.fixture(scope="module")
def job(tmp_path_factory):
    """The 2-rank job's results. Under pytest-xdist the first worker runs it and the others wait for its files
    in the session's shared temp directory, so the job is spawned once per session, not once per worker."""
    if "PYTEST_XDIST_WORKER" not in os.environ:
        out = tmp_path_factory.mktemp("dist")
        _run_job(out)
    else:
        out = tmp_path_factory.getbasetemp().parent / "bscale-dist-job"
        out.mkdir(exist_ok=True)
        try:
            os.close(os.open(out / "claimed", os.O_CREAT | os.O_EXCL))
            owner = True
        except FileExistsError:
            owner = False
        if owner:
            try:
                _run_job(out)
            except Exception as e:
                (out / "failed").write_text(str(e))
                raise
            (out / "done").touch()
        else:
            deadline = time.monotonic() + 600
            while not (out / "done").exists():
                if (out / "failed").exists():
                    pytest.fail("the 2-rank job failed in another worker:\n" + (out / "failed").read_text())
                if time.monotonic() > deadline:
                    pytest.fail("timed out waiting for the 2-rank job run by another worker")
                time.sleep(0.2)
    return [torch.load(out / f"rank{r}.pt", weights_only=False) for r in range(WORLD)]


@pytest.fixture(scope="module")
def ref():
    return W.reference(range(WORLD), ACCUM)


def result(job, rank, key):
    """One scenario's result on one rank, or the failure with the scenario tracebacks that rank recorded."""
    res = job[rank]
    if key not in res:
        pytest.fail(f"rank {rank} has no {key!r}; scenario errors:\n" + "\n".join(res["errors"].values()))
    return res[key]


def assert_readings(got, want, rtol=RTOL, what=""):
    assert len(got) == len(want), what
    for step, (g, w) in enumerate(zip(got, want, strict=True)):
        assert set(g) == set(w), f"{what} step {step}: keys {sorted(set(g) ^ set(w))}"
        # A standard error from the first few steps is a small difference of second moments: it amplifies the
        # float32 rounding of the gradients themselves (DDP sums microbatches in another order than one
        # process) by ~100x, so it gets 10x the tolerance; bit-identical comparisons (rtol 0) stay exact.
        bad = {k: (g[k], w[k]) for k in w if not W.close(g[k], w[k], rtol * (10 if k.endswith("_stderr") else 1))}
        assert not bad, f"{what} step {step}: (got, want) {bad}"


def test_reference_is_informative(ref):
    """The comparisons are not vacuous: by the last step every reading is finite and the LR scale moved."""
    last = ref[-1]
    for key in ("noise_scale", "noise_scale_stderr", "grad_sq", "trace_sigma", "layer/0/noise_scale"):
        assert math.isfinite(last[key]) and last[key] > 0, key
    assert last["microbatches"] == WORLD * ACCUM and last["batch_size"] == WORLD * ACCUM * W.MICRO
    # ref_batch=16 against B=32: the noise-aware factor lies strictly between 1 and the linear rule's 2.
    assert 1.0 < last["lr_scale"] < 2.0


# ride_*: ddp=, the statistics sent with DDP's last gradient bucket (several buckets, bucket views with a GradScaler).
RIDES = ("ride_no_sync", "ride_sync", "ride_debug", "ride_buckets", "ride_bucket_view_scaler")


@pytest.mark.parametrize(
    "run",
    ["ddp_no_sync", "ddp_sync", "ddp_sync_bucket_view", "ddp_bucket_view_scaler", "fsdp_no_sync", "fsdp_sync", *RIDES],
)
def test_matches_one_process(job, ref, run):
    """W=2 ranks × A=2 microbatches equal one process accumulating the same 4 microbatches."""
    for rank in range(WORLD):
        assert_readings(result(job, rank, run), ref, what=f"{run} rank {rank}")


@pytest.mark.parametrize(
    "run", ["ddp_no_sync", "ddp_sync", "fsdp_no_sync", "ddp_fp16_hook", "resumed", "ddp_unread_one_rank", *RIDES]
)
def test_identical_on_every_rank(job, run):
    """Every rank holds bit-identical readings (and so applies the identical learning-rate scale)."""
    for rank in range(1, WORLD):
        assert_readings(result(job, rank, run), result(job, 0, run), rtol=0.0, what=f"{run} rank {rank} vs 0")


@pytest.mark.parametrize("run", ["ddp_varying_accum", "ride_varying"])
def test_changing_accumulation_count(job, run):
    """Counts 2, 3, 3, 2, 1, 2 per rank: each step equals one process running that step's 2·A microbatches."""
    want = W.reference(range(WORLD), W.VARYING, steps=len(W.VARYING))
    for rank in range(WORLD):
        assert_readings(result(job, rank, run), want, what=f"rank {rank}")


@pytest.mark.parametrize("run", ["every_ddp", "every_ride", "every_fsdp"])
def test_measure_every_matches_one_process(job, run):
    """measure_every=2: steps 1 and 3 measured on every rank, as one process measuring the same steps."""
    want = W.reference(range(WORLD), ACCUM, measure_every=W.MEASURE_EVERY)
    every_step = W.reference(range(WORLD), ACCUM)
    assert want[2]["noise_scale"] == want[1]["noise_scale"] != every_step[2]["noise_scale"]
    for rank in range(WORLD):
        assert_readings(result(job, rank, run), want, what=f"{run} rank {rank}")
    assert_readings(result(job, 1, run), result(job, 0, run), rtol=0.0, what=f"{run} rank 1 vs 0")


@pytest.mark.parametrize("run", ["ddp_post_hook_rank0_controller", "ddp_post_hook_rank0_ride"])
def test_a_first_step_one_rank_edits_in_place_is_left_out_on_every_rank(job, run):
    # Rank 0's post-accumulate hook edits .grad in place: its first step cannot be read there, and the step's
    # reduction, launched before step() (a controller's count) or riding DDP's bucket, must leave it out on both.
    for rank in range(WORLD):
        assert result(job, rank, f"{run}_steps") == W.STEPS - 1, rank
    assert_readings(result(job, 1, run), result(job, 0, run), rtol=0.0, what=run)


def test_a_step_one_rank_cannot_read_is_left_out_on_every_rank(job):
    # Steps 0, 1, 4 are read; 2 and 3 (fewer microbatches, .grad changed in place on rank 0) are left out.
    assert [result(job, rank, "ddp_unread_one_rank_steps") for rank in range(WORLD)] == [3] * WORLD


def test_static_graph_first_step_is_left_out_and_the_rest_match(job):
    # The first step's norms would be those of the all-reduced gradient (DDP's static_graph first iteration
    # rewrites .grad in place before the wrapper's end-of-backward callback): left out, on every rank alike.
    for rank in range(WORLD):
        got, sync = result(job, rank, "ddp_static_graph"), result(job, rank, "ddp_dynamic_graph")
        assert result(job, rank, "ddp_static_graph_steps") == W.STEPS - 1
        assert result(job, rank, "ddp_dynamic_graph_steps") == W.STEPS
        assert result(job, rank, "ddp_post_hook_steps") == W.STEPS - 1
        assert math.isnan(got[0]["noise_scale"]) and math.isnan(got[0]["step_trace_sigma"])
        for g, s in zip(got[1:], sync[1:], strict=True):
            for key in ("step_grad_sq", "step_trace_sigma", "batch_size", "examples"):
                assert W.close(g[key], s[key], RTOL), (rank, key, g[key], s[key])
    assert_readings(result(job, 1, "ddp_static_graph"), result(job, 0, "ddp_static_graph"), rtol=0.0)


def test_a_rank_whose_backwards_miss_the_parameters_raises_the_count_error(job):
    for rank in range(WORLD):
        assert "different numbers of microbatches" in result(job, rank, "err_untouched")


def test_fsdp_detected(job):
    assert result(job, 0, "fsdp_no_sync_sharded") and result(job, 0, "fsdp_sync_sharded")


def test_hsdp_replicated_shards(job, ref):
    """HSDP (replicate × shard mesh): replicas of a gradient shard count once."""
    for rank in range(WORLD):
        assert_readings(result(job, rank, "hsdp"), ref, what=f"hsdp rank {rank}")


def test_fsdp_gradient_divide_factor(job, ref):
    """A module whose gradients are summed over ranks (divide factor 1) is rescaled to the average."""
    for rank in range(WORLD):
        assert_readings(result(job, rank, "fsdp_divide_factor"), ref[:1], what=f"divide factor rank {rank}")


def test_checkpoint_resume_gives_uninterrupted_readings(job):
    """Saved on rank 0 mid-run, loaded by every rank into fresh objects: the rest of the run is unchanged."""
    for rank in range(WORLD):
        uninterrupted = result(job, rank, "ddp_no_sync")[W.CKPT_AT :]
        assert_readings(result(job, rank, "resumed"), uninterrupted, rtol=1e-12, what=f"rank {rank}")


def test_user_comm_hook_composes(job, ref):
    """An fp16-compression comm hook still runs on every bucket; readings follow its (rounded) gradient."""
    assert result(job, 0, "fp16_hook_calls") >= W.STEPS  # at least one bucket per synchronising backward
    # fp16 keeps 11 significant bits of the averaged gradient (~5e-4 relative per element); the readings move
    # by ~2e-4 here, their standard error by ~2e-3.
    assert_readings(result(job, 0, "ddp_fp16_hook"), ref, rtol=1e-2, what="fp16 hook")


def test_ride_sends_no_collective_of_its_own(job):
    """With ddp=, the only all-reduces are DDP's buckets (one here: the model is tiny), the last one longer by
    the statistics: one sum per parameter tensor, three counts and the examples in two parts."""
    n_params, n_tensors = result(job, 0, "ride_sizes")
    carried = n_params + n_tensors + 5  # Σb travels in two parts, exact in float32
    for rank in range(WORLD):
        assert result(job, rank, "ride_no_sync_collectives") == [carried] * W.STEPS
        assert result(job, rank, "ride_sync_collectives") == [carried] * (W.STEPS * ACCUM)
        # Varying counts: one synchronising backward per step, except that no collective of bscale's own is
        # ever needed (the step's last backward always carries the whole step).
        assert result(job, rank, "ride_varying_collectives") == [carried] * len(W.VARYING)


def test_ride_several_buckets(job):
    """Several buckets (after DDP's first step, which uses one): only the last carries the statistics, sent once
    every parameter's gradient of the backward has been seen; the readings are one process's (above)."""
    n_params, n_tensors = result(job, 0, "ride_sizes")
    carried = n_params + n_tensors + 5
    for rank in range(WORLD):
        sizes = result(job, rank, "ride_buckets_collectives")
        assert sizes[0] == carried  # the first step: a single bucket
        per_step, rest = divmod(len(sizes) - 1, W.STEPS - 1)
        assert per_step >= 2 and rest == 0, sizes
        for step in range(W.STEPS - 1):
            chunk = sizes[1 + step * per_step : 1 + (step + 1) * per_step]
            assert sum(chunk) == carried, chunk
            assert chunk[-1] > n_tensors + 5 and all(c < n_params for c in chunk[:-1]), chunk


def test_ride_handed_to_a_new_wrapper(job):
    """A second wrap(..., ddp=model) takes the model's hook over from the first (DDP keeps one per model)."""
    want = W.reference(range(WORLD), ACCUM, new_opt_at=W.REWRAP_AT)
    n_params, n_tensors = result(job, 0, "ride_sizes")
    for rank in range(WORLD):
        assert_readings(result(job, rank, "ride_rewrap"), want, what=f"rank {rank}")
        assert result(job, rank, "ride_rewrap_collectives") == [n_params + n_tensors + 5] * (W.STEPS - W.REWRAP_AT)


def test_ride_dropped_wrapper_is_reported_not_hung(job):
    """A wrapper dropped on one rank only: its hook keeps the bucket's length, and the other rank is told."""
    assert "different numbers of microbatches" in result(job, 0, "err_dropped")
    assert result(job, 1, "err_dropped") == ""


def test_ride_refuses_what_it_cannot_ride(job):
    for rank in range(WORLD):
        assert "DistributedDataParallel" in result(job, rank, "err_plain")
        assert "already has a communication hook" in result(job, rank, "err_hooked")
        assert "process_group=" in result(job, rank, "err_group")
        assert "must be one that DDP synchronises" in result(job, rank, "err_outside")
        assert "must be one that DDP synchronises" in result(job, rank, "err_added")
        assert "must be one that DDP synchronises" in result(job, rank, "err_added_named")
        assert result(job, rank, "groups_after_refusal") == 1


def test_process_group(job):
    """A rank alone in its group is one process; a 2-rank group carries every collective bscale issues."""
    pair_ref = W.reference(range(WORLD), ACCUM, steps=2)
    for rank in range(WORLD):
        own_ref = W.reference([rank], ACCUM, steps=2)
        assert_readings(result(job, rank, "own_group"), own_ref, what=f"own group {rank}")
        assert_readings(result(job, rank, "pair_group"), pair_ref, what="pair group")
        calls = result(job, rank, "pair_group_collectives")
        assert len(calls) == 2 * 2 and all(calls)  # per step: the statistics, and the debug check


def test_debug_names_the_divergence(job):
    for rank in range(WORLD):
        assert "'noise_scale' differs across ranks" in result(job, rank, "err_estimator")
        assert "did not synchronise gradients" in result(job, rank, "err_unsynced")
        assert "different numbers of microbatches" in result(job, rank, "err_uneven")


@pytest.mark.slow
def test_torchrun_restart_resumes_estimator(tmp_path):
    """examples/ddp_train.py under torchrun --max-restarts=1: rank 1 dies once mid-run; the restarted job
    resumes from the last checkpoint and ends with the uninterrupted run's readings."""
    script = ROOT / "examples" / "ddp_train.py"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}

    def run(name, *extra):
        d = tmp_path / name
        cmd = [
            sys.executable,
            "-m",
            "torch.distributed.run",
            "--standalone",
            "--nproc_per_node=2",
            "--max-restarts=1",
            str(script),
            "--steps",
            "12",
            "--accum",
            "2",
            "--ckpt-every",
            "4",
            "--ckpt-dir",
            str(d),
            "--out-json",
            str(d / "final.json"),
            *extra,
        ]
        p = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=240)
        assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
        return json.loads((d / "final.json").read_text()), p.stdout + p.stderr

    clean, _ = run("clean")
    failed, log = run("failed", "--fail-at-step", "6")
    assert "resumed from step 4" in log, log[-3000:]
    assert (tmp_path / "failed" / "failed_once").exists()
    assert clean["steps"] == failed["steps"] == 12
    for key in ("noise_scale", "noise_scale_stderr", "grad_sq", "trace_sigma", "lr_scale", "examples"):
        assert W.close(failed[key], clean[key], 1e-9), (key, failed[key], clean[key])
