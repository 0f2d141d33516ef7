"""Benchmark: transformers' numpy masking + negative sampling vs engine/masking.py.

    python bench/masking.py --device cpu --iters 20
    python bench/masking.py --device cuda --iters 200       # on the GPU machine: GPU rows only
    python bench/masking.py --device all --iters 200        # CPU rows too (slow: numpy, torch on CPU)

Setting: T = 999 frames (a batch padded to 20 s at 16 kHz), K = 100 negatives, mask_prob 0.65,
mask_length 10, min_masks 2 (the HF example's defaults); utterance lengths drawn like LibriSpeech
train (normal, mean 12.3 s, sd 3.5 s, clipped to 2-20 s), frames from the conv stack's formula.
Each cell is the median over --iters runs in milliseconds, after warm-up. CPU: wall clock.
CUDA: CUDA events around each call; the seed's CUDA row is its numpy work plus copying both
results to the GPU (what a training step that uses it pays). "graph" replays ours captured in
one CUDA graph. "ops" counts the computing aten ops ours dispatches (views and allocations
excluded; ~ kernels on CUDA); "kernels" is the number of GPU kernels the profiler sees for one
call of ours (CUDA only). On CUDA both implementations of engine/masking.py are timed side by
side (W2V_MASKING_IMPL=torch, =triton; --impls picks); the seed's numpy row runs at most 20 times
there (it is CPU work, ~10-100 ms a run).
"""
from __future__ import annotations

import argparse
import contextlib
import os
import statistics
import sys
import time

import numpy as np
import torch
from torch.utils._python_dispatch import TorchDispatchMode

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
from engine.masking import compute_span_mask, implementation, sample_negatives  # noqa: E402

T, K, MASK_PROB, MASK_LENGTH, MIN_MASKS = 999, 100, 0.65, 10, 2
SAMPLE_RATE = 16000
CONV = [(10, 5)] + [(3, 2)] * 4 + [(2, 2)] * 2  # wav2vec 2.0 feature encoder (kernel, stride)


def frames(samples: int) -> int:
    for k, s in CONV:
        samples = (samples - k) // s + 1
    return samples


def librispeech_lengths(batch: int, rng: np.random.Generator) -> torch.Tensor:
    seconds = np.clip(rng.normal(12.3, 3.5, batch), 2.0, 20.0)
    return torch.tensor([min(frames(int(s * SAMPLE_RATE)), T) for s in seconds])


def seed_fns():
    from transformers.models.wav2vec2.modeling_wav2vec2 import _compute_mask_indices, _sample_negative_indices

    def seed(lengths: torch.Tensor):
        attention = (torch.arange(T)[None, :] < lengths[:, None]).long()
        mask = _compute_mask_indices((len(lengths), T), MASK_PROB, MASK_LENGTH, attention, MIN_MASKS)
        neg = _sample_negative_indices((len(lengths), T), K, mask)
        return mask, neg

    def seed_mask(lengths):
        attention = (torch.arange(T)[None, :] < lengths[:, None]).long()
        return _compute_mask_indices((len(lengths), T), MASK_PROB, MASK_LENGTH, attention, MIN_MASKS)

    def seed_neg(mask):
        return _sample_negative_indices((mask.shape[0], T), K, mask)

    return seed, seed_mask, seed_neg


def ours_mask(lengths, gen=None):
    return compute_span_mask(lengths, T, MASK_PROB, MASK_LENGTH, MIN_MASKS, generator=gen)


def ours_neg(mask, gen=None):
    return sample_negatives(mask, K, generator=gen)


def ours(lengths, gen=None):
    mask = ours_mask(lengths, gen)
    return mask, ours_neg(mask, gen)


_NO_KERNEL = {"view", "_unsafe_view", "unsqueeze", "squeeze", "slice", "select", "expand", "unfold",
              "as_strided", "alias", "detach", "t", "transpose", "permute", "empty", "scalar_tensor",
              "lift_fresh"}


class _CountOps(TorchDispatchMode):
    """Counts dispatched aten ops that compute something (views and allocations excluded)."""

    def __init__(self):
        super().__init__()
        self.n = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func.overloadpacket.__name__ not in _NO_KERNEL:
            self.n += 1
        return func(*args, **(kwargs or {}))


