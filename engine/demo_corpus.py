"""A built-in demo corpus of speech-like audio, made on the machine with numpy alone.

Each utterance is a sequence of syllables from a small made-up language (a Markov chain over
consonant-vowel units): vowels are harmonic sources with a gliding pitch shaped by formant
resonances, fricatives are band-passed noise, stops are a closure then a burst. It has what
wav2vec 2.0 learns from — phone-like units, co-articulated transitions, speaker pitch ranges —
with no download and no system package.

    python -m engine.demo_corpus data/demo --num_files 240
"""
from __future__ import annotations

import argparse
import os

import numpy as np
import soundfile as sf

SR = 16_000
# (F1, F2, F3) in Hz for a handful of vowels.
VOWELS = {"a": (730, 1090, 2440), "i": (270, 2290, 3010), "u": (300, 870, 2240), "e": (530, 1840, 2480),
          "o": (570, 840, 2410)}
# Consonants: kind and the centre frequency of their noise band (fricatives, bursts).
CONSONANTS = {"s": ("fric", 6000), "f": ("fric", 4000), "sh": ("fric", 3000), "p": ("stop", 1000),
              "t": ("stop", 4000), "k": ("stop", 2000), "m": ("nasal", 250), "n": ("nasal", 300)}


def _vowel(rng, formants, f0_start, f0_end, dur):
    n = int(dur * SR)
    f0 = np.linspace(f0_start, f0_end, n) * (1 + 0.01 * rng.standard_normal(n).cumsum() / np.sqrt(n))
    phase = 2 * np.pi * np.cumsum(f0) / SR
    harmonics = np.arange(1, int(4000 / max(f0_start, f0_end)) + 1)
    freqs = harmonics[:, None] * f0[None, :]
    gain = sum(1.0 / (1.0 + ((freqs - f) / (60 + 0.05 * f)) ** 2) for f in formants) / harmonics[:, None] ** 0.5
    return (gain * np.sin(harmonics[:, None] * phase[None, :])).sum(0)


def _noise_band(rng, centre, dur, width=0.35):
    n = int(dur * SR)
    spec = np.fft.rfft(rng.standard_normal(n))
    freqs = np.fft.rfftfreq(n, 1 / SR)
    spec *= np.exp(-0.5 * ((freqs - centre) / (width * centre)) ** 2)
    return np.fft.irfft(spec, n)


def _envelope(n, attack=0.01):
    a = max(1, min(int(attack * SR), n // 2))
    env = np.ones(n)
    env[:a] = np.linspace(0, 1, a)
    env[-a:] = np.linspace(1, 0, a)
    return env


def synth_utterance(rng: np.random.Generator, duration: float) -> np.ndarray:
    """One utterance of about `duration` seconds, float32 in [-1, 1]."""
    speaker_f0 = rng.uniform(90, 240)
    vowels, consonants = list(VOWELS), list(CONSONANTS)
    pieces, total, prev = [np.zeros(int(rng.uniform(0.05, 0.2) * SR))], 0.0, 0
    while total < duration - 0.3:
        c = consonants[(prev * 3 + rng.integers(0, 3)) % len(consonants)]  # Markov-ish: depends on prev
        v = vowels[(prev + rng.integers(0, 2)) % len(vowels)]
        prev = consonants.index(c) + vowels.index(v)
        kind, band = CONSONANTS[c]
        cdur = rng.uniform(0.05, 0.12)
        if kind == "fric":
            cons = 0.3 * _noise_band(rng, band, cdur)
        elif kind == "stop":
            cons = np.concatenate([np.zeros(int(0.6 * cdur * SR)), 0.8 * _noise_band(rng, band, 0.4 * cdur, 0.8)])
        else:
            cons = 0.5 * _vowel(rng, (band, 1200, 2500), speaker_f0, speaker_f0, cdur)
        vdur = rng.uniform(0.08, 0.25)
        f0a = speaker_f0 * rng.uniform(0.9, 1.15)
        vow = _vowel(rng, VOWELS[v], f0a, f0a * rng.uniform(0.85, 1.05), vdur)
        for seg in (cons, vow):
            pieces.append(seg * _envelope(len(seg)))
        total += cdur + vdur
        if rng.random() < 0.12:  # a pause between words
            pieces.append(np.zeros(int(rng.uniform(0.05, 0.25) * SR)))
    x = np.concatenate(pieces)
    x += 0.003 * rng.standard_normal(len(x))  # room noise
    return (0.5 * x / (np.abs(x).max() + 1e-9)).astype(np.float32)


def make_demo_corpus(out_dir: str, num_files: int = 240, min_seconds: float = 2.0, max_seconds: float = 6.0,
                     seed: int = 0) -> str:
    """Write `num_files` 16 kHz wav files to out_dir (skipped if already complete); returns out_dir."""
    os.makedirs(out_dir, exist_ok=True)
    marker = os.path.join(out_dir, ".complete")
    if os.path.isfile(marker) and open(marker).read().strip() == f"{num_files} {min_seconds} {max_seconds} {seed}":
        return out_dir
    rng = np.random.default_rng(seed)
    try:
        from tqdm.auto import tqdm
        it = tqdm(range(num_files), desc="demo corpus", unit="file")
    except ImportError:  # pragma: no cover
        it = range(num_files)
    for i in it:
        x = synth_utterance(rng, rng.uniform(min_seconds, max_seconds))
        sf.write(os.path.join(out_dir, f"utt{i:05d}.wav"), x, SR, subtype="PCM_16")
    with open(marker, "w") as fh:
        fh.write(f"{num_files} {min_seconds} {max_seconds} {seed}")
    return out_dir


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("out_dir")
    p.add_argument("--num_files", type=int, default=240)
    p.add_argument("--min_seconds", type=float, default=2.0)
    p.add_argument("--max_seconds", type=float, default=6.0)
    p.add_argument("--seed", type=int, default=0)
    a = p.parse_args(argv)
    make_demo_corpus(a.out_dir, a.num_files, a.min_seconds, a.max_seconds, a.seed)
    print(f"demo corpus in {a.out_dir}")


if __name__ == "__main__":
    main()
