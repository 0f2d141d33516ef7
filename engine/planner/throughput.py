"""Rough throughput model: step time and audio seconds per second of a configuration."""
from __future__ import annotations

from dataclasses import dataclass

from engine.planner.common import SAMPLING_RATE
from engine.planner.facts import ModelFacts


# Rough throughput model (H100-class defaults; override with --gpu_tflops etc.). Only used to rank
# plans within an offload tier, to size gradient accumulation under offload and to print estimates.
# Calibrated on an H100 capped at 16 GiB (bench/RESULTS.md run 6, the engine's step, 16 host cores): micro-steps of
# the planner's choices for large (ZeRO-0, 4 x 20 s), XLS-R 1B (ZeRO-1 + optimizer offload, 3 x 20 s) and 2B (ZeRO-1
# + optimizer offload + checkpointing, 4 x 20 s) within 10 % (2B's ZeRO-2 runner-up at 14 x 20 s: estimate 26 %
# slow), their CPU optimizer steps within 10 %. The sustained rate grows with the hidden size (wider matmuls, fewer
# small kernels per FLOP): 180 TFLOP/s at 1024 (large) to ~340 at 1920 (2B) measured. Not calibrated: ZeRO-3's
# gathers (measured ~10x the estimate for large at 2 x 20 s).
@dataclass(frozen=True)
class Throughput:
    gpu_tflops: float = 180.0          # sustained bf16/fp16 training FLOP/s (x1e12) of a hidden-1024 model
    reference_hidden: int = 1024       # gpu_tflops scales with hidden / reference_hidden (at most 2x)
    fp32_tflops: float = 25.0          # same for fp32 training
    half_efficiency_frames: int = 400  # micro-batch frames at which the GPU reaches half of gpu_tflops
    pcie_gbps: float = 20.0            # pinned host<->device copy bandwidth per GPU (GB/s)
    collective_gbps: float = 100.0     # NCCL bus bandwidth per GPU within a node (GB/s)
    comm_overlap: float = 0.7          # fraction of per-micro-step communication hidden behind compute
    cpu_adam_params_per_s: float = 1.7e9  # DeepSpeedCPUAdam throughput per node (params/s; 16 cores measured)
    hbm_gbps: float = 2000.0           # GPU memory bandwidth for the fused Adam step (GB/s)


# ----------------------------------------------------------------------------------------------
# Cost model (rough; see Throughput)

def _forward_flops_per_utt(facts: ModelFacts, seconds: float) -> tuple[float, float]:
    """(flops of the checkpointable part: conv + transformer layers, flops of the rest) of one forward."""
    samples = int(round(seconds * SAMPLING_RATE))
    lengths = facts.conv_lengths(samples)
    F = lengths[-1]
    conv, c_in = 0.0, 1
    for c, k, n in zip(facts.conv_dim, facts.conv_kernel, lengths):
        conv += 2.0 * c_in * c * k * n
        c_in = c
    h, f, L = facts.hidden, facts.ffn, facts.num_layers
    layers = F * L * 2.0 * (4 * h * h + 2 * h * f) + L * 4.0 * F * F * h
    C, K, Dp, Dc = facts.conv_dim[-1], facts.num_negatives, facts.proj_codevector_dim, facts.codevector_dim
    GV = facts.num_groups * facts.num_vars
    head = F * 2.0 * (C * h + C * GV + h * Dp + Dc * Dp + 3 * (K + 1) * Dp + facts.num_vars * Dc)
    head += F * 2.0 * h * (h // max(1, facts.heads)) * 8  # pos conv, roughly
    return conv + layers, head


@dataclass(frozen=True)
class StepEstimate:
    micro_seconds: float
    step_seconds: float
    audio_per_second: float   # all ranks together


def estimate_step(facts: ModelFacts, *, stage: int, offload: str, checkpointing: bool, precision: str,
                  micro_utts: int, seconds: float, accum: int, world_size: int, num_nodes: int = 1,
                  tp: Throughput = Throughput()) -> StepEstimate:
    P, N = facts.total_params, world_size
    e = 4 if precision == "fp32" else 2
    ckptable, rest = _forward_flops_per_utt(facts, seconds)
    flops = micro_utts * ((4.0 if checkpointing else 3.0) * ckptable + 3.0 * rest)
    frames = micro_utts * facts.frames(int(seconds * SAMPLING_RATE))
    eff = frames / (frames + tp.half_efficiency_frames)
    tflops = (tp.fp32_tflops if precision == "fp32" else tp.gpu_tflops) * min(2.0, facts.hidden / tp.reference_hidden)
    t_compute = flops / (tflops * 1e12 * eff)
    ring = (N - 1) / N if N > 1 else 0.0
    coll = tp.collective_gbps * 1e9
    pcie = tp.pcie_gbps * 1e9
    # per micro-step communication / transfers
    comm = 0.0
    if stage == 2:
        comm += e * P * ring / coll                       # reduce-scatter of the gradients each micro-step
    if stage == 3:
        gathers = 3 if checkpointing else 2               # forward, backward (+ recompute)
        comm += (gathers + 1) * e * P * ring / coll
    pcie_micro = 0.0
    if offload != "none" and stage >= 2 and accum > 1:
        pcie_micro += 2 * e * P / N / pcie                # grads accumulated on the host: H2D + D2H
    if offload == "all":
        pcie_micro += (3 if checkpointing else 2) * e * P / N / pcie  # params fetched from the host
    t_micro = t_compute + (1 - tp.comm_overlap) * comm + pcie_micro
    # per optimizer step
    t_boundary = 0.0
    if stage in (0, 1):
        t_boundary += 2 * e * P * ring / coll             # allreduce / reduce-scatter at the boundary
    if offload == "none":
        t_opt = (36 if e == 2 else 32) * P / N / (tp.hbm_gbps * 1e9)
    else:
        t_opt = P / max(num_nodes, 1) / tp.cpu_adam_params_per_s
        # last grads to the host; ZeRO-2 also brings the host accumulator back first (ZeRO-1 keeps
        # accumulating on the GPU and copies once per step: checked by counting DeepSpeed's calls)
        t_opt += (2 if accum > 1 and stage >= 2 else 1) * e * P / N / pcie
        if offload == "optimizer":
            t_opt += e * P / N / pcie                      # updated params back to the GPU
    t_step = accum * t_micro + t_boundary + t_opt
    audio = micro_utts * seconds * accum * N
    return StepEstimate(t_micro, t_step, audio / t_step)
