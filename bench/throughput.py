#!/usr/bin/env python
"""Throughput of one wav2vec 2.0 pre-training step: the seed's (HF's run_wav2vec2_pretraining_no_trainer.py)
against ours, in one process, printed as one table (last), optionally written as JSON.

    # GPU (one H100): about 4-5 minutes per model with these variants (see --max_minutes)
    python bench/throughput.py --models base --variants seed,ours-hf,ours,ours-compile --json base.json
    # CPU smoke test (< 2 minutes): the demo preset, a few steps
    python bench/throughput.py --tiny

Rows are model x variant; every variant runs on the same synthetic LibriSpeech-like length distribution
(lognormal, mean ~12 s, truncated to [2, 20] s) of random normalized audio made in memory (no disk I/O).

  seed  the seed's step as the HF example does it: the HF model in fp32 under bf16 autocast, gradient
        checkpointing, fixed batches of 8 utterances in random order (padded), the collator's
        feature_extractor.pad + numpy `_compute_mask_indices` / `_sample_negative_indices` on the CPU (timed:
        the example collates in the main process), gradients scaled by 1/num_losses after backward behind
        `if num_losses > 0`, the example's per-parameter `.item()` grad norm, torch AdamW.
  ours  engine/: a DeepSpeed engine (ZeRO-2, bf16, FusedAdam; engine.ds_config), engine.step.PretrainStep
        (masking and negatives on the GPU, fast forward of engine/fastpath.py), batches of ~--batch_seconds of
        audio made of utterances of similar length (low padding), no gradient checkpointing. The batches are
        collated (and pinned) before timing: the data loader is benchmarked separately by bench/data.py.

Variants are names, optionally with overrides: `ours:compile=layers:seconds=600`. Keys (ours): fast (0/1),
attention (sdpa|sdpa-flash|sdpa-cudnn|eager|varlen), compile (none|layers|full), conv (cudnn-cl|gemm|cudnn),
pos (fft|cudnn), batch (budget|crop|fixed), seconds,
utts (fixed batch size), zero (0-3), gc (0/1), cudnn (cudnn.benchmark 0/1), pad (pad lengths to a multiple of
this many samples), attn_dropout (override the config's), hf_attn (transformers' attention for fast=0: sdpa|
eager). Keys (seed): gc, utts, hf_attn, precision (bf16|fp32). `--list` prints the named variants.

Columns: step ms = median of the timed steps (CUDA events, no sync inside the loop); audio-s/s = real
(unpadded) audio seconds of the timed steps / their wall time; MFU = analytic training FLOPs of that real
audio (conv encoder + transformer matmuls + attention per utterance + heads, x3 for forward and backward)
per second / --peak_tflops; peak GiB = torch.cuda.max_memory_allocated over the row; padding % = padded
samples / all samples. Each row catches its own errors (OOM included) and the table still prints.
"""
from __future__ import annotations

import argparse
import copy
import gc
import json
import logging
import math
import os
import statistics
import sys
import time
import traceback

import numpy as np
import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

SR = 16_000

