"""Model configs (presets, local dirs, hub names), model construction and the perplexity fix.

`--model_name_or_path` accepts:
  * a built-in preset name (``demo``, ``base``, ``large``, ``xlsr-300m``, ``xlsr-1b``, ``xlsr-2b``)
    with the published architecture hyper-parameters;
  * a local directory holding ``config.json`` (the seed's large recipe uses ``./``);
  * a hub model id, whose config is fetched by transformers (offline this fails with a clear message).

As in the seed, the model is initialized at random from the config.
"""
from __future__ import annotations

import os

import torch
from transformers import Wav2Vec2Config, Wav2Vec2FeatureExtractor, Wav2Vec2ForPreTraining

SAMPLING_RATE = 16_000

# Pre-training values shared by every preset (wav2vec 2.0 paper / fairseq recipes). LayerDrop is off:
# with DeepSpeed, ranks that skip different layers leave gradients unreduced (ZeRO-3 hangs).
_COMMON = dict(
    mask_time_prob=0.65,
    mask_time_length=10,
    num_negatives=100,
    num_codevector_groups=2,
    num_codevectors_per_group=320,
    contrastive_logits_temperature=0.1,
    diversity_loss_weight=0.1,
    layerdrop=0.0,
    feat_quantizer_dropout=0.0,
)
_LARGE_FAMILY = dict(feat_extract_norm="layer", do_stable_layer_norm=True, conv_bias=True,
                     feat_extract_activation="gelu")

PRESETS: dict[str, dict] = {
    # A few hundred thousand parameters: CPU demo and tests. Same conv strides (20 ms frames) as the real ones.
    "demo": dict(_COMMON, **_LARGE_FAMILY, hidden_size=64, num_hidden_layers=2, num_attention_heads=2,
                 intermediate_size=128, conv_dim=(64,) * 7, num_conv_pos_embeddings=16,
                 num_conv_pos_embedding_groups=4, num_codevectors_per_group=32, codevector_dim=64,
                 proj_codevector_dim=64, hidden_dropout=0.0, attention_dropout=0.0, activation_dropout=0.0,
                 feat_proj_dropout=0.0, mask_time_prob=0.5, mask_time_length=5, num_negatives=20),
    # facebook/wav2vec2-base: 95M
    "base": dict(_COMMON, hidden_size=768, num_hidden_layers=12, num_attention_heads=12, intermediate_size=3072,
                 feat_extract_norm="group", do_stable_layer_norm=False, conv_bias=False,
                 codevector_dim=256, proj_codevector_dim=256, hidden_dropout=0.1, attention_dropout=0.1,
                 activation_dropout=0.0, feat_proj_dropout=0.1),
    # facebook/wav2vec2-large-lv60: 317M
    "large": dict(_COMMON, **_LARGE_FAMILY, hidden_size=1024, num_hidden_layers=24, num_attention_heads=16,
                  intermediate_size=4096, codevector_dim=768, proj_codevector_dim=768, hidden_dropout=0.1,
                  attention_dropout=0.1, activation_dropout=0.0, feat_proj_dropout=0.1),
    # facebook/wav2vec2-xls-r-1b: 965M
    "xlsr-1b": dict(_COMMON, **_LARGE_FAMILY, hidden_size=1280, num_hidden_layers=48, num_attention_heads=16,
                    intermediate_size=5120, codevector_dim=1024, proj_codevector_dim=1024, hidden_dropout=0.1,
                    attention_dropout=0.1, activation_dropout=0.0, feat_proj_dropout=0.1),
    # facebook/wav2vec2-xls-r-2b: 2.16B
    "xlsr-2b": dict(_COMMON, **_LARGE_FAMILY, hidden_size=1920, num_hidden_layers=48, num_attention_heads=16,
                    intermediate_size=7680, codevector_dim=1024, proj_codevector_dim=1024, hidden_dropout=0.1,
                    attention_dropout=0.1, activation_dropout=0.0, feat_proj_dropout=0.1),
}
PRESETS["tiny"] = PRESETS["demo"]
PRESETS["xlsr-300m"] = PRESETS["large"]


class ModelError(ValueError):
    """A model that cannot be configured; the message names the flag."""


