"""engine/masking.py against transformers' numpy originals (issue 4: the masking kernel).

Issue text, in short: span masks and negatives must follow ``_compute_mask_indices`` and
``_sample_negative_indices`` (transformers/models/wav2vec2/modeling_wav2vec2.py) but run as
vectorized torch on the device, without host synchronisation, deterministic under a generator.

Statistical tests use fixed seeds (so they are deterministic) and bounds far in the tail (~4.5
sigma), and each statistic is shown to reject a deliberately wrong sampler (test_*_has_power).

Two implementations (engine/masking.py dispatches): the torch path (CPU, fallback) and the Triton
kernels (engine/_masking_triton.py, CUDA). Tests taking the ``impl`` fixture run on both: the
kernels run here on CPU tensors through Triton's interpreter (``TRITON_INTERPRET=1``), the very
code the GPU compiles, with other block sizes (more rows per program, bigger chunks: the
interpreter pays per operation); test_triton_* show the outputs don't depend on those sizes. The
Triton cases skip where triton is not installed. The CUDA tests run on the GPU machine only.
"""
from __future__ import annotations

import functools
import importlib
import importlib.util
import math

import numpy as np
import pytest
import torch
from transformers.models.wav2vec2.modeling_wav2vec2 import _compute_mask_indices, _sample_negative_indices

import engine.masking as masking
from engine.masking import compute_span_mask, sample_negatives

Z = 4.5  # tail bound in standard deviations for every statistical check
HAS_TRITON = importlib.util.find_spec("triton") is not None
needs_triton = pytest.mark.skipif(not HAS_TRITON, reason="triton not installed")
needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA (run on the GPU machine)")


def use_impl(monkeypatch, impl: str, interpret: bool = True):
    """Route engine.masking to ``impl`` for this test. For "triton", load the kernel module in the
    wanted mode: the interpreter (CPU tensors) or compiled (CUDA); Triton decides when the @jit
    decorators run, so the module is reloaded when its mode differs."""
    monkeypatch.setenv("W2V_MASKING_IMPL", impl)
    if impl != "triton":
        return None
    import triton.language
    from triton.runtime.interpreter import InterpretedFunction

    # Triton's own library (tl.sum, tl.philox...) was defined in one mode when triton was imported:
    # tests/conftest.py sets TRITON_INTERPRET=1 on machines without a GPU, before that import.
    if isinstance(triton.language.random.philox, InterpretedFunction) != interpret:
        pytest.skip("Triton's interpreter runs where there is no GPU; the CUDA tests cover the kernels here"
                    if interpret else "triton was imported in interpreter mode")
    if interpret:
        monkeypatch.setenv("TRITON_INTERPRET", "1")
    else:
        monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    mt = importlib.import_module("engine._masking_triton")
    if isinstance(mt._span_mask_kernel, InterpretedFunction) != interpret:
        mt = importlib.reload(mt)
    monkeypatch.setattr(masking, "_triton_module", mt)
    monkeypatch.setattr(masking, "_triton_error", None)
    return mt


@pytest.fixture(params=["torch", pytest.param("triton", marks=needs_triton)])
def impl(request, monkeypatch):
    """Run the test on the torch path and on the Triton kernels (interpreted, CPU tensors)."""
    use_impl(monkeypatch, request.param)
    assert masking.implementation("cpu") == request.param
    return request.param


# ----------------------------------------------------------------------------------------- helpers
def gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def chi2_bound(df: int, z: float = Z) -> float:
    """Upper quantile of chi-square(df) at a standard-normal z (Wilson-Hilferty: (X/df)^(1/3) is
    close to normal with mean 1 - 2/(9 df) and variance 2/(9 df))."""
    v = 2.0 / (9.0 * df)
    return df * (1.0 - v + z * math.sqrt(v)) ** 3


def chi2_stat(observed: np.ndarray, expected: np.ndarray) -> float:
    observed, expected = np.asarray(observed, float), np.asarray(expected, float)
    return float(((observed - expected) ** 2 / expected).sum())


def two_sample_chi2(a: np.ndarray, b: np.ndarray) -> tuple[float, int]:
    """Homogeneity statistic of two histograms over the same bins (empty bins dropped), and its df."""
    a, b = np.asarray(a, float), np.asarray(b, float)
    keep = (a + b) > 0
    a, b = a[keep], b[keep]
    na, nb = a.sum(), b.sum()
    pooled = (a + b) / (na + nb)
    stat = chi2_stat(a, na * pooled) + chi2_stat(b, nb * pooled)
    return stat, max(int(keep.sum()) - 1, 1)


def seed_mask(lengths, seq_len, mask_prob, mask_length, min_masks=0) -> np.ndarray:
    lengths = torch.as_tensor(lengths)
    attention = (torch.arange(seq_len)[None, :] < lengths[:, None]).long()
    return _compute_mask_indices((len(lengths), seq_len), mask_prob, mask_length, attention, min_masks)


def ours_repeated(lengths, seq_len, mask_prob, mask_length, min_masks, draws, seed) -> torch.Tensor:
    """``draws`` independent masks of the batch in one call: rows are independent by design."""
    rep = torch.as_tensor(lengths).repeat(draws)
    out = compute_span_mask(rep, seq_len, mask_prob, mask_length, min_masks, generator=gen(seed))
    return out.view(draws, len(lengths), seq_len)


