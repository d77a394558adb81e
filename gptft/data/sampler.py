"""Batch samplers: a new seeded order each epoch, optionally grouping examples of similar length."""

from __future__ import annotations

from collections.abc import Iterator, Sequence

import torch


class EpochBatchSampler:
    """Yields lists of example indices; every example once per epoch (bar ``drop_last``).

    The order depends only on ``(seed, epoch)``, so a resumed run sees the same batches.
    Batches are formed as *global* batches of ``batch_size * num_processes`` examples, each then
    cut into ``num_processes`` consecutive batches of ``batch_size``; Accelerate's prepared loader
    hands batch ``i`` to process ``i % num_processes``, so one step of N processes with
    ``batch_size=b`` sees exactly the examples of one step of 1 process with ``batch_size=N*b``.
    With ``group_by_length`` the shuffled indices are cut into windows of ``window`` global
    batches, each window is sorted by length and cut into global batches, and the global batches
    are shuffled: batches hold examples of similar length (little padding) in a random order.
    ``drop_last`` drops the incomplete last global batch (training) unless it is the only one:
    Accelerate would otherwise fill it up with repeated examples on several processes.

    With ``grad_accum_steps`` (``set_grad_accum_steps``: the trainer sets it) the global batches are
    those of a whole optimizer step, ``batch_size * num_processes * grad_accum_steps`` examples, cut
    into ``num_processes * grad_accum_steps`` batches of ``batch_size``: the examples of each step
    (and what ``drop_last`` drops) then depend only on that product, not on how it is split into
    processes, micro-batches and accumulation, so a run can resume on another number of processes.

    Call ``set_epoch(epoch)`` before iterating (``Accelerate``'s prepared loader keeps this object).
    """

    def __init__(self, lengths: Sequence[int], batch_size: int, seed: int = 0,
                 shuffle: bool = True, group_by_length: bool = False, window: int = 64,
                 num_processes: int = 1, drop_last: bool = False):
        self.lengths = list(lengths)
        self.batch_size = batch_size  # per process: Accelerate reads it
        self.seed = seed
        self.shuffle = shuffle
        self.group_by_length = group_by_length
        self.window = window
        self.num_processes = num_processes
        self.drop_incomplete = drop_last  # not `drop_last`: Accelerate reads that name
        self.grad_accum_steps = 1
        self.epoch = 0

    def set_grad_accum_steps(self, steps: int) -> None:
        """Form the global batches of whole optimizer steps of `steps` micro-batches."""
        self.grad_accum_steps = steps

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        full, rest = divmod(len(self.lengths), self._global_size())
        tail = 0 if self.drop_incomplete and full else (rest + self.batch_size - 1) // self.batch_size
        return full * self.num_processes * self.grad_accum_steps + tail

    def _global_size(self) -> int:
        return self.batch_size * self.num_processes * self.grad_accum_steps

    def __iter__(self) -> Iterator[list[int]]:
        batches = self._global_batches()
        full = self._global_size()
        for batch in batches:
            if self.drop_incomplete and len(batches) > 1 and len(batch) < full:
                continue  # only ever the last one
            yield from (batch[i : i + self.batch_size] for i in range(0, len(batch), self.batch_size))

    def _global_batches(self) -> list[list[int]]:
        size = self._global_size()
        g = torch.Generator().manual_seed(self.seed * 1_000_003 + self.epoch)
        n = len(self.lengths)
        order = torch.randperm(n, generator=g).tolist() if self.shuffle else list(range(n))
        if not self.group_by_length:
            return [order[i : i + size] for i in range(0, n, size)]
        span = size * self.window
        batches = []
        for start in range(0, n, span):
            chunk = sorted(order[start : start + span], key=lambda i: -self.lengths[i])
            batches += [chunk[i : i + size] for i in range(0, len(chunk), size)]
        # The short remainder batch of the last window goes last, so every other batch is full.
        full, rest = batches[:-1], batches[-1:]
        if self.shuffle:
            full = [full[i] for i in torch.randperm(len(full), generator=g).tolist()]
        return full + rest
