"""Our data flags (the HF example's own data flags are defined by engine/args.py)."""
from __future__ import annotations

import argparse


def add_data_args(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """Add the engine's data flags to ``parser`` (in an argument group) and return it."""
    g = parser.add_argument_group("data sources, batching and bad audio (engine/data)")
    g.add_argument("--train_dir", type=str, default=None,
                   help="Folder of .wav/.flac/.ogg files, searched recursively, used as training data "
                        "instead of --dataset_name. Durations come from the file headers.")
    g.add_argument("--validation_dir", type=str, default=None,
                   help="Folder of audio files for validation. Without it (and without "
                        "--validation_manifest), --validation_split_percentage of the training "
                        "items is held out.")
    g.add_argument("--train_manifest", type=str, default=None,
                   help="fairseq manifest (.tsv: first line the root folder, then "
                        "'relative_path<TAB>num_samples') used as training data. num_samples is "
                        "taken to be at the model's sampling rate; no file is opened up front.")
    g.add_argument("--validation_manifest", type=str, default=None,
                   help="fairseq manifest (.tsv) for validation.")
    g.add_argument("--dataset_data_files", type=str, nargs="+", default=None,
                   help="data_files passed to load_dataset with --dataset_name, for packaged "
                        "builders such as 'parquet' or 'arrow' (e.g. --dataset_name parquet "
                        "--dataset_data_files 'shards/*.parquet').")
    g.add_argument("--max_batch_seconds", type=float, default=None,
                   help="Batch by a budget of padded audio seconds per device batch (length-bucketed, "
                        "fairseq's max_tokens) instead of a fixed --per_device_train_batch_size. "
                        "E.g. 200 for a base model on an 80 GB GPU.")
    g.add_argument("--max_skip_fraction", type=float, default=0.05,
                   help="Stop with an error once more than this fraction of a split's audio is "
                        "unusable (unreadable, truncated, empty, NaN/inf, silent). Duration-filtered "
                        "items do not count. Default: 0.05.")
    g.add_argument("--skip_report", type=str, default=None,
                   help="TSV file listing every skipped item (id, reason, detail), rewritten as new "
                        "skips are found; validation goes to NAME.validation.EXT, ranks > 0 to "
                        "NAME[.validation].rankR.EXT.")
    g.add_argument("--crop_long_audio", action="store_true",
                   help="Keep audio longer than --max_duration_in_seconds, cropped to it (the HF "
                        "example's behaviour), instead of dropping it (default).")
    g.add_argument("--crop_to_shortest", action="store_true",
                   help="Crop every utterance of a training batch to the batch's shortest, at a random "
                        "offset (fairseq's wav2vec 2.0 recipe): no padding and no attention mask, so "
                        "attention runs on the fast flash kernel. Pair with --max_batch_seconds, whose "
                        "length buckets keep the cropped audio to a few percent.")
    g.add_argument("--dataloader_num_workers", type=int, default=4,
                   help="DataLoader worker processes per rank decoding and resampling audio "
                        "(0 = in the training process). Default: 4.")
    return parser
