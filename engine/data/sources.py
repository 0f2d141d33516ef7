"""Sources -> AudioIndex (+ the items skipped while indexing).

Three kinds, each listed by our own code (no audiofolder builder, no torchcodec):
  folder    every .wav/.flac/.ogg below a directory, recursively (symlinked dirs not followed),
            sorted by path; frames and rate from the file header (soundfile.info)
  manifest  fairseq .tsv: first line the root dir, then ``relative_path<TAB>num_samples[<TAB>...]``;
            durations = num_samples / target rate (fairseq's assumption), nothing is opened
  datasets  ``datasets.load_dataset`` rows; the audio column is cast to ``Audio(decode=False)``;
            frames and rate from the header of each row's bytes (or its path)
"""
from __future__ import annotations

import os

from tqdm.auto import tqdm

from .audio import AUDIO_EXTENSIONS
from .errors import SKIP_EMPTY, BadAudio, DataError
from .index import AudioIndex
from .probing import probe_hf_rows, probe_many

Skip = tuple[str, str, str]   # (id, reason, detail)


# ---------------------------------------------------------------- folders
def list_audio_files(root: str, flag: str, *, dir_mtimes: dict | None = None,
                     progress: bool = False) -> list[str]:
    """Sorted absolute paths of the audio files below ``root`` (``flag`` names it in errors).

    ``dir_mtimes``, when given, receives {directory: mtime_ns} of every directory walked (taken
    before listing it), which is how a cached index notices files added or removed later.
    """
    if not os.path.isdir(root):
        raise DataError(f"{flag} {root!r} is not a directory")
    root = os.path.abspath(root)
    found = []
    bar = tqdm(desc=f"listing {flag}", unit="dir", disable=not progress)
    for dirpath, dirnames, filenames in os.walk(root):
        if dir_mtimes is not None:
            dir_mtimes[dirpath] = os.stat(dirpath).st_mtime_ns
        dirnames.sort()
        found.extend(os.path.join(dirpath, f) for f in filenames
                     if f.lower().endswith(AUDIO_EXTENSIONS) and not f.startswith("."))
        bar.update(1)
        bar.set_postfix(files=len(found), refresh=False)
    bar.close()
    found.sort()
    if not found:
        raise DataError(f"{flag} {root!r} holds no audio files ({', '.join(AUDIO_EXTENSIONS)})")
    return found


def index_files(paths: list[str], *, num_workers: int = 0, progress: bool = False,
                desc: str = "probing audio", checkpoint: str | None = None) -> tuple[AudioIndex, list[Skip]]:
    """Probe each file header; unreadable/empty/truncated-WAV files become skips."""
    infos = probe_many(paths, num_workers=num_workers, progress=progress, desc=desc,
                       checkpoint=checkpoint)
    keep, skips = [], []
    for path, info in zip(paths, infos):
        if isinstance(info, BadAudio):
            skips.append((path, info.reason, info.detail))
        else:
            keep.append((path, info))
    index = AudioIndex.build([p for p, _ in keep], [p for p, _ in keep], [-1] * len(keep),
                             [0] * len(keep), [i.frames for _, i in keep],
                             [i.sample_rate for _, i in keep])
    return index, skips


def index_folder(root: str, flag: str, *, dir_mtimes: dict | None = None, progress: bool = False,
                 **kw) -> tuple[AudioIndex, list[Skip]]:
    """List a folder and probe every file header (see index_files for ``kw``)."""
    paths = list_audio_files(root, flag, dir_mtimes=dir_mtimes, progress=progress)
    return index_files(paths, desc=f"probing {flag}", progress=progress, **kw)


# ---------------------------------------------------------------- fairseq manifests
def index_manifest(path: str, flag: str, sampling_rate: int) -> tuple[AudioIndex, list[Skip]]:
    """Read a fairseq manifest without opening any audio file."""
    try:
        with open(path, encoding="utf-8") as fh:
            lines = fh.read().splitlines()
    except OSError as exc:
        raise DataError(f"{flag} {path!r} cannot be read: {exc}") from None
    if not lines or not lines[0].strip():
        raise DataError(f"{flag} {path!r}: first line must be the root directory")
    root = lines[0].strip()
    if not os.path.isabs(root):
        root = os.path.join(os.path.dirname(os.path.abspath(path)), root)
    paths, frames, skips = [], [], []
    for lineno, line in enumerate(lines[1:], start=2):
        if not line.strip():
            continue
        fields = line.split("\t")
        try:
            n = int(fields[1])
        except (IndexError, ValueError):
            raise DataError(f"{flag} {path!r} line {lineno}: expected 'relative_path<TAB>num_samples', "
                            f"got {line!r}") from None
        full = os.path.join(root, fields[0])
        if n <= 0:
            skips.append((full, SKIP_EMPTY, f"manifest line {lineno} says {n} samples"))
            continue
        paths.append(full)
        frames.append(n)
    if not paths and not skips:
        raise DataError(f"{flag} {path!r} lists no audio files")
    index = AudioIndex.build(paths, paths, [-1] * len(paths), [0] * len(paths), frames,
                             [sampling_rate] * len(paths))
    return index, skips


