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

from engine.planner.common import GIB, OFFLOADS, PRECISIONS, SAMPLING_RATE
from engine.planner.facts import ModelFacts, analytic_parameter_count, count_parameters, model_facts
from engine.planner.activations import (ACTIVATION_COEFFS, ActivationEstimate, Measurement, activation_bytes,
                                        calibrate, measure_activations)
from engine.planner.states import (DEFAULT_ZERO_CONFIG, DS_ALLREDUCE_BUCKET, DS_CPU_BUFFER_FACTOR,
                                   HOST_PER_PROCESS_GIB, StateEstimate, model_state_bytes)
from engine.planner.throughput import StepEstimate, Throughput, estimate_step
from engine.planner.result import MemoryBreakdown, Plan
from engine.planner.policy import (MARGIN_FRACTION, MARGIN_GIB, OFFLOAD_NAMES, PlanError, estimate_memory, plan,
                                   plan_from_args, read_gpu_memory_gb, read_host_memory_gb)
from engine.planner.cli import build_parser, main

__all__ = [
    "GIB", "OFFLOADS", "PRECISIONS", "SAMPLING_RATE", "ModelFacts", "analytic_parameter_count",
    "count_parameters", "model_facts", "ACTIVATION_COEFFS", "ActivationEstimate", "Measurement",
    "activation_bytes", "calibrate", "measure_activations", "DEFAULT_ZERO_CONFIG", "DS_ALLREDUCE_BUCKET",
    "DS_CPU_BUFFER_FACTOR", "HOST_PER_PROCESS_GIB", "StateEstimate", "model_state_bytes", "StepEstimate",
    "Throughput", "estimate_step", "MemoryBreakdown", "Plan", "MARGIN_FRACTION", "MARGIN_GIB",
    "OFFLOAD_NAMES", "PlanError", "estimate_memory", "plan", "plan_from_args", "read_gpu_memory_gb",
    "read_host_memory_gb", "build_parser", "main",
]
