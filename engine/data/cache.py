"""On-disk cache of probed source indexes (what ``--preprocessing_only`` builds).

What is cached: per source (a --train_dir/--validation_dir folder, or the --dataset_name
config/split set), the *unfiltered* probed index (ids, paths or row numbers, frames, sample rates)
and the items that failed probing. Duration filters and the validation split are cheap numpy
operations applied after loading, so changing --min/--max_duration_in_seconds, the seed or
--validation_split_percentage never re-probes. Manifests are not cached: reading one is already
an index.

Where: ``<--cache_dir or --output_dir>/w2v_data_index/<kind>-<key>.npz``; key = sha256 of the
source identity (absolute folder path / dataset name, configs, splits, data files and the
datasets library's fingerprint of every loaded split) and CACHE_VERSION.

Staleness: a dataset whose files change gets a new datasets fingerprint, hence a new key. A folder
keeps its key; the cache stores the mtime of every directory it walked, and any file added,
removed or renamed changes its directory's mtime. A stale folder cache is refused with a
DataError unless --overwrite_cache is given (then it is rebuilt), so that the ranks of a
distributed run never each start a long re-probe. Files rewritten in place keep their directory
mtime and are not detected (decoding still catches damage).

Only the main process (RANK 0 or unset) writes; writes are atomic (tmp file + rename).
"""
from __future__ import annotations

import hashlib
import json
import logging
import os

import numpy as np

from .errors import DataError
from .index import AudioIndex, StringColumn

logger = logging.getLogger(__name__)

CACHE_VERSION = 1
SUBDIR = "w2v_data_index"


def cache_root(args) -> str | None:
    base = getattr(args, "cache_dir", None) or getattr(args, "output_dir", None)
    return os.path.join(base, SUBDIR) if base else None


def source_key(identity: dict) -> str:
    blob = json.dumps({"version": CACHE_VERSION, **identity}, sort_keys=True, default=str)
    return hashlib.sha256(blob.encode()).hexdigest()[:20]


def skips_to_arrays(skips) -> dict[str, np.ndarray]:
    cols = list(zip(*skips)) if skips else ([], [], [])
    out = {}
    for name, values in zip(("skip_ids", "skip_reasons", "skip_details"), cols):
        col = StringColumn.from_list(list(values))
        out[f"{name}_buf"], out[f"{name}_off"] = col.buf, col.offsets
    return out


def skips_from_arrays(a) -> list[tuple[str, str, str]]:
    cols = [StringColumn(a[f"{n}_buf"], a[f"{n}_off"]).tolist()
            for n in ("skip_ids", "skip_reasons", "skip_details")]
    return list(zip(*cols))


class IndexCache:
    """One cached source index: ``load()`` -> (index, skips) | None, ``save(index, skips, ...)``."""

    def __init__(self, root: str, kind: str, identity: dict, flag: str):
        self.flag = flag
        self.identity = identity
        self.path = os.path.join(root, f"{kind}-{source_key(identity)}.npz")
        self.checkpoint = self.path[:-4] + ".partial.npz"

    def load(self, *, overwrite: bool) -> tuple[AudioIndex, list] | None:
        """The cached index, None when absent (or ``overwrite``); DataError when stale."""
        if overwrite or not os.path.exists(self.path):
            return None
        try:
            with np.load(self.path, allow_pickle=False) as z:
                arrays = {k: z[k] for k in z.files}
            meta = json.loads(str(arrays["meta"]))
        except Exception as exc:
            raise DataError(f"{self.flag}: index cache {self.path} is unreadable ({exc}); "
                            f"pass --overwrite_cache to rebuild it") from None
        changed = [d for d, mtime in meta.get("dir_mtimes", {}).items() if _mtime(d) != mtime]
        if changed:
            raise DataError(
                f"{self.flag}: {len(changed)} folder(s) changed since the index cache {self.path} was "
                f"built (e.g. {changed[0]!r}); pass --overwrite_cache (ideally in a --preprocessing_only "
                f"run) to rebuild it")
        logger.info("loaded data index %s (%d items)", self.path, len(arrays["frames"]))
        return AudioIndex.from_arrays(arrays), skips_from_arrays(arrays)

    def save(self, index: AudioIndex, skips, *, dir_mtimes: dict | None = None) -> None:
        os.makedirs(os.path.dirname(self.path), exist_ok=True)
        meta = {"identity": self.identity, "dir_mtimes": dir_mtimes or {}, "items": len(index),
                "skips": len(skips)}
        tmp = f"{self.path[:-4]}.tmp{os.getpid()}.npz"
        np.savez(tmp, meta=np.array(json.dumps(meta, default=str)), **index.to_arrays(),
                 **skips_to_arrays(skips))
        os.replace(tmp, self.path)
        if os.path.exists(self.checkpoint):
            os.remove(self.checkpoint)
        logger.info("saved data index %s (%d items, %d skipped)", self.path, len(index), len(skips))


def _mtime(path: str) -> int | None:
    try:
        return os.stat(path).st_mtime_ns
    except OSError:
        return None
