"""Header probing of many items, optionally in worker processes, with a progress bar.

Files are probed by path; dataset rows are probed in row ranges by workers that hold the
(memory-mapped) dataset themselves, so audio bytes never cross a process boundary.
"""
from __future__ import annotations

import multiprocessing as mp
import os

from tqdm.auto import tqdm

from .audio import AudioInfo, probe
from .errors import BadAudio

CHUNK = 256  # items per task


def _probe_one(source) -> AudioInfo | BadAudio:
    if source is None:
        return BadAudio("unreadable", "no bytes and no path")
    try:
        return probe(source)
    except BadAudio as bad:
        return bad


def _probe_chunk(sources: list) -> list:
    return [_probe_one(s) for s in sources]


def _pool(num_workers: int, initializer=None, initargs=()):
    ctx = mp.get_context("fork" if "fork" in mp.get_all_start_methods() else "spawn")
    return ctx.Pool(num_workers, initializer=initializer, initargs=initargs)


def probe_many(sources: list, *, num_workers: int = 0, progress: bool = False,
               desc: str = "probing audio") -> list[AudioInfo | BadAudio]:
    """Probe each path (or bytes) -> AudioInfo or the BadAudio it raised, in input order."""
    chunks = [sources[i:i + CHUNK] for i in range(0, len(sources), CHUNK)]
    bar = tqdm(total=len(sources), desc=desc, unit="file", disable=not progress)
    out = []
    try:
        if num_workers and num_workers > 1 and len(chunks) > 1:
            with _pool(num_workers) as pool:
                for res in pool.imap(_probe_chunk, chunks):
                    out.extend(res)
                    bar.update(len(res))
        else:
            for chunk in chunks:
                out.extend(_probe_chunk(chunk))
                bar.update(len(chunk))
    finally:
        bar.close()
    return out


# ---------------------------------------------------------------- dataset rows
_WORKER_DS = None


def _set_worker_ds(ds, column):
    global _WORKER_DS
    _WORKER_DS = (ds, column)
    os.environ.setdefault("OMP_NUM_THREADS", "1")


def audio_ref(value) -> tuple[bytes | None, str | None]:
    """An audio cell (``{"bytes", "path"}`` dict or a path string) -> (bytes, path)."""
    if isinstance(value, dict):
        return value.get("bytes"), value.get("path")
    if isinstance(value, str):
        return None, value
    return None, None


def _probe_rows(bounds: tuple[int, int]) -> list[tuple[str | None, AudioInfo | BadAudio]]:
    ds, column = _WORKER_DS
    table = ds.with_format("arrow")[bounds[0]:bounds[1]]
    out = []
    for value in table.column(column).to_pylist():
        data, path = audio_ref(value)
        out.append((path, _probe_one(data if data else path)))
    return out


def probe_hf_rows(ds, column: str, *, num_workers: int = 0, progress: bool = False,
                  desc: str = "probing rows") -> list[tuple[str | None, AudioInfo | BadAudio]]:
    """Probe every row of a decode=False audio column -> [(path, AudioInfo | BadAudio)]."""
    n = len(ds)
    bounds = [(i, min(i + CHUNK, n)) for i in range(0, n, CHUNK)]
    bar = tqdm(total=n, desc=desc, unit="row", disable=not progress)
    out = []
    try:
        if num_workers and num_workers > 1 and len(bounds) > 1:
            with _pool(num_workers, _set_worker_ds, (ds, column)) as pool:
                for res in pool.imap(_probe_rows, bounds):
                    out.extend(res)
                    bar.update(len(res))
        else:
            _set_worker_ds(ds, column)
            for b in bounds:
                res = _probe_rows(b)
                out.extend(res)
                bar.update(len(res))
    finally:
        bar.close()
    return out
