"""Model facts and parameter counts of a wav2vec 2.0 config (no weights allocated)."""
from __future__ import annotations

from dataclasses import dataclass


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
    pos_conv_kernel: int = 128

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
        feat_quantizer_dropout=config.feat_quantizer_dropout, pos_conv_kernel=k,
    )
    _FACTS_CACHE[key] = facts
    return facts
