"""engine/fastpath.py: the same losses and gradients as transformers' Wav2Vec2ForPreTraining, no host syncs,
and training through the trainer (ZeRO 0 and ZeRO 3, the latter with every parameter partitioned)."""
import copy
import json
import os

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode
from transformers import Wav2Vec2Config, Wav2Vec2ForPreTraining

from conftest import first_batch, tiny_flags
from engine import fastpath
from engine.args import parse_args
from engine.masking import compute_span_mask, sample_negatives
from engine.metrics import read_metrics
from engine.models import PRESETS, apply_perplexity_fix
from engine.step import MaskingSpec, PretrainStep
from engine.trainer import main as train

OUTPUTS = ("loss", "contrastive_loss", "diversity_loss", "codevector_perplexity")


def _config(flavor: str, **extra) -> Wav2Vec2Config:
    """The demo preset (large family: layer-norm convs, pre-LN) or its base-family twin (group norm, post-LN)."""
    kw = dict(PRESETS["demo"], **extra)
    if flavor == "base":
        kw.update(feat_extract_norm="group", do_stable_layer_norm=False, conv_bias=False)
    return Wav2Vec2Config(**kw)


def _models(config):
    torch.manual_seed(0)
    reference = apply_perplexity_fix(Wav2Vec2ForPreTraining(config))
    ours = copy.deepcopy(reference)
    fastpath.install(ours)
    return reference, ours


def _batch(model, padded: bool, seed: int = 1, num_negatives: int = 20):
    g = torch.Generator().manual_seed(seed)
    B, S = 3, 16000
    x = torch.randn(B, S, generator=g)
    am = torch.ones(B, S, dtype=torch.long)
    if padded:
        am[1, 12000:] = 0
        am[2, 7001:] = 0
        x = x * am
    lengths = model._get_feat_extract_output_lengths(am.sum(-1))
    T = int(model._get_feat_extract_output_lengths(torch.tensor(S)))
    mask = compute_span_mask(lengths, T, 0.5, 5, generator=g)
    neg = sample_negatives(mask, num_negatives, generator=g)
    return x, (am if padded else None), lengths, mask, neg


def _run_both(reference, ours, batch, attention="sdpa", host_lengths=None, **fast_kw):
    x, am, lengths, mask, neg = batch
    packing = None
    if attention == "varlen" and am is not None:
        packing = fastpath.packing_for(lengths, mask.shape[1], torch.device("cpu"))
    outs = []
    fast_args = fastpath.FastPathArgs(attention, lengths if am is not None else None, packing, **fast_kw)
    for model, fast in ((reference, None), (ours, fast_args)):
        model.zero_grad()
        torch.manual_seed(123)  # the gumbel noise: both forwards draw it in the same call, same shape
        kwargs = {} if fast is None else {"fast_path": fast}
        out = model(x, attention_mask=am, mask_time_indices=mask, sampled_negative_indices=neg, **kwargs)
        out.loss.backward()
        outs.append(out)
    return outs


def _assert_equal(reference, ours, ref_out, our_out, rtol=1e-5):
    for key in OUTPUTS:
        a, b = getattr(ref_out, key), getattr(our_out, key)
        torch.testing.assert_close(b, a, rtol=rtol, atol=1e-5 * abs(float(a.detach())), msg=key)
    scale = max(p.grad.abs().max() for p in reference.parameters() if p.grad is not None)
    for (name, p), q in zip(reference.named_parameters(), ours.parameters()):
        assert (p.grad is None) == (q.grad is None), name
        if p.grad is not None:  # atol: k_proj.bias has a mathematically zero gradient (~1e-9 rounding noise)
            torch.testing.assert_close(q.grad, p.grad, rtol=1e-4, atol=1e-5 * float(scale), msg=name)


@pytest.mark.parametrize("flavor", ["base", "large"])
@pytest.mark.parametrize("padded", [True, False])
@pytest.mark.parametrize("training", [True, False])
def test_outputs_and_gradients_equal_transformers(flavor, padded, training):
    reference, ours = _models(_config(flavor))
    reference.train(training)
    ours.train(training)
    batch = _batch(reference, padded)
    ref_out, our_out = _run_both(reference, ours, batch)
    _assert_equal(reference, ours, ref_out, our_out)


@pytest.mark.parametrize("attention", ["eager", "sdpa-cudnn", "varlen"])
def test_every_attention_mode_equals_transformers(attention):
    reference, ours = _models(_config("large"))
    batch = _batch(reference, padded=True)
    ref_out, our_out = _run_both(reference, ours, batch, attention=attention)
    _assert_equal(reference, ours, ref_out, our_out)