def seed_repeated(lengths, seq_len, mask_prob, mask_length, min_masks, draws, seed) -> np.ndarray:
    """The original draws one rounding variable per batch, so its draws are separate calls.

    Its padding frames are cleared: a row that draws no span gets the "dummy" span start
    seq_len - 1, i.e. the original masks the *padding* frame seq_len - 1 of such a row (a loss
    target made of padding). We deliberately don't (test_original_masks_padding_we_do_not).
    Cached (the tests compare both implementations with the same reference draws)."""
    return _seed_repeated(tuple(lengths), seq_len, mask_prob, mask_length, min_masks, draws, seed).copy()


@functools.lru_cache(maxsize=None)
def _seed_repeated(lengths, seq_len, mask_prob, mask_length, min_masks, draws, seed) -> np.ndarray:
    np.random.seed(seed)
    out = np.stack([seed_mask(lengths, seq_len, mask_prob, mask_length, min_masks) for _ in range(draws)])
    pad = np.arange(seq_len)[None, None, :] >= np.asarray(lengths)[None, :, None]
    assert not out[:, :, :-1][pad[:, :, :-1].repeat(draws, 0)].any()  # only ever frame seq_len - 1
    out[pad.repeat(draws, 0)] = False
    return out


def check_negative_invariants(mask: torch.Tensor, neg: torch.Tensor) -> None:
    B, T = mask.shape
    K = neg.shape[-1]
    assert neg.shape == (B, T, K) and neg.dtype == torch.long
    b_idx = torch.arange(B)[:, None, None].expand(B, T, K)
    t_idx = torch.arange(T)[None, :, None].expand(B, T, K)
    count = mask.sum(1)[:, None, None].expand(B, T, K)
    m = mask[:, :, None].expand(B, T, K)
    # unmasked frames: b*T, as the original
    assert torch.equal(neg[~m], (b_idx * T)[~m])
    nb, nt = neg // T, neg % T
    assert torch.equal(nb[m], b_idx[m]), "negative from another utterance"
    assert mask.reshape(-1)[neg[m]].all(), "negative is an unmasked/padding frame"
    lone = m & (count == 1)
    assert torch.equal(nt[lone], t_idx[lone]), "a lone masked frame must point to itself"
    others = m & (count >= 2)
    assert not (nt[others] == t_idx[others]).any(), "negative equals its own frame"


# ------------------------------------------------------------------------------------- validation
@pytest.mark.parametrize("mask_prob", [-0.1, 1.5, float("nan")])
def test_mask_prob_out_of_range_raises(mask_prob):
    with pytest.raises(ValueError, match="mask_prob"):
        compute_span_mask(torch.tensor([50]), 50, mask_prob, 5)


def test_mask_length_errors_match_the_original(impl):
    for ml in (0, -3):
        with pytest.raises(ValueError, match="mask_length"):
            compute_span_mask(torch.tensor([50]), 50, 0.5, ml)
        with pytest.raises(ValueError):
            seed_mask([50], 50, 0.5, ml)
    with pytest.raises(ValueError, match="mask_length"):
        compute_span_mask(torch.tensor([50]), 50, 0.5, 51)
    with pytest.raises(ValueError):
        seed_mask([50], 50, 0.5, 51)
    # mask_length == seq_len is allowed (one span at most)
    out = compute_span_mask(torch.tensor([50, 49]), 50, 1.0, 50, generator=gen(0))
    assert out[0].all() and not out[1].any()


def test_other_argument_errors():
    with pytest.raises(ValueError, match="min_masks"):
        compute_span_mask(torch.tensor([50]), 50, 0.5, 5, min_masks=-1)
    with pytest.raises(ValueError, match="frame_lengths"):
        compute_span_mask(torch.tensor([[50]]), 50, 0.5, 5)
    with pytest.raises(ValueError, match="num_negatives"):
        sample_negatives(torch.ones(2, 5, dtype=torch.bool), -1)
    with pytest.raises(ValueError, match="mask"):
        sample_negatives(torch.ones(5, dtype=torch.bool), 3)


def test_shapes_dtypes_and_empty_inputs(impl):
    m = compute_span_mask(torch.tensor([40, 7]), 40, 0.5, 4, generator=gen(0))
    assert m.shape == (2, 40) and m.dtype == torch.bool and m.is_contiguous()
    neg = sample_negatives(m, 6, generator=gen(0))
    assert neg.shape == (2, 40, 6) and neg.dtype == torch.long
    assert compute_span_mask(torch.zeros(0, dtype=torch.long), 40, 0.5, 4).shape == (0, 40)
    assert sample_negatives(torch.zeros(0, 40, dtype=torch.bool), 6).shape == (0, 40, 6)
    assert sample_negatives(m, 0).shape == (2, 40, 0)
    # int32 lengths and an integer 0/1 mask are accepted
    assert compute_span_mask(torch.tensor([40, 7], dtype=torch.int32), 40, 0.5, 4).shape == (2, 40)
    check_negative_invariants(m, sample_negatives(m.to(torch.uint8), 6, generator=gen(1)))


# --------------------------------------------------------------------------------------- span mask
def test_no_mask_in_padding_and_short_rows(impl):
    T, ml = 120, 10
    lengths = [120, 119, 64, 10, 9, 3, 0]  # 9 and 3 < mask_length: no span at all
    out = ours_repeated(lengths, T, 0.65, ml, 2, draws=300, seed=1)
    pad = torch.arange(T)[None, None, :] >= torch.tensor(lengths)[None, :, None]
    assert not out[pad.expand_as(out)].any()
    assert not out[:, 4:].any()
    assert out[:, 3].sum(-1).eq(10).all()  # L == mask_length with min_masks 2: one span, all masked
    assert out[:, :3].any(-1).all()  # min_masks=2 gives every long row a span


