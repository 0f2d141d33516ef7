"""Activation model (formula in the package docstring), its measured coefficients, and their
measurement / calibration (`calibrate`)."""
from __future__ import annotations

import json
import math
import weakref
from dataclasses import dataclass

from engine.planner.common import PRECISIONS, SAMPLING_RATE
from engine.planner.facts import ModelFacts, model_facts

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


# The fast forward (engine/fastpath.py + engine/convs.py), measured the same way (`measure_activations(...,
# fast_forward=True)` on 12 configs: base and large families, hidden 128-256, D_p 128-768, K 50-100, 2-4 s,
# batch 1-2; fit within 1.2 MiB of each measured peak): conv encoder and layers as above; the head saves
# dp*D_p + k*(K+1) bytes per frame (no [K+1, B, T, D_p] gather), no transient beyond that; plus a constant
# per micro-batch: `one` bytes and the positional conv's FFT'd weight (complex64 [E, E/G, n/2+1]) held
# `fft_weight` times (rFFT output, its grouped matmul layout, their gradients).
FAST_HEAD: dict = {"dp": 16.53, "k": 29.93, "one": 9.46e6, "fft_weight": 4.0}

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
                     padded: bool = True, fast_forward: bool = False) -> ActivationEstimate:
    """Activation memory of one training micro-step (see the module docstring for the model).

    `dropout_mask_bytes`: 1 on CUDA (bool masks); CPU's dropout keeps a mask in the input dtype.
    `padded`: the batch has padding, so the attention gets a mask; sdpa converts it to a
    [B, 1, F, F] additive mask per layer (kept for backward by the memory-efficient kernel).
    `fast_forward`: engine/fastpath.py's forward (FAST_HEAD below) instead of transformers'.
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
    constant = facts.pos_conv_weight_numel * e
    if fast_forward:
        fh = FAST_HEAD
        head = F * (fh["dp"] * Dp + fh["k"] * (K + 1))
        transient = F * max(recompute - fh["dp"] * Dp - fh["k"] * (K + 1), 0.0) if checkpointing else 0.0
        from engine.convs import fft_size        # the FFT length engine/convs.py uses
        n = fft_size(F + facts.pos_conv_kernel - 1)
        weight_pairs = facts.pos_conv_weight_numel // max(facts.pos_conv_kernel, 1)     # E * E/G
        constant += fh["one"] + fh["fft_weight"] * 8 * weight_pairs * (n // 2 + 1)

    return ActivationEstimate(conv=batch * conv, layers=batch * layers, attention=batch * attention,
                              head=batch * head, dropout=batch * dropout,
                              constant=constant, transient=batch * transient)


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
                        keep_dropout: bool = False, fast_forward: bool = False) -> Measurement:
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

    fast = {}
    if fast_forward:   # engine/fastpath.py (its module calls bypass the part hooks: only totals are meaningful)
        from engine import fastpath
        fastpath.install(model)
        fast = {"fast_path": fastpath.FastPathArgs()}
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
            loss = model(x, mask_time_indices=mask, sampled_negative_indices=neg, **fast).loss
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
