"""build_datasets: flags -> (train, validation) AudioDatasets.

Order of work:
 1. pick the train source: exactly one of --dataset_name / --train_dir / --train_manifest;
 2. index it from headers only (or load that index from the cache, engine/data/cache.py);
 3. duration filter: keep min < duration <= max (--crop_long_audio: keep longer ones, cropped);
    dropped items are reported as too_short / too_long, not counted as damage;
 4. validation: --validation_dir / --validation_manifest (same steps), else the first
    --validation_split_percentage % of the usable train items after a shuffle with --seed
    (0 = no validation; a percentage that yields 0 items is an error, as in the HF example).
    Unlike the HF example the shuffle happens even for a single split, so the held-out items are
    not the first speaker's.
 5. AudioDatasets with the skips found so far; more than --max_skip_fraction damage -> DataError.

--preprocessing_only: nothing special happens here beyond requiring a cache folder; the caller
builds the datasets once (which writes the index cache) and exits. HF's --train_cache_file_name /
--validation_cache_file_name are not used (there is no datasets.map cache to name).
"""
from __future__ import annotations

import os

import numpy as np

from .cache import IndexCache, cache_root
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


def _source_identity(kind: str, value, args, hf_parts) -> dict:
    if kind == "dir":
        return {"dir": os.path.abspath(value)}
    return {"dataset_name": os.path.abspath(value) if os.path.exists(value) else value,
            "configs": getattr(args, "dataset_config_names", None),
            "splits": getattr(args, "dataset_split_names", None),
            "data_files": getattr(args, "dataset_data_files", None),
            "audio_column": _flag(args, "audio_column_name", "audio"),
            "fingerprints": [getattr(ds, "_fingerprint", None) for _, ds in hf_parts],
            "rows": [len(ds) for _, ds in hf_parts]}


def index_source(kind: str, flag: str, args, sampling_rate: int, hf_parts=None):
    """-> (AudioIndex, skips) for one source, headers only, through the index cache."""
    value = getattr(args, flag)
    if kind == "manifest":
        return index_manifest(value, f"--{flag}", sampling_rate)
    workers = int(_flag(args, "preprocessing_num_workers", 0))
    progress = _is_main_process()
    root = cache_root(args)
    if getattr(args, "preprocessing_only", False) and not root:
        raise DataError("--preprocessing_only needs --cache_dir (or --output_dir) to store the index in")
    cache = IndexCache(root, kind, _source_identity(kind, value, args, hf_parts), f"--{flag}") if root else None
    if cache is not None:
        hit = cache.load(overwrite=bool(getattr(args, "overwrite_cache", False)))
        if hit is not None:
            return hit
    writer = cache is not None and _is_main_process()
    if kind == "dir":
        dir_mtimes: dict = {}
        index, skips = index_folder(value, f"--{flag}", dir_mtimes=dir_mtimes, num_workers=workers,
                                    progress=progress, checkpoint=cache.checkpoint if writer else None)
    else:
        dir_mtimes = None
        index, skips = index_hf_parts(hf_parts, _flag(args, "audio_column_name", "audio"),
                                      num_workers=workers, progress=progress)
    if writer:
        cache.save(index, skips, dir_mtimes=dir_mtimes)
    return index, skips


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
    """-> dict with train/validation indexes, their skips, and the loaded datasets (or None)."""
    kind, flag = train_source(args)
    lo, hi = getattr(args, "min_duration_in_seconds", None), getattr(args, "max_duration_in_seconds", None)
    crop = bool(getattr(args, "crop_long_audio", False))
    hf_parts = load_hf_parts(args) if kind == "hf" else None   # [(label, Dataset)]
    train, train_skips = index_source(kind, flag, args, sampling_rate, hf_parts)
    train, filtered = filter_durations(train, lo, hi, crop)
    train_skips = list(train_skips) + filtered
    if len(train) == 0:
        raise DataError(f"--{flag}: no usable audio left after skipping {len(train_skips)} items "
                        f"(check --min/--max_duration_in_seconds and the files)")
    val_flags = [f for f in ("validation_dir", "validation_manifest") if getattr(args, f, None)]
    if len(val_flags) > 1:
        raise DataError("give at most one of --validation_dir and --validation_manifest")
    val, val_skips = None, []
    if val_flags:
        vkind = "dir" if val_flags[0] == "validation_dir" else "manifest"
        val, val_skips = index_source(vkind, val_flags[0], args, sampling_rate)
        val, filtered = filter_durations(val, lo, hi, crop)
        val_skips = list(val_skips) + filtered
        if len(val) == 0:
            raise DataError(f"--{val_flags[0]}: no usable audio left after skipping {len(val_skips)} items")
    else:
        pct = int(_flag(args, "validation_split_percentage", 1))
        train, val = split_validation(train, pct, int(_flag(args, "seed", 0)))
    return {"train": train, "train_skips": train_skips, "validation": val,
            "validation_skips": val_skips, "hf_parts": hf_parts}


def make_datasets(args, sampling_rate: int, built: dict) -> tuple[AudioDataset, AudioDataset | None]:
    hi = getattr(args, "max_duration_in_seconds", None)
    common = dict(hf_parts=[ds for _, ds in built["hf_parts"] or []], audio_column=_flag(args, "audio_column_name", "audio"),
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
