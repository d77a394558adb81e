"""Batch samplers: a new seeded order each epoch, optionally grouping examples of similar length."""

from __future__ import annotations

from collections.abc import Iterator, Sequence

import torch


class EpochBatchSampler:
    """Yields lists of example indices; every example exactly once per epoch.

    The order depends only on ``(seed, epoch)``, so a resumed run sees the same batches.
    With ``group_by_length`` the shuffled indices are cut into windows of ``window`` batches,
    each window is sorted by length and cut into batches, and the batches are shuffled: batches
    hold examples of similar length (little padding) in a random order.

    Call ``set_epoch(epoch)`` before iterating (``Accelerate``'s prepared loader keeps this object).
    """

    def __init__(self, lengths: Sequence[int], batch_size: int, seed: int = 0,
                 shuffle: bool = True, group_by_length: bool = False, window: int = 64):
        self.lengths = list(lengths)
        self.batch_size = batch_size
        self.seed = seed
        self.shuffle = shuffle
        self.group_by_length = group_by_length
        self.window = window
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return (len(self.lengths) + self.batch_size - 1) // self.batch_size

    def __iter__(self) -> Iterator[list[int]]:
        g = torch.Generator().manual_seed(self.seed * 1_000_003 + self.epoch)
        n = len(self.lengths)
        order = torch.randperm(n, generator=g).tolist() if self.shuffle else list(range(n))
        if not self.group_by_length:
            yield from (order[i : i + self.batch_size] for i in range(0, n, self.batch_size))
            return
        span = self.batch_size * self.window
        batches = []
        for start in range(0, n, span):
            chunk = sorted(order[start : start + span], key=lambda i: -self.lengths[i])
            batches += [chunk[i : i + self.batch_size] for i in range(0, len(chunk), self.batch_size)]
        # The short remainder batch of the last window goes last, so every other batch is full.
        full, rest = batches[:-1], batches[-1:]
        if self.shuffle:
            full = [full[i] for i in torch.randperm(len(full), generator=g).tolist()]
        yield from full + rest
