"""Faster forms of wav2vec 2.0's two convolution stacks, computed on the HF modules' own parameters.

Both are plain torch (autograd gives the backward) and compute the same function as the cuDNN convolution
(tests/test_convs.py compares outputs and gradients with transformers' modules):

  * feature encoder, `gemm`: each strided Conv1d as one matrix multiplication on channels-last activations.
    The windows of a kernel-k, stride-s convolution are `x.unfold(time, k, s)` (a copy of 1.5x the input for
    k=3, s=2; a free reshape when k == s), multiplied by the weight reshaped to [C_out, C_in * k]. The
    activations stay [B, time, channels] from the audio to the feature projection, so no transposes either.
  * feature encoder, `cudnn-cl`: the same channels-last activations, each Conv1d run as a cuDNN conv2d on an
    NHWC view ([B, C, 1, L] with channel stride 1): cuDNN's NHWC kernels without its NCHW<->NHWC conversions.
  * positional convolution, `fft`: the grouped Conv1d (kernel 128, 16 groups, "same" padding) as a product in
    the frequency domain, in fp32: rFFT over time, one small complex matrix product per (frequency, group),
    inverse rFFT. ~20x fewer FLOPs than the direct convolution, and more accurate than a bf16 one.

How they are called: `install(model)` (from `fastpath.install`) replaces the *instances'* `forward` of the
feature encoder's Conv1d modules and of `pos_conv_embed` by dispatchers that run transformers' code unless
the call passes `impl=`. Going through the module call keeps ZeRO-3's parameter gathering (the weight-norm
parameters of the positional conv are external parameters of `pos_conv_embed`, the bias is the Conv1d's own).
"""
from __future__ import annotations

import types

import torch
import torch.nn.functional as F

CONV_IMPLS = ("cudnn-cl", "gemm", "cudnn")
POS_CONV_IMPLS = ("fft", "cudnn")


# --------------------------------------------------------------------------------------------------------------
# feature encoder


def conv_gemm(conv: torch.nn.Conv1d, x: torch.Tensor) -> torch.Tensor:
    """conv(x) for channels-last x: [B, L, C_in] -> [B, L_out, C_out] (no padding, no dilation, groups 1)."""
    k, s = conv.kernel_size[0], conv.stride[0]
    B, L, C = x.shape
    n = (L - k) // s + 1
    w = conv.weight
    if k == s:                                                    # non-overlapping windows: a reshape
        cols = x[:, :n * s].reshape(B, n, s * C)                  # window element (j, c) at j * C + c
        w = w.permute(0, 2, 1).reshape(w.shape[0], k * C)
    else:
        cols = x.unfold(1, k, s).reshape(B, n, C * k)             # [B, n, C, k] -> (c, j) at c * k + j
        w = w.reshape(w.shape[0], C * k)
    return F.linear(cols, w.to(x.dtype), None if conv.bias is None else conv.bias.to(x.dtype))


def conv_channels_last(conv: torch.nn.Conv1d, x: torch.Tensor) -> torch.Tensor:
    """conv(x) for channels-last x: [B, L, C_in] -> [B, L_out, C_out], as a cuDNN conv2d on an NHWC view
    ([B, C, 1, L] with channel stride 1), so that cuDNN's NHWC kernels run without layout conversions."""
    x4 = x.transpose(1, 2).unsqueeze(2)                           # [B, C, 1, L], channels-last strides
    w4 = conv.weight.to(x.dtype).unsqueeze(2).contiguous(memory_format=torch.channels_last)
    bias = None if conv.bias is None else conv.bias.to(x.dtype)
    y = F.conv2d(x4, w4, bias, stride=(1, conv.stride[0]))
    return y.squeeze(2).transpose(1, 2)                           # [B, L_out, C_out] (contiguous if NHWC)


def norm_act_channels_last(layer, h: torch.Tensor) -> torch.Tensor:
    """What an HF conv layer does after its convolution, on channels-last h: [B, L, C]: group norm (base
    family: statistics over time) or layer norm over channels, then GELU."""
    norm = getattr(layer, "layer_norm", None)
    if isinstance(norm, torch.nn.GroupNorm):                     # statistics over time: on the [B, C, L] view
        h = norm(h.transpose(1, 2)).transpose(1, 2)               # (saves the bf16 input, not fp32 copies)
    elif norm is not None:
        h = norm(h)
    return layer.activation(h)


