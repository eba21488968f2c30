"""Which case each training step draws, and with which random patches: fixed by ``(seed, epoch)`` alone.

Every process computes the same global order of draws for an epoch; a process of a distributed run
takes its share of each global batch. The random transforms (patch position, augmentation) of a draw
are seeded by its position in that order, so a patch depends neither on how many processes train nor
on which process or loader worker draws it. That is what makes a 2-process run match a 1-process run
with the same global batch, and a resumed run match an uninterrupted one.
"""

from __future__ import annotations

import math

import numpy as np
from monai.data import CacheDataset


def epoch_draws(num_cases: int, global_batch: int, steps: int, epoch_seed: int) -> list[int]:
    """Case indices of an epoch's ``steps * global_batch`` draws: shuffled passes over the cases
    (a new permutation for each pass), cut to length."""
    rng = np.random.default_rng(epoch_seed)
    needed = steps * global_batch
    passes = math.ceil(needed / num_cases)
    return [int(i) for _ in range(passes) for i in rng.permutation(num_cases)][:needed]


def rank_keys(draws: list[int], num_cases: int, global_batch: int, rank: int, world_size: int) -> list[int]:
    """This rank's dataset keys, batch after batch: its slice of each global batch. A key encodes the
    draw's position and its case (``position * num_cases + case``) for :class:`DrawSeededDataset`."""
    per_rank = global_batch // world_size
    keys = []
    for start in range(0, len(draws), global_batch):
        first = start + rank * per_rank
        keys += [pos * num_cases + draws[pos] for pos in range(first, first + per_rank)]
    return keys


def steps_per_epoch(num_cases: int, global_batch: int, iterations: int | None) -> int:
    """``iterations`` when set, else one pass over the cases (the last batch filled from a new pass)."""
    return iterations or math.ceil(num_cases / global_batch)


class DrawSeededDataset(CacheDataset):
    """A MONAI CacheDataset whose random transforms are seeded per draw (see the module docstring).

    Indexed by the keys of :func:`rank_keys`; ``epoch_seed`` is set before each epoch's loader starts.
    """

    epoch_seed: int = 0

    def __getitem__(self, key):  # noqa: D105
        position, case = divmod(int(key), len(self.data))
        self.transform.set_random_state(seed=(self.epoch_seed * 1_000_003 + position) % 2**32)
        return self._transform(case)
