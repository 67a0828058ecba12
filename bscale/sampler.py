"""A batch sampler whose batch size can change mid-epoch without skipping or repeating an example."""

from __future__ import annotations

import numbers
from collections.abc import Iterator, Mapping, Sized
from typing import Any

import torch
import torch.distributed as dist
from torch.utils.data import Sampler

__all__ = ["AdaptiveBatchSampler"]


def _whole(value: Any) -> bool:
    """An integer of any type: Python's, numpy's, or a float such as 4.0 that is one."""
    if isinstance(value, bool):
        return False
    return isinstance(value, numbers.Integral) or (isinstance(value, float) and value.is_integer())


def _non_negative_int(name: str, value: Any) -> int:
    if not _whole(value) or value < 0:
        raise ValueError(f"{name} must be a non-negative integer, got {value!r}")
    return int(value)


class AdaptiveBatchSampler(Sampler[list[int]]):
    r"""Yields one list of indices per batch, with a batch size that may change between any two batches.

    Pass it as ``DataLoader(dataset, batch_sampler=sampler)``. Within an epoch the examples come in one fixed
    order and each batch takes the next ``batch_size`` of them, so :meth:`set_batch_size` takes effect from
    the next batch and no example of the epoch is skipped or repeated, however often the size changes.

    Across ranks it follows :class:`~torch.utils.data.distributed.DistributedSampler`: every rank draws the
    same permutation from ``seed + epoch``; without ``drop_last`` the permutation is padded with its own first
    indices to a multiple of ``num_replicas``, with ``drop_last`` its tail is cut to one; rank ``k`` takes the
    entries ``k, k + num_replicas, ...``. At a fixed batch size a rank's batches are exactly its
    DistributedSampler shard, cut into consecutive pieces. ``batch_size`` is **per rank**: the global batch is
    ``batch_size × num_replicas``. Ranks stay in step as long as every rank calls :meth:`set_batch_size` with
    the same value at the same batch.

    The last batch of an epoch may be short; with ``drop_last`` it is dropped instead. Once an epoch's last
    batch is handed out, the sampler is at the start of the next epoch (``epoch + 1``): a checkpoint taken
    between epochs resumes with the next one, and a loop that never calls :meth:`set_epoch` still gets a fresh
    permutation every epoch.

    The sampler tracks how far into the epoch it has handed out indices. A ``DataLoader`` with ``num_workers >
    0`` draws ``prefetch_factor × num_workers`` batches ahead of the training loop, so a new size reaches the
    loop that many batches later and a :meth:`state_dict` taken mid-epoch counts those prefetched batches as
    consumed; with ``num_workers=0`` both are exact.

    Args:
        data_source_or_len: the dataset (anything with ``len``) or its length.
        batch_size: examples per batch on each rank.
        shuffle: draw a fresh permutation each epoch. (default: True)
        seed: the permutation of epoch ``e`` is drawn from ``seed + e``; must be the same on every rank.
            (default: 0)
        drop_last: cut the epoch to a multiple of ``num_replicas`` and drop a short last batch, instead of
            padding and yielding it. (default: False)
        num_replicas: data-parallel ranks; None reads the world size of ``torch.distributed`` when
            initialized, else 1. (default: None)
        rank: this rank; None reads it from ``torch.distributed`` when initialized, else 0. (default: None)

    Example::

        >>> sampler = AdaptiveBatchSampler(dataset, ctl.batch_size // world_size)
        >>> loader = DataLoader(dataset, batch_sampler=sampler)
        >>> for epoch in range(epochs):
        ...     sampler.set_epoch(epoch)
        ...     for x, y in loader:
        ...         opt.microbatch_size = len(x)  # the wrapper counts the examples of each backward
        ...         ...  # forward, backward, opt.step() feeds the controller
        ...         sampler.set_batch_size(ctl.batch_size // world_size)

    (With gradient accumulation instead, keep the sampler at the microbatch and take
    ``ctl.accumulation_steps(microbatch, world_size)`` microbatches per step.)
    """

    def __init__(
        self,
        data_source_or_len: Sized | int,
        batch_size: int,
        *,
        shuffle: bool = True,
        seed: int = 0,
        drop_last: bool = False,
        num_replicas: int | None = None,
        rank: int | None = None,
    ) -> None:
        if isinstance(data_source_or_len, int) and not isinstance(data_source_or_len, bool):
            n = _non_negative_int("data_source_or_len", data_source_or_len)
        elif isinstance(data_source_or_len, Sized):
            n = len(data_source_or_len)
        else:
            raise ValueError(
                f"data_source_or_len must be a dataset with len() or its length, got {type(data_source_or_len)!r}"
            )
        distributed = dist.is_available() and dist.is_initialized()
        if num_replicas is None:
            num_replicas = dist.get_world_size() if distributed else 1
        if rank is None:
            rank = dist.get_rank() if distributed else 0
        if isinstance(num_replicas, bool) or not isinstance(num_replicas, int) or num_replicas < 1:
            raise ValueError(f"num_replicas must be a positive integer, got {num_replicas!r}")
        if isinstance(rank, bool) or not isinstance(rank, int) or not 0 <= rank < num_replicas:
            raise ValueError(f"rank must be an integer in [0, {num_replicas - 1}], got {rank!r}")
        if isinstance(seed, bool) or not isinstance(seed, int):
            raise ValueError(f"seed must be an integer, got {seed!r}")
        self._len = n
        self.shuffle = bool(shuffle)
        self.seed = seed
        self.drop_last = bool(drop_last)
        self.num_replicas = num_replicas
        self.rank = rank
        # DistributedSampler's shard size: cut the tail to a multiple of the ranks, or pad up to one.
        if self.drop_last:
            self.num_samples = n // num_replicas
        else:
            self.num_samples = -(-n // num_replicas)
        self.batch_size = 1
        self.set_batch_size(batch_size)
        self.epoch = 0
        self._position = 0  # indices of this rank's shard already handed out in the current epoch

    def set_batch_size(self, batch_size: int) -> None:
        """Use ``batch_size`` examples per rank from the next batch on."""
        if not _whole(batch_size) or batch_size < 1:
            raise ValueError(f"batch_size must be a positive integer (examples per rank), got {batch_size!r}")
        self.batch_size = int(batch_size)

    def set_epoch(self, epoch: int) -> None:
        """Start epoch ``epoch`` from its beginning; a no-op for the current epoch (e.g. just resumed, or just
        moved on to at the end of the last)."""
        epoch = _non_negative_int("epoch", epoch)
        if epoch != self.epoch:
            self.epoch = epoch
            self._position = 0

    def _shard(self) -> list[int]:
        n, reps = self._len, self.num_replicas
        if self.shuffle:
            g = torch.Generator()
            g.manual_seed(self.seed + self.epoch)
            order = torch.randperm(n, generator=g).tolist()
        else:
            order = list(range(n))
        total = self.num_samples * reps
        if total > n:
            # Pad with the permutation's own head, repeated if there are fewer examples than ranks.
            order += (order * (-(-(total - n) // max(n, 1))))[: total - n]
        return order[self.rank : total : reps]

    def __iter__(self) -> Iterator[list[int]]:
        shard = self._shard()
        while self._position < self.num_samples:
            end = self._position + self.batch_size
            if end > self.num_samples and self.drop_last:
                break
            batch = shard[self._position : end]
            self._position = min(end, self.num_samples)
            yield batch
        # The epoch is over: the sampler moves on to the next one, so a state_dict() taken between epochs resumes
        # there (and not at the start of the finished epoch). set_epoch() with the next epoch is then a no-op, and
        # with the finished one replays it.
        self.epoch += 1
        self._position = 0

    def __len__(self) -> int:
        """Batches left in the current epoch at the current batch size (a full epoch before it starts)."""
        remaining = self.num_samples - self._position
        if self.drop_last:
            return remaining // self.batch_size
        return -(-remaining // self.batch_size)

    def state_dict(self) -> dict[str, Any]:
        """Epoch, position within it and batch size (the position counts examples over all ranks), and the
        settings a resumed sampler must share: seed, shuffle, length and drop_last."""
        return {
            "epoch": self.epoch,
            "consumed": self._position * self.num_replicas,
            "batch_size": self.batch_size,
            "seed": self.seed,
            "shuffle": self.shuffle,
            "length": self._len,
            "drop_last": self.drop_last,
        }

    def load_state_dict(self, state_dict: Mapping[str, Any]) -> None:
        """Continue exactly where :meth:`state_dict` was taken, also on another rank of the same run.

        The number of ranks may change between save and load when the examples consumed divide evenly among
        the new ranks.
        """
        # A state saved before drop_last was recorded holds no value for it: nothing to compare.
        saved = {"drop_last": self.drop_last, **state_dict}
        checked = [("seed", self.seed), ("shuffle", self.shuffle), ("length", self._len), ("drop_last", self.drop_last)]
        for key, have in checked:
            if saved[key] != have:
                raise ValueError(
                    f"the state was saved with {key}={saved[key]!r} but this sampler has "
                    f"{key}={have!r}; "
                    f"construct it with {key}={saved[key]!r}"
                )
        consumed = _non_negative_int("consumed", state_dict["consumed"])
        if consumed % self.num_replicas:
            raise ValueError(
                f"{consumed} examples consumed do not divide among num_replicas={self.num_replicas}; "
                "resume with the number of ranks of the saved run"
            )
        position = consumed // self.num_replicas
        if position > self.num_samples:
            raise ValueError(f"saved position {position} lies past the end of the epoch ({self.num_samples})")
        self.set_batch_size(state_dict["batch_size"])
        self.epoch = _non_negative_int("epoch", state_dict["epoch"])
        self._position = position

    def __repr__(self) -> str:
        return (
            f"{type(self).__name__}(len={self._len}, batch_size={self.batch_size}, epoch={self.epoch}, "
            f"position={self._position}/{self.num_samples}, shuffle={self.shuffle}, "
            f"drop_last={self.drop_last}, "
            f"num_replicas={self.num_replicas}, rank={self.rank})"
        )
