"""AdaptiveBatchSampler: each example of an epoch exactly once, whatever the batch sizes, on any ranks."""

from __future__ import annotations

import io
import json
from collections import Counter

import numpy as np
import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from hypothesis import given, settings
from hypothesis import strategies as st
from torch.utils.data import DataLoader, DistributedSampler, TensorDataset

import bscale
from bscale import AdaptiveBatchSampler


def drain(sampler: AdaptiveBatchSampler, sizes: dict[int, int] | None = None) -> list[list[int]]:
    """Iterate one epoch; before batch ``k`` (0-based) set the batch size to ``sizes[k]`` when given."""
    sizes = sizes or {}
    out: list[list[int]] = []
    if 0 in sizes:
        sampler.set_batch_size(sizes[0])
    for batch in sampler:
        out.append(batch)
        if len(out) in sizes:
            sampler.set_batch_size(sizes[len(out)])
    return out


def flat(batches: list[list[int]]) -> list[int]:
    return [i for b in batches for i in b]


def test_one_process_covers_the_epoch_once_across_size_changes():
    s = AdaptiveBatchSampler(103, 4, shuffle=False)
    batches = drain(s, {3: 10, 5: 1, 6: 32})
    assert [len(b) for b in batches] == [4, 4, 4, 10, 10, 1, 32, 32, 6]
    assert flat(batches) == list(range(103))  # nothing skipped, nothing repeated, order kept


