#!/usr/bin/env python
"""Where the time of one pre-training step goes, on a GPU: two tables.

1. Components, forward + backward, CUDA events (median of --iters), bf16 model, a batch of --utts x
   --seconds of audio with no padding: the conv feature encoder (cudnn | gemm, eager | norm+GELU compiled),
   the positional convolution (cudnn | fft), the transformer layers (eager | compiled), and the heads.
2. The engine's whole step (bench/throughput.py's runner, any of its variants) under torch.profiler: the top
   CUDA kernels by total time per step, and the time by kernel family.

    python bench/profile_step.py --model base --variants ours-crop-compile,ours-crop-compile-cudnn-convs
"""
from __future__ import annotations

import argparse
import os
import statistics
import time
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

SR = 16_000


def timed(fn, iters: int, warmup: int = 3) -> float:
    for _ in range(warmup):
        fn()
    torch.cuda.synchronize()
    times = []
    for _ in range(iters):
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        fn()
        b.record()
        torch.cuda.synchronize()
        times.append(a.elapsed_time(b))
    return statistics.median(times)


def components(args) -> list[tuple[str, float]]:
    from engine import fastpath
    from engine.models import build_model, load_config

    config = load_config(args.model)
    torch.manual_seed(0)
    model = build_model(config).to("cuda", torch.bfloat16).train()
    fastpath.install(model)
    B, S = args.utts, int(args.seconds * SR)
    x = torch.randn(B, S, device="cuda", dtype=torch.bfloat16)
    rows = []

    def fe(impl, compiled):
        def run():
            out = fastpath.feature_encoder(model, x, compiled=compiled, impl=impl)
            out.backward(torch.ones_like(out))
        return run

    for impl in ("cudnn", "gemm"):
        for compiled in (False, True):
            rows.append((f"feature encoder {impl}{' +compiled norm/GELU' if compiled else ''}",
                         timed(fe(impl, compiled), args.iters)))
    torch.backends.cudnn.benchmark = True
    rows.append(("feature encoder cudnn, cudnn.benchmark", timed(fe("cudnn", False), args.iters)))
    torch.backends.cudnn.benchmark = False

    with torch.no_grad():
        feats = fastpath.feature_encoder(model, x, impl="gemm")
        hidden, _ = model.wav2vec2.feature_projection(feats)
    T = hidden.shape[1]
    h = hidden.detach().requires_grad_(True)
    pos = model.wav2vec2.encoder.pos_conv_embed

    def pc(impl):
        def run():
            out = pos(h, impl=impl) if impl != "cudnn" else pos(h)
            out.backward(torch.ones_like(out))
        return run

    for impl in ("cudnn", "fft"):
        rows.append((f"positional conv {impl}", timed(pc(impl), args.iters)))
    torch.backends.cudnn.benchmark = True
    rows.append(("positional conv cudnn, cudnn.benchmark", timed(pc("cudnn"), args.iters)))
    torch.backends.cudnn.benchmark = False

    stable = config.do_stable_layer_norm

    def layers(compiled):
        fn = fastpath._compiled_fn(fastpath.encoder_layer, "layer") if compiled else fastpath.encoder_layer

        def run():
            out = h
            for layer in model.wav2vec2.encoder.layers:
                out = fn(layer, out, "sdpa", None, None, stable)
            out.backward(torch.ones_like(out))
        return run

    rows.append((f"{len(model.wav2vec2.encoder.layers)} transformer layers, eager", timed(layers(False), args.iters)))
    rows.append((f"{len(model.wav2vec2.encoder.layers)} transformer layers, compiled", timed(layers(True), args.iters)))
    print(f"components: {args.model}, {B} x {args.seconds:g} s = {B * args.seconds:g} audio-s, T = {T} frames, "
          f"fwd+bwd ms (median of {args.iters})")
    for name, ms in rows:
        print(f"  {name:50s} {ms:8.2f}")
    torch.cuda.empty_cache()
    return rows


FAMILIES = [("gemm (cuBLAS/CUTLASS)", ("gemm", "sm90_xmma", "cutlass", "cublas", "nvjet")),
            ("attention", ("flash", "fmha", "attention", "cudnn_generated")),
            ("convolution (cuDNN)", ("conv", "implicit", "wgrad", "dgrad", "xmma_fprop", "sm80_xmma")),
            ("FFT", ("fft", "radix", "regular_fft", "vector_fft")),
            ("optimizer", ("multi_tensor", "adam")),
            ("norm", ("norm", "welford")),
            ("triton (compiled)", ("triton_",)),
            ("copy / elementwise", ("elementwise", "copy", "fill", "vectorized", "unrolled", "cat")),
            ("reduce", ("reduce",))]


