"""Data pipeline benchmark on a synthetic LibriSpeech-like corpus.

Builds (once, reused) a folder of utterances with lognormal-ish durations clipped to 2..20 s
(mean ~12 s), FLAC and/or WAV, mostly 16 kHz with a fraction at 8 / 22.05 / 44.1 kHz (some
stereo), then reports:
  * index build time (header probing) and cached reload time
  * padding fraction of a whole epoch plan: fixed batch of --batch_size vs --max_batch_seconds
  * loader throughput (audio seconds decoded+resampled+normalized+batched per wall second)
    with --workers DataLoader processes, for both batching modes

    python bench/data.py                                  # small, < 1 min on 2 CPU cores
    python bench/data.py --num_files 4000 --workers 16    # GPU machine's CPUs
"""
from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import os
import resource
import sys
import time

import numpy as np
import soundfile as sf
import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from engine.data import build_datasets, build_loader  # noqa: E402
from engine.data.batching import plan_epoch, padding_fraction  # noqa: E402

SR = 16000
OTHER_RATES = (8000, 22050, 44100)


def corpus_spec(a) -> dict:
    return {"num_files": a.num_files, "format": a.format, "other_rate_fraction": a.other_rate_fraction,
            "seed": a.seed, "version": 1}


def durations(n: int, seed: int) -> np.ndarray:
    """Lognormal around 12 s, clipped to [2, 20] (LibriSpeech-like)."""
    rng = np.random.default_rng(seed)
    return np.clip(rng.lognormal(np.log(12.5), 0.35, n), 2.0, 20.0)


def synth(seconds: float, sr: int, seed: int, channels: int) -> np.ndarray:
    """Speech-ish: a gliding harmonic tone, syllable-rate amplitude modulation, a little noise."""
    rng = np.random.default_rng(seed)
    t = np.arange(int(seconds * sr), dtype=np.float32) / sr
    f0 = 120 + 40 * np.sin(2 * np.pi * 0.3 * t + rng.uniform(0, 6))
    phase = 2 * np.pi * np.cumsum(f0) / sr
    x = sum(np.sin(k * phase) / k for k in (1, 2, 3))
    x *= 0.5 * (1 + np.sin(2 * np.pi * 4 * t + rng.uniform(0, 6)))
    x = (0.2 * x + 0.01 * rng.standard_normal(len(t))).astype(np.float32)
    return np.stack([x, 0.9 * x], 1) if channels == 2 else x


def _write_one(job):
    path, seconds, sr, seed, channels = job
    sf.write(path, synth(seconds, sr, seed, channels), sr)


def make_corpus(a) -> str:
    root = os.path.join(a.corpus, "audio")
    spec_path = os.path.join(a.corpus, "spec.json")
    if os.path.exists(spec_path) and json.load(open(spec_path)) == corpus_spec(a):
        return root
    if os.path.exists(a.corpus) and os.listdir(a.corpus):
        raise SystemExit(f"{a.corpus} exists with another corpus; pick another --corpus or remove it")
    rng = np.random.default_rng(a.seed)
    jobs = []
    for i, d in enumerate(durations(a.num_files, a.seed)):
        other = rng.random() < a.other_rate_fraction
        sr = int(rng.choice(OTHER_RATES)) if other else SR
        channels = 2 if other and rng.random() < 0.5 else 1
        ext = a.format if a.format != "mixed" else ("flac" if i % 2 else "wav")
        sub = os.path.join(root, f"spk{i % 40:03d}", f"ch{i % 7}")
        os.makedirs(sub, exist_ok=True)
        jobs.append((os.path.join(sub, f"utt{i:06d}.{ext}"), float(d), sr, i, channels))
    t0 = time.perf_counter()
    if a.workers > 1:
        with mp.get_context("fork").Pool(a.workers) as pool:
            pool.map(_write_one, jobs, chunksize=8)
    else:
        for job in jobs:
            _write_one(job)
    json.dump(corpus_spec(a), open(spec_path, "w"))
    print(f"corpus: wrote {len(jobs)} files to {root} in {time.perf_counter() - t0:.1f} s")
    return root


def data_args(a, root: str) -> argparse.Namespace:
    return argparse.Namespace(
        dataset_name=None, train_dir=root, validation_split_percentage=0, seed=a.seed,
        min_duration_in_seconds=2.0, max_duration_in_seconds=20.0, cache_dir=os.path.join(a.corpus, "cache"),
        preprocessing_num_workers=a.workers, overwrite_cache=False, audio_column_name="audio",
        max_skip_fraction=0.05)


