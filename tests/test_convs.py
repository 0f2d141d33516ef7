"""engine/convs.py: the GEMM feature encoder and the FFT positional convolution compute transformers' modules'
outputs and gradients, alone and inside the whole fast forward (both model families, padded or not)."""
import copy

import pytest
import torch
from transformers import Wav2Vec2ForPreTraining

from engine import convs
from engine.models import apply_perplexity_fix
from test_fastpath import _assert_equal, _batch, _config, _models, _run_both


def _grads(module):
    return {n: p.grad.clone() for n, p in module.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("fused", [False, True])
@pytest.mark.parametrize("impl", ["gemm", "cudnn-cl"])
@pytest.mark.parametrize("flavor", ["base", "large"])
def test_channels_last_conv_layers_equal_conv1d(flavor, impl, fused):
    torch.manual_seed(0)
    model = Wav2Vec2ForPreTraining(_config(flavor, conv_dim=(16, 16, 16), conv_kernel=(10, 3, 2),
                                           conv_stride=(5, 2, 2)))
    theirs = model.wav2vec2.feature_extractor
    ours = copy.deepcopy(model)
    convs.install(ours)
    x = torch.randn(2, 1999, dtype=torch.float64)
    theirs.double()
    ours.double()
    ref = theirs(x).transpose(1, 2)                                       # [B, T, C]
    h = x[:, :, None]
    for layer in ours.wav2vec2.feature_extractor.conv_layers:
        norm_act = convs.norm_act_channels_last_fused if fused else convs.norm_act_channels_last
        h = norm_act(layer, layer.conv(h, impl=impl))
    assert h.shape == ref.shape
    torch.testing.assert_close(h, ref, rtol=1e-10, atol=1e-10)
    g = torch.randn_like(ref)
    ref.backward(g)
    h.backward(g)
    a, b = _grads(theirs), _grads(ours.wav2vec2.feature_extractor)
    assert a.keys() == b.keys() and len(a) >= 5   # 3 conv weights + a norm's weight and bias at least
    for name in a:
        torch.testing.assert_close(b[name], a[name], rtol=1e-9, atol=1e-9, msg=name)


@pytest.mark.parametrize("T", [1, 37, 128, 300])
def test_fft_positional_conv_equals_grouped_conv1d(T):
    torch.manual_seed(0)
    model = Wav2Vec2ForPreTraining(_config("base", num_conv_pos_embeddings=16))
    pos = model.wav2vec2.encoder.pos_conv_embed
    with torch.no_grad():                                                 # a non-trivial weight norm gain
        pos.conv.parametrizations.weight.original0.mul_(torch.rand_like(pos.conv.parametrizations.weight.original0))
    theirs, ours = pos, copy.deepcopy(pos)
    ours.forward = convs._pos_conv_dispatch.__get__(ours)
    h = torch.randn(3, T, model.config.hidden_size, requires_grad=True)
    h2 = h.detach().clone().requires_grad_(True)
    ref, out = theirs(h), ours(h2, impl="fft")
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)
    g = torch.randn_like(ref)
    ref.backward(g)
    out.backward(g)
    torch.testing.assert_close(h2.grad, h.grad, rtol=1e-4, atol=1e-5)
    a, b = _grads(theirs), _grads(ours)
    assert a.keys() == b.keys() and len(a) == 3                           # weight g, weight v, bias
    for name in a:
        torch.testing.assert_close(b[name], a[name], rtol=1e-4, atol=1e-4 * float(a[name].abs().max()), msg=name)


def testfft_size_is_smooth_and_large_enough():
    for n in range(1, 3000, 7):
        m = convs.fft_size(n)
        assert m >= n and m < 1.25 * n + 2
        for f in (2, 3, 5):
            while m % f == 0:
                m //= f
        assert m == 1


@pytest.mark.parametrize("conv", ["gemm", "cudnn-cl", "cudnn"])
@pytest.mark.parametrize("flavor", ["base", "large"])
@pytest.mark.parametrize("padded", [True, False])
def test_fast_forward_with_channels_last_convs_and_fft_equals_transformers(flavor, padded, conv):
    reference, ours = _models(_config(flavor))
    batch = _batch(reference, padded)
    ref_out, our_out = _run_both(reference, ours, batch, conv=conv, pos_conv="fft")
    _assert_equal(reference, ours, ref_out, our_out)


def test_transformers_convolutions_through_the_fast_forward():
    reference, ours = _models(_config("base"))
    ref_out, our_out = _run_both(reference, ours, _batch(reference, padded=True), conv="cudnn", pos_conv="cudnn")
    _assert_equal(reference, ours, ref_out, our_out)


def test_channels_last_encoder_with_gradient_checkpointing():
    reference, ours = _models(_config("base"))
    ours.gradient_checkpointing_enable()
    ref_out, our_out = _run_both(reference, ours, _batch(reference, padded=True), conv="cudnn-cl", pos_conv="fft")
    _assert_equal(reference, ours, ref_out, our_out)


def test_modules_without_impl_run_transformers_code():
    torch.manual_seed(0)
    model = apply_perplexity_fix(Wav2Vec2ForPreTraining(_config("base")))
    twin = copy.deepcopy(model)
    convs.install(twin)
    x = torch.randn(2, 4000)
    torch.testing.assert_close(twin.wav2vec2.feature_extractor(x), model.wav2vec2.feature_extractor(x),
                               rtol=0, atol=0)
    h = torch.randn(2, 20, model.config.hidden_size)
    torch.testing.assert_close(twin.wav2vec2.encoder.pos_conv_embed(h), model.wav2vec2.encoder.pos_conv_embed(h),
                               rtol=0, atol=0)
