"""AudioIndex: what is known about every utterance before decoding it.

Columns are flat numpy arrays (strings packed in one uint8 buffer + offsets), so an index of
millions of items pickles fast into DataLoader workers and does not suffer from copy-on-write
refcount churn the way a Python list of str does.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np


class StringColumn:
    """An immutable array of str stored as UTF-8 bytes + offsets."""

    def __init__(self, buf: np.ndarray, offsets: np.ndarray):
        self.buf = buf            # uint8[total_bytes]
        self.offsets = offsets    # int64[n + 1]

    @classmethod
    def from_list(cls, items) -> "StringColumn":
        encoded = [s.encode("utf-8") for s in items]
        offsets = np.zeros(len(encoded) + 1, dtype=np.int64)
        if encoded:
            np.cumsum([len(b) for b in encoded], out=offsets[1:])
        buf = np.frombuffer(b"".join(encoded), dtype=np.uint8).copy()
        return cls(buf, offsets)

    def __len__(self) -> int:
        return len(self.offsets) - 1

    def __getitem__(self, i: int) -> str:
        lo, hi = self.offsets[i], self.offsets[i + 1]
        return self.buf[lo:hi].tobytes().decode("utf-8")

    def __iter__(self):
        return (self[i] for i in range(len(self)))

    def tolist(self) -> list[str]:
        return list(self)

    def take(self, idx) -> "StringColumn":
        """Rows ``idx`` (vectorized gather of the byte ranges)."""
        idx = np.asarray(idx, dtype=np.int64)
        starts, ends = self.offsets[idx], self.offsets[idx + 1]
        lengths = ends - starts
        offsets = np.zeros(len(idx) + 1, dtype=np.int64)
        np.cumsum(lengths, out=offsets[1:])
        gather = np.repeat(starts - offsets[:-1], lengths) + np.arange(offsets[-1], dtype=np.int64)
        return StringColumn(self.buf[gather], offsets)

    @classmethod
    def concat(cls, cols: list["StringColumn"]) -> "StringColumn":
        bufs, offs, base = [], [np.zeros(1, dtype=np.int64)], 0
        for c in cols:
            bufs.append(c.buf)
            offs.append(c.offsets[1:] + base)
            base += int(c.offsets[-1])
        return cls(np.concatenate(bufs) if bufs else np.zeros(0, np.uint8), np.concatenate(offs))


@dataclass
class AudioIndex:
    """One row per utterance.

    ids:          unique readable id (a file path, or ``config/split/row[:file]`` for dataset rows)
    paths:        file path to read, or "" for dataset rows (read from ``parts[i]`` row ``rows[i]``)
    rows, parts:  dataset row and which loaded dataset it belongs to (-1 / 0 for files)
    frames:       samples per channel in the source file, at ``sample_rates``
    sample_rates: the source file's rate (manifests: assumed to be the target rate, as fairseq does)
    """

    ids: StringColumn
    paths: StringColumn
    rows: np.ndarray
    parts: np.ndarray
    frames: np.ndarray
    sample_rates: np.ndarray

    def __len__(self) -> int:
        return len(self.frames)

    @property
    def durations(self) -> np.ndarray:
        """Seconds, float64."""
        return self.frames / np.maximum(self.sample_rates, 1)

    @classmethod
    def empty(cls) -> "AudioIndex":
        return cls.build([], [], [], [], [], [])

    @classmethod
    def build(cls, ids, paths, rows, parts, frames, sample_rates) -> "AudioIndex":
        return cls(StringColumn.from_list(ids), StringColumn.from_list(paths),
                   np.asarray(rows, dtype=np.int64), np.asarray(parts, dtype=np.int32),
                   np.asarray(frames, dtype=np.int64), np.asarray(sample_rates, dtype=np.int32))

    def take(self, idx) -> "AudioIndex":
        idx = np.asarray(idx, dtype=np.int64)
        return AudioIndex(self.ids.take(idx), self.paths.take(idx), self.rows[idx], self.parts[idx],
                          self.frames[idx], self.sample_rates[idx])

    @classmethod
    def concat(cls, indexes: list["AudioIndex"]) -> "AudioIndex":
        if not indexes:
            return cls.empty()
        return cls(StringColumn.concat([x.ids for x in indexes]),
                   StringColumn.concat([x.paths for x in indexes]),
                   np.concatenate([x.rows for x in indexes]),
                   np.concatenate([x.parts for x in indexes]),
                   np.concatenate([x.frames for x in indexes]),
                   np.concatenate([x.sample_rates for x in indexes]))

    # --- persistence (the --preprocessing_only cache) ---
    def to_arrays(self, prefix: str = "") -> dict[str, np.ndarray]:
        return {f"{prefix}ids_buf": self.ids.buf, f"{prefix}ids_off": self.ids.offsets,
                f"{prefix}paths_buf": self.paths.buf, f"{prefix}paths_off": self.paths.offsets,
                f"{prefix}rows": self.rows, f"{prefix}parts": self.parts,
                f"{prefix}frames": self.frames, f"{prefix}sample_rates": self.sample_rates}

    @classmethod
    def from_arrays(cls, arrays, prefix: str = "") -> "AudioIndex":
        return cls(StringColumn(arrays[f"{prefix}ids_buf"], arrays[f"{prefix}ids_off"]),
                   StringColumn(arrays[f"{prefix}paths_buf"], arrays[f"{prefix}paths_off"]),
                   arrays[f"{prefix}rows"], arrays[f"{prefix}parts"],
                   arrays[f"{prefix}frames"], arrays[f"{prefix}sample_rates"])