def throughput(ds, a, max_batch_seconds) -> dict:
    """Loader rates over <= --seconds of epochs: overall, and steady (first batch of each epoch
    excluded, i.e. without worker start-up), plus the padding fraction seen."""
    # audio per batch from the index (ids -> samples): reading the 20 MB mask of every batch
    # would make the main process, not the workers, the bottleneck of this measurement
    samples = {k: d * SR for k, d in zip(ds.ids, ds.durations)}
    real = padded = steady_audio = 0
    steady_time = startup = 0.0
    batches = 0
    cpu0 = _cpu()
    t_start = time.perf_counter()
    for epoch in range(10_000):
        loader = build_loader(ds, batch_size=a.batch_size, shuffle=True, seed=a.seed, epoch=epoch, rank=0,
                              world_size=1, num_workers=a.workers, pad_to_multiple_of=None,
                              max_batch_seconds=max_batch_seconds,
                              mask_dtype=torch.bool if a.mask_dtype == "bool" else torch.long)
        t_prev = time.perf_counter()
        for k, b in enumerate(loader):
            now = time.perf_counter()
            n = sum(samples[i] for i in b["ids"])
            real += n
            padded += b["attention_mask"].numel()
            batches += 1
            if k == 0:
                startup += now - t_prev
            else:
                steady_audio += n
                steady_time += now - t_prev
            t_prev = now
            if now - t_start > a.seconds:
                break
        if time.perf_counter() - t_start > a.seconds:
            break
    elapsed = time.perf_counter() - t_start
    del loader
    cpu1 = _cpu()
    main_cpu, child_cpu = cpu1[0] - cpu0[0], cpu1[1] - cpu0[1]
    decode_cpu = child_cpu if a.workers else main_cpu
    decode_sys = (cpu1[3] - cpu0[3]) if a.workers else (cpu1[2] - cpu0[2])
    return {"rate": real / SR / elapsed, "per_cpu": real / SR / max(decode_cpu, 1e-9),
            "sys_share": decode_sys / max(decode_cpu, 1e-9),
            "main_ms": 1000 * main_cpu / max(batches, 1), "steady": steady_audio / SR / max(steady_time, 1e-9),
            "startup": startup / (epoch + 1), "padding": 1 - real / max(padded, 1), "batches": batches}


def _cpu() -> tuple[float, float, float, float]:
    """(this process, reaped children) CPU seconds, then the kernel part of each; DataLoader workers
    are reaped per epoch."""
    me, kids = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return me.ru_utime + me.ru_stime, kids.ru_utime + kids.ru_stime, me.ru_stime, kids.ru_stime


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--corpus", default="/tmp/w2v_bench_corpus", help="corpus folder (created once)")
    p.add_argument("--num_files", type=int, default=120)
    p.add_argument("--format", choices=["flac", "wav", "mixed"], default="flac")
    p.add_argument("--other_rate_fraction", type=float, default=0.1,
                   help="fraction of files at 8/22.05/44.1 kHz (half of them stereo)")
    p.add_argument("--workers", type=int, default=2, help="DataLoader workers (and probing workers)")
    p.add_argument("--batch_size", type=int, default=8)
    p.add_argument("--max_batch_seconds", type=float, default=100.0)
    p.add_argument("--seconds", type=float, default=8.0, help="time per throughput measurement")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--mask_dtype", choices=["long", "bool"], default="bool",
                   help="attention_mask dtype (default bool, what the trainer asks for: 5 instead of 12 "
                        "bytes/sample; long is build_loader's default)")
    a = p.parse_args(argv)

    root = make_corpus(a)
    args = data_args(a, root)
    t0 = time.perf_counter()
    args.overwrite_cache = True
    ds, _ = build_datasets(args, SR)
    t_index = time.perf_counter() - t0
    args.overwrite_cache = False
    t0 = time.perf_counter()
    ds, _ = build_datasets(args, SR)
    t_cached = time.perf_counter() - t0
    dur = ds.durations
    print(f"index: {len(ds)} files, {dur.sum() / 3600:.2f} h, mean {dur.mean():.1f} s; built in "
          f"{t_index:.2f} s ({len(ds) / t_index:.0f} files/s), cached reload {t_cached * 1000:.0f} ms")

    for label, mbs in ((f"fixed batch {a.batch_size}", None), (f"budget {a.max_batch_seconds:g} s", a.max_batch_seconds)):
        plan = plan_epoch(dur, batch_size=a.batch_size, max_batch_seconds=mbs, shuffle=True, seed=a.seed,
                          epoch=0, world_size=1)
        pad_plan = padding_fraction(plan, dur)
        r = throughput(ds, a, mbs)
        mean_items = np.mean([len(b) for b in plan])
        print(f"{label:>18}: padding {pad_plan:6.2%} of an epoch plan ({r['padding']:6.2%} in the "
              f"{r['batches']} batches loaded), {len(plan)} batches/epoch of {mean_items:.1f} items")
        print(f"{'':>18}  {a.workers} workers: {r['rate']:7.0f} audio-s/s overall, {r['steady']:7.0f} steady "
              f"(first batch of an epoch after {r['startup'] * 1000:.0f} ms)")
        print(f"{'':>18}  CPU cost: {r['per_cpu']:.0f} audio-s per decoding CPU-second (x workers = the "
              f"ceiling on idle cores); main process {r['main_ms']:.1f} ms CPU per batch")
        print(f"{'':>18}  {r['sys_share']:.0%} of the decoding CPU in the kernel (page faults of fresh "
              f"shared memory, fd passing, worker start-up)")
    print(f"skipped: {dict(ds.skipped) or 'none'}")


if __name__ == "__main__":
    main()
