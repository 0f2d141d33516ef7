"""Memory planner: picks ZeRO stage, CPU offload, activation checkpointing, micro-batch and gradient
accumulation for a wav2vec 2.0 model on a given GPU / host, and explains the choice.

    python -m engine.planner --model large --gpu_memory_gb 16            # plan, printed as a table
    python -m engine.planner --calibrate                                  # re-measure the activation model

Memory is in GiB (2**30 bytes) everywhere, `--gpu_memory_gb` included: it is what PyTorch's caching
allocator may use on one GPU (a card's size minus ~0.5 GiB of CUDA context; with
`torch.cuda.set_per_process_memory_fraction(16 / total)` it is exactly 16).

Per-GPU peak memory of a plan
-----------------------------
    params + grads + optimizer states          model states: DeepSpeed's estimators (stages 2, 3, with
                                               or without offload) and our formula for stages 0/1
  + DeepSpeed buffers                          gradient buckets, offload staging, ZeRO-3 gathered params
  + max(activation peak, optimizer-step temp)  activations are freed before the optimizer step, whose
                                               fp32 gradient copy is the only other big transient
  + margin                                     CUDA/cuBLAS/cuDNN workspaces, allocator fragmentation

Activation model (measured, see ACTIVATION_COEFFS and `calibrate`)
-------------------------------------------------------------------
For one utterance of S samples (F = frames after the conv feature encoder, about 50 per second) in a
micro-batch, with e = 2 bytes (bf16/fp16) or 4 (fp32):

  saved(S) = conv        k_s*S + k_0*C_0*n_0 + k_mid*sum_{i=1..5} C_i*n_i + k_6*C_6*n_6
                         (n_i = output length of conv layer i; k per feature-encoder norm, with or without
                         checkpointing; at 512 channels the outputs are ~3.25M elements per audio-s,
                         half of them the 3.2 kHz first layer's)
           + transformer F * L * (a_h*h + a_f*f + a_n*heads + a_0)     without checkpointing
                         F * L * e*h                                   with checkpointing (the layer inputs)
           + attention   L * heads * F^2 * (e, +e+1 with dropout)      eager attention;
                         L * F^2 * e                                   sdpa with padding: its additive mask
           + head        F * (g_kd*K*D_p + g_dp*D_p + g_gv*G*V + g_h*h + g_c*C + g_dc*D_c + g_0)
                         quantizer, projections and the contrastive logits over K=100 negatives
           + dropout     1 byte per element of each active dropout (CUDA keeps a bool mask)
  peak(S)  = saved(S) + F * max(c * (K+1)*D_p,  q * V*D_c - s*(K+1)*D_p)
                         the backward of the fp32 cosine-similarity logits, or the quantizer's
                         [frames, G*V, D_c/G] codevector product (forward and backward)
  + once per micro-batch: the weight-normed positional conv weight (h * h/groups * kernel * e).

The head term is the surprise: Wav2Vec2ForPreTraining materializes the 100 negatives of every frame
(masked or not) and computes their cosine similarity in fp32: ~1.0 MB saved + ~1.2 MB transient per
frame for `large` (vs ~33 KB per transformer layer), i.e. 63% of the activation peak of a 20 s
utterance without checkpointing and 92% with it (base 52/82%, XLS-R 1B 53/91%, 2B 44/89%). A loss
that scores only masked frames, in bf16, without materializing [K, B, T, D] would shrink micro-batch
memory several-fold; `calibrate` would then have to measure that loss instead of the HF forward.
"""
from __future__ import annotations

import argparse
import contextlib
import json
import math
import os
import sys
import weakref
from dataclasses import asdict, dataclass, field, replace

GIB = 2 ** 30
SAMPLING_RATE = 16_000

# ----------------------------------------------------------------------------------------------
# Measured activation coefficients.
#
# Measured with `python -m engine.planner --calibrate` (torch 2.13 CPU, transformers 5.24), i.e.
# `calibrate()`: forward + backward of Wav2Vec2ForPreTraining (train mode, layerdrop 0, all dropouts
# 0, sdpa attention, perplexity fix) on small configs with the real conv feature encoder (512
# channels) for the conv part and small hidden sizes (64..128) for the rest; model in bf16 ("16") or
# fp32 ("32"). "Saved" bytes = unique storages passed to torch.autograd.graph.saved_tensors_hooks,
# parameters excluded, attributed to conv encoder / transformer layers / rest by module hooks
# (checkpointing measured with use_reentrant=True, whose saved inputs go through the same hook; the
# non-reentrant default keeps the same tensors). "Peak" = the highest sum of live op outputs during
# forward + backward (a TorchDispatchMode that frees a storage's bytes when its StorageImpl dies),
# parameter gradients dropped as soon as they are accumulated (DeepSpeed moves them to its buffers).
# Fits: conv by least squares over five channel layouts at 1 s and 2 s; layers by least squares over (h, f, heads) at 2 s;
# head by least squares over the head dimensions of the slope between 2 s and 3 s; the transient by
# configs where one of its two phases dominates. Bytes; see the module docstring for the formula.
# Dropout masks are not in these numbers (CPU dropout keeps a mask in the input dtype, CUDA a bool):
# the planner adds 1 byte per element of each active dropout.
ACTIVATION_COEFFS: dict = {
    "16": {
        # conv: bytes per (input sample, layer-0 / layers 1-5 / layer-6 output element)
        "conv": {"group": [2.0, 6.001, 4.0, 2.0], "group_ckpt": [2.0, 2.0, 2.0, 0.0],
                 "layer": [3.586, 6.0, 6.0, 4.0], "layer_ckpt": [2.0, 2.0, 2.0, 0.0]},
        # transformer layer: bytes per frame per layer = h*hidden + f*ffn + heads*heads + one
        "layer": {"h": 16.0, "f": 4.0, "heads": 4.0, "one": 8.0},
        # head: bytes per frame = kd*K*D_p + dp*D_p + gv*G*V + h*hidden + c*C_last + dc*D_c + one
        "head": {"kd": 12.453, "dp": -29.313, "gv": 9.92, "h": 8.0, "c": 4.0, "dc": 2.125, "one": 2996.2},
        # transient: bytes per frame = max(c*(K+1)*D_p, q*V*D_c - s*(K+1)*D_p)
        "transient": {"c": 15.955, "q": 5.995, "s": 12.453},
    },
    "32": {
        "conv": {"group": [4.0, 12.002, 8.0, 4.0], "group_ckpt": [4.0, 4.0, 4.0, 0.0],
                 "layer": [7.173, 12.0, 12.0, 8.0], "layer_ckpt": [4.0, 4.0, 4.0, 0.0]},
        "layer": {"h": 32.0, "f": 8.0, "heads": 4.0, "one": 16.0},
        "head": {"kd": 12.453, "dp": -29.313, "gv": 12.0, "h": 16.0, "c": 8.0, "dc": 4.125, "one": 2953.0},
        "transient": {"c": 15.93, "q": 11.992, "s": 12.453},
    },
}