@pytest.mark.parametrize("training", [True, False])
def test_negatives_equal_to_the_positive_are_masked_like_transformers(training):
    """A codebook that collapses onto a few codes: many negatives equal their positive, and HF sets their
    logits to -inf. Our code-key comparison must pick exactly the same ones (train mode: gumbel + straight-
    through values; eval mode: argmax)."""
    reference, ours = _models(_config("large"))
    with torch.no_grad():
        for model in (reference, ours):
            model.quantizer.weight_proj.weight.mul_(0.01)
            bias = model.quantizer.weight_proj.bias
            bias.zero_()
            bias.view(2, -1)[:, :2] = 4.0  # two likely codes per group
    reference.train(training)
    ours.train(training)
    batch = _batch(reference, padded=True)
    ref_out, our_out = _run_both(reference, ours, batch)
    q = ref_out.projected_quantized_states
    neg = batch[4]
    B, T, K = neg.shape
    negatives = q.reshape(B * T, -1)[neg.reshape(-1)].view(B, T, K, -1)
    collisions = ((q[:, :, None] == negatives).all(-1) & batch[3][..., None]).sum()
    assert collisions > 10, "the test must exercise neg_is_pos"
    _assert_equal(reference, ours, ref_out, our_out)


def test_gradient_checkpointing_gives_the_same_gradients():
    reference, ours = _models(_config("large"))
    ours.gradient_checkpointing_enable()
    ref_out, our_out = _run_both(reference, ours, _batch(reference, padded=True))
    _assert_equal(reference, ours, ref_out, our_out)


class _SyncOps(TorchDispatchMode):
    """Records ops that need the host to wait for the device (data-dependent shapes or scalar reads)."""
    SYNCING = {"nonzero", "_local_scalar_dense", "is_nonzero", "masked_select", "item", "unique", "equal"}

    def __init__(self):
        super().__init__()
        self.seen = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        name = func.__name__.split(".")[0]
        if name in self.SYNCING:
            self.seen.append(name)
        if name in ("index", "index_put", "index_put_"):  # boolean indices = nonzero
            indices = args[1] if len(args) > 1 else []
            if any(t is not None and t.dtype == torch.bool for t in indices):
                self.seen.append(f"{name}(bool)")
        return func(*args, **(kwargs or {}))


@pytest.mark.parametrize("padded", [True, False])
def test_fast_step_has_no_host_sync_and_transformers_has(padded):
    config = _config("base")
    torch.manual_seed(0)
    model = apply_perplexity_fix(Wav2Vec2ForPreTraining(config)).train()
    step = PretrainStep(model, MaskingSpec(0.5, 5, 0, 20), torch.device("cpu"),
                        generator=torch.Generator().manual_seed(0))
    x, am, _, _, _ = _batch(model, padded=True)
    am = am if padded else torch.ones_like(am)
    inputs = step.prepare({"input_values": x, "attention_mask": am, "ids": ["a", "b", "c"]})
    assert inputs["padded"] == padded
    with _SyncOps() as ops:
        loss, stats = step.forward(model, inputs)
        loss.backward()
    assert ops.seen == [], ops.seen
    slow = PretrainStep(model, MaskingSpec(0.5, 5, 0, 20, fast_forward=False), torch.device("cpu"))
    inputs = slow.prepare({"input_values": x, "attention_mask": am, "ids": ["a", "b", "c"]})
    with _SyncOps() as ops:
        slow.forward(model, inputs)
    assert ops.seen, "transformers' forward syncs (boolean index assignment, neg_is_pos.any())"


def test_right_padded_lengths():
    from engine.step import right_padded_lengths
    mask = torch.zeros(5, 37, dtype=torch.long)
    for row, n in enumerate([37, 0, 1, 36, 18]):
        mask[row, :n] = 1
    assert right_padded_lengths(mask).tolist() == [37, 0, 1, 36, 18]


def test_step_loss_is_the_same_on_both_paths(corpus_dir):
    batch = first_batch(corpus_dir)
    torch.manual_seed(0)
    model = apply_perplexity_fix(Wav2Vec2ForPreTraining(_config("large"))).train()
    results = []
    for fast in (False, True):
        step = PretrainStep(model, MaskingSpec(0.5, 5, 0, 20, fast_forward=fast), torch.device("cpu"),
                            generator=torch.Generator().manual_seed(0))
        torch.manual_seed(7)
        results.append(step.forward(model, step.prepare(batch)))
    (slow_loss, slow_stats), (fast_loss, fast_stats) = results
    torch.testing.assert_close(fast_loss, slow_loss, rtol=1e-5, atol=0)
    for key in slow_stats:
        torch.testing.assert_close(fast_stats[key], slow_stats[key], rtol=1e-5, atol=1e-6, msg=key)