def profile_variant(spec: str, args) -> None:
    import throughput as tp
    from torch.profiler import ProfilerActivity, profile

    name, settings = tp.parse_variant(spec)
    settings["check_compiled"] = False
    audio = tp.Audio(0, 2.0, 20.0, 12.0)
    n = args.warmup + args.steps
    raw = tp.make_batches(audio, settings, n, args.model, False)
    step, config, close, _ = tp.ours_runner(args.model, settings, torch.device("cuda"), raw)
    batches = [tp.collate(b, settings.get("pad"), True) for b in raw]
    for b in batches:                                   # warm-up, then every profiled batch once (warm shapes)
        step(b)
    torch.cuda.synchronize()
    acts = [ProfilerActivity.CUDA] + ([ProfilerActivity.CPU] if args.cpu else [])
    t0 = time.perf_counter()
    with profile(activities=acts) as prof:
        for b in batches[args.warmup:]:
            step(b)
        torch.cuda.synchronize()
    wall = (time.perf_counter() - t0) * 1e3 / args.steps
    audio_s = sum(len(u) for b in raw[args.warmup:] for u in b) / SR
    averages = prof.key_averages()
    events = [e for e in averages if e.device_type.name == "CUDA" or
              (e.self_device_time_total > 0 and e.self_cpu_time_total == 0)]
    total = sum(e.self_device_time_total for e in events) / 1e3 / args.steps
    print(f"\nprofile: {args.model} {spec}: {args.steps} steps, {audio_s / args.steps:.0f} audio-s/step, "
          f"kernel time {total:.1f} ms/step (sum over kernels), wall {wall:.1f} ms/step (profiled)")
    fam: dict[str, float] = {}
    for e in events:
        key = e.key.lower()
        family = next((f for f, pats in FAMILIES if any(p in key for p in pats)), "other")
        fam[family] = fam.get(family, 0.0) + e.self_device_time_total / 1e3 / args.steps
    for f, ms in sorted(fam.items(), key=lambda kv: -kv[1]):
        print(f"  {f:30s} {ms:8.2f} ms  {100 * ms / total:5.1f} %")
    print("  top kernels (ms/step, calls/step):")
    for e in sorted(events, key=lambda e: -e.self_device_time_total)[:args.top]:
        print(f"  {e.self_device_time_total / 1e3 / args.steps:8.2f} {e.count / args.steps:6.0f}  {e.key[:110]}")
    if args.cpu:
        idle_report(prof, args.steps)
        host = [e for e in averages if e.self_cpu_time_total > 0]
        print("  host: top ops by self CPU time (ms/step, calls/step):")
        for e in sorted(host, key=lambda e: -e.self_cpu_time_total)[:args.top]:
            print(f"  {e.self_cpu_time_total / 1e3 / args.steps:8.2f} {e.count / args.steps:6.0f}  {e.key[:110]}")
        sync = [e for e in host if "Synchronize" in e.key or "Memcpy" in e.key or "item" in e.key
                or "local_scalar" in e.key or "nonzero" in e.key]
        print("  host: syncs and copies:")
        for e in sync:
            print(f"  {e.self_cpu_time_total / 1e3 / args.steps:8.2f} {e.count / args.steps:6.0f}  {e.key[:110]}")
    close()
    torch._dynamo.reset()
    torch.cuda.empty_cache()


def idle_report(prof, steps: int) -> None:
    """GPU idle time (no kernel running) and which named host range (bench/throughput.py's step: prepare,
    forward, backward, optimizer) the host was in when each idle gap began."""
    import json
    import tempfile
    with tempfile.NamedTemporaryFile(suffix=".json") as fh:
        prof.export_chrome_trace(fh.name)
        trace = json.load(open(fh.name))["traceEvents"]
    kernels = sorted((e["ts"], e["ts"] + e.get("dur", 0)) for e in trace
                     if e.get("cat") in ("kernel", "gpu_memcpy", "gpu_memset"))
    ranges = [(e["ts"], e["ts"] + e.get("dur", 0), e["name"]) for e in trace
              if e.get("cat") == "user_annotation" and e["name"] in ("prepare", "forward", "backward", "optimizer")]
    if not kernels:
        print("  idle: no kernels in the trace")
        return
    gaps, end = [], kernels[0][1]
    for a, b in kernels[1:]:
        if a > end:
            gaps.append((end, a))
        end = max(end, b)
    span = end - kernels[0][0]
    by_range: dict[str, float] = {}
    for a, b in gaps:
        name = next((n for s0, s1, n in ranges if s0 <= a < s1), "outside")
        by_range[name] = by_range.get(name, 0.0) + (b - a)
    idle = sum(b - a for a, b in gaps)
    print(f"  GPU idle {idle / 1e3 / steps:.1f} ms/step of {span / 1e3 / steps:.1f} ms/step "
          f"({len(gaps) / steps:.0f} gaps/step); idle by host range: " +
          ", ".join(f"{k} {v / 1e3 / steps:.1f} ms" for k, v in sorted(by_range.items(), key=lambda kv: -kv[1])))
    big = sorted(gaps, key=lambda g: g[0] - g[1])[:5]
    print("  largest gaps (ms): " + ", ".join(f"{(b - a) / 1e3:.2f}" for a, b in big))


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="base")
    p.add_argument("--utts", type=int, default=32)
    p.add_argument("--seconds", type=float, default=12.0)
    p.add_argument("--iters", type=int, default=10)
    p.add_argument("--variants", default="ours-crop-compile", help="bench/throughput.py variants to profile")
    p.add_argument("--steps", type=int, default=3)
    p.add_argument("--warmup", type=int, default=4)
    p.add_argument("--top", type=int, default=25)
    p.add_argument("--skip_components", action="store_true")
    p.add_argument("--cpu", action="store_true", help="also profile the host: top CPU ops, syncs")
    args = p.parse_args()
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    from engine.trainer import setup_distributed
    setup_distributed()
    if not args.skip_components:
        components(args)
    for spec in filter(None, args.variants.split(",")):
        try:
            profile_variant(spec, args)
        except Exception as exc:  # noqa: BLE001
            print(f"profile {spec}: {type(exc).__name__}: {str(exc)[:300]}")


if __name__ == "__main__":
    main()
