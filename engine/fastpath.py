"""A sync-free, faster pre-training forward that runs on the HF model's own modules and parameters.

`Wav2Vec2ForPreTraining.forward` (transformers 5.x) synchronizes with the host several times per step and
does much more work than the loss needs:

  * `hidden_states[mask] = masked_spec_embed` and the encoder's `hidden_states[~mask] = 0` are boolean
    index assignments (a `nonzero`, i.e. a device->host sync, each);
  * `if neg_is_pos.any()` is a sync, and the logits are built from a `[K+1, B, T, D]` gather of negative
    vectors in fp32 (about 2 GB for a 400 s base batch) only to be rounded back to bf16;
  * the feature encoder forces `requires_grad` on the raw audio (a useless input-gradient convolution);
  * the quantizer looks codevectors up with a `[B*T, G*V, D/G]` broadcast product.

`pretraining_forward` computes the same losses (equal outputs and gradients, see tests/test_fastpath.py) by
calling the same submodules (conv layers, feature projection, positional conv, q/k/v/out projections,
feed-forwards, layer norms, quantizer projection, project_hid/project_q), so state dicts, checkpoints and
`save_pretrained` are unchanged. What it replaces:

  * mask insertion and padding zeroing: `torch.where`;
  * encoder layers: the same residual/normalisation order as HF, with our own attention call
    (`sdpa`: `F.scaled_dot_product_attention` with no mask when the batch has no padding, so that a flash
    kernel (flash or cuDNN attention) runs, else a broadcast key-padding mask; `sdpa-cudnn` / `sdpa-flash`: the same, trying cuDNN /
    flash attention first; `eager`: matmul-softmax-matmul; `varlen`: the padded batch is packed once into its real frames
    and every layer runs on them, attention through flash varlen attention);
  * quantizer lookup: one batched matmul (`einsum`), bitwise equal to HF's broadcast-and-sum;
  * contrastive logits: cosine similarities of each utterance's predictions with all its targets
    (`[B, T, T]`, fp32), gathered at the negative indices; `neg_is_pos` from the code indices and
    straight-through values (equal to HF's exact vector comparison, see `_code_keys`) set with
    `torch.where`; fp32 logits; cross-entropy with `ignore_index`;
  * losses and perplexity stay device tensors.

How it is called: `install(model)` replaces the *instance's* `forward` with a dispatcher. Without the
keyword `fast_path=` it runs transformers' forward unchanged; with `fast_path=FastPathArgs(...)` it runs
ours. Going through `model(...)` (or the DeepSpeed engine's forward) keeps DeepSpeed's bookkeeping
(backward hooks, gradient-accumulation scaling) and ZeRO-3's parameter gathering (every submodule is
called as a module; the two parameters used outside a submodule forward, `masked_spec_embed` and
`quantizer.codevectors`, are registered as external parameters of the top module).

Not supported (the step falls back to transformers' forward): `mask_feature_prob > 0`, adapters, LayerDrop.
"""
from __future__ import annotations

import dataclasses
import os
import types
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint
from transformers.models.wav2vec2.modeling_wav2vec2 import Wav2Vec2ForPreTrainingOutput

from engine import convs

ATTENTION_MODES = ("sdpa", "sdpa-flash", "sdpa-cudnn", "eager", "varlen")
COMPILE_SCOPES = ("none", "layers", "full")


@dataclass
class Packing:
    """Where the real frames of a padded batch are, for `varlen` attention (built on the host, no sync)."""
    index: torch.Tensor        # LongTensor[N]: flat positions (b * T + t) of the N real frames
    cu_seqlens: torch.Tensor   # IntTensor[B + 1]
    max_len: int


@dataclass
class FastPathArgs:
    """Per-call arguments of the fast forward. `frame_lengths` (LongTensor[B], on the device): the batch is
    padded and these are its real frames (else they come from `attention_mask`; neither: no padding).
    `packing` only for `varlen` attention on a padded batch."""
    attention: str = "sdpa"
    frame_lengths: torch.Tensor | None = None
    packing: Packing | None = None
    compile: str = "none"
    conv: str = "cudnn-cl"       # feature encoder: cudnn-cl | gemm (engine/convs.py) | cudnn (transformers' Conv1d)
    pos_conv: str = "fft"        # positional convolution: fft (engine/convs.py) | cudnn (transformers')


