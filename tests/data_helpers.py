"""Audio made in the test: tones, noise and broken files written with soundfile."""
from __future__ import annotations

import argparse
import os

import numpy as np
import soundfile as sf


def tone(seconds: float, sr: int, freq: float = 440.0, channels: int = 1, seed: int = 0) -> np.ndarray:
    t = np.arange(int(round(seconds * sr))) / sr
    x = 0.5 * np.sin(2 * np.pi * freq * t) + 0.01 * np.random.default_rng(seed).standard_normal(len(t))
    x = x.astype(np.float32)
    return np.stack([x] * channels, axis=1) if channels > 1 else x


def write(path, seconds=1.0, sr=16000, freq=440.0, channels=1, seed=0, subtype=None) -> str:
    path = str(path)
    os.makedirs(os.path.dirname(path), exist_ok=True)
    sf.write(path, tone(seconds, sr, freq, channels, seed), sr, subtype=subtype)
    return path


def write_bad(folder, kind: str) -> str:
    """A broken file of the given kind; returns its path."""
    folder = str(folder)
    os.makedirs(folder, exist_ok=True)
    if kind == "unreadable":
        path = os.path.join(folder, "garbage.wav")
        with open(path, "wb") as fh:
            fh.write(b"this is not audio at all" * 10)
    elif kind == "truncated_flac":
        full = write(os.path.join(folder, "tmp_full.flac"), 2.0)
        path = os.path.join(folder, "cut.flac")
        raw = open(full, "rb").read()
        open(path, "wb").write(raw[: len(raw) // 2])
        os.remove(full)
    elif kind == "truncated_wav":
        full = write(os.path.join(folder, "tmp_full.wav"), 2.0)
        path = os.path.join(folder, "cut.wav")
        raw = open(full, "rb").read()
        open(path, "wb").write(raw[: len(raw) // 2])
        os.remove(full)
    elif kind == "empty":
        path = os.path.join(folder, "empty.wav")
        sf.write(path, np.zeros(0, np.float32), 16000)
    elif kind == "nan":
        path = os.path.join(folder, "nan.wav")
        x = tone(1.0, 16000)
        x[100] = np.nan
        sf.write(path, x, 16000, subtype="FLOAT")
    elif kind == "silent":
        path = os.path.join(folder, "silent.wav")
        sf.write(path, np.zeros(16000, np.float32), 16000)
    else:
        raise ValueError(kind)
    return path


def make_args(**kw) -> argparse.Namespace:
    """The HF example's data flags with its defaults, plus ours, overridable."""
    base = dict(dataset_name=None, dataset_config_names=None, dataset_split_names=None,
                audio_column_name="audio", cache_dir=None, validation_split_percentage=0,
                min_duration_in_seconds=None, max_duration_in_seconds=None,
                preprocessing_num_workers=None, overwrite_cache=False, train_cache_file_name=None,
                validation_cache_file_name=None, seed=0)
    base.update(kw)
    return argparse.Namespace(**base)


def dominant_freq(x: np.ndarray, sr: int) -> float:
    spec = np.abs(np.fft.rfft(x * np.hanning(len(x))))
    return float(np.fft.rfftfreq(len(x), 1 / sr)[np.argmax(spec)])
