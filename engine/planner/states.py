"""Model-state and buffer memory per GPU / host (DeepSpeed's estimators where they apply)."""
from __future__ import annotations

from dataclasses import dataclass

from engine.planner.common import GIB, OFFLOADS
from engine.planner.facts import ModelFacts

HOST_PER_PROCESS_GIB = 3.0      # python + torch + CUDA libraries + data loading per rank
DS_CPU_BUFFER_FACTOR = 1.5      # DeepSpeed's estimators' additional_buffer_factor for host memory

# ZeRO settings the buffers are computed for: those of ds_configs/zero{1,2,3}.json.
DEFAULT_ZERO_CONFIG: dict[int, dict] = {
    0: {},
    1: {"reduce_bucket_size": 200_000_000, "overlap_comm": False},
    2: {"reduce_bucket_size": 200_000_000, "overlap_comm": True},
    3: {"reduce_bucket_size": 50_000_000, "overlap_comm": True, "stage3_prefetch_bucket_size": 50_000_000,
        "stage3_param_persistence_threshold": 1_000_000, "stage3_max_live_parameters": 1_000_000_000,
        "stage3_max_reuse_distance": 1_000_000_000},
}
DS_ALLREDUCE_BUCKET = 500_000_000   # DeepSpeed's engine allreduce_bucket_size (stage 0, world > 1)


# ----------------------------------------------------------------------------------------------
# Model states (DeepSpeed's estimators where they apply, our formula for stages 0/1 and fp32)

@dataclass(frozen=True)
class StateEstimate:
    params: float
    grads: float
    optimizer: float          # persistent optimizer states on the GPU (fp32 master + Adam m, v)
    step_transient: float     # fp32 gradient copy made in the optimizer step (activations are gone then)
    buffers: float            # gradient buckets, offload staging, ZeRO-3 gathered params
    host: float               # per node
    ds_estimate_gpu: float | None = None  # DeepSpeed's own estimator's GPU figure, when it applies


def model_state_bytes(facts: ModelFacts, *, stage: int, offload: str, precision: str, world_size: int,
                      num_nodes: int = 1, zero_config: dict | None = None, zero_init: bool = False) -> StateEstimate:
    from deepspeed.runtime.zero.stage_1_and_2 import estimate_zero2_model_states_mem_needs
    from deepspeed.runtime.zero.stage3 import estimate_zero3_model_states_mem_needs

    if offload not in OFFLOADS:
        raise ValueError(f"offload must be one of {OFFLOADS}")
    if offload != "none" and stage == 0:
        raise ValueError("offload needs ZeRO stage >= 1")
    if offload == "all" and stage != 3:
        raise ValueError("param offload needs ZeRO stage 3")
    P, N = facts.total_params, world_size
    gpn = max(1, world_size // max(num_nodes, 1))
    mixed = precision != "fp32"
    e = 2 if mixed else 4
    zc = {**DEFAULT_ZERO_CONFIG.get(stage, {}), **(zero_config or {})}
    bucket = zc.get("reduce_bucket_size", 0) * e * (2 if zc.get("overlap_comm") else 1)
    host_proc = HOST_PER_PROCESS_GIB * GIB * gpn
    ds_gpu = None

    # Mixed precision keeps 16-bit params and grads on the GPU and 16 bytes/param of fp32 state in the
    # optimizer: master params 4, Adam m and v 8, and the fp32 gradient made for the step 4 (transient).
    # fp32 training has no master copy: params 4, grads 4, Adam 8.
    opt_full = 12 if mixed else 8
    step_tmp = 4 if mixed else 0
    if stage in (0, 1) or (stage == 2 and not mixed):
        opt_div = 1 if stage == 0 else N
        if offload == "none":
            grads_gpu = e * P / (N if stage == 2 else 1)
            params, optim, tmp = e * P, opt_full * P / opt_div, step_tmp * P / opt_div
            host = P * 4 * gpn * DS_CPU_BUFFER_FACTOR
        else:  # stage 1 (+ fp32 stage 2) with the optimizer on the CPU: grads accumulate on the GPU (stage 1)
            grads_gpu = e * P if stage == 1 else 0.0
            params, optim, tmp = e * P, 0.0, 0.0
            bucket += facts.largest_param_numel * e
            host = P * max(4 * N, 16) * DS_CPU_BUFFER_FACTOR
        buffers = bucket if stage > 0 else 0.0
        if stage == 0 and mixed:
            tmp = 8 * P  # FP16_Optimizer's step: per-param fp32 grad copies, then their flattened copy
        if stage == 0 and N > 1:
            tmp += min(P, DS_ALLREDUCE_BUCKET) * e  # flattened allreduce bucket at the boundary
        states = StateEstimate(params, grads_gpu, optim, tmp, buffers, host + host_proc)
    elif stage == 2:
        cpu, gpu = estimate_zero2_model_states_mem_needs(P, num_gpus_per_node=gpn, num_nodes=num_nodes,
                                                         cpu_offload=offload != "none",
                                                         additional_buffer_factor=DS_CPU_BUFFER_FACTOR)
        ds_gpu = gpu
        if offload == "none":
            params, grads = 2 * P, 2 * P / N  # gpu = 2P + 18P/N = params + grads + 16P/N
            optim, tmp = gpu - params - grads - 4 * P / N, 4 * P / N
            buffers = bucket
        else:
            params, grads, optim, tmp = gpu, 0.0, 0.0, 0.0  # gpu = 2P
            buffers = bucket + facts.largest_param_numel * e  # + offload staging buffer
        states = StateEstimate(params, grads, optim, tmp, buffers, cpu + host_proc, ds_gpu)
    else:  # stage 3
        largest = facts.largest_layer_params
        cpu, gpu, largest_mem = estimate_zero3_model_states_mem_needs(
            P, largest, num_gpus_per_node=gpn, num_nodes=num_nodes, cpu_offload=offload != "none",
            cpu_offload_params=offload == "all", zero_init=zero_init, additional_buffer_factor=DS_CPU_BUFFER_FACTOR)
        ds_gpu = gpu
        if not mixed:  # fp32: params 4 + grads 4 + Adam 8 bytes/param, no master copy
            gpu = largest_mem + {"none": 16 * P / N, "optimizer": 4 * P / N, "all": 0.0}[offload]
        persistent = facts.persistent_params(zc.get("stage3_param_persistence_threshold", 100_000))
        live = min(P, zc.get("stage3_max_live_parameters", 1e9),
                   zc.get("stage3_max_reuse_distance", 1e9) / 2 + zc.get("stage3_prefetch_bucket_size", 5e7)
                   + largest)
        working = max(0.0, live * e - largest_mem) + persistent * e * (N - 1) / N
        sharded = gpu - largest_mem
        if offload == "none":
            # DeepSpeed's estimator says 18 bytes/param/N; stage3.py allocates 16-bit param and gradient
            # partitions (2 + 2), fp32 master (4), Adam m, v (8) and the step's fp32 gradient copy (4): 20.
            # We take the larger.
            params, grads = e * P / N, e * P / N
            tmp = step_tmp * P / N
            optim = max(sharded - params - grads - tmp, opt_full * P / N)
        elif offload == "optimizer":
            params, grads, optim, tmp = sharded, 0.0, 0.0, 0.0
        else:
            params, grads, optim, tmp = 0.0, 0.0, 0.0, 0.0
        buffers = largest_mem + working + bucket
        states = StateEstimate(params, grads, optim, tmp, buffers, cpu + host_proc, ds_gpu)
    return states