def unsupported_reason(config) -> str | None:
    """Why this config needs transformers' forward, or None when the fast forward computes the same thing."""
    if getattr(config, "mask_feature_prob", 0.0) > 0:
        return "mask_feature_prob > 0 (feature-axis SpecAugment)"
    if getattr(config, "add_adapter", False) or getattr(config, "adapter_attn_dim", None) is not None:
        return "adapters"
    if getattr(config, "layerdrop", 0.0) > 0:
        return "layerdrop > 0"
    return None


def varlen_available() -> bool:
    try:
        from torch.nn.attention.varlen import varlen_attn  # noqa: F401  (torch >= 2.10)
    except ImportError:
        return False
    return torch.cuda.is_available()


def packing_for(frame_lengths_cpu: torch.Tensor, seq_len: int, device) -> Packing:
    """Packing of a batch from its frame lengths, computed on the host (the CPU batch knows them)."""
    lengths = frame_lengths_cpu.long().clamp(0, seq_len)
    starts = torch.arange(len(lengths)) * seq_len
    index = torch.cat([s + torch.arange(int(n)) for s, n in zip(starts.tolist(), lengths.tolist())])
    cu = torch.zeros(len(lengths) + 1, dtype=torch.int32)
    cu[1:] = lengths.cumsum(0)
    pin = device.type == "cuda"
    move = lambda t: (t.pin_memory() if pin else t).to(device, non_blocking=True)  # noqa: E731
    return Packing(move(index), move(cu), int(lengths.max()))


# --------------------------------------------------------------------------------------------------------------
# installation


def _dispatch_forward(self, *args, fast_path: FastPathArgs | None = None, **kwargs):
    if fast_path is None:
        return type(self).forward(self, *args, **kwargs)
    return pretraining_forward(self, *args, args=fast_path, **kwargs)


def install(model) -> None:
    """Let `model(..., fast_path=FastPathArgs(...))` run the fast forward (idempotent, instance-only)."""
    convs.install(model)
    if not getattr(model, "_fast_path_installed", False):
        model.forward = types.MethodType(_dispatch_forward, model)
        model._fast_path_installed = True
    if not getattr(model, "_fast_path_zero3", False) and is_zero3(model):  # gather them with the top module
        model._fast_path_zero3 = True
        import deepspeed
        extra = [model.quantizer.codevectors]
        if hasattr(model.wav2vec2, "masked_spec_embed"):
            extra.append(model.wav2vec2.masked_spec_embed)
        for p in extra:
            deepspeed.zero.register_external_parameter(model, p)


def is_zero3(model) -> bool:
    return any(hasattr(p, "ds_id") for p in model.parameters())


# --------------------------------------------------------------------------------------------------------------
# encoder


def sdpa_kernel_order(mode: str):
    """A context that makes sdpa try cuDNN attention (sdpa-cudnn) or flash attention (sdpa-flash) first.
    cuDNN attention builds an execution graph per new shape on the host (~0.1 s); flash has no such cost."""
    from torch.nn.attention import SDPBackend, sdpa_kernel
    first = SDPBackend.CUDNN_ATTENTION if mode == "sdpa-cudnn" else SDPBackend.FLASH_ATTENTION
    rest = [SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION, SDPBackend.CUDNN_ATTENTION, SDPBackend.MATH]
    return sdpa_kernel([first] + [b for b in rest if b != first], set_priority=True)


def _attention(attn, x, mode: str, key_mask, packing):
    """x: [B, T, E] (or [N, E] packed). key_mask: BoolTensor[B, T] (True = real frame) or None."""
    heads, head_dim = attn.num_heads, attn.head_dim
    shape = x.shape[:-1]
    q = attn.q_proj(x).view(*shape, heads, head_dim)
    k = attn.k_proj(x).view(*shape, heads, head_dim)
    v = attn.v_proj(x).view(*shape, heads, head_dim)
    p = attn.dropout if attn.training else 0.0
    if mode == "varlen" and packing is not None:
        if q.device.type == "cuda" and q.dtype in (torch.bfloat16, torch.float16):
            from torch.nn.attention.varlen import varlen_attn
            o = varlen_attn(q, k, v, packing.cu_seqlens, packing.cu_seqlens, packing.max_len, packing.max_len)
        else:  # CPU tests and fp32: the same packed layout, one sdpa per utterance (a host read of cu_seqlens)
            cu = packing.cu_seqlens.tolist()
            o = torch.cat([F.scaled_dot_product_attention(*(t[a:b].transpose(0, 1) for t in (q, k, v)),
                                                          scale=attn.scaling).transpose(0, 1)
                           for a, b in zip(cu[:-1], cu[1:])])
    else:
        q, k, v = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)   # [B, H, T, D]
        mask = None if key_mask is None else key_mask[:, None, None, :]
        if mode == "eager":
            w = torch.matmul(q, k.transpose(-1, -2)) * attn.scaling
            if mask is not None:
                w = w.masked_fill(~mask, torch.finfo(w.dtype).min)
            w = F.dropout(w.softmax(-1), p=p, training=attn.training)
            o = torch.matmul(w, v)
        elif mode in ("sdpa-cudnn", "sdpa-flash"):
            with sdpa_kernel_order(mode):
                o = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=p, scale=attn.scaling)
        else:
            o = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=p, scale=attn.scaling)
        o = o.transpose(1, 2)
    return attn.out_proj(o.reshape(*shape, heads * head_dim))


