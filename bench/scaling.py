"""Multi-GPU scaling: 1 vs N GPUs through the real `deepspeed` launcher and pretrain.py.

For each model: ZeRO-2 bf16, the same per-GPU micro-batch, the same samples per optimizer step
(1 GPU with --gradient_accumulation_steps N vs N GPUs with 1), the same seed and data order. Reports
steady-state audio-s/s (first logged steps dropped), scaling efficiency = audio-s/s(N) / (N x
audio-s/s(1)), and the loss of both runs step by step (same samples per step; masks differ because
each rank draws its own, so they agree within noise, not bit for bit).

Optionally (--zero3_model xlsr-2b): ZeRO-3 on N GPUs, no offload, each GPU capped at --cap_gb.

    python bench/scaling.py --gpus 2 --models base,large --steps 30
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)


def corpus(path: str, num_files: int, workers: int) -> str:
    sys.path.insert(0, os.path.join(ROOT, "bench"))
    from data import make_corpus  # bench/data.py: LibriSpeech-like durations, 16 kHz mostly
    ns = argparse.Namespace(corpus=path, num_files=num_files, format="flac", other_rate_fraction=0.0, seed=0,
                            workers=workers)
    return make_corpus(ns)


def run(model: str, gpus: int, gas: int, a, out: str, extra=()) -> dict:
    cmd = ["deepspeed", "--num_gpus", str(gpus), "--master_port", str(29600 + gpus * 7 + gas),
           os.path.join(ROOT, "pretrain.py"), "--model_name_or_path", model, "--train_dir", a.train_dir,
           "--output_dir", out, "--max_train_steps", str(a.steps), "--logging_steps", "1",
           "--saving_steps", "100000", "--per_device_train_batch_size", str(a.batch), "--gradient_accumulation_steps",
           str(gas), "--learning_rate", str(a.lr.get(model, a.lr["*"])), "--num_warmup_steps", str(a.warmup),
           "--min_duration_in_seconds", "2",
           "--max_duration_in_seconds", "20", "--validation_split_percentage", "0", "--zero_stage", "2",
           "--precision", "bf16", "--dataloader_num_workers", "6", "--seed", "0", *a.engine_flags.split(), *extra]
    t0 = time.time()
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=a.timeout)
    wall = time.time() - t0
    log_path = os.path.join(out, "metrics.jsonl")
    if proc.returncode != 0 or not os.path.exists(log_path):
        tail = (proc.stdout + proc.stderr)[-1500:]
        oom = "out of memory" in tail.lower() or "OutOfMemory" in tail
        return {"ok": False, "oom": oom, "wall_s": wall, "tail": tail}
    recs = [json.loads(l) for l in open(log_path) if l.strip()]
    train = [r for r in recs if r["split"] == "train"]
    steady = train[a.skip:]
    aud = sum(r["audio_s_per_s"] for r in steady) / max(len(steady), 1)
    return {"ok": True, "wall_s": wall, "audio_s_per_s": aud, "losses": [r["loss"] for r in train],
            "peak_gib": max((r.get("gpu_mem_peak_gib", 0) for r in train), default=0),
            "perplexity": train[-1].get("codevector_perplexity")}


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--gpus", type=int, default=2)
    p.add_argument("--models", default="base,large")
    p.add_argument("--steps", type=int, default=30)
    p.add_argument("--skip", type=int, default=8, help="logged steps dropped as warm-up")
    p.add_argument("--batch", type=int, default=8, help="utterances per GPU per micro-batch")
    p.add_argument("--corpus", default="/tmp/w2v_scaling_corpus")
    p.add_argument("--num_files", type=int, default=800)
    p.add_argument("--learning_rate", default="base=5e-4,*=1e-4",
                   help="peak learning rate per model (model=lr,...; * for the others). large collapses "
                        "(codevector perplexity -> 2) at 5e-4 with a few warm-up steps")
    p.add_argument("--warmup", type=int, default=10, help="--num_warmup_steps of every run")
    p.add_argument("--engine_flags", default="", help="extra pretrain.py flags for every run")
    p.add_argument("--zero3_model", default=None, help="also run ZeRO-3 on --gpus GPUs for this model")
    p.add_argument("--cap_gb", type=float, default=16.0)
    p.add_argument("--timeout", type=int, default=900)
    p.add_argument("--out", default="/tmp/w2v_scaling")
    p.add_argument("--json", default=None)
    a = p.parse_args(argv)
    a.lr = dict(kv.split("=", 1) for kv in a.learning_rate.split(","))
    a.lr.setdefault("*", "1e-4")
    a.train_dir = corpus(a.corpus, a.num_files, 16)
    rows, results = [], {}
    for model in a.models.split(","):
        one = run(model, 1, a.gpus, a, os.path.join(a.out, f"{model}-1gpu"))
        many = run(model, a.gpus, 1, a, os.path.join(a.out, f"{model}-{a.gpus}gpu"))
        results[model] = {"1gpu": one, f"{a.gpus}gpu": many}
        if one["ok"] and many["ok"]:
            eff = many["audio_s_per_s"] / (a.gpus * one["audio_s_per_s"])
            n = min(len(one["losses"]), len(many["losses"]))
            rel = [abs(x - y) / abs(x) for x, y in zip(one["losses"][:n], many["losses"][:n])]
            rows.append(f"| {model} | {one['audio_s_per_s']:.0f} | {many['audio_s_per_s']:.0f} | {eff:.1%} | "
                        f"{one['losses'][-1]:.4f} | {many['losses'][-1]:.4f} | {max(rel):.2%} | "
                        f"{one['peak_gib']:.1f} / {many['peak_gib']:.1f} | {one['perplexity']:.0f} / {many['perplexity']:.0f} |")
        else:
            bad = one if not one["ok"] else many
            rows.append(f"| {model} | failed: {bad['tail'][-300:]!r} |")
    if a.zero3_model:
        os.environ["W2V_GPU_MEMORY_CAP_GB"] = str(a.cap_gb)
        z3 = run(a.zero3_model, a.gpus, 1, argparse.Namespace(**{**vars(a), "batch": 1, "steps": 8, "skip": 3}),
                 os.path.join(a.out, f"{a.zero3_model}-z3"), extra=("--zero_stage", "3", "--gradient_checkpointing"))
        results["zero3"] = z3
        status = (f"fits: {z3['audio_s_per_s']:.1f} audio-s/s, peak {z3['peak_gib']:.1f} GiB" if z3["ok"]
                  else ("OOM" if z3["oom"] else "failed"))
        rows.append(f"| {a.zero3_model} ZeRO-3, {a.gpus} GPUs, {a.cap_gb:g} GiB cap, 1 x <=20 s, checkpointing | {status} |")
    if a.json:
        with open(a.json, "w") as fh:
            json.dump(results, fh, indent=1)
    print(f"\n| model | audio-s/s 1 GPU | audio-s/s {a.gpus} GPUs | efficiency | loss@{a.steps} 1 GPU (acc {a.gpus}) "
          f"| loss@{a.steps} {a.gpus} GPUs | max rel. loss diff | peak GiB 1/{a.gpus} | codevector ppl 1/{a.gpus} |")
    print("| --- | --- | --- | --- | --- | --- | --- | --- | --- |")
    print("\n".join(rows))


if __name__ == "__main__":
    main()