# ---------------------------------------------------------------- datasets library
def load_hf_parts(args) -> list[tuple[str, object]]:
    """Load every (config, split) pair of ``--dataset_name`` -> [(label, Dataset)].

    Rule for ``--dataset_name``: a directory written by ``Dataset.save_to_disk`` /
    ``DatasetDict.save_to_disk`` is opened with ``load_from_disk`` (config ignored; split picked
    from a DatasetDict, default "train"); anything else is passed verbatim to
    ``load_dataset(name, config, split=split, cache_dir=--cache_dir)``: a hub name, a local folder
    of parquet/arrow/csv/json files, or a packaged builder such as "parquet" (then data files come
    from ``--dataset_data_files``). The audio column is cast to ``Audio(decode=False)``.
    """
    import datasets

    name = args.dataset_name
    configs = list(getattr(args, "dataset_config_names", None) or [None])
    splits = list(getattr(args, "dataset_split_names", None) or ["train"])
    if len(configs) == 1 and len(splits) > 1:
        configs = configs * len(splits)
    if len(splits) == 1 and len(configs) > 1:
        splits = splits * len(configs)
    if len(configs) != len(splits):
        raise DataError(f"--dataset_config_names ({len(configs)}) and --dataset_split_names "
                        f"({len(splits)}) must pair up one to one")
    data_files = getattr(args, "dataset_data_files", None)
    column = getattr(args, "audio_column_name", None) or "audio"
    saved = _saved_dataset_kind(name)
    parts = []
    for config, split in zip(configs, splits):
        label = f"{config or 'default'}/{split}"
        try:
            if saved:
                ds = datasets.load_from_disk(name)
                if isinstance(ds, datasets.DatasetDict):
                    ds = ds[split]
            else:
                kw = {"data_files": data_files} if data_files else {}
                ds = datasets.load_dataset(name, config, split=split, cache_dir=args.cache_dir, **kw)
        except Exception as exc:  # offline hub, missing split, bad files: all end here
            raise DataError(f"--dataset_name {name!r} (config {config!r}, split {split!r}) could not be "
                            f"loaded: {type(exc).__name__}: {exc}") from None
        if column not in ds.column_names:
            raise DataError(f"--audio_column_name {column!r} is not a column of --dataset_name {name!r} "
                            f"{label} (columns: {ds.column_names})")
        if isinstance(ds.features[column], datasets.Audio):
            ds = ds.cast_column(column, datasets.Audio(decode=False))
        parts.append((label, ds.select_columns([column])))
    return parts


def _saved_dataset_kind(name: str) -> bool:
    return os.path.isdir(name) and any(
        os.path.exists(os.path.join(name, f)) for f in ("state.json", "dataset_dict.json"))


def index_hf_parts(parts, column: str, *, num_workers: int = 0,
                   progress: bool = False) -> tuple[AudioIndex, list[Skip]]:
    """Probe every row header of every part (speech datasets store no durations)."""
    indexes, skips = [], []
    for p, (label, ds) in enumerate(parts):
        results = probe_hf_rows(ds, column, num_workers=num_workers, progress=progress,
                                desc=f"probing --dataset_name {label}")
        keep = []
        for row, (path, info) in enumerate(results):
            row_id = f"{label}/{row}" + (f":{os.path.basename(path)}" if path else "")
            if isinstance(info, BadAudio):
                skips.append((row_id, info.reason, info.detail))
            else:
                keep.append((row, row_id, info))
        indexes.append(AudioIndex.build([k[1] for k in keep], [""] * len(keep),
                                        [k[0] for k in keep], [p] * len(keep),
                                        [k[2].frames for k in keep], [k[2].sample_rate for k in keep]))
    return AudioIndex.concat(indexes), skips
