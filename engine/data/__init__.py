"""Audio data: sources -> index (ids, durations) -> decode/resample/normalize -> batches.

Public API (contract in docs/ARCHITECTURE.md):

    DataError                         ValueError whose message names the flag or file
    add_data_args(parser)             our data flags (see engine/data/args.py for help texts)
    build_datasets(args, sampling_rate) -> (AudioDataset, AudioDataset | None)
    build_loader(dataset, *, batch_size, shuffle, seed, epoch, rank, world_size, num_workers,
                 pad_to_multiple_of, start_batch=0, max_batch_seconds=None) -> AudioLoader
    AudioDataset                      .ids, .durations, [i] -> {"input_values", "id"} | None,
                                      .skipped (Counter), .skipped_items, .write_skip_report(path)
    collate(items, pad_to_multiple_of=None) -> Batch

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
