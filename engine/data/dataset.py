"""AudioDataset: an AudioIndex plus decoding, with bad items skipped and counted."""
from __future__ import annotations

import os
from collections import Counter

import numpy as np

from .audio import load_audio
from .errors import DAMAGE_REASONS, SKIP_UNREADABLE, BadAudio, DataError
from .index import AudioIndex
from .probing import audio_ref

#: Items tried, after an all-bad batch, to find one decodable replacement.
REFILL_TRIES = 64

#: Decode attempts this process must have made before its own damage rate is enforced.
MIN_DECODE_SAMPLE = 100


class AudioDataset:
    """Map-style dataset of decoded, resampled, normalized utterances.

    ``dataset[i]`` -> ``{"input_values": float32[n], "id": str}``, or None when item i cannot be
    used (the reason is recorded in ``skipped`` / ``skipped_items``, never raised).
    ``ids`` and ``durations`` (seconds, from headers/manifest) need no decoding.

    Skips recorded: those found while indexing (passed in) and those found while decoding, in
    this process; the loader forwards skips seen in its worker processes here. Each id counts
    once. Recording raises DataError when the damage rate (duration-filtered items excluded)
    exceeds ``max_skip_fraction``, the rate being the larger of
      * all damaged ids known here / all items of the split (a lower bound), and
      * ids damaged at decode / decode attempts in this process, once it made MIN_DECODE_SAMPLE
        attempts (a rank decodes only its shard, so the first bound alone would be W times low).
    """

    def __init__(self, index: AudioIndex, sampling_rate: int, *, hf_parts=None,
                 audio_column: str = "audio", max_samples: int | None = None,
                 skips=(), max_skip_fraction: float | None = None, name: str = "train",
                 skip_report: str | None = None):
        self.index = index
        self.sampling_rate = int(sampling_rate)
        self.hf_parts = hf_parts or []
        self.audio_column = audio_column
        self.max_samples = max_samples
        self.max_skip_fraction = max_skip_fraction
        self.name = name
        self.skip_report = skip_report
        self._skips: dict[str, tuple[str, str]] = {}
        self._indexed_skips = 0   # skips found while indexing (items absent from the index)
        self._decode_damaged = 0  # damaged ids found while decoding, in this process
        self.decode_attempts = 0  # items decoded (or tried) in this process, loader workers included
        for item_id, reason, detail in skips:
            if item_id not in self._skips:
                self._indexed_skips += 1
            self._skips.setdefault(item_id, (reason, detail))

    # ------------------------------------------------------------ what is known up front
    def __len__(self) -> int:
        return len(self.index)

    @property
    def ids(self):
        return self.index.ids

    @property
    def durations(self) -> np.ndarray:
        return self.index.durations

    # ------------------------------------------------------------ skips
    @property
    def skipped(self) -> Counter:
        """Counter of skip reasons (each item once)."""
        return Counter(reason for reason, _ in self._skips.values())

    @property
    def skipped_items(self) -> list[tuple[str, str]]:
        """[(id, reason)] in the order first seen."""
        return [(i, r) for i, (r, _) in self._skips.items()]

    def damage_fraction(self) -> float:
        damaged = sum(1 for r, _ in self._skips.values() if r in DAMAGE_REASONS)
        split_rate = damaged / max(len(self.index) + self._indexed_skips, 1)
        if self.decode_attempts < MIN_DECODE_SAMPLE:
            return split_rate
        return max(split_rate, self._decode_damaged / self.decode_attempts)

    def note_attempts(self, n: int) -> None:
        """Count ``n`` decode attempts (made here or in loader workers); re-check the skip rate."""
        self.decode_attempts += n
        if self._decode_damaged:
            self.check_skip_fraction()

    def record_skips(self, skips) -> None:
        """Record [(id, reason, detail)]; enforce ``max_skip_fraction``; refresh the report."""
        new = False
        for item_id, reason, detail in skips:
            if item_id not in self._skips:
                self._skips[item_id] = (reason, detail)
                self._decode_damaged += reason in DAMAGE_REASONS
                new = True
        if not new:
            return
        if self.skip_report:
            self.write_skip_report(self.skip_report)
        self.check_skip_fraction()

    def check_skip_fraction(self) -> None:
        frac = self.damage_fraction()
        if self.max_skip_fraction is not None and frac > self.max_skip_fraction:
            worst = ", ".join(f"{r}={n}" for r, n in self.skipped.most_common())
            raise DataError(
                f"{self.name} data: {frac:.1%} of the audio is unusable ({worst}), more than "
                f"--max_skip_fraction {self.max_skip_fraction}; see the skip report "
                f"({self.skip_report or 'write_skip_report()'}), e.g. {next(iter(self._skips))!r}")

    def write_skip_report(self, path: str) -> None:
        """TSV ``id<TAB>reason<TAB>detail``, one line per skipped item, written atomically."""
        os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
        tmp = f"{path}.tmp{os.getpid()}"
        with open(tmp, "w", encoding="utf-8") as fh:
            fh.write("id\treason\tdetail\n")
            for item_id, (reason, detail) in self._skips.items():
                fh.write(f"{item_id}\t{reason}\t{' '.join(detail.split())}\n")
        os.replace(tmp, path)

    # ------------------------------------------------------------ decoding
    def _source(self, i: int):
        path = self.index.paths[i]
        if path:
            return path
        part = self.hf_parts[int(self.index.parts[i])]
        data, ref_path = audio_ref(part[int(self.index.rows[i])][self.audio_column])
        return data if data else ref_path

    def load(self, i: int):
        """-> (item dict, None) or (None, (id, reason, detail)); never raises for bad audio."""
        i = int(i)
        item_id = self.index.ids[i]
        try:
            source = self._source(i)
            if source is None:
                raise BadAudio(SKIP_UNREADABLE, "row has neither bytes nor path")
            x = load_audio(source, self.sampling_rate, expected_frames=int(self.index.frames[i]),
                           max_samples=self.max_samples)
        except BadAudio as bad:
            return None, (item_id, bad.reason, bad.detail)
        except OSError as exc:
            return None, (item_id, SKIP_UNREADABLE, f"{type(exc).__name__}: {exc}")
        return {"input_values": x, "id": item_id}, None

    def __getitem__(self, i: int):
        item, skip = self.load(i)
        if skip is not None:
            self.record_skips([skip])
        self.note_attempts(1)
        return item

    def fetch_batch(self, indices) -> tuple[list[dict], list[tuple[str, str, str]], bool]:
        """Decode a batch -> (good items, skips, refilled).

        When every item is bad, up to REFILL_TRIES other items (a fixed stride from the first
        index) are tried and the first good one forms a batch of 1 (``refilled`` True), so a
        rank never yields fewer batches than its peers. Raises DataError if none decodes.
        """
        items, skips = [], []
        for i in indices:
            item, skip = self.load(i)
            if item is not None:
                items.append(item)
            else:
                skips.append(skip)
        if items or not len(indices):
            return items, skips, False
        n = len(self)
        for k in range(1, REFILL_TRIES + 1):
            item, skip = self.load((int(indices[0]) + k * 7919) % n)
            if item is not None:
                return [item], skips, True
            skips.append(skip)
        raise DataError(f"{self.name} data: {REFILL_TRIES + len(indices)} items in a row failed to "
                        f"decode (e.g. {skips[0][0]!r}: {skips[0][1]} {skips[0][2]})")
