"""Single-item audio I/O: probe a header, decode to float32 mono, resample, normalize.

Everything goes through soundfile (libsndfile: wav, flac, ogg/vorbis, ...) and soxr; no
torchcodec/ffmpeg. Problems raise :class:`BadAudio` with a skip reason, never anything else.
"""
from __future__ import annotations

import io
import re
from typing import NamedTuple

import numpy as np
import soundfile as sf
import soxr

from .errors import (SKIP_EMPTY, SKIP_NONFINITE, SKIP_SILENT, SKIP_TRUNCATED, SKIP_UNREADABLE,
                     BadAudio)

#: File extensions listed from folders (formats libsndfile reads without extra codecs).
AUDIO_EXTENSIONS = (".wav", ".flac", ".ogg")

#: Feature-extractor normalization epsilon (Wav2Vec2FeatureExtractor.zero_mean_unit_var_norm).
NORM_EPS = 1e-7

#: A decode that returns fewer than this fraction of the expected frames is "truncated".
TRUNCATION_TOLERANCE = 0.98

_WAV_DATA_SIZE = re.compile(r"data : (\d+) \(should be (\d+)\)")


class AudioInfo(NamedTuple):
    frames: int
    sample_rate: int
    channels: int


def _open_arg(source):
    """A path string or raw bytes -> what soundfile accepts."""
    if isinstance(source, (bytes, bytearray, memoryview)):
        return io.BytesIO(bytes(source))
    return source


def probe(source) -> AudioInfo:
    """Read only the header of a file path or encoded bytes.

    Raises BadAudio(unreadable | empty | truncated). A WAV whose data chunk claims more bytes than
    the file holds is reported as truncated (libsndfile silently shortens it otherwise).
    """
    try:
        info = sf.info(_open_arg(source))
    except Exception as exc:  # libsndfile raises several types (LibsndfileError, RuntimeError, ...)
        raise BadAudio(SKIP_UNREADABLE, f"{type(exc).__name__}: {exc}") from None
    match = _WAV_DATA_SIZE.search(info.extra_info or "")
    if match:
        declared, actual = int(match.group(1)), int(match.group(2))
        # 0 and 0xFFFFFFFF(-ish) are the "unknown length" markers of streamed WAVs, not damage.
        if actual < declared < 0xFFFFFFF0 and declared != 0:
            raise BadAudio(SKIP_TRUNCATED, f"WAV data chunk says {declared} bytes, file has {actual}")
    if info.frames <= 0:
        raise BadAudio(SKIP_EMPTY, "header reports 0 frames")
    return AudioInfo(int(info.frames), int(info.samplerate), int(info.channels))


def read_mono(source, expected_frames: int | None = None) -> tuple[np.ndarray, int]:
    """Decode a path or encoded bytes to float32 mono (channel mean) and its sample rate."""
    try:
        data, sr = sf.read(_open_arg(source), dtype="float32", always_2d=False)
    except Exception as exc:
        reason = SKIP_TRUNCATED if "lost sync" in str(exc) or "truncat" in str(exc) else SKIP_UNREADABLE
        raise BadAudio(reason, f"{type(exc).__name__}: {exc}") from None
    if data.shape[0] == 0:
        raise BadAudio(SKIP_EMPTY, "0 frames decoded")
    if expected_frames and data.shape[0] < TRUNCATION_TOLERANCE * expected_frames:
        raise BadAudio(SKIP_TRUNCATED, f"decoded {data.shape[0]} of {expected_frames} frames")
    return (data if data.ndim == 1 else downmix(data)), int(sr)


def downmix(data: np.ndarray) -> np.ndarray:
    """[frames, channels] float32 -> the channel mean, float32.

    Bit-identical to ``data.mean(axis=1, dtype=np.float32)`` (which sums the few channels of a row
    left to right, then divides), but column-wise: numpy's reduction over a short last axis is ~35x
    slower than these whole-column adds (0.67 ms vs 0.02 ms per second of 44.1 kHz stereo).
    """
    mono = data[:, 0].copy()
    for c in range(1, data.shape[1]):
        mono += data[:, c]
    mono /= np.float32(data.shape[1])
    return mono


def resample(x: np.ndarray, orig_sr: int, target_sr: int) -> np.ndarray:
    """soxr high-quality resampling; a no-op at equal rates."""
    if orig_sr == target_sr:
        return x
    return soxr.resample(x, orig_sr, target_sr, quality="HQ").astype(np.float32, copy=False)


def normalize(x: np.ndarray) -> np.ndarray:
    """Zero mean, unit variance (eps 1e-7), as Wav2Vec2FeatureExtractor(do_normalize=True).

    Mean in float64, variance as a float32 dot of the centred signal: 20x faster than a float64
    copy, within 1e-6 of it.
    """
    centred = x - np.float32(x.mean(dtype=np.float64))
    var = float(np.dot(centred, centred)) / max(len(centred), 1)
    centred *= np.float32(1.0 / np.sqrt(var + NORM_EPS))
    return centred


def load_audio(source, target_sr: int, *, expected_frames: int | None = None,
               max_samples: int | None = None) -> np.ndarray:
    """Decode -> check -> mono -> resample -> (crop to max_samples) -> normalize.

    Raises BadAudio(unreadable | truncated | empty | nonfinite | silent).
    """
    x, sr = read_mono(source, expected_frames)
    check_signal(x)
    x = resample(x, sr, target_sr)
    if max_samples is not None and x.shape[0] > max_samples:
        x = x[:max_samples]
    return normalize(x)


def check_signal(x: np.ndarray) -> None:
    """Raise BadAudio(nonfinite) for NaN/inf samples, BadAudio(silent) when all samples are equal.

    One min and one max pass instead of isfinite + min + max: NaN propagates through both, and an
    inf is the max or the min.
    """
    lo, hi = float(x.min()), float(x.max())
    if not (np.isfinite(lo) and np.isfinite(hi)):
        raise BadAudio(SKIP_NONFINITE, "NaN or inf samples")
    if hi == lo:
        raise BadAudio(SKIP_SILENT, "all samples equal")