def encoder_layer(layer, h, mode: str, key_mask, packing, stable: bool):
    """One transformer layer, in transformers' order (post-LN for base, pre-LN for `do_stable_layer_norm`)."""
    if stable:
        a = _attention(layer.attention, layer.layer_norm(h), mode, key_mask, packing)
        h = h + layer.dropout(a)
        return h + layer.feed_forward(layer.final_layer_norm(h))
    a = _attention(layer.attention, h, mode, key_mask, packing)
    h = layer.layer_norm(h + layer.dropout(a))
    return layer.final_layer_norm(h + layer.feed_forward(h))


_compiled: dict = {}
# tests use "aot_eager" (inductor's C++ codegen takes minutes on a small CPU)
COMPILE_BACKEND = os.environ.get("W2V_COMPILE_BACKEND", "inductor")


def _compiled_fn(fn, name: str):
    """One compiled wrapper per function. `dynamic=True`: batch and sequence sizes vary from step to step.
    The layer graph is shared by every encoder layer (dynamo treats the modules' parameters as inputs)."""
    key = (name, COMPILE_BACKEND)
    if key not in _compiled:
        _compiled[key] = torch.compile(fn, dynamic=True, backend=COMPILE_BACKEND)
    return _compiled[key]


def _call(module, h, **kw):
    return module(h, **kw)


def _eager(module, h, compiling: bool, **kw):
    """Under --torch_compile full: a convolution kept out of the graph (a graph break), because inductor's
    conv lowering (and the FFT length of engine/convs.py) specializes on the sequence length and would
    recompile for every new length."""
    if not compiling:
        return module(h, **kw)
    if "eager" not in _compiled:
        _compiled["eager"] = torch.compiler.disable(_call)  # imports dynamo: only when compiling
    return _compiled["eager"](module, h, **kw)


def _encoder(enc, h, frame_mask, args: FastPathArgs, stable: bool):
    if frame_mask is not None:                      # HF: hidden_states[~mask] = 0 (a sync); same values
        h = h.masked_fill(~frame_mask[..., None], 0.0)
    h = h + _eager(enc.pos_conv_embed, h, args.compile == "full", impl=args.pos_conv)
    if not stable:
        h = enc.layer_norm(h)
    h = enc.dropout(h)

    mode, packing = args.attention, None
    if mode == "varlen" and enc.training and enc.config.attention_dropout > 0:
        mode = "sdpa"                               # flash varlen has no dropout: keep the model's regularization
    if mode == "varlen":
        packing = args.packing if frame_mask is not None else None
        mode = "varlen" if packing is not None else "sdpa"
    B, T, E = h.shape
    if packing is not None:
        h = h.reshape(B * T, E).index_select(0, packing.index)
    key_mask = frame_mask if packing is None else None

    layer_fn = encoder_layer
    if args.compile == "layers" and packing is None:  # varlen's host-side max_len would specialize the graph
        layer_fn = _compiled_fn(encoder_layer, "layer")
    for layer in enc.layers:
        if getattr(layer, "gradient_checkpointing", False) and layer.training and torch.is_grad_enabled():
            h = checkpoint(layer_fn, layer, h, mode, key_mask, packing, stable, use_reentrant=False)
        else:
            h = layer_fn(layer, h, mode, key_mask, packing, stable)
    if stable:
        h = enc.layer_norm(h)
    if packing is not None:                         # padded frames come back as zeros (they carry no loss)
        h = h.new_zeros(B * T, E).index_copy(0, packing.index, h).view(B, T, E)
    return h


