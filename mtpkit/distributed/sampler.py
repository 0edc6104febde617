"""Data parallelism over a global batch plan: each rank takes a disjoint part of every batch.

The plan (which samples form global batch i of epoch e) is computed identically on every rank
from the seed, so the data a run trains on depends on the seed only, not on the world size:
N processes see exactly the global batches one process would, each sample once per epoch, and
a checkpoint's data position (epoch, batch) means the same thing at any world size.
"""

from __future__ import annotations


def rank_part(indices: list[int], rank: int, world: int) -> list[int]:
    """This rank's part of a global batch: every world-th item from position `rank`.

    Batches are sorted by length, so strided parts have similar lengths (and padding).
    """
    return list(indices[rank::world])


def rank_batch(indices: list[int], rank: int, world: int) -> tuple[list[int], bool]:
    """(items, padding): a rank whose part is empty takes the first item as padding.

    Every rank must run every step (FSDP's collectives pair up across ranks), so a rank left
    without samples computes on one it must mask out of the loss: padding=True.
    """
    part = rank_part(indices, rank, world)
    return (part, False) if part else (list(indices[:1]), True)