def test_min_masks_caps_like_the_original(impl):
    # min_masks larger than any cap: n = min(T // ml, L - ml + 1) for every row
    T, ml = 60, 4
    lengths = [60, 18, 6, 4, 3]
    ours = ours_repeated(lengths, T, 0.0, ml, 1000, draws=50, seed=2).sum(-1)
    ref = torch.from_numpy(seed_repeated(lengths, T, 0.0, ml, 1000, draws=50, seed=2)).sum(-1)
    # every start chosen for rows 18, 6, 4 -> the whole row; row 3 -> nothing
    for b, L in enumerate(lengths[1:], start=1):
        assert ours[:, b].eq(L if L >= ml else 0).all() and ref[:, b].eq(ours[:, b]).all()
    # row 60: 15 spans out of 57 starts: not every frame, but the same mean as the original
    assert ours[:, 0].float().mean() == pytest.approx(ref[:, 0].float().mean(), abs=3.0)
    # mask_prob 0 and no min_masks: nothing masked; min_masks 1: exactly one span per row
    assert not compute_span_mask(torch.tensor([60, 30]), T, 0.0, ml, 0, generator=gen(0)).any()
    one = compute_span_mask(torch.tensor([60, 30] * 50), T, 0.0, ml, 1, generator=gen(0))
    assert one.sum(-1).eq(ml).all()


def test_lengths_beyond_seq_len_are_clamped(impl):
    a = compute_span_mask(torch.tensor([80] * 2000), 50, 0.5, 5, generator=gen(3)).float().mean()
    b = compute_span_mask(torch.tensor([50] * 2000), 50, 0.5, 5, generator=gen(4)).float().mean()
    assert abs(a - b) < 0.02


def test_original_masks_padding_we_do_not(impl):
    np.random.seed(0)
    ref = seed_mask([50, 7, 20], 50, 0.5, 10)  # row 1 (7 < mask_length) draws no span
    assert ref[1].sum() == 1 and ref[1, 49]  # the original: padding frame 49 masked
    ours = compute_span_mask(torch.tensor([50, 7, 20]), 50, 0.5, 10, generator=gen(0))
    assert not ours[1].any() and not ours[2, 20:].any()


@pytest.mark.parametrize("lengths,T,p,ml,min_masks", [
    ([100, 100, 73, 40, 17, 11, 10, 6], 100, 0.65, 10, 0),
    ([100, 90, 55, 31, 12, 5], 100, 0.3, 3, 2),
    ([64, 50, 33, 20], 64, 0.9, 7, 1),
    ([999, 871, 604, 250, 101], 999, 0.65, 10, 2),
])
def test_mask_matches_the_original_statistically(lengths, T, p, ml, min_masks, impl):
    """Per-utterance masked-fraction mean and per-frame masking probability vs the original."""
    draws = 1000 if T < 500 else 300
    ours = ours_repeated(lengths, T, p, ml, min_masks, draws, seed=10).double().numpy()
    ref = seed_repeated(lengths, T, p, ml, min_masks, draws, seed=10).astype(float)
    check_profile(ours, ref, lengths, draws)


def check_profile(ours: np.ndarray, ref: np.ndarray, lengths, draws: int) -> None:
    """ours, ref: [draws, B, T] masks as floats."""
    # (1) masked fraction per utterance
    for b, L in enumerate(lengths):
        fo, fr = ours[:, b].sum(-1) / max(L, 1), ref[:, b].sum(-1) / max(L, 1)
        se = math.sqrt((fo.var() + fr.var()) / draws)
        assert abs(fo.mean() - fr.mean()) <= Z * se + 1e-12, (L, fo.mean(), fr.mean())
    # (2) probability that frame t of utterance b is masked (covers start uniformity and the edges)
    po, pr = ours.mean(0), ref.mean(0)
    pool = (po + pr) / 2
    se = np.sqrt(2 * pool * (1 - pool) / draws)
    z = np.abs(po - pr)[se > 0] / se[se > 0]
    assert z.max() < 5.0, z.max()
    for b, L in enumerate(lengths):  # padding: never masked by either
        assert not ours[:, b, L:].any() and not ref[:, b, L:].any()


@pytest.mark.parametrize("L,T,p,min_masks", [(37, 50, 0.3, 0), (50, 50, 0.55, 0), (12, 50, 0.1, 2), (23, 40, 1.0, 0)])
def test_span_count_distribution_matches_the_original(L, T, p, min_masks, impl):
    """mask_length 1: the masked count is the number of spans (starts without replacement)."""
    draws = 4000
    ours = ours_repeated([L], T, p, 1, min_masks, draws, seed=20).sum(-1).flatten().numpy()
    ref = seed_repeated([L], T, p, 1, min_masks, 1000, seed=20).sum(-1).flatten()
    x = p * L
    expect_support = {max(math.floor(x), min_masks), max(math.floor(x) + 1, min_masks)}
    expect_support = {min(n, L) for n in expect_support}
    assert set(np.unique(ours)) <= expect_support and set(np.unique(ref)) <= expect_support
    hist_o = np.bincount(ours, minlength=T + 1)
    hist_r = np.bincount(ref, minlength=T + 1)
    stat, df = two_sample_chi2(hist_o, hist_r)
    assert stat < chi2_bound(df), (stat, hist_o[hist_o > 0], hist_r[hist_r > 0])
    # probabilistic rounding: P(floor + 1) = frac(p * L) (when min_masks does not bind)
    if min_masks <= math.floor(x) and math.floor(x) + 1 <= L and x != math.floor(x):
        frac = x - math.floor(x)
        got = (ours == math.floor(x) + 1).mean()
        assert abs(got - frac) < Z * math.sqrt(frac * (1 - frac) / draws)