VARIANTS = {
    "seed": dict(kind="seed"),
    "seed-nogc": dict(kind="seed", gc=0),
    "seed-eager": dict(kind="seed", hf_attn="eager"),
    "ours-hf": dict(kind="ours", fast=0),                       # engine, transformers' forward (sdpa)
    "ours": dict(kind="ours"),
    "ours-compile": dict(kind="ours", compile="layers"),
    "ours-compile-full": dict(kind="ours", compile="full"),
    "ours-eager-attn": dict(kind="ours", attention="eager"),
    "ours-cudnn-attn": dict(kind="ours", attention="sdpa-cudnn"),
    "ours-cudnn-convs": dict(kind="ours", conv="cudnn", pos="cudnn"),   # the convolutions of run 2-3
    "ours-crop-cudnn-convs": dict(kind="ours", batch="crop", conv="cudnn", pos="cudnn"),
    "ours-crop-compile-cudnn-convs": dict(kind="ours", batch="crop", compile="layers", conv="cudnn", pos="cudnn"),
    "ours-nodrop": dict(kind="ours", attn_dropout=0.0),          # the baseline of ours-varlen
    "ours-varlen": dict(kind="ours", attention="varlen", attn_dropout=0.0),
    "ours-crop": dict(kind="ours", batch="crop"),                # fairseq-style: crop to the batch's shortest
    "ours-crop-compile": dict(kind="ours", batch="crop", compile="layers"),
    "ours-fixed8": dict(kind="ours", batch="fixed"),             # the seed's batches
    "ours-gc": dict(kind="ours", gc=1),
    "ours-zero0": dict(kind="ours", zero=0),
    "ours-cudnn-bench": dict(kind="ours", cudnn=1, pad=4000),
}
SEED_DEFAULTS = dict(gc=1, utts=8, hf_attn=None, precision="bf16", batch="fixed")
OURS_DEFAULTS = dict(fast=1, attention="sdpa", compile="none", conv="cudnn-cl", pos="fft", batch="budget", seconds=None, utts=8, zero=2,
                     gc=0, cudnn=0, pad=None, attn_dropout=None, hf_attn="sdpa", precision="bf16")
DEFAULT_SECONDS = {"base": 400.0, "large": 300.0, "demo": 16.0}
TINY_VARIANTS = "seed,ours-hf,ours,ours-eager-attn,ours-varlen,ours-crop,ours-fixed8,ours-zero0"
GPU_VARIANTS = "seed,ours-hf,ours,ours-compile"


def parse_variant(spec: str) -> tuple[str, dict]:
    name, *overrides = spec.split(":")
    if name not in VARIANTS:
        raise SystemExit(f"unknown variant {name!r}; known: {', '.join(VARIANTS)}")
    base = dict(VARIANTS[name])
    settings = dict(SEED_DEFAULTS if base["kind"] == "seed" else OURS_DEFAULTS)
    settings.update(base)
    for item in overrides:
        key, _, value = item.partition("=")
        if key not in settings:
            raise SystemExit(f"variant {spec!r}: unknown key {key!r}")
        settings[key] = _value(value)
    return spec, settings


def _value(text: str):
    if text in ("none", "None"):
        return None if text == "None" else "none"
    for cast in (int, float):
        try:
            return cast(text)
        except ValueError:
            pass
    return text


# ----------------------------------------------------------------------------------------------------------
# FLOPs


