"""Header probing of many items, optionally in worker processes, with a progress bar.

Files are probed by path; dataset rows are probed in row ranges by workers that hold the
(memory-mapped) dataset themselves, so audio bytes never cross a process boundary.
"""
from __future__ import annotations

import multiprocessing as mp
import os
import time

import numpy as np
from tqdm.auto import tqdm

from .audio import AudioInfo, probe
from .errors import BadAudio
from .index import StringColumn

#: Seconds between progress checkpoints of a resumable probe.
CHECKPOINT_SECONDS = 30.0

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


def probe_many(paths: list[str], *, num_workers: int = 0, progress: bool = False,
               desc: str = "probing audio", checkpoint: str | None = None) -> list[AudioInfo | BadAudio]:
    """Probe each path -> AudioInfo or the BadAudio it raised, in input order.

    With ``checkpoint`` (a file path), results are saved there every CHECKPOINT_SECONDS and
    reused by the next call, so an interrupted probe of a huge folder resumes where it stopped.
    The caller deletes the checkpoint once the result is stored elsewhere.
    """
    done = load_checkpoint(checkpoint) if checkpoint else {}
    todo = [p for p in paths if p not in done]
    chunks = [todo[i:i + CHUNK] for i in range(0, len(todo), CHUNK)]
    bar = tqdm(total=len(paths), initial=len(paths) - len(todo), desc=desc, unit="file",
               disable=not progress)
    pool = _pool(num_workers) if num_workers and num_workers > 1 and len(chunks) > 1 else None
    last_save = time.monotonic()
    try:
        results = pool.imap(_probe_chunk, chunks) if pool else map(_probe_chunk, chunks)
        for chunk, res in zip(chunks, results):
            done.update(zip(chunk, res))
            bar.update(len(res))
            if checkpoint and time.monotonic() - last_save > CHECKPOINT_SECONDS:
                save_checkpoint(checkpoint, done)
                last_save = time.monotonic()
    finally:
        bar.close()
        if pool:
            pool.terminate()
        if checkpoint and len(done) < len(paths):   # interrupted: keep what was probed
            save_checkpoint(checkpoint, done)
    return [done[p] for p in paths]


def save_checkpoint(path: str, done: dict) -> None:
    """Atomically write {path: AudioInfo | BadAudio} to ``path`` (.npz, no pickle)."""
    keys = list(done)
    vals = [done[k] for k in keys]
    ok = [isinstance(v, AudioInfo) for v in vals]
    col = StringColumn.from_list(keys)
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    tmp = f"{path}.tmp{os.getpid()}.npz"
    np.savez(tmp, **{
        "paths": col.buf, "paths_off": col.offsets,
        "frames": np.array([v.frames if o else -1 for v, o in zip(vals, ok)], np.int64),
        "rates": np.array([v.sample_rate if o else 0 for v, o in zip(vals, ok)], np.int64),
        "channels": np.array([v.channels if o else 0 for v, o in zip(vals, ok)], np.int64),
        "reasons": np.array(["" if o else v.reason for v, o in zip(vals, ok)], dtype=str),
        "details": np.array(["" if o else v.detail[:200] for v, o in zip(vals, ok)], dtype=str)})
    os.replace(tmp, path)


def load_checkpoint(path: str) -> dict:
    """Read what save_checkpoint wrote; {} when absent or unreadable."""
    if not os.path.exists(path):
        return {}
    try:
        z = np.load(path, allow_pickle=False)
    except (OSError, ValueError):
        return {}
    with z:
        a = {k: z[k] for k in z.files}
    out = {}
    frames, rates, chans = a["frames"].tolist(), a["rates"].tolist(), a["channels"].tolist()
    for i, p in enumerate(StringColumn(a["paths"], a["paths_off"])):
        if frames[i] >= 0:
            out[p] = AudioInfo(frames[i], rates[i], chans[i])
        else:
            out[p] = BadAudio(str(a["reasons"][i]), str(a["details"][i]))
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