def start_histogram_stat(starts: np.ndarray, n_valid: int, draws: int, per_draw: int) -> tuple[float, int]:
    """Chi-square of start counts for ``per_draw`` distinct starts uniform among ``n_valid``: each
    count is Binomial(draws, q) with q = per_draw / n_valid, so (O - E)^2 / (draws q (1 - q))."""
    counts = np.bincount(starts, minlength=n_valid)[:n_valid]
    q = per_draw / n_valid
    stat = float(((counts - draws * q) ** 2).sum() / (draws * q * (1 - q)))
    return stat, n_valid - 1


def test_span_starts_uniform_without_replacement(impl):
    # mask_length 1 makes the mask the set of starts; p * L integer -> exactly 9 starts each draw
    L, T, draws = 45, 60, 6000
    out = ours_repeated([L], T, 0.2, 1, 0, draws, seed=30)[:, 0]
    assert out.sum(-1).eq(9).all(), "starts are not distinct (drawn with replacement?)"
    assert not out[:, L:].any()
    stat, df = start_histogram_stat(out.nonzero()[:, 1].numpy(), L, draws, 9)
    assert stat < chi2_bound(df), stat
    # mask_length 5: starts seen as the first frames of isolated spans are uniform too; the
    # profile test above compares every frame; here the boundary frames: frame 0 and frame L - 1
    # are each covered by exactly one start, so each is masked with probability n / (L - ml + 1)
    L, ml, n = 40, 5, 4  # 0.5 * 40 / 5 = 4 spans exactly
    out = ours_repeated([L], 50, 0.5, ml, 0, draws, seed=31)[:, 0].double()
    q = n / (L - ml + 1)
    for t in (0, L - 1):
        assert abs(out[:, t].mean().item() - q) < Z * math.sqrt(q * (1 - q) / draws)


def test_start_histogram_has_power():
    """The start statistic rejects an off-by-one start range (last valid start never drawn)."""
    rng = np.random.default_rng(0)
    L, draws, n = 45, 6000, 9
    wrong = np.concatenate([rng.choice(L - 1, n, replace=False) for _ in range(draws)])
    stat, df = start_histogram_stat(wrong, L, draws, n)
    assert stat > chi2_bound(df)
    right = np.concatenate([rng.choice(L, n, replace=False) for _ in range(draws)])
    stat, df = start_histogram_stat(right, L, draws, n)
    assert stat < chi2_bound(df)


def test_profile_check_has_power():
    """The profile comparison of test_mask_matches_the_original_statistically rejects a mask
    without probabilistic rounding (spans = floor(p L / ml))."""
    lengths, T, p, ml, draws = [100, 73, 40], 100, 0.65, 10, 1000
    ref = seed_repeated(lengths, T, p, ml, 0, draws, seed=11).astype(float)
    rng = np.random.default_rng(1)
    wrong = np.zeros_like(ref)
    for d in range(draws):
        for b, L in enumerate(lengths):
            for s in rng.choice(L - ml + 1, int(p * L / ml), replace=False):
                wrong[d, b, s:s + ml] = 1
    fo, fr = wrong[:, 0].sum(-1) / 100, ref[:, 0].sum(-1) / 100
    assert abs(fo.mean() - fr.mean()) > Z * math.sqrt((fo.var() + fr.var()) / draws)


# --------------------------------------------------------------------------------------- negatives
def random_masks(seed: int) -> torch.Tensor:
    g = gen(seed)
    T = 37
    dens = torch.tensor([0.0, 0.03, 0.2, 0.5, 0.9, 1.0])[:, None]
    mask = torch.rand(6, T, generator=g) < dens
    lone = torch.zeros(2, T, dtype=torch.bool)
    lone[0, 0] = True
    lone[1, T - 1] = True
    two = torch.zeros(1, T, dtype=torch.bool)
    two[0, [4, 30]] = True
    return torch.cat([mask, lone, two])


def test_negative_invariants(impl):
    for seed in range(5):
        mask = random_masks(seed)
        check_negative_invariants(mask, sample_negatives(mask, 50, generator=gen(seed)))
    lengths = torch.tensor([999, 871, 604, 250, 101, 40, 9])
    mask = compute_span_mask(lengths, 999, 0.65, 10, 2, generator=gen(7))
    neg = sample_negatives(mask, 100, generator=gen(8))
    check_negative_invariants(mask, neg)
    assert not (neg % 999 >= lengths[:, None, None]).any(), "negative in padding"


def test_two_masked_frames_point_to_each_other_and_lone_frames_to_themselves(impl):
    mask = random_masks(0)
    neg = sample_negatives(mask, 20, generator=gen(1))
    T = mask.shape[1]
    assert neg[6, 0].eq(6 * T).all() and neg[7, T - 1].eq(7 * T + T - 1).all()
    assert neg[8, 4].eq(8 * T + 30).all() and neg[8, 30].eq(8 * T + 4).all()
    assert neg[0].eq(0).all()  # no masked frame in row 0: every entry b*T