def norm_act_channels_last_fused(layer, h: torch.Tensor) -> torch.Tensor:
    """The same function written for torch.compile: the group norm as fp32 `var_mean` over time on [B, L, C],
    which inductor turns into one reduction and one pointwise kernel (a base step measured 146 ms this way
    vs 156 ms compiling the group norm on the transposed view, bench/RESULTS.md run 5). Eager, it would
    keep fp32 copies of the layer-0 output for backward: `norm_act_channels_last` is the eager form."""
    norm = getattr(layer, "layer_norm", None)
    if not isinstance(norm, torch.nn.GroupNorm):
        return norm_act_channels_last(layer, h)
    if norm.num_groups != norm.num_channels:
        raise NotImplementedError("group norm with several channels per group")
    acc = torch.promote_types(h.dtype, torch.float32)             # fp32 statistics for bf16, as GroupNorm
    x = h.to(acc)
    var, mean = torch.var_mean(x, dim=1, keepdim=True, correction=0)
    y = (x - mean) * torch.rsqrt(var + norm.eps) * norm.weight.to(acc) + norm.bias.to(acc)
    return layer.activation(y.to(h.dtype))


# --------------------------------------------------------------------------------------------------------------
# positional convolution


def fft_size(n: int) -> int:
    """The smallest 2^a 3^b 5^c >= n (sizes cuFFT and pocketfft handle fastest)."""
    while True:
        m = n
        for f in (2, 3, 5):
            while m % f == 0:
                m //= f
        if m == 1:
            return n
        n += 1


def pos_conv_fft(module, h: torch.Tensor) -> torch.Tensor:
    """HF's Wav2Vec2PositionalConvEmbedding convolution + same-padding trim (before the activation), on
    h: [B, T, E] -> [B, T, E] (h's dtype), computed in fp32 through the FFT.

    The convolution is the correlation out[t] = sum_k w[k] x[t + k - p] (p = K // 2), i.e. the linear
    convolution of x with the reversed kernel read at t + K - 1 - p."""
    conv = module.conv
    K, p, G = conv.kernel_size[0], conv.padding[0], conv.groups
    B, T, E = h.shape
    w = conv.weight.float()                                       # [E, E/G, K] (weight norm applied)
    Eo, Ei = E // G, w.shape[1]
    n = fft_size(T + K - 1)
    X = torch.fft.rfft(h.float(), n=n, dim=1)                     # [B, F, E]
    W = torch.fft.rfft(w.flip(-1), n=n, dim=-1)                   # [E, Ei, F]
    Fq = X.shape[1]
    Xg = X.view(B, Fq, G, Ei).permute(1, 2, 0, 3)                 # [F, G, B, Ei]
    Wg = W.view(G, Eo, Ei, Fq).permute(3, 0, 2, 1)                # [F, G, Ei, Eo]
    Y = torch.matmul(Xg, Wg).permute(2, 0, 1, 3).reshape(B, Fq, E)
    start = K - 1 - p
    y = torch.fft.irfft(Y, n=n, dim=1)[:, start:start + T]
    if conv.bias is not None:
        y = y + conv.bias.float()
    return y.to(h.dtype)


# --------------------------------------------------------------------------------------------------------------
# installation


def _conv_dispatch(self, x, impl: str | None = None):
    if impl is None:
        return type(self).forward(self, x)
    if impl == "cudnn-cl":
        return conv_channels_last(self, x)
    if impl != "gemm":
        raise ValueError(f"unknown conv impl {impl!r}")
    return conv_gemm(self, x)


def _pos_conv_dispatch(self, h, impl: str | None = None):
    if impl is None or impl == "cudnn":
        return type(self).forward(self, h)
    if impl != "fft":
        raise ValueError(f"unknown positional conv impl {impl!r}")
    return self.activation(pos_conv_fft(self, h))


def install(model) -> None:
    """Let `layer.conv(x_channels_last, impl="gemm")` and `pos_conv_embed(h, impl="fft")` run the forms above
    (instance-level, idempotent); without `impl` the modules run transformers' code."""
    if getattr(model, "_fast_convs_installed", False):
        return
    for layer in model.wav2vec2.feature_extractor.conv_layers:
        layer.conv.forward = types.MethodType(_conv_dispatch, layer.conv)
    pos = model.wav2vec2.encoder.pos_conv_embed
    pos.forward = types.MethodType(_pos_conv_dispatch, pos)
    model._fast_convs_installed = True