def count_ops(fn, *args) -> int:
    with _CountOps() as c:
        fn(*args)
    return c.n


def time_host(fn, iters: int, warmup: int = 3, sync=None) -> float:
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(iters):
        t0 = time.perf_counter()
        fn()
        if sync:
            sync()
        times.append(time.perf_counter() - t0)
    return statistics.median(times) * 1e3


def time_cuda(fn, iters: int, warmup: int = 10) -> float:
    for _ in range(warmup):
        fn()
    torch.cuda.synchronize()
    start = [torch.cuda.Event(enable_timing=True) for _ in range(iters)]
    end = [torch.cuda.Event(enable_timing=True) for _ in range(iters)]
    for i in range(iters):
        start[i].record()
        fn()
        end[i].record()
    torch.cuda.synchronize()
    return statistics.median(s.elapsed_time(e) for s, e in zip(start, end))


def cuda_kernels(fn) -> int | str:
    try:
        from torch.profiler import ProfilerActivity, profile

        fn()
        torch.cuda.synchronize()
        with profile(activities=[ProfilerActivity.CUDA]) as prof:
            fn()
            torch.cuda.synchronize()
        return sum(1 for e in prof.events() if e.device_type == torch.autograd.DeviceType.CUDA)
    except Exception as exc:  # profiler unavailable: not worth failing the bench
        return f"n/a ({type(exc).__name__})"


def graph_time(lengths: torch.Tensor, iters: int) -> float | str:
    """Capture mask + negatives in one CUDA graph (a registered generator) and time replays."""
    try:
        gen = torch.Generator(device="cuda").manual_seed(0)
        graph = torch.cuda.CUDAGraph()
        if hasattr(graph, "register_generator_state"):
            graph.register_generator_state(gen)
        else:
            gen = None  # old torch: the default CUDA generator is graph-safe
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            for _ in range(3):
                ours(lengths, gen)
        torch.cuda.current_stream().wait_stream(side)
        with torch.cuda.graph(graph):
            mask, neg = ours(lengths, gen)
        graph.replay()
        torch.cuda.synchronize()
        assert mask.shape == (len(lengths), T) and neg.shape == (len(lengths), T, K)
        return time_cuda(graph.replay, iters)
    except Exception as exc:
        return f"capture failed: {type(exc).__name__}: {str(exc)[:80]}"


