"""An analytic FLOP model of wav2vec 2.0 pre-training, and model FLOPs utilization (MFU).

Counted from the config, per utterance, a multiply-add = 2 FLOPs, for one forward pass:

  feature encoder   sum over conv layers i:  2 * L_i * C_out_i * C_in_i * k_i     (L_i = output frames)
  feature proj      2 * T * conv_dim[-1] * d
  pos. conv embed   2 * T * d * (d / groups) * kernel
  transformer       per layer: 2 * T * 4 d^2 (q, k, v, o) + 2 * T * 2 d f (feed-forward)
                               + 4 * T^2 * d (scores q k^T and their product with v)
  quantizer         2 * T * conv_dim[-1] * G V (logits) + 2 * T * V * D (codevector selection)
  projections       2 * T * D * P (project_q) + 2 * T * d * P (project_hid)
  contrastive       2 * T * (K + 1) * P (cosine similarities with the target and K negatives)

with T frames, d hidden size, f intermediate size, G groups of V codevectors of total dimension D,
P the projected codevector dim and K negatives. Norms, activations, softmax and the loss itself are
left out (a few % of the matmuls). Training = 3 x forward (backward = 2 x forward); gradient
checkpointing's recomputation is not counted (MFU counts model FLOPs, not hardware FLOPs).

Real lengths are counted (padding is not useful work). For ``base`` this gives ~46 GFLOP of
training per audio-second for 15-20 s utterances (see tests/test_metrics.py).
"""
from __future__ import annotations

import torch

# Dense peak FLOP/s per GPU (vendor data sheets, SXM parts unless named): bf16/fp16 tensor cores, tf32
# tensor cores, plain fp32.
PEAK_FLOPS = {
    "H100 PCIe": {"bf16": 756e12, "tf32": 378e12, "fp32": 51e12},
    "H100": {"bf16": 989e12, "tf32": 494.7e12, "fp32": 67e12},
    "H200": {"bf16": 989e12, "tf32": 494.7e12, "fp32": 67e12},
    "A100": {"bf16": 312e12, "tf32": 156e12, "fp32": 19.5e12},
}


def _conv_frames(config, num_samples: int) -> list[int]:
    frames, out = num_samples, []
    for kernel, stride in zip(config.conv_kernel, config.conv_stride):
        frames = max((frames - kernel) // stride + 1, 0)
        out.append(frames)
    return out


def forward_flops(config, num_samples: int, num_negatives: int | None = None) -> float:
    """FLOPs of one forward pass of Wav2Vec2ForPreTraining over one utterance of `num_samples` samples
    (`num_negatives` defaults to the config's)."""
    frames = _conv_frames(config, num_samples)
    flops, c_in = 0.0, 1
    for frames_i, c_out, kernel in zip(frames, config.conv_dim, config.conv_kernel):
        flops += 2.0 * frames_i * c_out * c_in * kernel
        c_in = c_out
    T = frames[-1] if frames else 0
    d, f, c = config.hidden_size, config.intermediate_size, config.conv_dim[-1]
    flops += 2.0 * T * c * d
    flops += 2.0 * T * d * (d // config.num_conv_pos_embedding_groups) * config.num_conv_pos_embeddings
    per_layer = 2.0 * T * 4 * d * d + 2.0 * T * 2 * d * f + 4.0 * T * T * d
    flops += config.num_hidden_layers * per_layer
    G, V, D, P = (config.num_codevector_groups, config.num_codevectors_per_group, config.codevector_dim,
                  config.proj_codevector_dim)
    flops += 2.0 * T * c * G * V + 2.0 * T * V * D
    flops += 2.0 * T * D * P + 2.0 * T * d * P
    K = config.num_negatives if num_negatives is None else num_negatives
    flops += 2.0 * T * (K + 1) * P
    return flops


def train_flops(config, lengths, num_negatives: int | None = None) -> float:
    """Training FLOPs (forward + backward = 3 x forward) of a batch with these real lengths (samples)."""
    return 3.0 * sum(forward_flops(config, int(n), num_negatives) for n in lengths)


def train_flops_per_audio_second(config, seconds: float = 15.0, sampling_rate: int = 16_000) -> float:
    """Training FLOPs per second of audio for utterances of `seconds` seconds."""
    return train_flops(config, [int(seconds * sampling_rate)]) / seconds


def peak_flops(device: torch.device, precision: str, override_tflops: float | None = None) -> float | None:
    """Dense peak FLOP/s of one device for this precision; None where unknown (CPU, unlisted GPUs):
    pass `--peak_tflops` for those. fp32 counts tf32 tensor cores when torch allows tf32 matmuls."""
    if override_tflops:
        return override_tflops * 1e12
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    for key, table in PEAK_FLOPS.items():  # ordered: "H100 PCIe" before "H100"
        if key in name or key.replace(" ", "") in name.replace(" ", ""):
            if precision in ("bf16", "fp16"):
                return table["bf16"]
            return table["tf32"] if torch.backends.cuda.matmul.allow_tf32 else table["fp32"]
    return None


def mfu(flops: float, seconds: float, peak: float | None, world_size: int = 1) -> float | None:
    """Model FLOPs utilization: achieved training FLOP/s over the peak of all `world_size` devices."""
    if peak is None or seconds <= 0:
        return None
    return flops / seconds / (peak * world_size)
