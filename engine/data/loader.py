"""Batches on the CPU: collate (right zero padding + attention mask) and the per-rank loader."""
from __future__ import annotations

import zlib

import numpy as np
import torch

from .batching import BUCKET_CHUNK, plan_epoch


def collate(items: list, pad_to_multiple_of: int | None = None,
            mask_dtype: torch.dtype = torch.long, crop_seed: int | None = None) -> dict:
    """[{"input_values": float32[n], "id": str} | None] -> Batch (None items dropped).

    Batch: input_values FloatTensor[B, S] (zero padded on the right), attention_mask
    LongTensor[B, S] (1 = real sample; ``mask_dtype`` may make it bool/int32), lengths
    LongTensor[B] (real samples per row = attention_mask.sum(1)), ids list[str], padded (bool:
    whether any row has padding); S is rounded up to pad_to_multiple_of.

    With ``crop_seed`` set, every item is cropped to the batch's shortest at a random offset
    (fairseq's wav2vec 2.0 recipe): no padding, so the model needs no attention mask. The offsets
    are a function of crop_seed and the batch's ids, so a resumed run crops the same way.
    """
    return unpack(pack(items, pad_to_multiple_of, mask_dtype, crop_seed))


def pack(items: list, pad_to_multiple_of: int | None = None, mask_dtype: torch.dtype = torch.long,
         crop_seed: int | None = None) -> dict:
    """``collate``'s work, with the three tensors laid out in one uint8 ``buffer`` (see ``unpack``).

    In a DataLoader worker the buffer is allocated in shared memory, so a batch travels to the main
    process as one file descriptor (torch hands over each tensor's storage separately, through a
    socket round trip with the worker) and its pages are written once, here.
    """
    items = [it for it in items if it is not None]
    if crop_seed is not None and items:
        items = _crop_to_shortest(items, crop_seed)
    lengths = [len(it["input_values"]) for it in items]
    B, seq = len(items), max(lengths, default=0)
    if pad_to_multiple_of and seq % pad_to_multiple_of:
        seq += pad_to_multiple_of - seq % pad_to_multiple_of
    layout = _layout(B, seq, mask_dtype)
    buffer, zeroed = _alloc_bytes(layout[-1])
    lengths_t, values_t, mask_t = _views(buffer, B, seq, mask_dtype, layout)
    lengths_t.copy_(torch.tensor(lengths, dtype=torch.long))
    values, mask = values_t.numpy(), mask_t.numpy()
    for row, (it, n) in enumerate(zip(items, lengths)):
        values[row, :n] = it["input_values"]
        mask[row, :n] = 1
        if not zeroed and n < seq:
            values[row, n:] = 0
            mask[row, n:] = 0
    return {"buffer": buffer, "shape": (B, seq), "mask_dtype": mask_dtype,
            "ids": [it["id"] for it in items], "padded": any(n != seq for n in lengths)}


def unpack(packed: dict) -> dict:
    """A ``pack`` result -> Batch (tensors are views of its buffer, which may be pinned by now)."""
    B, seq = packed["shape"]
    lengths, values, mask = _views(packed["buffer"], B, seq, packed["mask_dtype"])
    return {"input_values": values, "attention_mask": mask, "lengths": lengths,
            "ids": packed["ids"], "padded": packed["padded"]}


_ALIGN = 64