# Rough throughput model (H100-class defaults; override with --gpu_tflops etc.). Only used to rank
# plans within an offload tier, to size gradient accumulation under offload and to print estimates.
@dataclass(frozen=True)
class Throughput:
    gpu_tflops: float = 100.0          # sustained bf16/fp16 training FLOP/s (x1e12) at large micro-batches
    fp32_tflops: float = 25.0          # same for fp32 training
    half_efficiency_frames: int = 400  # micro-batch frames at which the GPU reaches half of gpu_tflops
    pcie_gbps: float = 20.0            # pinned host<->device copy bandwidth per GPU (GB/s)
    collective_gbps: float = 100.0     # NCCL bus bandwidth per GPU within a node (GB/s)
    comm_overlap: float = 0.7          # fraction of per-micro-step communication hidden behind compute
    cpu_adam_params_per_s: float = 1.0e9  # DeepSpeedCPUAdam throughput per node (params/s)
    hbm_gbps: float = 2000.0           # GPU memory bandwidth for the fused Adam step (GB/s)


# Safety margin on top of the estimate: CUDA/cuBLAS/cuDNN workspaces, NCCL, allocator rounding and
# fragmentation (variable-length speech batches fragment the caching allocator). Calibrated on an H100 capped
# at 16 GiB (bench/RESULTS.md, run 3): plans estimated at 15.6-15.7 GiB with 0.5 GiB + 8 % ran out of memory
# (large ZeRO-0 3 x 20 s, XLS-R 1B ZeRO-1 + offload 2 x 20 s), so the margin was raised to 1.25 GiB + 15 %.
MARGIN_GIB = 1.25
MARGIN_FRACTION = 0.15          # of the activation peak
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

OFFLOADS = ("none", "optimizer", "all")
PRECISIONS = ("bf16", "fp16", "fp32")
OFFLOAD_NAMES = {"none": "no offload", "optimizer": "optimizer offload", "all": "param+optimizer offload"}


class PlanError(ValueError):
    """Nothing fits; the message says what would be needed and which flag to change."""


# ----------------------------------------------------------------------------------------------
# Model facts (no weights allocated)