def test_unmasked_entries_equal_the_original(impl):
    mask = random_masks(3)[2:6]  # the original cannot sample rows with < 2 masked frames
    np.random.seed(0)
    ref = torch.from_numpy(_sample_negative_indices(tuple(mask.shape), 10, mask.numpy())).long()
    ours = sample_negatives(mask, 10, generator=gen(0))
    um = ~mask[:, :, None].expand_as(ours)
    assert torch.equal(ours[um], ref[um])
    check_negative_invariants(mask, ref)  # the invariants hold for the original too


def pair_table(mask_row: torch.Tensor, neg_row: torch.Tensor) -> np.ndarray:
    """counts[i, j]: how often masked frame #i drew masked frame #j."""
    frames = mask_row.nonzero()[:, 0]
    rank = torch.full((mask_row.numel(),), -1, dtype=torch.long)
    rank[frames] = torch.arange(len(frames))
    m = len(frames)
    src = rank[frames][:, None].expand(m, neg_row.shape[-1])
    dst = rank[neg_row[frames]]
    table = torch.zeros(m, m, dtype=torch.long)
    src, dst = src.reshape(-1), dst.reshape(-1)
    table.index_put_((src, dst), torch.ones_like(src), accumulate=True)
    return table.numpy()


def pair_table_stat(table: np.ndarray) -> tuple[float, int]:
    """Chi-square over the off-diagonal cells: each row uniform over the m - 1 other frames."""
    m = table.shape[0]
    off = ~np.eye(m, dtype=bool)
    expected = table.sum(1, keepdims=True) / (m - 1) * np.ones_like(table, dtype=float)
    return chi2_stat(table[off], expected[off]), m * (m - 2)


def test_negatives_uniform_over_other_masked_frames(impl):
    T, K = 64, 3000
    mask = torch.zeros(2, T, dtype=torch.bool)
    mask[0, [0, 1, 2, 9, 10, 20, 33, 34, 35, 36, 50, 62, 63]] = True
    mask[1, 5:25] = True
    neg = sample_negatives(mask, K, generator=gen(40))
    for b in range(2):
        table = pair_table(mask[b], neg[b] - b * T)
        assert np.trace(table) == 0
        stat, df = pair_table_stat(table)
        assert stat < chi2_bound(df), (b, stat, chi2_bound(df))
    # the same statistic accepts the original's sampler
    np.random.seed(1)
    ref = torch.from_numpy(_sample_negative_indices((2, T), K, mask.numpy())).long()
    stat, df = pair_table_stat(pair_table(mask[0], ref[0]))
    assert stat < chi2_bound(df)


def test_pair_table_has_power():
    """The statistic rejects a sampler that favours the next masked frame by 30%."""
    m, K = 13, 3000
    rng = np.random.default_rng(0)
    table = np.zeros((m, m), dtype=np.int64)
    for i in range(m):
        w = np.ones(m)
        w[i] = 0
        w[(i + 1) % m] = 1.3
        table[i] = rng.multinomial(K, w / w.sum())
    stat, df = pair_table_stat(table)
    assert stat > chi2_bound(df)


def test_lone_masked_frame_adds_nothing_to_the_contrastive_loss():
    """The HF model sets logits of negatives equal to the positive to -inf, so a lone masked frame
    whose negatives point to itself adds exactly 0 to the contrastive loss (and no NaN)."""
    from transformers import Wav2Vec2Config, Wav2Vec2ForPreTraining

    cfg = Wav2Vec2Config(hidden_size=16, num_hidden_layers=1, num_attention_heads=2, intermediate_size=32,
                         conv_dim=(16, 16), conv_stride=(5, 2), conv_kernel=(10, 3), num_conv_pos_embeddings=16,
                         num_conv_pos_embedding_groups=2, codevector_dim=8, proj_codevector_dim=8,
                         num_codevectors_per_group=4, num_codevector_groups=2, num_negatives=5,
                         mask_time_prob=0.05)
    torch.manual_seed(0)
    model = Wav2Vec2ForPreTraining(cfg).eval()
    x = torch.randn(2, 400, generator=gen(0))
    T = int(model._get_feat_extract_output_lengths(torch.tensor(400)))
    mask = torch.zeros(2, T, dtype=torch.bool)
    mask[1, 3:20] = True
    losses = []
    for lone in (False, True):
        mask[0, 5] = lone
        neg = sample_negatives(mask, 5, generator=gen(1))
        with torch.no_grad():
            losses.append(model(x, mask_time_indices=mask, sampled_negative_indices=neg).contrastive_loss)
    assert torch.isfinite(losses[1]) and torch.equal(losses[0], losses[1])


def test_float32_floor_never_reaches_the_scale():
    """The float32 path relies on floor(u * s) <= s - 1 for every float32 u < 1 and s < 2**24."""
    u = torch.tensor(1.0).nextafter(torch.tensor(0.0))
    s = torch.arange(1, 2**24, 997, dtype=torch.float32)
    assert ((u * s).floor() <= s - 1).all()