def _norm_act(layer, h):
    """What an HF conv layer does after its convolution: [group norm | layer norm over channels] + GELU."""
    norm = getattr(layer, "layer_norm", None)
    if isinstance(norm, torch.nn.LayerNorm):
        h = norm(h.transpose(-2, -1)).transpose(-2, -1)
    elif norm is not None:
        h = norm(h)
    return layer.activation(h)


def feature_encoder(model, input_values, compiled: bool = False, impl: str = "cudnn-cl"):
    """The conv feature encoder, layer by layer (no requires_grad forced on the audio, unlike HF's forward).

    impl "cudnn": transformers' Conv1d modules, [B, C, L] activations; "cudnn-cl" / "gemm": engine/convs.py's
    channels-last forms (cuDNN NHWC conv2d / one matrix multiplication), [B, L, C] activations from the audio on.
    compiled: convolutions stay eager (cuDNN / cuBLAS) and only the memory-bound norm + GELU after each is
    compiled (one fused kernel per layer). Compiling through a strided conv makes inductor guard on the exact
    output length (`((S // 80 - 3) // 2) == 177`), i.e. one recompilation per distinct input length."""
    channels_last = impl in ("gemm", "cudnn-cl")
    h = input_values[:, :, None] if channels_last else input_values[:, None]
    norm_act = convs.norm_act_channels_last if channels_last else _norm_act
    if compiled:
        norm_act = (_compiled_fn(convs.norm_act_channels_last_fused, "norm_act_cl") if channels_last
                    else _compiled_fn(_norm_act, "norm_act"))
    for layer in model.wav2vec2.feature_extractor.conv_layers:
        checkpointed = getattr(layer, "gradient_checkpointing", False) and layer.training and torch.is_grad_enabled()
        if channels_last:
            h = (checkpoint(_channels_last_layer, layer, h, impl, norm_act, use_reentrant=False) if checkpointed
                 else _channels_last_layer(layer, h, impl, norm_act))
        elif compiled and not checkpointed:
            h = norm_act(layer, layer.conv(h))
        else:
            h = layer(h)
    return h if channels_last else h.transpose(1, 2)


def _channels_last_layer(layer, h, impl, norm_act):
    return norm_act(layer, layer.conv(h, impl=impl))


# --------------------------------------------------------------------------------------------------------------
# quantizer and loss


def quantize(quantizer, features, mask_time_indices, temperature=None):
    """HF's Wav2Vec2GumbelVectorQuantizer.forward with the lookup as a batched matmul; also returns the
    per-frame code keys (see `_code_keys`). Consumes the RNG exactly like HF (one gumbel_softmax call)."""
    B, T, _ = features.shape
    G, V = quantizer.num_groups, quantizer.num_vars
    logits = quantizer.weight_proj(features).view(B * T * G, V)
    if quantizer.training:
        tau = quantizer.temperature if temperature is None else temperature
        probs = F.gumbel_softmax(logits.float(), tau=tau, hard=True).type_as(logits)
        soft = torch.softmax(logits.view(B * T, G, V).float(), dim=-1)
        perplexity = quantizer._compute_perplexity(soft, mask_time_indices)
    else:
        idx = logits.argmax(dim=-1)
        probs = logits.new_zeros(logits.shape).scatter_(-1, idx.view(-1, 1), 1.0)
        perplexity = quantizer._compute_perplexity(probs.view(B * T, G, V), mask_time_indices)
    probs = probs.view(B * T, G, V)
    codebook = quantizer.codevectors.view(G, V, -1)
    # exactly one non-zero term per sum: bitwise equal to HF's (probs[..., None] * codevectors).sum(-2)
    codevectors = torch.einsum("ngv,gvd->ngd", probs, codebook.to(probs.dtype))
    return codevectors.reshape(B, T, -1), perplexity, _code_keys(probs.detach())


def _code_keys(probs):
    """(code index, straight-through value) per frame and group. Two quantized vectors are bitwise equal iff
    these are: each group's vector is value * codevector[index] exactly (the other terms are exact zeros), and
    the value is 1 up to the rounding of `hard - soft + soft` (exactly 1.0 once cast to bf16)."""
    idx = probs.argmax(dim=-1)                                   # [N, G]
    val = probs.gather(-1, idx[..., None]).squeeze(-1)           # [N, G]
    return idx, val


