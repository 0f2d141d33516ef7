"""build_datasets: flags -> (train, validation) AudioDatasets.

Order of work: pick the source (exactly one of --dataset_name / --train_dir / --train_manifest),
index it (headers only), drop what fails the duration filter, then take the validation set from
--validation_dir / --validation_manifest or, failing those, the first
--validation_split_percentage % of the usable train items after a seeded shuffle.
"""
from __future__ import annotations

import os

import numpy as np

from .dataset import AudioDataset
from .errors import SKIP_TOO_LONG, SKIP_TOO_SHORT, DataError
from .index import AudioIndex
from .sources import index_folder, index_hf_parts, index_manifest, load_hf_parts

DEFAULT_MAX_SKIP_FRACTION = 0.05


def _flag(args, name, default=None):
    value = getattr(args, name, default)
    return default if value is None else value


def _is_main_process() -> bool:
    return os.environ.get("RANK", "0") in ("", "0")


def train_source(args) -> tuple[str, str]:
    """-> (kind, flag) for the one train source given."""
    given = [(kind, flag) for kind, flag in (("hf", "dataset_name"), ("dir", "train_dir"),
                                             ("manifest", "train_manifest")) if getattr(args, flag, None)]
    if len(given) != 1:
        names = ", ".join(f"--{f}" for _, f in given) or "none"
        raise DataError(f"give exactly one train source: --dataset_name, --train_dir or "
                        f"--train_manifest (got {names})")
    return given[0]


def index_source(kind: str, flag: str, args, sampling_rate: int):
    """-> (AudioIndex, skips, hf_parts) for one source, headers only."""
    workers = int(_flag(args, "preprocessing_num_workers", 0))
    progress = _is_main_process()
    value = getattr(args, flag)
    if kind == "dir":
        index, skips = index_folder(value, f"--{flag}", num_workers=workers, progress=progress)
        return index, skips, None
    if kind == "manifest":
        index, skips = index_manifest(value, f"--{flag}", sampling_rate)
        return index, skips, None
    parts = load_hf_parts(args)
    column = _flag(args, "audio_column_name", "audio")
    index, skips = index_hf_parts(parts, column, num_workers=workers, progress=progress)
    return index, skips, [ds for _, ds in parts]


def filter_durations(index: AudioIndex, min_s: float | None, max_s: float | None,
                     crop_long: bool = False) -> tuple[AudioIndex, list]:
    """Keep ``min_s < duration <= max_s``; with ``crop_long`` longer items are kept, cropped."""
    dur = index.durations
    keep = np.ones(len(index), dtype=bool)
    reasons = np.full(len(index), "", dtype=object)
    if min_s is not None and min_s > 0:
        short = dur <= min_s
        keep &= ~short
        reasons[short] = SKIP_TOO_SHORT
    if max_s is not None and not crop_long:
        long_ = dur > max_s
        keep &= ~long_
        reasons[long_] = SKIP_TOO_LONG
    skips = [(index.ids[i], reasons[i], f"{dur[i]:.2f} s") for i in np.flatnonzero(~keep)]
    kept = index.take(np.flatnonzero(keep))
    if crop_long and max_s is not None:
        kept.frames = np.minimum(kept.frames, np.ceil(max_s * kept.sample_rates).astype(np.int64))
    return kept, skips


def split_validation(index: AudioIndex, percentage: int, seed: int) -> tuple[AudioIndex, AudioIndex | None]:
    """First ``percentage`` % of a seeded shuffle -> validation, the rest -> train."""
    if not percentage:
        return index, None
    if not 0 < percentage < 100:
        raise DataError(f"--validation_split_percentage must be in [0, 100), got {percentage}")
    n_val = len(index) * int(percentage) // 100
    if n_val == 0:
        raise DataError(f"--validation_split_percentage {percentage} gives 0 of {len(index)} usable "
                        f"train items; raise it, pass 0 for no validation, or give "
                        f"--validation_dir / --validation_manifest")
    perm = np.random.default_rng(int(seed)).permutation(len(index))
    return index.take(np.sort(perm[n_val:])), index.take(np.sort(perm[:n_val]))


def _report_path(args, split: str) -> str | None:
    path = getattr(args, "skip_report", None)
    if not path:
        return None
    stem, ext = os.path.splitext(path)
    rank = os.environ.get("RANK", "0") or "0"
    return f"{stem}{'' if split == 'train' else '.' + split}{'' if rank == '0' else '.rank' + rank}{ext}"


def build_indexes(args, sampling_rate: int):
    """-> dict with train/validation indexes, skips and hf parts (what the cache stores)."""
    kind, flag = train_source(args)
    lo, hi = getattr(args, "min_duration_in_seconds", None), getattr(args, "max_duration_in_seconds", None)
    crop = bool(getattr(args, "crop_long_audio", False))
    train, train_skips, hf_parts = index_source(kind, flag, args, sampling_rate)
    train, filtered = filter_durations(train, lo, hi, crop)
    train_skips += filtered
    if len(train) == 0:
        raise DataError(f"--{flag}: no usable audio left after skipping {len(train_skips)} items "
                        f"(check --min/--max_duration_in_seconds and the files)")
    val_flags = [f for f in ("validation_dir", "validation_manifest") if getattr(args, f, None)]
    if len(val_flags) > 1:
        raise DataError("give at most one of --validation_dir and --validation_manifest")
    val, val_skips = None, []
    if val_flags:
        vkind = "dir" if val_flags[0] == "validation_dir" else "manifest"
        val, val_skips, _ = index_source(vkind, val_flags[0], args, sampling_rate)
        val, filtered = filter_durations(val, lo, hi, crop)
        val_skips += filtered
        if len(val) == 0:
            raise DataError(f"--{val_flags[0]}: no usable audio left after skipping {len(val_skips)} items")
    else:
        pct = int(_flag(args, "validation_split_percentage", 1))
        train, val = split_validation(train, pct, int(_flag(args, "seed", 0)))
    return {"train": train, "train_skips": train_skips, "validation": val,
            "validation_skips": val_skips, "hf_parts": hf_parts}


def make_datasets(args, sampling_rate: int, built: dict) -> tuple[AudioDataset, AudioDataset | None]:
    hi = getattr(args, "max_duration_in_seconds", None)
    common = dict(hf_parts=built["hf_parts"], audio_column=_flag(args, "audio_column_name", "audio"),
                  max_samples=int(np.ceil(hi * sampling_rate)) if hi else None,
                  max_skip_fraction=float(_flag(args, "max_skip_fraction", DEFAULT_MAX_SKIP_FRACTION)))
    train = AudioDataset(built["train"], sampling_rate, skips=built["train_skips"], name="train",
                         skip_report=_report_path(args, "train"), **common)
    val = None
    if built["validation"] is not None:
        val = AudioDataset(built["validation"], sampling_rate, skips=built["validation_skips"],
                           name="validation", skip_report=_report_path(args, "validation"), **common)
    for ds in (train, val):
        if ds is not None:
            if ds.skip_report and ds.skipped_items and _is_main_process():
                ds.write_skip_report(ds.skip_report)
            ds.check_skip_fraction()
    return train, val


def build_datasets(args, sampling_rate: int) -> tuple[AudioDataset, AudioDataset | None]:
    """(train, validation or None) from the flags; see the module doc and engine/data/__init__."""
    return make_datasets(args, sampling_rate, build_indexes(args, sampling_rate))