@dataclass(frozen=True)
class ModelFacts:
    total_params: int
    largest_layer_params: int      # DeepSpeed's definition: most parameters held directly by one module
    largest_param_numel: int
    param_sizes: tuple             # numel of every parameter, ascending (ZeRO-3 persistence)
    num_layers: int
    hidden: int
    ffn: int
    heads: int
    conv_dim: tuple
    conv_kernel: tuple
    conv_stride: tuple
    feat_extract_norm: str
    num_negatives: int
    proj_codevector_dim: int
    codevector_dim: int
    num_groups: int
    num_vars: int
    pos_conv_weight_numel: int
    hidden_dropout: float
    activation_dropout: float
    attention_dropout: float
    feat_proj_dropout: float
    feat_quantizer_dropout: float

    def persistent_params(self, threshold: int) -> int:
        """Parameters ZeRO-3 keeps whole on every rank (numel <= stage3_param_persistence_threshold)."""
        return sum(n for n in self.param_sizes if n <= threshold)

    def frames(self, samples: int) -> int:
        for k, s in zip(self.conv_kernel, self.conv_stride):
            samples = (samples - k) // s + 1
        return max(samples, 0)

    def conv_lengths(self, samples: int) -> list[int]:
        out = []
        for k, s in zip(self.conv_kernel, self.conv_stride):
            samples = max((samples - k) // s + 1, 0)
            out.append(samples)
        return out


def _build_meta_model(config):
    import torch
    from transformers import Wav2Vec2ForPreTraining
    import transformers

    verbosity = transformers.logging.get_verbosity()
    transformers.logging.set_verbosity_error()
    try:
        with torch.device("meta"):
            return Wav2Vec2ForPreTraining(config)
    finally:
        transformers.logging.set_verbosity(verbosity)


def count_parameters(config) -> int:
    """Exact parameter count of Wav2Vec2ForPreTraining(config), built on the meta device."""
    return model_facts(config).total_params


def analytic_parameter_count(config) -> int:
    """The same count from the architecture's formulas (no torch); a cross-check of the meta count."""
    if getattr(config, "add_adapter", False):
        raise NotImplementedError("analytic count does not cover adapters; use count_parameters")
    h, f, L = config.hidden_size, config.intermediate_size, config.num_hidden_layers
    conv = 0
    c_in = 1
    for i, (c, k) in enumerate(zip(config.conv_dim, config.conv_kernel)):
        conv += c_in * c * k + (c if config.conv_bias else 0)
        if config.feat_extract_norm == "layer" or i == 0:
            conv += 2 * c  # LayerNorm per layer, or the first layer's GroupNorm (affine)
        c_in = c
    c_last = config.conv_dim[-1]
    n = conv
    n += 2 * c_last + c_last * h + h                         # feature projection (LayerNorm + Linear)
    if config.mask_time_prob > 0 or config.mask_feature_prob > 0:
        n += h                                               # masked_spec_embed
    k, g = config.num_conv_pos_embeddings, config.num_conv_pos_embedding_groups
    n += h * (h // g) * k + k + h                            # pos conv: weight_v, weight_g (dim=2), bias
    n += 2 * h                                               # encoder LayerNorm
    n += L * (4 * (h * h + h) + 2 * 2 * h + h * f + f + f * h + h)
    G, V = config.num_codevector_groups, config.num_codevectors_per_group
    n += V * config.codevector_dim                           # codevectors (1, G*V, D_c/G)
    n += c_last * G * V + G * V                              # quantizer weight_proj
    n += h * config.proj_codevector_dim + config.proj_codevector_dim          # project_hid
    n += config.codevector_dim * config.proj_codevector_dim + config.proj_codevector_dim  # project_q
    return n


_FACTS_CACHE: dict[str, ModelFacts] = {}


def model_facts(config) -> ModelFacts:
    key = config.to_json_string(use_diff=False)
    if key in _FACTS_CACHE:
        return _FACTS_CACHE[key]
    model = _build_meta_model(config)
    sizes = {}
    for p in model.parameters():  # shared params counted once (DeepSpeed's model_to_params does the same)
        sizes[id(p)] = p.numel()
    total = sum(sizes.values())
    largest_layer = max(sum(p.numel() for p in m.parameters(recurse=False)) for m in model.modules())
    largest_param = max(sizes.values())
    k, g, h = config.num_conv_pos_embeddings, config.num_conv_pos_embedding_groups, config.hidden_size
    facts = ModelFacts(
        total_params=total, largest_layer_params=largest_layer, largest_param_numel=largest_param,
        param_sizes=tuple(sorted(sizes.values())), num_layers=config.num_hidden_layers, hidden=h,
        ffn=config.intermediate_size, heads=config.num_attention_heads, conv_dim=tuple(config.conv_dim),
        conv_kernel=tuple(config.conv_kernel), conv_stride=tuple(config.conv_stride),
        feat_extract_norm=config.feat_extract_norm, num_negatives=config.num_negatives,
        proj_codevector_dim=config.proj_codevector_dim, codevector_dim=config.codevector_dim,
        num_groups=config.num_codevector_groups, num_vars=config.num_codevectors_per_group,
        pos_conv_weight_numel=h * (h // g) * k,
        hidden_dropout=config.hidden_dropout, activation_dropout=config.activation_dropout,
        attention_dropout=config.attention_dropout, feat_proj_dropout=config.feat_proj_dropout,
        feat_quantizer_dropout=config.feat_quantizer_dropout,
    )
    _FACTS_CACHE[key] = facts
    return facts


# ----------------------------------------------------------------------------------------------
# Activation model

def _pclass(precision: str) -> str:
    if precision not in PRECISIONS:
        raise ValueError(f"precision must be one of {PRECISIONS}, got {precision!r}")
    return "32" if precision == "fp32" else "16"


@dataclass(frozen=True)
class ActivationEstimate:
    """Bytes for one micro-batch of `batch` utterances of `seconds` each (padded batch)."""
    conv: float
    layers: float
    attention: float
    head: float
    dropout: float
    constant: float
    transient: float

    @property
    def saved(self) -> float:
        return self.conv + self.layers + self.attention + self.head + self.dropout + self.constant

    @property
    def peak(self) -> float:
        return self.saved + self.transient


def _conv_features(facts: ModelFacts, samples: int, lengths: list[int]) -> tuple:
    """(input samples, first layer's output elements, middle layers' output elements, last layer's)."""
    outs = [c * n for c, n in zip(facts.conv_dim, lengths)]
    return (samples, outs[0], sum(outs[1:-1]), outs[-1])


def activation_bytes(facts: ModelFacts, seconds: float, *, batch: int = 1, precision: str = "bf16",
                     checkpointing: bool = False, attn_implementation: str = "sdpa",
                     coeffs: dict | None = None, include_dropout: bool = True, dropout_mask_bytes: int = 1,
                     padded: bool = True) -> ActivationEstimate:
    """Activation memory of one training micro-step (see the module docstring for the model).

    `dropout_mask_bytes`: 1 on CUDA (bool masks); CPU's dropout keeps a mask in the input dtype.
    `padded`: the batch has padding, so the attention gets a mask; sdpa converts it to a
    [B, 1, F, F] additive mask per layer (kept for backward by the memory-efficient kernel).
    """
    pc = _pclass(precision)
    co = (coeffs or ACTIVATION_COEFFS)[pc]
    e = 4 if pc == "32" else 2
    samples = int(round(seconds * SAMPLING_RATE))
    lengths = facts.conv_lengths(samples)
    F = lengths[-1]
    h, f, L, H = facts.hidden, facts.ffn, facts.num_layers, facts.heads
    K, Dp, Dc = facts.num_negatives, facts.proj_codevector_dim, facts.codevector_dim
    GV, VDc = facts.num_groups * facts.num_vars, facts.num_vars * facts.codevector_dim
    C = facts.conv_dim[-1]

    cc = co["conv"][facts.feat_extract_norm + ("_ckpt" if checkpointing else "")]
    conv = sum(w * x for w, x in zip(cc, _conv_features(facts, samples, lengths)))

    lc = co["layer"]
    full_layer = lc["h"] * h + lc["f"] * f + lc["heads"] * H + lc["one"]
    eager = attn_implementation == "eager"
    mb = dropout_mask_bytes if include_dropout else 0
    if eager:  # softmax output (+ dropout mask and output) per head
        attn_f2 = (e + (e + mb if facts.attention_dropout > 0 and include_dropout else 0)) * H * F * F
    else:      # the additive padding mask sdpa builds per layer (last dim padded to 16)
        attn_f2 = e * F * (16 * math.ceil(F / 16)) if padded else 0.0
    layer_drop = mb * ((2 * h if facts.hidden_dropout > 0 else 0) + (f if facts.activation_dropout > 0 else 0))
    if checkpointing:
        layers = F * L * e * h
        attention = 0.0
        layer_dropout = 0.0
    else:
        layers = F * L * full_layer
        attention = L * attn_f2
        layer_dropout = F * L * layer_drop

    hc = co["head"]
    head_per_frame = (hc["kd"] * K * Dp + hc["dp"] * Dp + hc["gv"] * GV + hc["h"] * h + hc["c"] * C
                      + hc["dc"] * Dc + hc["one"])
    head = F * head_per_frame
    head_drop = mb * ((h if facts.feat_proj_dropout > 0 else 0) + (h if facts.hidden_dropout > 0 else 0)
                      + (C if facts.feat_quantizer_dropout > 0 else 0))
    dropout = layer_dropout + F * head_drop

    tc = co["transient"]
    contrastive_bwd = tc["c"] * (K + 1) * Dp
    quantizer = tc["q"] * VDc - tc["s"] * (K + 1) * Dp
    recompute = (full_layer + layer_drop + attn_f2 / max(F, 1) - hc["kd"] * (K + 1) * Dp) if checkpointing else 0.0
    transient = F * max(contrastive_bwd, quantizer, recompute)

    return ActivationEstimate(conv=batch * conv, layers=batch * layers, attention=batch * attention,
                              head=batch * head, dropout=batch * dropout,
                              constant=facts.pos_conv_weight_numel * e, transient=batch * transient)


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
    tflops = tp.fp32_tflops if precision == "fp32" else tp.gpu_tflops
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


# ----------------------------------------------------------------------------------------------
# The plan

@dataclass(frozen=True)
class MemoryBreakdown:
    """Estimated peak bytes per GPU. total = params + grads + optimizer + buffers
    + max(activations, optimizer_step_temp) + margin."""
    params: float
    grads: float
    optimizer: float             # persistent optimizer states on the GPU
    activations: float           # activation peak of one micro-step (saved tensors + backward transient)
    buffers: float               # DeepSpeed buckets, offload staging, ZeRO-3 gathered parameters
    margin: float                # workspaces and fragmentation
    total: float
    optimizer_step_temp: float = 0.0  # fp32 gradient copies of the optimizer step (after activations are freed)

    def gib(self) -> dict:
        return {k: round(v / GIB, 2) for k, v in asdict(self).items()}


@dataclass
class Plan:
    model: str
    total_params: int
    world_size: int
    precision: str
    zero_stage: int
    offload: str
    gradient_checkpointing: bool
    micro_batch_size: int                 # utterances of max_duration_in_seconds per micro-batch
    micro_batch_seconds: float            # = micro_batch_size * max_duration_in_seconds (audio budget)
    gradient_accumulation_steps: int
    effective_batch_seconds: float        # micro_batch_seconds * accumulation * world_size
    target_effective_batch_seconds: float
    max_duration_in_seconds: float
    gpu_memory_gb: float                  # budget the plan was made for (GiB)
    host_memory_gb: float                 # per node (GiB)
    gpu: MemoryBreakdown                  # estimated peak per GPU (bytes)
    host_bytes: float                     # estimated host memory per node (bytes)
    est_step_seconds: float
    est_audio_seconds_per_second: float
    reason: str
    zero_config: dict = field(default_factory=dict)
    # the other configurations that fit, same offload tier first, best estimate first: dicts with label,
    # zero_stage, offload, gradient_checkpointing, micro_batch_size, gradient_accumulation_steps,
    # est_gib, est_audio_seconds_per_second
    alternatives: list = field(default_factory=list)

    def apply(self, args, *, budget_batching: bool | None = None):
        """Write the plan into a pretrain.py args namespace (returns it): zero_stage, offload,
        gradient_checkpointing, gradient_accumulation_steps, precision (if 'auto'), and the micro-batch:
        per_device_train_batch_size = micro_batch_size, or with budget batching (default: when
        args.max_batch_seconds was set) max_batch_seconds = micro_batch_seconds (padded audio-s)."""
        if budget_batching is None:
            budget_batching = getattr(args, "max_batch_seconds", None) is not None
        args.zero_stage = self.zero_stage
        args.offload = self.offload
        args.per_device_train_batch_size = self.micro_batch_size
        if budget_batching:
            args.max_batch_seconds = self.micro_batch_seconds
        args.gradient_checkpointing = self.gradient_checkpointing
        args.gradient_accumulation_steps = self.gradient_accumulation_steps
        if getattr(args, "precision", None) in (None, "auto"):
            args.precision = self.precision
        return args

    def to_dict(self) -> dict:
        d = asdict(self)
        d["gpu_gib"] = self.gpu.gib()
        d["host_gib"] = round(self.host_bytes / GIB, 2)
        return d

    def table(self) -> str:
        g = self.gpu.gib()
        rows = [
            ("model", f"{self.model} ({self.total_params / 1e6:.1f}M params)"),
            ("hardware", f"{self.world_size} x GPU with {self.gpu_memory_gb:.1f} GiB, host {self.host_memory_gb:.1f} GiB"
                         f" per node, {self.precision}"),
            ("ZeRO stage", str(self.zero_stage)),
            ("offload", self.offload),
            ("gradient checkpointing", "yes" if self.gradient_checkpointing else "no"),
            ("micro-batch", f"{self.micro_batch_size} x {self.max_duration_in_seconds:g} s = "
                            f"{self.micro_batch_seconds:g} audio-s per GPU"),
            ("gradient accumulation", str(self.gradient_accumulation_steps)),
            ("effective batch", f"{self.effective_batch_seconds:g} audio-s (target {self.target_effective_batch_seconds:g})"),
            ("GPU params", f"{g['params']:.2f} GiB"),
            ("GPU grads", f"{g['grads']:.2f} GiB"),
            ("GPU optimizer states", f"{g['optimizer']:.2f} GiB"
                                     + (f" (+ {g['optimizer_step_temp']:.2f} GiB temp in the step, overlaps activations)"
                                        if self.gpu.optimizer_step_temp else "")),
            ("GPU activations (peak)", f"{g['activations']:.2f} GiB"),
            ("GPU DeepSpeed buffers", f"{g['buffers']:.2f} GiB"),
            ("GPU workspace/fragmentation", f"{g['margin']:.2f} GiB"),
            ("GPU total (est.)", f"{g['total']:.2f} of {self.gpu_memory_gb:.2f} GiB"),
            ("host total (est.)", f"{self.host_bytes / GIB:.1f} of {self.host_memory_gb:.1f} GiB"),
            ("step time (rough est.)", f"{self.est_step_seconds:.2f} s -> {self.est_audio_seconds_per_second:.0f} audio-s/s"),
        ]
        w = max(len(k) for k, _ in rows)
        lines = [f"{k:<{w}}  {v}" for k, v in rows]
        lines.append("")
        lines.append("why: " + self.reason)
        if self.alternatives:
            lines.append("other fits (same tier first): " + "; ".join(
                f"{a['label']}: {a['micro_batch_size']} utt, ~{a['est_audio_seconds_per_second']:.0f} audio-s/s"
                for a in self.alternatives[:6]))
        return "\n".join(lines)


@dataclass(frozen=True)
class _Candidate:
    stage: int
    offload: str
    checkpointing: bool

    @property
    def label(self) -> str:
        s = f"ZeRO-{self.stage}"
        if self.offload != "none":
            s += f" + {OFFLOAD_NAMES[self.offload]}"
        return s + (" + ckpt" if self.checkpointing else "")

    @property
    def order(self) -> tuple:  # preference among equally fast options
        return (OFFLOADS.index(self.offload), self.checkpointing, self.stage)


def _gpu_total(states: StateEstimate, act: ActivationEstimate) -> MemoryBreakdown:
    margin = MARGIN_GIB * GIB + MARGIN_FRACTION * act.peak
    acts = max(act.peak, states.step_transient)
    total = states.params + states.grads + states.optimizer + states.buffers + acts + margin
    return MemoryBreakdown(states.params, states.grads, states.optimizer, act.peak, states.buffers, margin, total,
                           states.step_transient)


def estimate_memory(config, *, zero_stage: int, offload: str = "none", gradient_checkpointing: bool = False,
                    micro_batch_size: int = 1, max_duration_in_seconds: float = 20.0, precision: str = "bf16",
                    world_size: int = 1, num_nodes: int = 1, attn_implementation: str = "sdpa",
                    padded: bool = True, zero_config: dict | None = None,
                    zero_init: bool = False) -> tuple[MemoryBreakdown, float]:
    """(GPU peak breakdown, host bytes per node) of a given configuration: for checking a hand-made
    configuration (pretrain.py without the planner) or comparing with a measurement."""
    facts = model_facts(config)
    states = model_state_bytes(facts, stage=zero_stage, offload=offload or "none", precision=precision,
                               world_size=world_size, num_nodes=num_nodes, zero_config=zero_config,
                               zero_init=zero_init)
    act = activation_bytes(facts, max_duration_in_seconds, batch=micro_batch_size, precision=precision,
                           checkpointing=gradient_checkpointing, attn_implementation=attn_implementation,
                           padded=padded)
    return _gpu_total(states, act), states.host


def read_host_memory_gb() -> float:
    """MemAvailable of /proc/meminfo in GiB (MemTotal-based figures can start small on some GPU hosts:
    pass --host_memory_gb there)."""
    try:
        with open("/proc/meminfo") as fh:
            for line in fh:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024 / GIB
    except OSError:
        pass
    raise PlanError("cannot read host memory from /proc/meminfo; pass --host_memory_gb")


def read_gpu_memory_gb() -> float:
    """Free memory of the current CUDA device in GiB (what is left after this process's CUDA context and
    other processes). A cap set with torch.cuda.set_per_process_memory_fraction is not visible here:
    pass --gpu_memory_gb explicitly in that case."""
    import torch

    if not torch.cuda.is_available():
        raise PlanError("--gpu_memory_gb auto needs a CUDA device; pass the GPU memory in GiB")
    free, _total = torch.cuda.mem_get_info()
    return free / GIB


def plan(config, *, gpu_memory_gb="auto", host_memory_gb: float | None = None, world_size: int = 1,
         num_nodes: int = 1, precision: str = "bf16", max_duration_in_seconds: float = 20.0,
         effective_batch_seconds: float | None = None, per_device_train_batch_size: float = 8,
         gradient_accumulation_steps: int = 1, attn_implementation: str = "sdpa", padded: bool = True,
         zero_stage: int | None = None, offload: str | None = None, gradient_checkpointing: bool | None = None,
         min_gpu_seconds_per_step: float = 8.0, throughput: Throughput = Throughput(),
         zero_config: dict[int, dict] | None = None, zero_init: bool = False, name: str | None = None) -> Plan:
    """Choose the fastest configuration that fits.

    Policy: offload tiers in order none -> optimizer -> all (a higher tier is used only when nothing
    fits below it); within a tier every (ZeRO stage, checkpointing) pair gets the largest micro-batch
    of whole max-duration utterances that fits, and the one with the best estimated throughput wins
    (ties: no checkpointing, then the lower stage). Gradient accumulation keeps the effective batch
    (`effective_batch_seconds`, default: per_device_train_batch_size x max_duration x
    gradient_accumulation_steps x world_size, the seed's recipe); under offload, unless the
    effective batch was given explicitly, accumulation is raised until a step holds
    `min_gpu_seconds_per_step` of GPU work, amortizing the CPU optimizer step.
    `zero_stage` / `offload` / `gradient_checkpointing` restrict the search when given. `padded`:
    batches carry padding and an attention mask (False with --crop_to_shortest). `zero_config`:
    {stage: zero_optimization section} whose bucket sizes the buffers are computed from (default:
    DEFAULT_ZERO_CONFIG, the values of ds_configs/).
    """
    if precision not in PRECISIONS:
        raise PlanError(f"--precision must be one of {PRECISIONS} for planning, got {precision!r}")
    if world_size < 1 or num_nodes < 1 or world_size % num_nodes:
        raise PlanError(f"--world_size {world_size} must be a positive multiple of --num_nodes {num_nodes}")
    if max_duration_in_seconds <= 0:
        raise PlanError("--max_duration_in_seconds must be > 0")
    if offload is not None and offload not in OFFLOADS:
        raise PlanError(f"--offload must be one of {OFFLOADS}, got {offload!r}")
    gpu_gb = read_gpu_memory_gb() if gpu_memory_gb in (None, "auto") else float(gpu_memory_gb)
    host_gb = read_host_memory_gb() if host_memory_gb in (None, "auto") else float(host_memory_gb)
    if gpu_gb <= 0 or host_gb <= 0:
        raise PlanError("--gpu_memory_gb and --host_memory_gb must be > 0")
    facts = model_facts(config)
    name = name or f"wav2vec2 {facts.num_layers}x{facts.hidden}"
    pinned = effective_batch_seconds is not None
    if effective_batch_seconds is None:
        effective_batch_seconds = (per_device_train_batch_size * max_duration_in_seconds
                                   * gradient_accumulation_steps * world_size)
    target_utts = max(effective_batch_seconds / world_size / max_duration_in_seconds, 1.0)
    budget = gpu_gb * GIB
    host_budget = host_gb * GIB
    dur = max_duration_in_seconds

    cands = []
    for off in OFFLOADS:
        stages = {"none": (0, 1, 2, 3), "optimizer": (1, 2, 3), "all": (3,)}[off]
        for st in stages:
            for ck in (False, True):
                c = _Candidate(st, off, ck)
                if zero_stage is not None and st != zero_stage:
                    continue
                if offload is not None and off != offload:
                    continue
                if gradient_checkpointing is not None and ck != gradient_checkpointing:
                    continue
                cands.append(c)
    if not cands:
        raise PlanError(f"no configuration matches --zero_stage {zero_stage} --offload {offload}")

    act1 = {ck: activation_bytes(facts, dur, batch=1, precision=precision, checkpointing=ck,
                                 attn_implementation=attn_implementation, padded=padded) for ck in (False, True)}
    fits, needs = [], []
    for c in cands:
        zc = (zero_config or {}).get(c.stage)
        states = model_state_bytes(facts, stage=c.stage, offload=c.offload, precision=precision,
                                   world_size=world_size, num_nodes=num_nodes, zero_config=zc, zero_init=zero_init)

        def mem(n, c=c, states=states):
            a = activation_bytes(facts, dur, batch=n, precision=precision, checkpointing=c.checkpointing,
                                 attn_implementation=attn_implementation, padded=padded)
            return _gpu_total(states, a)

        one = mem(1)
        needs.append((c, one.total, states.host))
        if states.host > host_budget or one.total > budget:
            continue
        # largest n with mem(n) <= budget (memory is affine in n)
        per_utt = act1[c.checkpointing].peak - act1[c.checkpointing].constant
        n_max = 1 + int((budget - one.total) / (per_utt * (1 + MARGIN_FRACTION)))
        while n_max > 1 and mem(n_max).total > budget:
            n_max -= 1
        while mem(n_max + 1).total <= budget and n_max < 100_000:
            n_max += 1
        amortize = c.offload != "none" and not pinned
        if amortize:
            n = n_max
            accum = max(1, math.ceil(target_utts / n - 1e-9))
        else:
            n, accum = _split_batch(target_utts, n_max)
        est = estimate_step(facts, stage=c.stage, offload=c.offload, checkpointing=c.checkpointing,
                            precision=precision, micro_utts=n, seconds=dur, accum=accum,
                            world_size=world_size, num_nodes=num_nodes, tp=throughput)
        if amortize and accum * est.micro_seconds < min_gpu_seconds_per_step:
            accum = max(accum, math.ceil(min_gpu_seconds_per_step / est.micro_seconds - 1e-9))
            est = estimate_step(facts, stage=c.stage, offload=c.offload, checkpointing=c.checkpointing,
                                precision=precision, micro_utts=n, seconds=dur, accum=accum,
                                world_size=world_size, num_nodes=num_nodes, tp=throughput)
        fits.append((c, n, n_max, accum, est, mem(n), states, zc))

    if not fits:
        raise PlanError(_refusal(name, facts, needs, gpu_gb, host_gb, world_size, dur, precision))

    tier = min(OFFLOADS.index(f[0].offload) for f in fits)
    in_tier = [f for f in fits if OFFLOADS.index(f[0].offload) == tier]
    best_aps = max(f[4].audio_per_second for f in in_tier)
    # among plans within 1% of the best estimate, prefer no checkpointing, then the lower stage
    chosen = min((f for f in in_tier if f[4].audio_per_second >= 0.99 * best_aps), key=lambda f: f[0].order)
    c, n, n_max, accum, est, gpu, states, zc = chosen

    others = sorted((f for f in fits if f is not chosen),
                    key=lambda f: (OFFLOADS.index(f[0].offload) != tier, -f[4].audio_per_second))
    alternatives = [dict(label=f[0].label, zero_stage=f[0].stage, offload=f[0].offload,
                         gradient_checkpointing=f[0].checkpointing, micro_batch_size=f[1],
                         gradient_accumulation_steps=f[3], est_gib=round(f[5].total / GIB, 2),
                         est_audio_seconds_per_second=round(f[4].audio_per_second, 1)) for f in others]
    reason = _reason(c, n, n_max, accum, est, fits, tier, pinned, target_utts, dur, world_size,
                     min_gpu_seconds_per_step, gpu_gb)
    zc_used = {**DEFAULT_ZERO_CONFIG.get(c.stage, {}), **(zc or {})}
    return Plan(
        model=name, total_params=facts.total_params, world_size=world_size, precision=precision,
        zero_stage=c.stage, offload=c.offload, gradient_checkpointing=c.checkpointing, micro_batch_size=n,
        micro_batch_seconds=n * dur, gradient_accumulation_steps=accum,
        effective_batch_seconds=n * dur * accum * world_size, target_effective_batch_seconds=effective_batch_seconds,
        max_duration_in_seconds=dur, gpu_memory_gb=gpu_gb, host_memory_gb=host_gb, gpu=gpu,
        host_bytes=states.host, est_step_seconds=est.step_seconds, est_audio_seconds_per_second=est.audio_per_second,
        reason=reason, zero_config=zc_used, alternatives=alternatives)


def _split_batch(target_utts: float, n_max: int) -> tuple[int, int]:
    """(micro-batch, accumulation) covering `target_utts` per GPU: the micro-batch stays within 75% of
    the largest that fits; among those, the smallest overshoot of the target, then the larger micro-batch."""
    n_cap = min(n_max, max(1, math.ceil(target_utts - 1e-9)))
    best = None
    for n in range(n_cap, max(1, math.ceil(0.75 * n_cap)) - 1, -1):
        accum = max(1, math.ceil(target_utts / n - 1e-9))
        m = max(1, math.ceil(target_utts / accum - 1e-9))  # same accumulation, smallest micro-batch
        key = (m * accum - target_utts, -m)
        if best is None or key < best[0]:
            best = (key, m, accum)
    return best[1], best[2]


def _reason(c, n, n_max, accum, est, fits, tier, pinned, target_utts, dur, world, min_gpu_s, gpu_gb) -> str:
    parts = []
    if tier == 0:
        parts.append("model states fit the GPU without offload")
    else:
        lower = OFFLOADS[tier - 1]
        parts.append(f"nothing fits {gpu_gb:g} GiB with {OFFLOAD_NAMES[lower]} (not even 1 x {dur:g} s), "
                     f"so {OFFLOAD_NAMES[c.offload]}")
    parts.append(f"{c.label} gives the best estimated throughput in this tier"
                 + (f" with up to {n_max} x {dur:g} s per micro-batch" if n_max > 1 else " with 1 utterance per micro-batch"))
    if c.checkpointing:
        nock = [f for f in fits if f[0].offload == c.offload and f[0].stage == c.stage and not f[0].checkpointing]
        if nock:
            parts.append(f"without checkpointing only {nock[0][2]} x {dur:g} s would fit, which is slower per audio-s")
        else:
            parts.append("without checkpointing not even one utterance fits")
    if c.offload != "none" and not pinned:
        parts.append(f"accumulation {accum} so that a step holds ~{accum * est.micro_seconds:.1f} s of GPU work "
                     f"(>= {min_gpu_s:g} s) to amortize the CPU optimizer step (effective batch raised to "
                     f"{n * dur * accum * world:g} s; pass --effective_batch_seconds to pin it)")
    else:
        parts.append(f"accumulation {accum} keeps the effective batch at >= {target_utts * dur * world:g} audio-s")
    return "; ".join(parts) + "."


def _refusal(name, facts, needs, gpu_gb, host_gb, world, dur, precision) -> str:
    lines = [f"{name} ({facts.total_params / 1e6:.0f}M params, {precision}, {world} GPU(s)) does not fit "
             f"--gpu_memory_gb {gpu_gb:g} with host memory {host_gb:.1f} GiB (--host_memory_gb), "
             f"even at 1 x {dur:g} s per micro-batch. Smallest needs:"]
    for off in OFFLOADS:
        opts = [(g, h, c) for c, g, h in needs if c.offload == off]
        if not opts:
            continue
        g, h, c = min(opts, key=lambda x: (x[0], x[1]))
        lines.append(f"  {OFFLOAD_NAMES[off]}: {c.label} needs >= {g / GIB:.1f} GiB GPU (--gpu_memory_gb) and "
                     f">= {h / GIB:.1f} GiB host (--host_memory_gb)")
    lines.append("Options: more GPU or host memory, more GPUs (--world_size, partitions ZeRO states), "
                 "or a shorter --max_duration_in_seconds.")
    return "\n".join(lines)


def plan_from_args(args, config, world_size: int, *, precision: str | None = None, gpu_memory_gb=None,
                   host_memory_gb=None) -> Plan:
    """Plan for a pretrain.py args namespace (raises PlanError, a ValueError, when nothing fits).

    Reads when present: gpu_memory_gb ('auto' or GiB), host_memory_gb, num_nodes, precision,
    max_duration_in_seconds, the recipe whose effective batch is kept (per_device_train_batch_size, or
    max_batch_seconds, x gradient_accumulation_steps x world_size) unless effective_batch_seconds is
    given, attn_implementation, crop_to_shortest (no padding), zero_stage / offload / a --deepspeed
    config file as constraints (None = free), and the bucket sizes of ds_configs/ (or of that file).
    `precision`: the resolved one (ds_config.resolve_precision); otherwise args.precision, where
    'auto' means bf16 (fp16 on a CUDA device without bf16): planning is for GPUs."""
    get = lambda k, d=None: getattr(args, k, d) if getattr(args, k, None) is not None else d  # noqa: E731
    precision = precision or get("precision", "auto")
    if precision == "auto":
        precision = "bf16"
        try:
            import torch
            if torch.cuda.is_available() and not torch.cuda.is_bf16_supported():
                precision = "fp16"
        except Exception:
            pass
    dur = float(get("max_duration_in_seconds", 20.0))
    accum = get("gradient_accumulation_steps", 1)
    if get("max_batch_seconds") is not None:  # budget batching: the recipe in padded seconds
        recipe_utts = get("max_batch_seconds") / dur
    else:
        recipe_utts = get("per_device_train_batch_size", 8)
    zero_stage, offload = get("zero_stage"), get("offload")
    zero_config = _repo_zero_configs()
    ds_file = _deepspeed_file(args)
    if ds_file is not None:
        from engine.ds_config import load_config_file, offload_of

        cfg = load_config_file(ds_file)
        zero_stage = cfg.get("zero_optimization", {}).get("stage", 0)
        offload = offload_of(cfg)
        zero_config[zero_stage] = _numeric(cfg.get("zero_optimization", {}))
    return plan(
        config,
        gpu_memory_gb=gpu_memory_gb if gpu_memory_gb is not None else get("gpu_memory_gb", "auto"),
        host_memory_gb=host_memory_gb if host_memory_gb is not None else get("host_memory_gb"),
        world_size=world_size, num_nodes=get("num_nodes", 1), precision=precision,
        max_duration_in_seconds=dur, effective_batch_seconds=get("effective_batch_seconds"),
        per_device_train_batch_size=recipe_utts, gradient_accumulation_steps=accum,
        attn_implementation=get("attn_implementation", "sdpa") or "sdpa",
        padded=not get("crop_to_shortest", False),
        zero_stage=zero_stage, offload=None if offload in (None, "auto") else offload,
        zero_config=zero_config, name=get("model_name_or_path") or get("config_name"),
    )


def _numeric(zero: dict) -> dict:
    return {k: v for k, v in zero.items() if isinstance(v, (int, float)) and not isinstance(v, bool)
            or k == "overlap_comm" and isinstance(v, bool)}


def _repo_zero_configs() -> dict:
    """zero_optimization sections of ds_configs/zero{1,2,3}.json (what pretrain.py derives configs from)."""
    out = {}
    try:
        from engine.ds_config import stage_config
    except ImportError:
        return out
    for stage in (1, 2, 3):
        try:
            out[stage] = _numeric(stage_config(stage).get("zero_optimization", {}))
        except Exception:
            pass
    return out


def _deepspeed_file(args):
    try:
        from engine.args import deepspeed_config_path
    except ImportError:
        return None
    try:
        return deepspeed_config_path(args) if hasattr(args, "deepspeed") else None
    except Exception:
        return None


# ----------------------------------------------------------------------------------------------
# Measurement (calibration)

def _tracker_class():
    import torch
    from torch.utils._python_dispatch import TorchDispatchMode
    from torch.utils._pytree import tree_flatten

    class LiveBytes(TorchDispatchMode):
        """Bytes of storages created by ops, counted until their StorageImpl dies; keeps the peak."""

        def __init__(self, ignore: set):
            super().__init__()
            self.keys = set(ignore)
            self.live = 0
            self.peak = 0

        def _free(self, key, nbytes):
            self.keys.discard(key)
            self.live -= nbytes

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            out = func(*args, **(kwargs or {}))
            for t in tree_flatten(out)[0]:
                if isinstance(t, torch.Tensor):
                    st = t.untyped_storage()
                    key, n = st.data_ptr(), st.nbytes()
                    if n == 0 or key in self.keys:
                        continue
                    self.keys.add(key)
                    self.live += n
                    self.peak = max(self.peak, self.live)
                    weakref.finalize(st, self._free, key, n)
            return out

    return LiveBytes


@dataclass(frozen=True)
class Measurement:
    frames: int       # all utterances of the batch
    conv: int         # saved bytes in the conv feature encoder
    layers: int       # saved bytes in the transformer layers (all of them)
    head: int         # saved bytes elsewhere (projection, pos conv, quantizer, contrastive loss)
    peak: int         # peak live bytes of op outputs over forward + backward

    @property
    def saved(self) -> int:
        return self.conv + self.layers + self.head


def measure_activations(config, seconds: float, *, batch_size: int = 1, precision: str = "bf16",
                        checkpointing: bool = False, attn_implementation: str = "sdpa", seed: int = 0,
                        keep_dropout: bool = False) -> Measurement:
    """Measure saved-for-backward and peak activation bytes of one training micro-step on the CPU."""
    import numpy as np
    import torch
    import transformers
    from transformers import Wav2Vec2ForPreTraining
    from transformers.models.wav2vec2.modeling_wav2vec2 import _compute_mask_indices, _sample_negative_indices

    from engine.models import apply_perplexity_fix

    dtype = {"bf16": torch.bfloat16, "fp16": torch.bfloat16, "fp32": torch.float32}[precision]
    torch.manual_seed(seed)
    np.random.seed(seed)
    config = type(config).from_dict(config.to_dict())
    config.layerdrop = 0.0
    if not keep_dropout:
        for k in ("hidden_dropout", "activation_dropout", "attention_dropout", "feat_proj_dropout",
                  "feat_quantizer_dropout"):
            setattr(config, k, 0.0)
    config._attn_implementation = attn_implementation
    verbosity = transformers.logging.get_verbosity()
    transformers.logging.set_verbosity_error()
    try:
        model = Wav2Vec2ForPreTraining(config).to(dtype).train()
        if checkpointing:
            import warnings
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": True})
    finally:
        transformers.logging.set_verbosity(verbosity)
    apply_perplexity_fix(model)
    for p in model.parameters():
        p.register_post_accumulate_grad_hook(lambda p: setattr(p, "grad", None))
    samples = int(round(seconds * SAMPLING_RATE))
    x = torch.randn(batch_size, samples, dtype=dtype)
    frames = int(model._get_feat_extract_output_lengths(samples))
    mask = _compute_mask_indices((batch_size, frames), mask_prob=0.65, mask_length=10, min_masks=2)
    neg = _sample_negative_indices((batch_size, frames), config.num_negatives, mask_time_indices=mask)
    mask, neg = torch.tensor(mask), torch.tensor(neg)

    params = {p.untyped_storage().data_ptr() for p in model.parameters()}
    where = ["head"]
    for name, mod in model.named_modules():
        part = "conv" if name == "wav2vec2.feature_extractor" else (
            "layers" if name.startswith("wav2vec2.encoder.layers.") and name.count(".") == 3 else None)
        if part:
            mod.register_forward_pre_hook(lambda m, a, part=part: where.append(part))
            mod.register_forward_hook(lambda m, a, o: where.pop() and None)
    saved: dict[int, tuple[str, int]] = {}

    def pack(t):
        st = t.untyped_storage()
        key = st.data_ptr()
        if key not in params and key not in saved:
            saved[key] = (where[-1], st.nbytes())
        return t

    tracker = _tracker_class()(params | {t.untyped_storage().data_ptr() for t in (x, mask, neg)})
    with tracker:
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            loss = model(x, mask_time_indices=mask, sampled_negative_indices=neg).loss
        loss.backward()
        del loss
    parts = {"conv": 0, "layers": 0, "head": 0}
    for part, n in saved.values():
        parts[part] += n
    return Measurement(frames * batch_size, parts["conv"], parts["layers"], parts["head"], tracker.peak)


def _calib_config(**kw):
    from transformers import Wav2Vec2Config

    base = dict(num_hidden_layers=2, hidden_size=64, intermediate_size=256, num_attention_heads=4,
                feat_extract_norm="layer", do_stable_layer_norm=True, conv_bias=True, conv_dim=(32,) * 7,
                codevector_dim=64, proj_codevector_dim=64, num_conv_pos_embeddings=16,
                num_conv_pos_embedding_groups=4, num_negatives=100, num_codevectors_per_group=320,
                num_codevector_groups=2)
    base.update(kw)
    return Wav2Vec2Config(**base)


def _lstsq(rows: list[list[float]], ys: list[float]) -> list[float]:
    import numpy as np

    sol, *_ = np.linalg.lstsq(np.array(rows, dtype=float), np.array(ys, dtype=float), rcond=None)
    return [float(v) for v in sol]


def calibrate(verbose: bool = True) -> dict:
    """Re-measure ACTIVATION_COEFFS (about half a minute on one CPU core)."""
    out = {}
    log = print if verbose else (lambda *a, **k: None)
    for pc, precision in (("16", "bf16"), ("32", "fp32")):
        co = {"conv": {}, "layer": {}, "head": {}, "transient": {}}
        # conv feature encoder: least squares over (input samples, first / middle / last layer output
        # elements) at 1 s and 2 s for the real 512-channel stack and two others
        for norm in ("group", "layer"):
            for ck in (False, True):
                rows, ys = [], []
                for dims in ((512,) * 7, (64,) * 7, (128, 512, 64, 256, 512, 32, 96), (64,) * 6 + (512,),
                             (512,) + (64,) * 6):
                    cfg = _calib_config(conv_dim=dims, feat_extract_norm=norm, num_hidden_layers=1,
                                        hidden_size=32, intermediate_size=64, num_attention_heads=2)
                    facts = model_facts(cfg)
                    for sec in (1.0, 2.0):
                        m = measure_activations(cfg, sec, precision=precision, checkpointing=ck)
                        n = int(round(sec * SAMPLING_RATE))
                        rows.append(list(_conv_features(facts, n, facts.conv_lengths(n))))
                        ys.append(m.conv)
                co["conv"][norm + ("_ckpt" if ck else "")] = [round(v, 3) for v in _lstsq(rows, ys)]
        # transformer layers: least squares over (h, f, heads, 1) per layer-frame
        rows, ys = [], []
        for h, f, heads in ((64, 256, 4), (128, 256, 4), (64, 512, 4), (64, 256, 8), (128, 512, 8)):
            m = measure_activations(_calib_config(hidden_size=h, intermediate_size=f, num_attention_heads=heads),
                                    2.0, precision=precision)
            rows.append([h, f, heads, 1.0])
            ys.append(m.layers / (2 * m.frames))
        co["layer"] = dict(zip(("h", "f", "heads", "one"), (round(v, 3) for v in _lstsq(rows, ys))))
        # head: least squares of the per-frame slope (2 s -> 3 s) over the head's dimensions
        variants = [{}, dict(hidden_size=128), dict(conv_dim=(64,) * 7), dict(num_codevectors_per_group=160),
                    dict(num_negatives=50), dict(proj_codevector_dim=128), dict(codevector_dim=128),
                    dict(num_codevector_groups=4, num_codevectors_per_group=160, codevector_dim=128)]
        rows, ys, trans = [], [], []
        for kw in variants:
            cfg = _calib_config(**kw)
            f_ = model_facts(cfg)
            m1, m2 = (measure_activations(cfg, s, precision=precision) for s in (2.0, 3.0))
            rows.append([f_.num_negatives * f_.proj_codevector_dim, f_.proj_codevector_dim,
                         f_.num_groups * f_.num_vars, f_.hidden, f_.conv_dim[-1], f_.codevector_dim, 1.0])
            ys.append((m2.head - m1.head) / (m2.frames - m1.frames))
            trans.append((f_, (m2.peak - m2.saved) / m2.frames))
        co["head"] = dict(zip(("kd", "dp", "gv", "h", "c", "dc", "one"), (round(v, 3) for v in _lstsq(rows, ys))))
        # transient: contrastive-backward phase (large D_p, small D_c) and quantizer phase (the reverse)
        cq = {}
        for label, kw in (("c", dict(proj_codevector_dim=256, codevector_dim=32)),
                          ("q", dict(proj_codevector_dim=16, codevector_dim=512, num_negatives=20))):
            cfg = _calib_config(**kw)
            f_ = model_facts(cfg)
            m = measure_activations(cfg, 2.0, precision=precision)
            cq[label] = (f_, (m.peak - m.saved) / m.frames)
        f_c, t_c = cq["c"]
        f_q, t_q = cq["q"]
        s = co["head"]["kd"]
        co["transient"] = {
            "c": round(t_c / ((f_c.num_negatives + 1) * f_c.proj_codevector_dim), 3),
            "q": round((t_q + s * (f_q.num_negatives + 1) * f_q.proj_codevector_dim)
                       / (f_q.num_vars * f_q.codevector_dim), 3),
            "s": s,
        }
        out[pc] = co
        log(f"precision {pc}-bit: {json.dumps(co)}")
    return out


# ----------------------------------------------------------------------------------------------
# CLI

def _load_config(name: str):
    from engine.models import load_config

    return load_config(name, flag="--model")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m engine.planner", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--model", "--model_name_or_path", dest="model", default=None,
                   help="preset name (base, large, xlsr-1b, xlsr-2b, ...) or a directory with config.json")
    p.add_argument("--gpu_memory_gb", default="auto", help="GiB the allocator may use per GPU, or 'auto'")
    p.add_argument("--host_memory_gb", type=float, default=None,
                   help="host RAM per node in GiB (default: MemAvailable of /proc/meminfo)")
    p.add_argument("--world_size", type=int, default=1)
    p.add_argument("--num_nodes", type=int, default=1)
    p.add_argument("--precision", default="bf16", choices=PRECISIONS)
    p.add_argument("--max_duration_in_seconds", type=float, default=20.0)
    p.add_argument("--per_device_train_batch_size", type=int, default=8,
                   help="with --gradient_accumulation_steps: the recipe whose effective batch is kept")
    p.add_argument("--gradient_accumulation_steps", type=int, default=1)
    p.add_argument("--effective_batch_seconds", type=float, default=None,
                   help="audio seconds per optimizer step, all GPUs (pins it; default: the recipe's)")
    p.add_argument("--attn_implementation", default="sdpa", choices=["sdpa", "eager", "flash_attention_2"])
    p.add_argument("--zero_stage", type=int, default=None, choices=[0, 1, 2, 3], help="restrict to this stage")
    p.add_argument("--offload", default=None, choices=OFFLOADS, help="restrict to this offload")
    p.add_argument("--min_gpu_seconds_per_step", type=float, default=8.0)
    p.add_argument("--gpu_tflops", type=float, default=Throughput.gpu_tflops)
    p.add_argument("--cpu_adam_params_per_s", type=float, default=Throughput.cpu_adam_params_per_s)
    p.add_argument("--pcie_gbps", type=float, default=Throughput.pcie_gbps)
    p.add_argument("--json", action="store_true", help="print the plan as JSON")
    p.add_argument("--calibrate", action="store_true", help="re-measure the activation coefficients and exit")
    return p


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    if args.calibrate:
        os.environ.setdefault("OMP_NUM_THREADS", "1")
        coeffs = calibrate()
        print("\nACTIVATION_COEFFS = " + json.dumps(coeffs, indent=4))
        return 0
    if not args.model:
        print("error: --model is required (or --calibrate)", file=sys.stderr)
        return 2
    try:
        # library chatter (DeepSpeed logs its accelerator choice on stdout at import) goes to stderr
        with contextlib.redirect_stdout(sys.stderr):
            p = _plan_cli(args)
    except (PlanError, ValueError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    print(json.dumps(p.to_dict(), indent=2, default=str) if args.json else p.table())
    return 0


def _plan_cli(args) -> Plan:
    config = _load_config(args.model)
    tp = replace(Throughput(), gpu_tflops=args.gpu_tflops, cpu_adam_params_per_s=args.cpu_adam_params_per_s,
                 pcie_gbps=args.pcie_gbps)
    return plan(config, gpu_memory_gb=args.gpu_memory_gb, host_memory_gb=args.host_memory_gb,
                world_size=args.world_size, num_nodes=args.num_nodes, precision=args.precision,
                max_duration_in_seconds=args.max_duration_in_seconds,
                effective_batch_seconds=args.effective_batch_seconds,
                per_device_train_batch_size=args.per_device_train_batch_size,
                gradient_accumulation_steps=args.gradient_accumulation_steps,
                attn_implementation=args.attn_implementation, zero_stage=args.zero_stage, offload=args.offload,
                min_gpu_seconds_per_step=args.min_gpu_seconds_per_step, throughput=tp, name=args.model)


if __name__ == "__main__":
    sys.exit(main())