def _layout(B: int, seq: int, mask_dtype: torch.dtype) -> tuple[int, int, int]:
    """Byte offsets of input_values and attention_mask, and the total size, in a packed buffer
    (lengths first: int64[B]; each part starts on a 64-byte boundary)."""
    up = lambda n: -(-n // _ALIGN) * _ALIGN  # noqa: E731
    values_at = up(8 * B)
    mask_at = up(values_at + 4 * B * seq)
    return values_at, mask_at, mask_at + mask_dtype.itemsize * B * seq


def _views(buffer: torch.Tensor, B: int, seq: int, mask_dtype: torch.dtype, layout=None):
    values_at, mask_at, end = layout or _layout(B, seq, mask_dtype)
    lengths = buffer[:8 * B].view(torch.long)
    values = buffer[values_at:mask_at][:4 * B * seq].view(torch.float32).view(B, seq)
    mask = buffer[mask_at:end].view(mask_dtype).view(B, seq)
    return lengths, values, mask


def _crop_to_shortest(items: list, crop_seed: int) -> list:
    shortest = min(len(it["input_values"]) for it in items)
    rng = np.random.default_rng([crop_seed, zlib.crc32("\n".join(it["id"] for it in items).encode())])
    out = []
    for it in items:
        x = it["input_values"]
        start = int(rng.integers(0, len(x) - shortest + 1))
        out.append({**it, "input_values": x[start:start + shortest]})
    return out


def _alloc_bytes(nbytes: int) -> tuple[torch.Tensor, bool]:
    """(uninitialized uint8[nbytes], whether it is known to be zero-filled).

    In a DataLoader worker: a fresh shared-memory segment (a new tmpfs file, hence zero-filled),
    so sending it to the main process costs no copy, and the padding needs no writes."""
    if torch.utils.data.get_worker_info() is None:
        return torch.empty(nbytes, dtype=torch.uint8), False
    storage = torch.UntypedStorage._new_shared(max(nbytes, 1))
    return torch.empty(0, dtype=torch.uint8).set_(storage)[:nbytes], True


class _Fetcher(torch.utils.data.Dataset):
    """What the DataLoader sees: one batch of indices in -> (items, skips, refilled) out."""

    def __init__(self, dataset):
        self.dataset = dataset

    def __len__(self):
        return len(self.dataset)

    def __getitems__(self, indices):
        return self.dataset.fetch_batch(indices)

    def __getitem__(self, i):  # unused by the batch path; keeps the Dataset protocol whole
        return self.dataset.fetch_batch([i])


class _Collate:
    def __init__(self, pad_to_multiple_of, mask_dtype, crop_seed=None):
        self.pad_to_multiple_of = pad_to_multiple_of
        self.mask_dtype = mask_dtype
        self.crop_seed = crop_seed

    def __call__(self, fetched):
        items, skips, refilled = fetched
        packed = pack(items, self.pad_to_multiple_of, self.mask_dtype, self.crop_seed)
        packed["_skips"] = skips
        packed["_refilled"] = refilled
        return packed


def _worker_init(_):
    torch.set_num_threads(1)


class AudioLoader:
    """Iterable of Batch for one rank and one epoch; ``len()`` = batches it will yield.

    Attributes: ``batches_per_epoch`` (this rank's batches, ignoring start_batch),
    ``start_batch``, ``refilled`` (all-bad batches replaced so far), ``dataset``.
    Skips seen in worker processes are recorded on ``dataset`` as batches arrive.
    """

    def __init__(self, dataset, batches: list[np.ndarray], *, start_batch: int, num_workers: int,
                 pad_to_multiple_of: int | None, prefetch_factor: int = 2,
                 mask_dtype: torch.dtype = torch.long, crop_seed: int | None = None):
        self.dataset = dataset
        self.crop_seed = crop_seed
        self.batches_per_epoch = len(batches)
        self.start_batch = min(max(int(start_batch), 0), len(batches))
        self._batches = [b.tolist() for b in batches[self.start_batch:]]
        self.num_workers = int(num_workers)
        self.pad_to_multiple_of = pad_to_multiple_of
        self.prefetch_factor = prefetch_factor
        self.mask_dtype = mask_dtype
        self.refilled = 0

    def __len__(self) -> int:
        return len(self._batches)

    def __iter__(self):
        if not self._batches:
            return
        kw = {}
        if self.num_workers > 0:
            kw = dict(prefetch_factor=self.prefetch_factor, worker_init_fn=_worker_init,
                      persistent_workers=False)
        loader = torch.utils.data.DataLoader(
            _Fetcher(self.dataset), batch_sampler=self._batches, num_workers=self.num_workers,
            collate_fn=_Collate(self.pad_to_multiple_of, self.mask_dtype, self.crop_seed),
            pin_memory=torch.cuda.is_available(), **kw)
        for packed in loader:
            batch = unpack(packed)
            skips = packed["_skips"]
            if packed["_refilled"]:
                self.refilled += 1
            if skips:
                self.dataset.record_skips(skips)
            self.dataset.note_attempts(len(batch["ids"]) + len(skips))
            yield batch


def build_loader(dataset, *, batch_size: int, shuffle: bool, seed: int, epoch: int, rank: int,
                 world_size: int, num_workers: int, pad_to_multiple_of: int | None,
                 start_batch: int = 0, max_batch_seconds: float | None = None,
                 bucket_chunk: int = BUCKET_CHUNK, prefetch_factor: int = 2,
                 mask_dtype: torch.dtype = torch.long, crop_to_shortest: bool = False) -> AudioLoader:
    """This rank's batches of one epoch (see engine/data/batching.py for the plan).

    Every rank gets the same number of batches; ranks cover disjoint items. The plan depends
    only on (seed, epoch, durations, flags), so ``start_batch=k`` resumes exactly where batch k
    of that epoch would start, without decoding the k skipped batches. ``max_batch_seconds``,
    when set, replaces ``batch_size`` with a budget of padded audio seconds per batch.

    Transport cost: a worker batch travels as one shared-memory buffer (see ``pack``); its pages
    (written by the worker, freed by the main process) are the largest per-batch cost on both sides.
    ``mask_dtype=torch.bool`` (what the trainer uses) cuts them from 12 to 5 bytes per sample
    (contract default: torch.long). ``prefetch_factor`` batches per worker are kept in flight (shared memory use:
    workers x prefetch_factor x batch bytes). ``crop_to_shortest`` crops each batch to its shortest
    item (see ``collate``); pair it with ``max_batch_seconds`` so that batches hold similar lengths.
    """
    if not 0 <= rank < world_size:
        raise ValueError(f"rank {rank} not in [0, {world_size})")
    plan = plan_epoch(dataset.durations, batch_size=batch_size, max_batch_seconds=max_batch_seconds,
                      shuffle=shuffle, seed=seed, epoch=epoch, world_size=world_size,
                      bucket_chunk=bucket_chunk)
    return AudioLoader(dataset, plan[rank::world_size], start_batch=start_batch,
                       num_workers=num_workers, pad_to_multiple_of=pad_to_multiple_of,
                       prefetch_factor=prefetch_factor, mask_dtype=mask_dtype,
                       crop_seed=(seed * 1_000_003 + epoch) if crop_to_shortest else None)