def load_config(name_or_path: str, *, cache_dir: str | None = None, flag: str = "--model_name_or_path") -> Wav2Vec2Config:
    """Resolve a preset name, a local directory with config.json, or a hub id into a Wav2Vec2Config."""
    if name_or_path in PRESETS:
        return Wav2Vec2Config(**PRESETS[name_or_path])
    if os.path.isdir(name_or_path):
        if not os.path.isfile(os.path.join(name_or_path, "config.json")):
            raise ModelError(f"{flag}={name_or_path!r} is a directory without config.json; "
                             f"pass a preset ({', '.join(sorted(PRESETS))}), a hub id or a model directory")
        return Wav2Vec2Config.from_pretrained(name_or_path)
    if os.path.exists(name_or_path):
        raise ModelError(f"{flag}={name_or_path!r} is a file; pass a model directory holding config.json")
    try:
        return Wav2Vec2Config.from_pretrained(name_or_path, cache_dir=cache_dir)
    except Exception as exc:  # network, auth, missing repo: all end the same way for the user
        raise ModelError(
            f"{flag}={name_or_path!r}: could not fetch its config from the hub ({type(exc).__name__}: "
            f"{str(exc).splitlines()[0] if str(exc) else ''}). Offline? Use a preset "
            f"({', '.join(sorted(PRESETS))}) or a local directory with config.json") from exc


def load_feature_extractor(name_or_path: str, *, cache_dir: str | None = None) -> Wav2Vec2FeatureExtractor:
    """The feature extractor saved next to the model. Presets (and dirs without one) get the standard
    16 kHz, normalizing extractor; the seed only supports normalized inputs, so do_normalize is enforced."""
    fe = None
    if name_or_path not in PRESETS:
        try:
            fe = Wav2Vec2FeatureExtractor.from_pretrained(name_or_path, cache_dir=cache_dir)
        except Exception:
            fe = None
    if fe is None:
        fe = Wav2Vec2FeatureExtractor(feature_size=1, sampling_rate=SAMPLING_RATE, padding_value=0.0,
                                      do_normalize=True, return_attention_mask=True)
    if not fe.do_normalize:
        raise ModelError(f"--model_name_or_path={name_or_path!r}: its feature extractor has do_normalize=False; "
                         "training is only supported for normalized inputs (as in the HF example)")
    return fe


def stable_perplexity(probs: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
    """Codevector perplexity with a gradient that stays finite.

    transformers 5.x computes ``exp(-sum(xlogy(p, p)))``; d xlogy(x, y)/dy = x / y is NaN where a marginal
    code probability is exactly 0, which happens at once in pre-training. fairseq and transformers 4.x
    used ``p * log(p + 1e-7)``, which we restore here.
    """
    if mask is not None:
        keep = mask.flatten()[:, None, None].expand(probs.shape)
        probs = torch.where(keep, probs, torch.zeros_like(probs))
        marginal = probs.sum(dim=0) / mask.sum().clamp_min(1)
    else:
        marginal = probs.mean(dim=0)
    return torch.exp(-torch.sum(marginal * torch.log(marginal + 1e-7), dim=-1)).sum()


def apply_perplexity_fix(model: Wav2Vec2ForPreTraining) -> Wav2Vec2ForPreTraining:
    """Replace the quantizer's perplexity on this instance (the class is left alone)."""
    model.quantizer._compute_perplexity = stable_perplexity
    return model


def build_model(config: Wav2Vec2Config, *, gradient_checkpointing: bool = False,
                attn_implementation: str | None = None) -> Wav2Vec2ForPreTraining:
    """A randomly initialized Wav2Vec2ForPreTraining with the perplexity fix applied."""
    if attn_implementation is not None:
        config._attn_implementation = attn_implementation
    model = Wav2Vec2ForPreTraining(config)
    apply_perplexity_fix(model)
    if gradient_checkpointing:
        model.gradient_checkpointing_enable()
    return model


def conv_output_length(config: Wav2Vec2Config, num_samples: int) -> int:
    """Frames the feature encoder produces for `num_samples` samples (host-side integer math)."""
    for kernel, stride in zip(config.conv_kernel, config.conv_stride):
        num_samples = (num_samples - kernel) // stride + 1
    return max(num_samples, 0)


def count_parameters(model: torch.nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())