def test_float64_path(monkeypatch):
    """Beyond 2**24 flattened frames the negatives are computed in float64; same behaviour."""
    mask = random_masks(9)
    ref = sample_negatives(mask, 30, generator=gen(2))
    calls = []
    real_rand = torch.rand

    def spy(*args, **kwargs):
        calls.append(kwargs.get("dtype"))
        return real_rand(*args, **kwargs)

    monkeypatch.setattr(masking.torch, "rand", spy)
    monkeypatch.setattr(masking, "_FLOAT32_EXACT", 16)
    neg = sample_negatives(mask, 30, generator=gen(2))
    assert calls == [torch.float64]
    check_negative_invariants(mask, neg)
    assert neg.shape == ref.shape


def test_int32_slot_path(monkeypatch):
    """CUDA uses int32 slot indices: exercise that path on CPU."""
    mask = random_masks(4)
    ref = sample_negatives(mask, 30, generator=gen(3))
    monkeypatch.setattr(masking, "_slot_dtype", lambda device, n: torch.int32)
    neg = sample_negatives(mask, 30, generator=gen(3))
    assert torch.equal(neg, ref)


# ------------------------------------------------------------------------ determinism and no sync
def test_deterministic_under_a_generator(impl):
    lengths = torch.tensor([999, 700, 321, 15])
    a = compute_span_mask(lengths, 999, 0.65, 10, 2, generator=gen(5))
    b = compute_span_mask(lengths, 999, 0.65, 10, 2, generator=gen(5))
    c = compute_span_mask(lengths, 999, 0.65, 10, 2, generator=gen(6))
    assert torch.equal(a, b) and not torch.equal(a, c)
    g1, g2 = gen(5), gen(5)
    n1 = [sample_negatives(a, 100, generator=g1) for _ in range(2)]
    n2 = [sample_negatives(a, 100, generator=g2) for _ in range(2)]
    assert torch.equal(n1[0], n2[0]) and torch.equal(n1[1], n2[1])
    assert not torch.equal(n1[0], n1[1])  # the generator advances


def test_runs_without_data_on_the_meta_device():
    """Meta tensors carry no data: any .item()/.tolist()/.cpu()/nonzero/bool(tensor) would raise.
    So the shapes and the Python control flow depend on nothing but the arguments."""
    lengths = torch.zeros(8, dtype=torch.long, device="meta")
    mask = compute_span_mask(lengths, 999, 0.65, 10, 2)
    assert mask.device.type == "meta" and mask.shape == (8, 999) and mask.dtype == torch.bool
    neg = sample_negatives(mask, 100)
    assert neg.device.type == "meta" and neg.shape == (8, 999, 100) and neg.dtype == torch.long
    with pytest.raises(Exception):  # the check itself: a host sync on meta does fail
        torch.zeros(3, device="meta").sum().item()


def test_traces_as_one_graph():
    """torch.compile(fullgraph=True) refuses graph breaks (data-dependent Python control flow,
    .item(), .tolist(), nonzero...). A torch.Generator argument is not traceable by dynamo, so
    this runs with generator=None."""
    import torch._dynamo

    torch._dynamo.reset()
    mask_fn = torch.compile(compute_span_mask, fullgraph=True, backend="eager", dynamic=False)
    neg_fn = torch.compile(sample_negatives, fullgraph=True, backend="eager", dynamic=False)
    mask = mask_fn(torch.tensor([50, 31, 4]), 50, 0.65, 5, 1)
    check_negative_invariants(mask, neg_fn(mask, 7))

    def synchronising(x):
        return x + 1 if x.sum() > 0 else x

    with pytest.raises(Exception):  # the check itself: a host sync does break the graph
        torch.compile(synchronising, fullgraph=True, backend="eager")(torch.ones(3))


@needs_cuda
@pytest.mark.parametrize("impl_name", ["torch", pytest.param("triton", marks=needs_triton)])
def test_cuda_invariants_determinism_and_graph_capture(impl_name, monkeypatch):
    use_impl(monkeypatch, impl_name, interpret=False)
    assert masking.implementation("cuda") == impl_name
    dev = torch.device("cuda")
    lengths = torch.tensor([999, 871, 604, 250, 101, 40, 9], device=dev)
    g = torch.Generator(device=dev)
    masks, negs = [], []
    for _ in range(2):
        g.manual_seed(0)
        masks.append(compute_span_mask(lengths, 999, 0.65, 10, 2, generator=g))
        negs.append(sample_negatives(masks[-1], 100, generator=g))
    assert torch.equal(masks[0], masks[1]) and torch.equal(negs[0], negs[1])
    assert not (masks[0] & (torch.arange(999, device=dev) >= lengths[:, None])).any()
    check_negative_invariants(masks[0].cpu(), negs[0].cpu())
    frac = masks[0].sum(1).float() / lengths.float()
    assert (frac[:5] > 0.2).all()  # spans were drawn
    # capture in a CUDA graph (the default generator is graph-safe) and replay
    static = lengths.clone()
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        sample_negatives(compute_span_mask(static, 999, 0.65, 10, 2), 100)
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        mask = compute_span_mask(static, 999, 0.65, 10, 2)
        neg = sample_negatives(mask, 100)
    graph.replay()
    first, first_neg = mask.clone(), neg.clone()
    graph.replay()
    torch.cuda.synchronize()
    assert not torch.equal(first, mask)  # fresh randomness on each replay
    assert not torch.equal(first_neg, neg)
    check_negative_invariants(mask.cpu(), neg.cpu())
    # the replay reads the lengths from device memory
    static.copy_(torch.tensor([500, 400, 300, 200, 100, 50, 10], device=dev))
    graph.replay()
    torch.cuda.synchronize()
    assert not (mask & (torch.arange(999, device=dev) >= static[:, None])).any()
    assert (mask.sum(1)[:5] > 0).all()
    check_negative_invariants(mask.cpu(), neg.cpu())