@pytest.mark.parametrize("scope", ["layers", pytest.param("full", marks=pytest.mark.skipif(
    not os.environ.get("W2V_SLOW_TESTS"), reason="~60 s of tracing on CPU; set W2V_SLOW_TESTS=1"))])
def test_torch_compile_matches_eager_and_does_not_recompile(monkeypatch, scope):
    """The compiled paths trace (one graph shared by every encoder layer + the conv stack's norm/GELU, or one
    graph after the conv stack), compute the same loss, and are not recompiled for new batch shapes or a new
    gumbel temperature. aot_eager: dynamo + AOT autograd without inductor's C++ codegen, which takes minutes
    on a small CPU (the GPU run uses inductor)."""
    from torch._dynamo.utils import counters
    monkeypatch.setattr(fastpath, "COMPILE_BACKEND", "aot_eager")
    torch._dynamo.reset()
    _, ours = _models(_config("base", num_hidden_layers=2))
    ours.eval()
    x, am, lengths, mask, neg = _batch(ours, padded=True)
    run = lambda compile: ours(x, attention_mask=am, mask_time_indices=mask, sampled_negative_indices=neg,  # noqa
                               fast_path=fastpath.FastPathArgs("sdpa", lengths, compile=compile))
    want = run("none")
    got = run(scope)
    torch.testing.assert_close(got.loss, want.loss, rtol=1e-4, atol=1e-4)

    ours.train()
    graphs = []
    for i, (B, S) in enumerate([(3, 16000), (2, 12160), (4, 9920)]):
        g = torch.Generator().manual_seed(i)
        lengths_s = torch.randint(S // 2, S + 1, (B,), generator=g)
        lengths_s[0] = S
        am = (torch.arange(S)[None] < lengths_s[:, None]).long()
        frames = ours._get_feat_extract_output_lengths(lengths_s)
        T = int(ours._get_feat_extract_output_lengths(torch.tensor(S)))
        mask = compute_span_mask(frames, T, 0.5, 5, generator=g)
        ours.set_gumbel_temperature(2.0 * 0.9 ** i)
        out = ours(torch.randn(B, S, generator=g) * am, mask_time_indices=mask,
                   sampled_negative_indices=sample_negatives(mask, 20, generator=g),
                   fast_path=fastpath.FastPathArgs("sdpa", frames, compile=scope))
        out.loss.backward()
        graphs.append(counters["stats"]["unique_graphs"])
    assert graphs[1] == graphs[2] == graphs[0], f"recompiled: {graphs}"
    assert all(p.grad is not None for p in ours.wav2vec2.encoder.layers.parameters())


def _train(corpus, out, *extra):
    args = parse_args(tiny_flags(corpus, out, "--max_train_steps", "6", *extra))
    train(args)
    return [r["loss"] for r in read_metrics(str(out)) if r["split"] == "train"]


def test_trainer_fast_forward_zero0(corpus_dir, tmp_path):
    losses = _train(corpus_dir, tmp_path, "--zero_stage", "0", "--precision", "fp32")
    assert len(losses) == 6 and all(v == v for v in losses), losses
    assert sum(losses[-3:]) < sum(losses[:3]), losses


def test_trainer_fast_forward_zero3_every_parameter_partitioned(corpus_dir, tmp_path):
    """ZeRO-3 with a persistence threshold of 0: masked_spec_embed and the codebook are partitioned, used
    outside a submodule forward, and gathered as external parameters of the top module. They must train."""
    from transformers import set_seed
    from engine.ds_config import CONFIG_DIR, load_config_file
    from engine.models import build_model, load_config
    cfg = load_config_file(CONFIG_DIR / "zero3.json")
    cfg["zero_optimization"]["stage3_param_persistence_threshold"] = 0
    path = tmp_path / "zero3_nopersist.json"
    path.write_text(json.dumps(cfg))
    losses = _train(corpus_dir, tmp_path, "--deepspeed", str(path), "--precision", "bf16")
    assert len(losses) == 6 and all(v == v for v in losses), losses
    assert sum(losses[-3:]) < sum(losses[:3]), losses
    set_seed(0)  # the trainer's --seed: the same initial weights
    initial = build_model(load_config("demo"))
    trained = Wav2Vec2ForPreTraining.from_pretrained(tmp_path)
    for name in ("wav2vec2.masked_spec_embed", "quantizer.codevectors"):
        before, after = initial.get_parameter(name), trained.get_parameter(name)
        assert (after.float() - before.float()).abs().max() > 1e-4, f"{name} did not train under ZeRO-3"
