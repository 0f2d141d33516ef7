"""Epoch batch plans: which indices form each batch, for every rank.

A plan is a list of int64 arrays (global batches), identical on every rank because it depends
only on (durations, seed, epoch, flags). Rank r takes plan[r::world_size]; the plan length is
made a multiple of world_size first, so all ranks take the same number of steps.

Modes
  fixed    ``batch_size`` items per batch (the HF example's --per_device_*_batch_size)
  budget   ``max_batch_seconds`` of *padded* audio per batch (len(batch) * longest item), formed
           in length-sorted buckets: shuffle, cut into chunks of ``bucket_chunk`` items, sort each
           chunk by duration, fill batches greedily under the budget, then shuffle the batches.
"""
from __future__ import annotations

import numpy as np

#: Items sorted together in budget mode: large enough for little padding, small enough to vary
#: batch composition from epoch to epoch.
BUCKET_CHUNK = 20_000


def epoch_rng(seed: int, epoch: int) -> np.random.Generator:
    return np.random.default_rng([int(seed) & 0xFFFFFFFF, int(epoch)])


def fixed_batches(order: np.ndarray, batch_size: int) -> list[np.ndarray]:
    if batch_size < 1:
        raise ValueError("batch_size must be >= 1")
    return [order[i:i + batch_size] for i in range(0, len(order), batch_size)]


def budget_batches(order: np.ndarray, durations: np.ndarray, max_seconds: float,
                   bucket_chunk: int = BUCKET_CHUNK) -> list[np.ndarray]:
    """Greedy batches under a padded-seconds budget within length-sorted chunks of ``order``.

    An item longer than the budget forms a batch of its own.
    """
    batches = []
    for lo in range(0, len(order), bucket_chunk):
        chunk = order[lo:lo + bucket_chunk]
        chunk = chunk[np.argsort(durations[chunk], kind="stable")]
        start = 0
        for j in range(1, len(chunk) + 1):
            # chunk is ascending, so chunk[j] would be the new longest item of the batch
            if j == len(chunk) or (j + 1 - start) * durations[chunk[j]] > max_seconds:
                batches.append(chunk[start:j])
                start = j
    return batches


def balance(batches: list[np.ndarray], world_size: int) -> list[np.ndarray]:
    """Make len(batches) a multiple of world_size by halving the largest batches.

    Covers every item. If too few batches can be split (all single items), the last
    ``len % world_size`` batches are dropped instead.
    """
    batches = list(batches)
    while len(batches) % world_size:
        sizes = np.array([len(b) for b in batches])
        j = int(len(sizes) - 1 - np.argmax(sizes[::-1]))   # last of the largest
        if sizes[j] < 2:
            return batches[: len(batches) - len(batches) % world_size]
        half = (sizes[j] + 1) // 2
        batches[j:j + 1] = [batches[j][:half], batches[j][half:]]
    return batches


def plan_epoch(durations: np.ndarray, *, batch_size: int, max_batch_seconds: float | None,
               shuffle: bool, seed: int, epoch: int, world_size: int,
               bucket_chunk: int = BUCKET_CHUNK) -> list[np.ndarray]:
    """The global batch plan of one epoch (see module doc)."""
    n = len(durations)
    rng = epoch_rng(seed, epoch)
    order = rng.permutation(n) if shuffle else np.arange(n)
    if max_batch_seconds is None:
        batches = fixed_batches(order, batch_size)
    else:
        if max_batch_seconds <= 0:
            raise ValueError("max_batch_seconds must be > 0")
        batches = budget_batches(order, np.asarray(durations, dtype=np.float64), max_batch_seconds,
                                 bucket_chunk if shuffle else max(n, 1))
        if shuffle:
            batches = [batches[k] for k in rng.permutation(len(batches))]
    return balance(batches, world_size)


def padding_fraction(batches: list[np.ndarray], durations: np.ndarray) -> float:
    """Fraction of padded samples over all batches (padding / padded total)."""
    real = sum(float(durations[b].sum()) for b in batches)
    padded = sum(float(durations[b].max()) * len(b) for b in batches if len(b))
    return 1.0 - real / padded if padded else 0.0