@pytest.mark.parametrize("drop_last", [False, True])
@pytest.mark.parametrize(("n", "reps"), [(10, 1), (10, 3), (2, 3), (37, 4), (0, 2)])
@pytest.mark.parametrize("shuffle", [False, True])
def test_fixed_size_equals_distributed_sampler(n, reps, shuffle, drop_last):
    # At one batch size each rank's stream is its DistributedSampler shard, cut into pieces.
    for rank in range(reps):
        ours = AdaptiveBatchSampler(n, 3, shuffle=shuffle, seed=5, drop_last=drop_last, num_replicas=reps, rank=rank)
        ref = DistributedSampler(range(n), num_replicas=reps, rank=rank, shuffle=shuffle, seed=5, drop_last=drop_last)
        for epoch in (0, 2):
            ours.set_epoch(epoch)
            ref.set_epoch(epoch)
            expected = list(ref)
            got = list(ours)
            if drop_last:
                expected = expected[: len(expected) // 3 * 3]
            assert flat(got) == expected
            assert all(len(b) == 3 for b in got[:-1])


def expected_sizes(total: int, first: int, sizes: dict[int, int], drop_last: bool) -> list[int]:
    """The batch sizes a rank with ``total`` examples must yield under the schedule ``sizes`` (see drain)."""
    b, pos, out = sizes.get(0, first), 0, []
    while pos < total and not (drop_last and pos + b > total):
        out.append(min(b, total - pos))
        pos += out[-1]
        b = sizes.get(len(out), b)
    return out


@settings(max_examples=80, deadline=None)
@given(
    n=st.integers(0, 200),
    reps=st.integers(1, 4),
    sizes=st.dictionaries(st.integers(0, 40), st.integers(1, 17), max_size=6),
    first=st.integers(1, 17),
    shuffle=st.booleans(),
    drop_last=st.booleans(),
    seed=st.integers(0, 2**31),
)
def test_ranks_cover_the_epoch_once_modulo_padding(n, reps, sizes, first, shuffle, drop_last, seed):
    per_rank = []
    for rank in range(reps):
        kw = {"shuffle": shuffle, "seed": seed, "drop_last": drop_last, "num_replicas": reps, "rank": rank}
        s = AdaptiveBatchSampler(n, first, **kw)
        batches = drain(s, dict(sizes))
        # Every rank yields the same batch sizes (the ranks stay in step), taken in order from its shard.
        assert [len(b) for b in batches] == expected_sizes(s.num_samples, first, sizes, drop_last)
        shard = list(DistributedSampler(range(n), **kw))
        assert flat(batches) == shard[: len(flat(batches))]
        per_rank.append(flat(batches))
    seen = Counter(i for r in per_rank for i in r)
    if drop_last:
        assert set(seen.values()) <= {1}  # the cut tail and a short last batch are dropped; nothing repeats
    else:
        padded = -(-n // reps) * reps
        assert set(seen) == set(range(n))
        assert sum(c - 1 for c in seen.values()) == padded - n  # only the padding repeats


def test_two_ranks_take_strided_shares_of_one_permutation():
    r0 = AdaptiveBatchSampler(11, 2, seed=3, num_replicas=2, rank=0)
    r1 = AdaptiveBatchSampler(11, 2, seed=3, num_replicas=2, rank=1)
    b0, b1 = drain(r0, {2: 3}), drain(r1, {2: 3})
    g = torch.Generator().manual_seed(3)
    perm = torch.randperm(11, generator=g).tolist()
    perm += perm[:1]  # padded to 12
    assert flat(b0) == perm[0::2] and flat(b1) == perm[1::2]
    assert [len(b) for b in b0] == [len(b) for b in b1] == [2, 2, 2]


def test_change_takes_effect_from_the_next_batch_mid_iteration():
    s = AdaptiveBatchSampler(20, 2, shuffle=False)
    it = iter(s)
    assert next(it) == [0, 1]
    s.set_batch_size(5)
    assert next(it) == [2, 3, 4, 5, 6]
    assert len(s) == 3  # 13 left at 5 per batch
    s.set_batch_size(13)
    assert len(s) == 1
    assert next(it) == list(range(7, 20))
    with pytest.raises(StopIteration):
        next(it)
    assert len(s) == 2  # the epoch is over: a full epoch at the current size


def test_len_is_the_remaining_batches():
    s = AdaptiveBatchSampler(10, 4, shuffle=False)
    assert len(s) == 3
    d = AdaptiveBatchSampler(10, 4, shuffle=False, drop_last=True)
    assert len(d) == 2 and [len(b) for b in d] == [4, 4]


def test_epochs_reshuffle_and_set_epoch_keeps_a_resumed_position():
    s = AdaptiveBatchSampler(50, 5, seed=0)
    e0 = flat(list(s))
    s.set_epoch(1)
    e1 = flat(list(s))
    assert sorted(e0) == sorted(e1) == list(range(50)) and e0 != e1
    assert s.epoch == 2  # the end of epoch 1 moved on to epoch 2
    it = iter(s)
    next(it)
    s.set_epoch(2)  # the current epoch: a no-op, so a loop calling set_epoch after resuming keeps its place
    assert len(s) == 9
    s.set_epoch(3)
    assert len(s) == 10


def roundtrip(state):
    buf = io.BytesIO()
    torch.save(state, buf)
    buf.seek(0)
    return torch.load(buf, weights_only=True)


@pytest.mark.parametrize(("reps", "drop_last"), [(1, False), (2, False), (3, True)])
def test_resume_mid_epoch_equals_uninterrupted(reps, drop_last):
    sizes = {0: 3, 4: 7, 9: 2}
    for rank in range(reps):
        kw = {"seed": 11, "drop_last": drop_last, "num_replicas": reps, "rank": rank}
        whole = AdaptiveBatchSampler(100, 3, **kw)
        whole.set_epoch(4)
        expected = drain(whole, {k: v for k, v in sizes.items()})

        first = AdaptiveBatchSampler(100, 3, **kw)
        first.set_epoch(4)
        got = []
        for batch in first:
            got.append(batch)
            if len(got) in sizes:
                first.set_batch_size(sizes[len(got)])
            if len(got) == 6:
                break
        state = roundtrip(first.state_dict())
        # Resume on a fresh sampler built with another batch size: the state carries the size in use.
        resumed = AdaptiveBatchSampler(100, 1, **kw)
        resumed.load_state_dict(state)
        resumed.set_epoch(4)  # what a training loop does at the top of the epoch: must not restart it
        left = len(flat(expected[6:]))
        assert resumed.batch_size == 7 and len(resumed) == -(-left // 7)
        for batch in resumed:
            got.append(batch)
            if len(got) in sizes:
                resumed.set_batch_size(sizes[len(got)])
        assert got == expected


@pytest.mark.parametrize("drop_last", [False, True])
def test_a_checkpoint_between_epochs_resumes_with_the_next_epoch(drop_last):
    # The usual loop, checkpointed after each epoch; resumed from the checkpoint after epoch 0, it must go on with
    # epoch 1, not replay epoch 0 (the finished epoch's state once read as "epoch 0, nothing consumed").
    def run(sampler: AdaptiveBatchSampler, epochs: int, stop_after: int | None = None):
        seen, state = [], None
        for epoch in range(sampler.epoch, epochs):
            sampler.set_epoch(epoch)
            seen += [(epoch, b) for b in sampler]
            state = roundtrip(sampler.state_dict())
            if epoch == stop_after:
                break
        return seen, state

    kw = {"seed": 3, "drop_last": drop_last}
    whole, _ = run(AdaptiveBatchSampler(10, 4, **kw), 3)
    first, state = run(AdaptiveBatchSampler(10, 4, **kw), 3, stop_after=0)
    assert state["epoch"] == 1 and state["consumed"] == 0
    resumed = AdaptiveBatchSampler(10, 4, **kw)
    resumed.load_state_dict(state)
    rest, _ = run(resumed, 3)
    assert first + rest == whole
    assert [e for e, _ in whole] == [0] * len(first) + [1] * (len(rest) // 2) + [2] * (len(rest) // 2)
    # Without set_epoch each epoch is a new permutation; set_epoch with a finished epoch replays it.
    free = AdaptiveBatchSampler(10, 4, **kw)
    e0, e1 = flat(list(free)), flat(list(free))
    assert e0 == flat([b for e, b in whole if e == 0]) and e1 == flat([b for e, b in whole if e == 1]) and e0 != e1
    free.set_epoch(0)
    assert flat(list(free)) == e0


def test_resume_on_another_world_size():
    # 2 ranks x 6 batches of 3 consumed 36 examples; 3 ranks pick up at 12 each, from the same permutation.
    two = [AdaptiveBatchSampler(60, 3, num_replicas=2, rank=r, seed=1) for r in range(2)]
    consumed = []
    for s in two:
        it = iter(s)
        consumed += flat([next(it) for _ in range(6)])
    state = two[0].state_dict()
    assert state["consumed"] == 36
    rest = []
    for r in range(3):
        s = AdaptiveBatchSampler(60, 1, num_replicas=3, rank=r, seed=1)
        s.load_state_dict(state)
        rest += flat(list(s))
    assert sorted(consumed + rest) == list(range(60))
    bad = AdaptiveBatchSampler(60, 1, num_replicas=5, seed=1, rank=0)
    with pytest.raises(ValueError, match="do not divide among num_replicas=5"):
        bad.load_state_dict(state | {"consumed": 36})


def test_with_a_dataloader():
    data = TensorDataset(torch.arange(30.0))
    s = AdaptiveBatchSampler(data, 4, shuffle=False)
    loader = DataLoader(data, batch_sampler=s)
    assert len(loader) == 8
    got = []
    for (x,) in loader:
        got.append(x.tolist())
        if len(got) == 2:
            s.set_batch_size(8)
    assert [len(b) for b in got] == [4, 4, 8, 8, 6]
    assert flat(got) == list(range(30))


def test_defaults_without_distributed():
    s = AdaptiveBatchSampler(range(7), 2)
    assert (s.num_replicas, s.rank) == (1, 0)
    assert repr(s).startswith("AdaptiveBatchSampler(len=7, batch_size=2, epoch=0, position=0/7")
    assert bscale.AdaptiveBatchSampler is AdaptiveBatchSampler


@pytest.mark.parametrize(
    ("args", "kwargs", "match"),
    [
        ((-1, 2), {}, "data_source_or_len must be a non-negative integer"),
        ((object(), 2), {}, "data_source_or_len must be a dataset with len"),
        ((10, 0), {}, r"batch_size must be a positive integer \(examples per rank\)"),
        ((10, 2.5), {}, "batch_size must be a positive integer"),
        ((10, 2), {"num_replicas": 0}, "num_replicas must be a positive integer"),
        ((10, 2), {"num_replicas": 2, "rank": 2}, r"rank must be an integer in \[0, 1\]"),
        ((10, 2), {"seed": 1.5}, "seed must be an integer"),
    ],
)
def test_bad_arguments(args, kwargs, match):
    with pytest.raises(ValueError, match=match):
        AdaptiveBatchSampler(*args, **kwargs)


def test_integral_batch_sizes_of_any_type():
    s = AdaptiveBatchSampler(10, np.int64(4), shuffle=False)
    s.set_batch_size(3.0)  # ctl.batch_size / world as a float, or the wrapper's float stats
    assert s.batch_size == 3 and type(s.batch_size) is int
    assert [len(b) for b in s] == [3, 3, 3, 1]


def test_bad_state_and_calls():
    s = AdaptiveBatchSampler(10, 2, seed=0)
    with pytest.raises(ValueError, match=r"saved with seed=1 .* construct it with seed=1"):
        s.load_state_dict(s.state_dict() | {"seed": 1})
    with pytest.raises(ValueError, match="saved with length=12"):
        s.load_state_dict(s.state_dict() | {"length": 12})
    with pytest.raises(ValueError, match=r"saved with drop_last=True .* construct it with drop_last=True"):
        s.load_state_dict(s.state_dict() | {"drop_last": True})
    old = s.state_dict()
    del old["drop_last"]  # a state saved before drop_last was recorded
    s.load_state_dict(old)
    with pytest.raises(ValueError, match="past the end of the epoch"):
        s.load_state_dict(s.state_dict() | {"consumed": 11})
    with pytest.raises(ValueError, match="epoch must be a non-negative integer"):
        s.set_epoch(-1)


# ---- one real 2-process job (gloo) ----

WORLD = 2
SIZES = {0: 3, 2: 5, 5: 1, 6: 8}
LENGTH = 61


def _rank_job(rank: int, init_file: str, out: str) -> None:
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=WORLD)
    try:
        s = AdaptiveBatchSampler(LENGTH, 3, seed=7)  # num_replicas and rank from torch.distributed
        s.set_epoch(1)
        batches = drain(s, dict(SIZES))
        gathered: list = [None] * WORLD
        dist.all_gather_object(gathered, {"rank": s.rank, "world": s.num_replicas, "batches": batches})
        if rank == 0:
            with open(out, "w") as f:
                json.dump(gathered, f)
    finally:
        dist.destroy_process_group()


@pytest.mark.distributed
def test_two_processes_cover_the_epoch_once(tmp_path):
    out = tmp_path / "batches.json"
    mp.spawn(_rank_job, args=(str(tmp_path / "init"), str(out)), nprocs=WORLD, join=True)
    ranks = json.loads(out.read_text())
    assert [(r["rank"], r["world"]) for r in ranks] == [(0, WORLD), (1, WORLD)]
    sizes = [[len(b) for b in r["batches"]] for r in ranks]
    assert sizes[0] == sizes[1] == [3, 3, 5, 5, 5, 1, 8, 1]
    seen = Counter(i for r in ranks for b in r["batches"] for i in b)
    assert set(seen) == set(range(LENGTH)) and sum(seen.values()) == 62  # 61 padded to 62: one repeat
    for r in range(WORLD):  # each process chose exactly what the one-process simulation of its rank chooses
        s = AdaptiveBatchSampler(LENGTH, 3, seed=7, num_replicas=WORLD, rank=r)
        s.set_epoch(1)
        assert ranks[r]["batches"] == drain(s, dict(SIZES))