def train_flops(config, num_samples: int, num_negatives: int) -> float:
    """Analytic FLOPs of one training step (forward + backward = 3 x forward) on one utterance."""
    fwd, length, c_in = 0.0, num_samples, 1
    for c_out, k, s in zip(config.conv_dim, config.conv_kernel, config.conv_stride):
        length = (length - k) // s + 1
        fwd += 2.0 * length * c_in * c_out * k
        c_in = c_out
    T, E, F = length, config.hidden_size, config.intermediate_size
    fwd += 2.0 * T * c_in * E                                                      # feature projection
    fwd += 2.0 * T * E * (E // config.num_conv_pos_embedding_groups) * config.num_conv_pos_embeddings
    fwd += config.num_hidden_layers * (2.0 * T * (4 * E * E + 2 * E * F) + 4.0 * T * T * E)
    G, V, D, P = (config.num_codevector_groups, config.num_codevectors_per_group, config.codevector_dim,
                  config.proj_codevector_dim)
    fwd += 2.0 * T * (E * P + c_in * G * V + G * V * (D // G) + D * P + (num_negatives + 1) * P)
    return 3.0 * fwd


# ----------------------------------------------------------------------------------------------------------
# data


class Audio:
    """Utterance lengths from a LibriSpeech-like distribution and slices of one random normalized buffer."""

    def __init__(self, seed: int, min_s: float, max_s: float, mean_s: float, sigma: float = 0.35):
        self.rng = np.random.default_rng(seed)
        self.min_s, self.max_s, self.sigma = min_s, max_s, sigma
        self.mu = math.log(mean_s) - sigma ** 2 / 2
        self.buffer = self.rng.standard_normal(int((max_s + 5) * SR)).astype(np.float32)

    def lengths(self, n: int) -> list[int]:
        out = []
        while len(out) < n:
            x = self.rng.lognormal(self.mu, self.sigma, size=2 * n)
            out.extend(x[(x >= self.min_s) & (x <= self.max_s)].tolist())
        return [int(s * SR) for s in out[:n]]

    def clip(self, n: int) -> np.ndarray:
        start = int(self.rng.integers(0, len(self.buffer) - n))
        return self.buffer[start:start + n]


def make_batches(audio: Audio, settings: dict, count: int, model_name: str, tiny: bool):
    """`count` batches, each a list of 1-D float32 arrays (seed) or ready CPU tensors (ours)."""
    kind = settings["batch"]
    if kind == "fixed":
        lens = audio.lengths(settings["utts"] * count)
        groups = [lens[i * settings["utts"]:(i + 1) * settings["utts"]] for i in range(count)]
    else:
        budget = (settings["seconds"] or DEFAULT_SECONDS.get(model_name, 400.0)) * SR
        groups, window = [], 2000 if not tiny else 200
        while len(groups) < count:                                    # sort a window, fill by padded size
            lens = sorted(audio.lengths(window))
            batch: list[int] = []
            chunk = []
            for n in lens:
                if batch and (len(batch) + 1) * max(batch[-1], n) > budget:
                    chunk.append(batch)
                    batch = []
                batch.append(n)
            if batch:
                chunk.append(batch)
            audio.rng.shuffle(chunk)
            groups.extend(chunk)
        groups = groups[:count]
        if kind == "crop":
            groups = [[min(g)] * len(g) for g in groups]
    return [[audio.clip(n) for n in g] for g in groups]


def collate(utts: list[np.ndarray], pad_multiple: int | None, pin: bool) -> dict:
    S = max(len(u) for u in utts)
    if pad_multiple:
        S = -(-S // pad_multiple) * pad_multiple
    x = torch.zeros(len(utts), S)
    m = torch.zeros(len(utts), S, dtype=torch.long)
    for i, u in enumerate(utts):
        x[i, :len(u)] = torch.from_numpy(u)
        m[i, :len(u)] = 1
    if pin:
        x, m = x.pin_memory(), m.pin_memory()
    return {"input_values": x, "attention_mask": m, "ids": [str(i) for i in range(len(utts))]}


# ----------------------------------------------------------------------------------------------------------
# the two steps


def seed_runner(name, settings, device, batches):
    """The HF example's training step, re-implemented from its description (see module docstring)."""
    from transformers.models.wav2vec2.modeling_wav2vec2 import _compute_mask_indices, _sample_negative_indices
    from engine.models import build_model, load_config, load_feature_extractor

    config = load_config(name)
    model = build_model(config, gradient_checkpointing=bool(settings["gc"]),
                        attn_implementation=settings["hf_attn"]).to(device).train()
    fe = load_feature_extractor(name)
    optimizer = torch.optim.AdamW(model.parameters(), lr=5e-5, betas=(0.9, 0.999), eps=1e-8)
    autocast = settings["precision"] == "bf16" and device.type == "cuda"
    state = {"completed": 0}

    def step(utts):
        batch = fe.pad([{"input_values": u} for u in utts], padding=True, return_tensors="pt")
        seq_len = int(model._get_feat_extract_output_lengths(batch["input_values"].shape[-1]))
        sub_mask = model._get_feature_vector_attention_mask(seq_len, batch["attention_mask"])
        shape = (len(utts), seq_len)
        mask = _compute_mask_indices(shape, config.mask_time_prob, config.mask_time_length, attention_mask=sub_mask)
        neg = _sample_negative_indices(shape, config.num_negatives, mask_time_indices=mask)
        batch["mask_time_indices"] = torch.tensor(mask, dtype=torch.long)
        batch["sampled_negative_indices"] = torch.tensor(neg, dtype=torch.long)
        batch = {k: v.to(device) for k, v in batch.items()}                  # accelerate: blocking copies
        num_losses = batch["mask_time_indices"].sum()
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=autocast):
            out = model(**batch)
        out.loss.backward()
        if num_losses > 0:                                                     # host sync, as in the seed
            scale = 1 / num_losses
            for p in model.parameters():
                if p.grad is not None:
                    p.grad.data.mul_(scale)
        norm = 0.0
        for p in model.parameters():                                           # the seed's grad norm
            if p.grad is not None:
                norm += p.grad.detach().data.norm(2).item() ** 2
        optimizer.step()
        optimizer.zero_grad()
        state["completed"] += 1
        model.set_gumbel_temperature(max(2.0 * 0.999995 ** state["completed"], 0.5))
        return norm

    return step, config, lambda: None


def ours_runner(name, settings, device, batches):
    import deepspeed
    from engine.args import build_parser
    from engine.ds_config import build_ds_config
    from engine.models import build_model, load_config
    from engine.step import MaskingSpec, PretrainStep, StatsWindow
    from engine.trainer import param_groups

    config = load_config(name)
    if settings["attn_dropout"] is not None:
        config.attention_dropout = float(settings["attn_dropout"])
    model = build_model(config, gradient_checkpointing=bool(settings["gc"]), attn_implementation=settings["hf_attn"])
    reference = copy.deepcopy(model).to(device)   # fp32 copy of the initial weights, for the loss check
    precision = settings["precision"]
    args = build_parser().parse_args([
        "--model_name_or_path", name, "--output_dir", "unused", "--train_dir", "unused",
        "--zero_stage", str(settings["zero"]), "--precision", precision, "--per_device_train_batch_size", "1",
        "--learning_rate", "5e-5"])
    ds_cfg = build_ds_config(args, 1, device.type)
    engine, _, _, _ = deepspeed.initialize(model=model, model_parameters=param_groups(model, 0.0), config=ds_cfg)
    spec = MaskingSpec(config.mask_time_prob, config.mask_time_length, 0, config.num_negatives,
                       fast_forward=bool(settings["fast"]), attention=settings["attention"],
                       torch_compile=settings["compile"], conv_impl=settings["conv"],
                       pos_conv_impl=settings["pos"])
    gen = torch.Generator(device=device).manual_seed(0)
    step_fn = PretrainStep(engine.module, spec, device, generator=gen)
    window = StatsWindow()
    loss_check = _loss_check(engine, step_fn, reference, batches[0], device, settings.get("check_compiled", False))
    del reference
    engine.train()
    state = {"completed": 0}

    from torch.profiler import record_function   # named ranges for bench/profile_step.py (no cost unprofiled)

    def step(batch):
        with record_function("prepare"):
            inputs = step_fn.prepare(batch)
        with record_function("forward"):
            loss, stats = step_fn.forward(engine, inputs)
        with record_function("backward"):
            engine.backward(loss)
        with record_function("optimizer"):
            engine.step()
        window.add(stats)                      # device tensors; the trainer reads them at logging steps only
        state["completed"] += 1
        engine.module.set_gumbel_temperature(max(2.0 * 0.999995 ** state["completed"], 0.5))

    def check():
        result = window.reduce(step_fn)
        result.update(loss_check)
        if not math.isfinite(result.get("loss", float("nan"))):
            raise FloatingPointError(f"non-finite loss: {result}")
        return result

    def close():
        if hasattr(engine, "destroy"):
            engine.destroy()

    return step, config, close, check


def _loss_check(engine, step_fn, reference, utts, device, compiled: bool, max_utts: int = 4) -> dict:
    """Our step's loss (engine precision, bf16 on GPU) against transformers' model in fp32 with the same
    initial weights, batch, mask and negatives. Eval mode: no dropout, argmax quantizer, so both are
    deterministic. Relative difference of the summed loss (and of the contrastive part)."""
    batch = collate(utts[:max_utts], None, False)
    engine.eval()
    reference.eval()
    compile_mode = step_fn.compile
    if not compiled:
        step_fn.compile = "none"   # an eval graph would cost a compilation; --check_compiled checks it too
    with torch.no_grad():
        inputs = step_fn.prepare(batch)
        _, stats = step_fn.forward(engine, inputs)
    step_fn.compile = compile_mode
    with torch.no_grad():
        ref = reference(input_values=batch["input_values"].to(device),
                        attention_mask=batch["attention_mask"].to(device),
                        mask_time_indices=inputs["mask_time_indices"],
                        sampled_negative_indices=inputs["sampled_negative_indices"])
    ours, theirs = float(stats["loss_sum"]), float(ref.loss)
    ours_c, theirs_c = float(stats["contrastive_sum"]), float(ref.contrastive_loss)
    return {"loss_check_ours": ours, "loss_check_fp32_ref": theirs,
            "loss_check_rel_diff": abs(ours - theirs) / max(abs(theirs), 1e-12),
            "contrastive_check_rel_diff": abs(ours_c - theirs_c) / max(abs(theirs_c), 1e-12)}


# ----------------------------------------------------------------------------------------------------------
# one row


def run_row(model_name, spec, settings, args, device, audio_seed):
    row = {"model": model_name, "variant": spec,
           "settings": {k: v for k, v in settings.items() if k != "kind"}}
    is_cuda = device.type == "cuda"
    torch.backends.cudnn.benchmark = bool(settings.get("cudnn", 0))
    if is_cuda:
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
        row["mem_before_gib"] = torch.cuda.memory_allocated() / 2**30
    torch.manual_seed(audio_seed)                         # the same initial weights in every row
    audio = Audio(audio_seed, *args.lengths)
    n = args.warmup + args.steps
    t_setup = time.perf_counter()
    raw = make_batches(audio, settings, n, model_name, args.tiny)
    kind = settings["kind"]
    pad = settings.get("pad")
    if kind == "seed":
        step, config, close = seed_runner(model_name, settings, device, raw)[:3]
        check = None
        batches = raw
    else:
        step, config, close, check = ours_runner(model_name, settings, device, raw)
        batches = [collate(b, pad, is_cuda) for b in raw]
    real = [sum(len(u) for u in b) for b in raw]
    padded = [len(b) * (-(-max(len(u) for u in b) // pad) * pad if pad else max(len(u) for u in b)) for b in raw]
    flops = [sum(train_flops(config, len(u), config.num_negatives) for u in b) for b in raw]
    row["setup_s"] = time.perf_counter() - t_setup
    try:
        t_warm = time.perf_counter()
        timed = batches[args.warmup:]
        for b in batches[:args.warmup] + (timed if args.warm_shapes else []):
            step(b)
        if is_cuda:
            torch.cuda.synchronize()
        row["warmup_s"] = time.perf_counter() - t_warm
        marks = []
        if is_cuda:
            events = [torch.cuda.Event(enable_timing=True) for _ in range(len(timed) + 1)]
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        for i, b in enumerate(timed):
            if is_cuda:
                events[i].record()
            else:
                marks.append(time.perf_counter())
            step(b)
        if is_cuda:
            events[-1].record()
            torch.cuda.synchronize()
            per_step = [events[i].elapsed_time(events[i + 1]) for i in range(len(timed))]
        else:
            marks.append(time.perf_counter())
            per_step = [1e3 * (b - a) for a, b in zip(marks[:-1], marks[1:])]
        wall = time.perf_counter() - t0
        if check is not None:
            row["train_stats"] = check()
        sl = slice(args.warmup, None)
        audio_s = sum(real[sl]) / SR
        row.update(
            step_ms=statistics.median(per_step), mean_step_ms=1e3 * wall / len(timed),
            audio_s_per_s=audio_s / wall,
            tflops=sum(flops[sl]) / wall / 1e12,
            batch_utts=sum(len(b) for b in raw[sl]) / len(timed), batch_audio_s=audio_s / len(timed),
            padding_pct=100.0 * (1 - sum(real[sl]) / sum(padded[sl])),
            gflop_per_audio_s=sum(flops[sl]) / audio_s / 1e9)
        row["mfu_pct"] = 100.0 * row["tflops"] / args.peak_tflops
        if is_cuda:
            row["peak_gib"] = torch.cuda.max_memory_allocated() / 2**30
    except torch.OutOfMemoryError as exc:
        row["error"] = "OOM"
        row["detail"] = str(exc).splitlines()[0][:300]
    except Exception as exc:  # noqa: BLE001 -- a row's failure must not end the table
        row["error"] = f"{type(exc).__name__}: {str(exc).splitlines()[0][:200] if str(exc) else ''}"
        row["detail"] = traceback.format_exc()[-2000:]
    finally:
        try:
            close()
        except Exception:  # noqa: BLE001
            pass
        del step, close, check, batches, raw
        gc.collect()
        if is_cuda:
            torch.cuda.empty_cache()
        try:
            torch._dynamo.reset()
        except Exception:  # noqa: BLE001
            pass
    return row


# ----------------------------------------------------------------------------------------------------------
# table


def fmt_table(rows, peak) -> str:
    head = ["model", "variant", "utts/batch", "audio s/batch", "step ms", "audio-s/s", f"MFU % ({peak:.0f}T)",
            "peak GiB", "padding %", "loss vs fp32 ref", "note"]
    lines = []
    for r in rows:
        if "error" in r:
            lines.append([r["model"], r["variant"], "", "", "", "", "", "", "", "", r["error"]])
            continue
        get = lambda k, f: (f.format(r[k]) if r.get(k) is not None else "-")  # noqa: E731
        rel = r.get("train_stats", {}).get("loss_check_rel_diff")
        check = "-" if rel is None else f"{100 * rel:.2f} %"
        lines.append([r["model"], r["variant"], get("batch_utts", "{:.1f}"), get("batch_audio_s", "{:.0f}"),
                      get("step_ms", "{:.1f}"), get("audio_s_per_s", "{:.0f}"), get("mfu_pct", "{:.1f}"),
                      get("peak_gib", "{:.1f}"), get("padding_pct", "{:.1f}"), check,
                      f"warmup {r.get('warmup_s', 0):.0f}s"])
    widths = [max(len(str(x)) for x in col) for col in zip(head, *lines)]
    out = [" | ".join(str(x).ljust(w) for x, w in zip(head, widths)),
           "-|-".join("-" * w for w in widths)]
    out += [" | ".join(str(x).ljust(w) for x, w in zip(line, widths)) for line in lines]
    return "\n".join(out)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--models", default=None, help="comma-separated presets (default base,large; --tiny: demo)")
    p.add_argument("--variants", default=None, help=f"comma-separated (default {GPU_VARIANTS}; --tiny: more)")
    p.add_argument("--steps", type=int, default=None, help="timed steps per row (default 20; --tiny 3)")
    p.add_argument("--warmup", type=int, default=None, help="untimed steps first (default 5; --tiny 1)")
    p.add_argument("--batch_seconds", type=float, default=None,
                   help="ours: padded audio seconds per batch (default base 400, large 300); a variant's "
                        "seconds= wins")
    p.add_argument("--compile", action="store_true", help="add compile=layers to every ours variant")
    p.add_argument("--warm_shapes", action=argparse.BooleanOptionalAction, default=True,
                   help="before timing, run every timed batch once: the steady state of a long run, where each batch "
                        "shape has been seen (cuDNN execution plans, cuFFT plans and compiled graphs are built per "
                        "new shape on the host, ~0.1 s each; a run has a bounded set of shapes). --no-warm_shapes "
                        "times first sight of each shape.")
    p.add_argument("--check_compiled", action="store_true",
                   help="run the loss check through the compiled path too (one more compilation per row)")
    p.add_argument("--device", default=None, help="cuda or cpu (default: cuda if available)")
    p.add_argument("--tiny", action="store_true", help="CPU smoke test: demo preset, short utterances, few steps")
    p.add_argument("--json", default=None, help="write the results here (rewritten after every row)")
    p.add_argument("--peak_tflops", type=float, default=790.0,
                   help="bf16 dense peak for MFU (790: what the issue's figures imply for an H100/H200; the "
                        "H100 SXM spec sheet says 989)")
    p.add_argument("--max_minutes", type=float, default=None, help="skip the rows left after this long")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--list", action="store_true", help="print the named variants and exit")
    args = p.parse_args(argv)
    if args.list:
        for k, v in VARIANTS.items():
            print(f"{k:20s} {v}")
        return 0

    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    models = (args.models or ("demo" if args.tiny else "base,large")).split(",")
    variants = [parse_variant(v) for v in (args.variants or (TINY_VARIANTS if args.tiny else GPU_VARIANTS)).split(",")]
    args.steps = args.steps or (3 if args.tiny else 20)
    args.warmup = args.warmup if args.warmup is not None else (1 if args.tiny else 5)
    args.lengths = (1.0, 3.0, 2.0) if args.tiny else (2.0, 20.0, 12.0)

    os.environ.setdefault("OMP_NUM_THREADS", "1")
    logging.getLogger("DeepSpeed").setLevel(logging.WARNING)
    from engine.trainer import setup_distributed
    setup_distributed()                                   # one-process group for DeepSpeed (free port)
    try:
        import deepspeed.utils
        deepspeed.utils.logger.setLevel(logging.WARNING)
    except Exception:  # noqa: BLE001
        pass

    import transformers
    meta = {"device": torch.cuda.get_device_name() if device.type == "cuda" else "cpu", "torch": torch.__version__,
            "transformers": transformers.__version__, "peak_tflops": args.peak_tflops, "steps": args.steps,
            "warmup": args.warmup, "warm_shapes": args.warm_shapes, "lengths_s": args.lengths, "argv": sys.argv[1:]}
    from engine.models import load_config
    for m in models:
        cfg = load_config(m)
        meta[f"gflop_per_audio_s_{m}_12s"] = train_flops(cfg, 12 * SR, cfg.num_negatives) / 12 / 1e9
    print(json.dumps(meta), flush=True)

    rows, t_start = [], time.perf_counter()
    for model_name in models:
        for spec, settings in variants:
            settings = dict(settings)
            settings["check_compiled"] = args.check_compiled
            if device.type != "cuda" and "precision=" not in spec:
                settings["precision"] = "fp32"            # CPU: fp32 unless a variant asks for bf16
            if settings["kind"] == "ours":
                if args.batch_seconds and "seconds=" not in spec:
                    settings["seconds"] = args.batch_seconds
                if args.compile and "compile=" not in spec and settings["compile"] == "none":
                    settings["compile"] = "layers"
            if args.max_minutes and time.perf_counter() - t_start > 60 * args.max_minutes:
                rows.append({"model": model_name, "variant": spec, "error": "skipped (--max_minutes)"})
                continue
            t_row = time.perf_counter()
            row = run_row(model_name, spec, settings, args, device, args.seed)
            row["row_s"] = time.perf_counter() - t_row
            rows.append(row)
            print(json.dumps({k: v for k, v in row.items() if k != "detail"}), flush=True)
            if "detail" in row and row.get("error") != "OOM":
                print(row["detail"], file=sys.stderr, flush=True)
            if args.json:
                with open(args.json, "w") as fh:
                    json.dump({"meta": meta, "rows": rows}, fh, indent=1)
    print()
    print(f"{meta['device']} | torch {meta['torch']} | transformers {meta['transformers']} | "
          f"{args.warmup} warm-up + {args.steps} timed steps{' (shapes warmed)' if args.warm_shapes else ''} | lengths {args.lengths[0]:g}-{args.lengths[1]:g} s, "
          f"mean ~{args.lengths[2]:g} s | " + ", ".join(f"{m}: {meta[f'gflop_per_audio_s_{m}_12s']:.1f} GFLOP/audio-s"
                                                          for m in models))
    print(fmt_table(rows, args.peak_tflops), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