def check(lengths: torch.Tensor, mask: torch.Tensor, neg: torch.Tensor) -> str:
    """Invariants of ours on the device (a sync is fine here): no padding masked; negatives of
    masked frames are other masked frames of the same row; unmasked frames get b*T."""
    B = len(lengths)
    t = torch.arange(T, device=mask.device)
    b = torch.arange(B, device=mask.device)[:, None, None]
    ok = not (mask & (t >= lengths[:, None])).any()
    m = mask[:, :, None].expand_as(neg)
    lone = (mask.sum(1) == 1)[:, None, None]
    ok &= bool((neg // T == b)[m].all()) and bool(mask.reshape(-1)[neg[m]].all())
    ok &= bool(((neg % T != t[None, :, None]) | lone)[m].all()) and bool((neg == b * T)[~m].all())
    return "invariants ok" if ok else "INVARIANTS VIOLATED"


@contextlib.contextmanager
def forced_impl(name: str):
    """engine.masking reads W2V_MASKING_IMPL on every call (CUDA-graph capture included)."""
    old = os.environ.get("W2V_MASKING_IMPL")
    os.environ["W2V_MASKING_IMPL"] = name
    try:
        yield
    finally:
        if old is None:
            os.environ.pop("W2V_MASKING_IMPL", None)
        else:
            os.environ["W2V_MASKING_IMPL"] = old


def cuda_row(B: int, impl: str, lengths: torch.Tensor, args) -> str:
    dev = lengths.device
    with forced_impl(impl):
        if implementation(dev) != impl:
            return f"{'cuda':>6} {B:>3} {impl:>6}  unavailable"
        gen = torch.Generator(device=dev).manual_seed(args.seed)
        m = ours_mask(lengths, gen)  # compiles the Triton kernels on first use
        ours_neg(m, gen)
        row = (time_cuda(lambda: ours_mask(lengths, gen), args.iters),
               time_cuda(lambda: ours_neg(m, gen), args.iters),
               time_cuda(lambda: ours(lengths, gen), args.iters),
               graph_time(lengths, args.iters))
        ops = count_ops(ours, lengths, gen)
        kernels = cuda_kernels(lambda: ours(lengths, gen))
        return (f"{'cuda':>6} {B:>3} {impl:>6} " + " ".join(fmt(x) for x in row) + f" {ops:>5} {kernels!s:>8}"
                f"  {check(lengths, *ours(lengths, gen))}")


def fmt(x) -> str:
    return f"{x:9.3f}" if isinstance(x, float) else f"{x!s:>9}"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--device", choices=["cpu", "cuda", "all"], default="all")
    ap.add_argument("--iters", type=int, default=100)
    ap.add_argument("--batch-sizes", default="8,64")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--impls", default="torch,triton", help="CUDA rows: engine/masking.py implementations")
    args = ap.parse_args()

    devices = ["cpu", "cuda"] if args.device == "all" else [args.device]
    if "cuda" in devices and not torch.cuda.is_available():
        print("CUDA not available: skipping cuda", file=sys.stderr)
        devices.remove("cuda")
    seed, seed_mask, seed_neg = seed_fns()
    rng = np.random.default_rng(args.seed)
    np.random.seed(args.seed)
    try:
        import triton
        triton_version = f"triton {triton.__version__}"
    except ImportError:
        triton_version = "no triton"
    print(f"torch {torch.__version__}, {triton_version}, T={T}, K={K}, mask_prob={MASK_PROB}, mask_length={MASK_LENGTH}, "
          f"min_masks={MIN_MASKS}, median of {args.iters} runs, ms"
          + (f", {torch.cuda.get_device_name()}" if "cuda" in devices else "")
          + f", torch threads={torch.get_num_threads()}")
    header = f"{'device':>6} {'B':>3} {'impl':>6} {'mask':>9} {'negatives':>9} {'total':>9} {'graph':>9} {'ops':>5} {'kernels':>8}"
    print(header)
    print("-" * len(header))
    for B in (int(b) for b in args.batch_sizes.split(",")):
        lengths_cpu = librispeech_lengths(B, rng)
        for dev in devices:
            lengths = lengths_cpu.to(dev)
            if dev == "cpu":
                seed_m = seed_mask(lengths_cpu)
                row = (time_host(lambda: seed_mask(lengths_cpu), args.iters),
                       time_host(lambda: seed_neg(seed_m), args.iters),
                       time_host(lambda: seed(lengths_cpu), args.iters))
                print(f"{dev:>6} {B:>3} {'seed':>6} " + " ".join(fmt(x) for x in row))
                gen = torch.Generator().manual_seed(args.seed)
                with forced_impl("torch"):  # (Triton on CPU tensors is its interpreter: not timed)
                    m = ours_mask(lengths, gen)
                    row = (time_host(lambda: ours_mask(lengths, gen), args.iters),
                           time_host(lambda: ours_neg(m, gen), args.iters),
                           time_host(lambda: ours(lengths, gen), args.iters))
                    ops = count_ops(ours, lengths, gen)
                    print(f"{dev:>6} {B:>3} {'torch':>6} " + " ".join(fmt(x) for x in row) + f" {'-':>9} {ops:>5} {'-':>8}"
                          f"  {check(lengths, *ours(lengths, gen))}", flush=True)
            else:
                def seed_to_gpu():
                    mask, neg = seed(lengths_cpu)
                    torch.from_numpy(mask).to(dev)
                    torch.from_numpy(neg).to(dev)

                total = time_host(seed_to_gpu, min(args.iters, 20), warmup=1, sync=torch.cuda.synchronize)
                print(f"{dev:>6} {B:>3} {'seed':>6} {'-':>9} {'-':>9} {fmt(total)}  (numpy + copy to GPU)",
                      flush=True)
                for impl in args.impls.split(","):
                    try:
                        print(cuda_row(B, impl, lengths, args), flush=True)
                    except Exception as exc:  # keep the other rows (one GPU call, one log)
                        print(f"{dev:>6} {B:>3} {impl:>6}  FAILED: {type(exc).__name__}: {str(exc)[:300]}", flush=True)


if __name__ == "__main__":
    main()
