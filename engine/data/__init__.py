"""Audio data: sources -> index (ids, durations) -> decode/resample/normalize -> batches.

Public API (contract in docs/ARCHITECTURE.md):

    DataError                         ValueError whose message names the flag or file
    add_data_args(parser)             our data flags (see engine/data/args.py for help texts)
    build_datasets(args, sampling_rate) -> (AudioDataset, AudioDataset | None)
    build_loader(dataset, *, batch_size, shuffle, seed, epoch, rank, world_size, num_workers,
                 pad_to_multiple_of, start_batch=0, max_batch_seconds=None,
                 bucket_chunk=20000, prefetch_factor=2, mask_dtype=torch.long) -> AudioLoader
    AudioLoader                       iterable of Batch; len() = batches it will yield;
                                      .batches_per_epoch, .start_batch, .refilled
    AudioDataset                      .ids (str sequence), .durations (float64 seconds),
                                      [i] -> {"input_values": float32[n], "id"} | None,
                                      .skipped (Counter of reasons), .skipped_items [(id, reason)],
                                      .write_skip_report(path), .damage_fraction()
    collate(items, pad_to_multiple_of=None, mask_dtype=torch.long) -> Batch

--preprocessing_only: call build_datasets(args, sampling_rate) once (it writes the index cache
under --cache_dir or --output_dir, and raises DataError when neither is set), then exit.

Modules: errors, audio (one item), index (columns), probing, sources, dataset, batching,
loader, build, args.
"""
from .args import add_data_args
from .build import build_datasets
from .dataset import AudioDataset
from .errors import DataError
from .index import AudioIndex
from .loader import AudioLoader, build_loader, collate

__all__ = ["DataError", "AudioDataset", "AudioIndex", "AudioLoader", "add_data_args",
           "build_datasets", "build_loader", "collate"]