@needs_cuda
@pytest.mark.parametrize("impl_name", ["torch", pytest.param("triton", marks=needs_triton)])
def test_cuda_statistics_match_the_original(impl_name, monkeypatch):
    """The statistical checks of the CPU tests, on the GPU's own kernels (compiled, not interpreted),
    and other row lengths (block sizes / warp counts of the Triton kernels)."""
    use_impl(monkeypatch, impl_name, interpret=False)
    dev = torch.device("cuda")
    g = torch.Generator(device=dev).manual_seed(10)
    # per-frame profile and masked fractions vs the original
    lengths, T, p, ml, min_masks, draws = [999, 871, 604, 250, 101], 999, 0.65, 10, 2, 300
    rep = torch.tensor(lengths, device=dev).repeat(draws)
    ours = compute_span_mask(rep, T, p, ml, min_masks, generator=g).view(draws, len(lengths), T)
    check_profile(ours.double().cpu().numpy(), seed_repeated(lengths, T, p, ml, min_masks, draws, 10).astype(float),
                  lengths, draws)
    # starts: exactly 9 distinct, uniform over the 45 valid ones
    out = compute_span_mask(torch.full((6000,), 45, device=dev), 60, 0.2, 1, 0, generator=g).cpu()
    assert out.sum(-1).eq(9).all() and not out[:, 45:].any()
    stat, df = start_histogram_stat(out.nonzero()[:, 1].numpy(), 45, 6000, 9)
    assert stat < chi2_bound(df), stat
    # negatives: uniform over the other masked frames of the row
    T, K = 64, 3000
    mask = torch.zeros(2, T, dtype=torch.bool)
    mask[0, [0, 1, 2, 9, 10, 20, 33, 34, 35, 36, 50, 62, 63]] = True
    mask[1, 5:25] = True
    neg = sample_negatives(mask.to(dev), K, generator=g).cpu()
    check_negative_invariants(mask, neg)
    for b in range(2):
        stat, df = pair_table_stat(pair_table(mask[b], neg[b] - b * T))
        assert stat < chi2_bound(df), (b, stat)
    # other lengths: 1499 (2048-frame blocks), 5000 (8192), 20 (a 32-frame block)
    for T in (1499, 5000, 20):
        lengths = torch.tensor([T, T - 1, T // 2, 11, 3], device=dev)
        mask = compute_span_mask(lengths, T, 0.65, 10, 2, generator=g)
        assert not (mask & (torch.arange(T, device=dev) >= lengths[:, None])).any()
        frac = (mask.sum(1).float() / lengths.float()).cpu()
        assert T < 100 or ((frac[:3] > 0.3).all() and (frac[:3] < 0.8).all()), frac
        assert frac[:4].gt(0).all() and frac[4] == 0  # min_masks 2: a span wherever one fits
        check_negative_invariants(mask.cpu(), sample_negatives(mask, 100, generator=g).cpu())


# ------------------------------------------------------------------- the Triton path specifically
if HAS_TRITON:  # module level: an interpreted @jit function must see triton.language in its globals
    import triton
    import triton.language as tl

    _real_philox = tl.philox

    @triton.jit
    def _coarse_philox(seed, c0, c1, c2, c3):
        a, b, c, d = _real_philox(seed, c0, c1, c2, c3)
        return a & 3, b, c, d


@needs_triton
def test_triton_block_sizes_do_not_change_the_output(monkeypatch):
    """Each random value is named by its (row, position) Philox counter, so the rows per program
    (span mask) and the chunk size and programs per row (negatives) change nothing: the GPU's
    sizes (1 row per program; 1024-entry chunks, several programs per row and several chunks per
    program) give bit-identical outputs to the interpreter's defaults used by the other tests."""
    mt = use_impl(monkeypatch, "triton")
    lengths = torch.tensor([150, 149, 77, 12, 11, 10, 3, 0, 150])
    args = (lengths, 150, 0.65, 10, 2, masking._max_spans(150, 0.65, 10, 2))
    ref = compute_span_mask(*args[:5], generator=gen(0))
    for rows in (1, 2, 4):
        assert torch.equal(mt.span_mask(*args, gen(0), rows_per_program=rows), ref)
    mask = torch.cat([ref[[0, 3]], random_masks(0).repeat(1, 5)[:, :150][[6, 8]]])
    neg = sample_negatives(mask, 20, generator=gen(1))  # 3000 entries per row
    check_negative_invariants(mask, neg)
    # chunks of 1024 entries: 2 programs of 2 (the last one empty), 3 of 1; of 256: 3 programs of 4
    for per_row, chunk4 in ((1, 256), (3, 256), (2, 64)):
        assert torch.equal(mt.negatives(mask, 20, gen(1), programs_per_row=per_row, chunk4=chunk4), neg)


@needs_triton
def test_triton_tied_keys_keep_exactly_n_starts(monkeypatch):
    """With 2-bit keys (ties everywhere) the bisection ends on a tied value and the tie-break by
    position must still pick exactly n distinct valid starts (at full 32 bits ties are rare)."""
    mt = use_impl(monkeypatch, "triton")
    monkeypatch.setattr(tl, "philox", _coarse_philox)
    lengths = torch.tensor([45, 45, 44, 30, 9, 8, 0] * 40)
    out = mt.span_mask(lengths, 60, 0.2, 1, 0, masking._max_spans(60, 0.2, 1, 0), gen(3))
    pad = torch.arange(60) >= lengths[:, None]
    assert not out[pad].any()
    n = out.sum(-1)
    assert n[lengths == 45].eq(9).all() and n[lengths == 30].eq(6).all() and n[lengths == 0].eq(0).all()
    assert set(n[lengths == 44].tolist()) <= {8, 9} and set(n[lengths == 9].tolist()) <= {1, 2}
    # mask_length 3: distinct starts, dilated; every row is a union of n windows of 3 frames
    out = mt.span_mask(lengths, 60, 0.5, 3, 1, masking._max_spans(60, 0.5, 3, 1), gen(4))
    assert not out[pad].any() and out[lengths >= 3].any(-1).all()


def test_implementation_dispatch(monkeypatch):
    monkeypatch.delenv("W2V_MASKING_IMPL", raising=False)
    assert masking.implementation("cpu") == "torch" and masking.implementation("meta") == "torch"
    monkeypatch.setenv("W2V_MASKING_IMPL", "torch")
    assert masking.implementation("cuda") == "torch"
    monkeypatch.setenv("W2V_MASKING_IMPL", "cuda-please")
    with pytest.raises(ValueError, match="W2V_MASKING_IMPL"):
        masking.implementation("cpu")
    monkeypatch.setenv("W2V_MASKING_IMPL", "triton")
    monkeypatch.setattr(masking, "_triton_module", None)
    monkeypatch.setattr(masking, "_triton_error", ImportError("no triton here"))
    with pytest.raises(ImportError, match="no triton here"):
        masking.implementation("cpu")
    monkeypatch.setenv("W2V_MASKING_IMPL", "auto")
    assert masking.implementation("cuda") == "torch"  # auto: no triton -> torch, even on CUDA


@needs_triton
def test_triton_falls_back_to_torch_beyond_its_block_limit(monkeypatch):
    mt = use_impl(monkeypatch, "triton")
    calls = []
    monkeypatch.setattr(mt, "span_mask", lambda *a, **k: calls.append("mask"))
    monkeypatch.setattr(mt, "negatives", lambda *a, **k: calls.append("neg"))
    monkeypatch.setattr(mt, "MAX_BLOCK", 64)
    mask = compute_span_mask(torch.tensor([65, 30]), 65, 0.5, 5, generator=gen(0))  # torch path
    check_negative_invariants(mask, sample_negatives(mask, 4, generator=gen(0)))
    assert calls == []
    compute_span_mask(torch.tensor([64, 30]), 64, 0.5, 5, generator=gen(0))
    sample_negatives(mask[:, :64], 4, generator=gen(0))
    assert calls == ["mask", "neg"]


_COMPILE_FOR_H100 = r"""
import sys
import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource
from engine import _masking_triton as mt

target = GPUTarget("cuda", 90, 32)  # H100: Triton's own ptxas compiles without a GPU
for block, lengths, rate in ((1024, "*i64", "i64"), (8192, "*i32", "i32")):
    sig = {"len_ptr": lengths, "seed_ptr": "*i64", "scratch_ptr": "*i32", "out_ptr": "*i1", "B": "i32",
           "seq_len": "i32", "mask_length": "i32", "min_masks": "i32", "n_cap": "i32", "rate_bits": rate}
    triton.compile(ASTSource(mt._span_mask_kernel, sig, {"BLOCK": block, "ROWS": 1}), target=target,
                   options={"num_warps": mt._warps(block)})
for mask, block, iters in (("*i1", 1024, 2), ("*fp32", 8192, 64)):
    sig = {"mask_ptr": mask, "seed_ptr": "*i64", "scratch_ptr": "*i32", "out_ptr": "*i64", "T": "i32"}
    consts = {"K": 100, "BLOCK_T": block, "CHUNK4": mt._CHUNK4, "ITERS": iters}
    k = triton.compile(ASTSource(mt._negatives_kernel, sig, consts), target=target,
                       options={"num_warps": mt._warps(block)})
    assert "bar.sync" in k.asm["ptx"] or "barrier.sync" in k.asm["ptx"]
print("compiled")
"""


@needs_triton
def test_triton_kernels_compile_for_h100(tmp_path):
    """The interpreter shares Triton's front end with the compiler, not its back end: compile the
    kernels (both, a small and the largest block) for sm_90 through PTX to a cubin, here, without a
    GPU (a fresh process: the compiler needs triton imported outside interpreter mode)."""
    import os
    import pathlib
    import subprocess
    import sys

    import triton

    ptxas = pathlib.Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "ptxas"
    if not ptxas.exists():
        pytest.skip("this triton build ships no ptxas")
    root = pathlib.Path(__file__).resolve().parents[1]
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["PYTHONPATH"] = os.pathsep.join([str(root)] + [p for p in [env.get("PYTHONPATH")] if p])
    env["TRITON_CACHE_DIR"] = str(tmp_path)  # a cold cache: really compile, and leave the user's alone
    run = subprocess.run([sys.executable, "-c", _COMPILE_FOR_H100], env=env, cwd=root, capture_output=True,
                         text=True, timeout=300)
    assert run.returncode == 0 and "compiled" in run.stdout, run.stderr[-3000:]