def contrastive_logits(pred, target, local_negatives, temperature):
    """fp32 logits [B, T, 1 + K]: cosine similarity of each prediction with its target and its negatives.

    pred, target: [B, T, P]; local_negatives: LongTensor[B, T, K], indices into the same utterance's frames.
    Instead of gathering [B, T, K, P] negative vectors, all target-prediction similarities of an utterance
    are one [T, T] matmul, and the negatives' logits are gathered from it.
    """
    eps = 1e-8                                                   # torch.cosine_similarity's
    p = pred.float()
    t = target.float()
    p = p / p.norm(dim=-1, keepdim=True).clamp_min(eps)
    t = t / t.norm(dim=-1, keepdim=True).clamp_min(eps)
    positive = (p * t).sum(-1, keepdim=True)                     # [B, T, 1]
    sim = torch.bmm(p, t.transpose(1, 2))                        # [B, T(pred), T(target)]
    negative = sim.gather(2, local_negatives)                    # [B, T, K]
    return torch.cat([positive, negative], dim=-1) / temperature


def pretraining_forward(model, input_values, attention_mask=None, mask_time_indices=None,
                        sampled_negative_indices=None, *, args: FastPathArgs | None = None, **unused):
    """Same losses as `Wav2Vec2ForPreTraining.forward(...)` (see module docstring), no host synchronization."""
    args = args or FastPathArgs()
    if args.compile == "full" and args.attention == "varlen":
        args = dataclasses.replace(args, compile="layers")   # see _encoder: varlen layers stay eager
    features = feature_encoder(model, input_values, compiled=args.compile != "none", impl=args.conv)
    lengths = args.frame_lengths
    if lengths is None and attention_mask is not None:
        lengths = model._get_feat_extract_output_lengths(attention_mask.sum(-1))
    after = _after_features
    if args.compile == "full":  # everything after the conv stack in one graph (see feature_encoder for why not it)
        after = _compiled_fn(_after_features, "full")
    # The gumbel temperature changes every step: a tensor, so that a compiled graph does not specialize on it.
    temperature = torch.full((), float(model.quantizer.temperature), device=features.device)
    return after(model, features, lengths, mask_time_indices, sampled_negative_indices, temperature, args)


def _after_features(model, features, lengths, mask_time_indices, sampled_negative_indices, temperature,
                    args: FastPathArgs):
    config = model.config
    w2v = model.wav2vec2
    B, T, _ = features.shape
    frame_mask = None                                # None: no padding (flash attention, no masking)
    if lengths is not None:
        frame_mask = torch.arange(T, device=features.device)[None, :] < lengths[:, None]

    hidden, extract = w2v.feature_projection(features)
    mask = None
    if mask_time_indices is not None:
        mask = mask_time_indices.bool()
        if getattr(config, "apply_spec_augment", True):
            hidden = torch.where(mask[..., None], w2v.masked_spec_embed.to(hidden.dtype), hidden)

    hidden = _encoder(w2v.encoder, hidden, frame_mask, args, stable=config.do_stable_layer_norm)
    predicted = model.project_hid(hidden)
    quantized, perplexity, (codes, values) = quantize(model.quantizer, model.dropout_features(extract), mask,
                                                      temperature)
    quantized = model.project_q(quantized)

    loss = contrastive = diversity = None
    if sampled_negative_indices is not None and mask is not None:
        K = sampled_negative_indices.shape[-1]
        offsets = (torch.arange(B, device=hidden.device) * T).view(B, 1, 1)
        local = (sampled_negative_indices.long() - offsets).clamp(0, T - 1)          # same utterance's frames
        logits = contrastive_logits(predicted, quantized, local, config.contrastive_logits_temperature)
        flat = sampled_negative_indices.long().view(-1)
        same_code = (codes[flat].view(B, T, K, -1) == codes.view(B, T, 1, -1)).all(-1)
        same_value = (values[flat].view(B, T, K, -1) == values.view(B, T, 1, -1)).all(-1)
        neg_is_pos = same_code & same_value
        negative = logits[..., 1:].masked_fill(neg_is_pos, float("-inf"))
        logits = torch.cat([logits[..., :1], negative], dim=-1)
        target = torch.where(mask, 0, -100).long()
        contrastive = F.cross_entropy(logits.view(B * T, K + 1), target.view(-1), reduction="sum")
        num_codevectors = config.num_codevectors_per_group * config.num_codevector_groups
        diversity = ((num_codevectors - perplexity) / num_codevectors) * mask.sum()
        loss = contrastive + config.diversity_loss_weight * diversity

    return Wav2Vec2ForPreTrainingOutput(loss=loss, contrastive_loss=contrastive, diversity_loss=diversity,
                                        codevector_perplexity=perplexity)
