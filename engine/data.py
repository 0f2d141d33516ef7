"""PLACEHOLDER (replaced by the data branch): --train_dir only, fixed batches."""
from __future__ import annotations
import glob, os
import numpy as np, soundfile as sf, soxr, torch


class DataError(ValueError):
    pass


def add_data_args(p):
    g = p.add_argument_group("data flags")
    g.add_argument("--train_dir", default=None)
    g.add_argument("--validation_dir", default=None)
    g.add_argument("--train_manifest", default=None)
    g.add_argument("--validation_manifest", default=None)
    g.add_argument("--max_batch_seconds", type=float, default=None)
    g.add_argument("--dataloader_num_workers", type=int, default=0)


class AudioDataset(torch.utils.data.Dataset):
    def __init__(self, paths, durations, sr):
        self.paths, self.durations, self.sr = paths, np.asarray(durations), sr
        self.ids = list(paths)

    def __len__(self):
        return len(self.paths)

    def __getitem__(self, i):
        x, sr = sf.read(self.paths[i], dtype="float32", always_2d=True)
        x = x.mean(1)
        if sr != self.sr:
            x = soxr.resample(x, sr, self.sr).astype(np.float32)
        x = (x - x.mean()) / np.sqrt(x.var() + 1e-7)
        return {"input_values": x, "id": self.ids[i]}


def build_datasets(args, sampling_rate):
    files = sorted(glob.glob(os.path.join(args.train_dir, "**", "*.wav"), recursive=True))
    d = [sf.info(f).duration for f in files]
    keep = [(f, x) for f, x in zip(files, d) if args.min_duration_in_seconds <= x <= args.max_duration_in_seconds]
    n_val = len(keep) * args.validation_split_percentage // 100
    tr = AudioDataset([f for f, _ in keep[n_val:]], [x for _, x in keep[n_val:]], sampling_rate)
    va = AudioDataset([f for f, _ in keep[:n_val]], [x for _, x in keep[:n_val]], sampling_rate) if n_val else None
    return tr, va


def _collate(items, pad_to_multiple_of=None):
    items = [it for it in items if it is not None]
    S = max(len(it["input_values"]) for it in items)
    if pad_to_multiple_of:
        S = -(-S // pad_to_multiple_of) * pad_to_multiple_of
    x = torch.zeros(len(items), S)
    m = torch.zeros(len(items), S, dtype=torch.long)
    for i, it in enumerate(items):
        n = len(it["input_values"])
        x[i, :n] = torch.from_numpy(it["input_values"])
        m[i, :n] = 1
    return {"input_values": x, "attention_mask": m, "ids": [it["id"] for it in items]}


def build_loader(dataset, *, batch_size, shuffle, seed, epoch, rank, world_size, num_workers,
                 pad_to_multiple_of, start_batch=0, max_batch_seconds=None):
    g = np.random.default_rng(seed + epoch)
    idx = g.permutation(len(dataset)) if shuffle else np.arange(len(dataset))
    n = len(idx) // world_size * world_size
    idx = idx[:n][rank::world_size]
    batches = [idx[i:i + batch_size].tolist() for i in range(0, len(idx), batch_size)][start_batch:]
    return torch.utils.data.DataLoader(dataset, batch_sampler=batches, num_workers=num_workers,
                                       collate_fn=lambda b: _collate(b, pad_to_multiple_of))
