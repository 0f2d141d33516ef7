"""Span masks and contrastive negatives for wav2vec 2.0 pre-training, vectorized on the device.

Semantics are those of transformers' numpy helpers ``_compute_mask_indices`` and
``_sample_negative_indices`` (modeling_wav2vec2.py), re-derived as a fixed number of torch ops:

* no numpy, no per-utterance Python loop, no host synchronisation (no ``.item()``, ``.tolist()``,
  ``.cpu()``, ``nonzero`` or boolean indexing, no tensor in a Python ``if``);
* every shape depends only on ``B``, ``seq_len``, ``mask_length``, ``num_negatives`` and host-side
  Python numbers, so both functions can run inside a CUDA-graph-captured training step (with a
  custom ``generator``, register it with the graph: ``graph.register_generator_state(gen)``);
* deterministic under a ``torch.Generator`` (bit-exact repeat on the same device); CPU and CUDA
  draw from the same distributions but not the same random streams.

The tests (tests/test_masking.py) compare both functions with the numpy originals statistically.
"""
from __future__ import annotations

import math

import torch

__all__ = ["compute_span_mask", "sample_negatives"]

_INT32_KEY_HIGH = 2**31  # span-start sort keys are uniform int32 in [0, 2**31)
_FLOAT32_EXACT = 2**24  # integers below this are exact in float32


def _max_spans(seq_len: int, mask_prob: float, mask_length: int, min_masks: int) -> int:
    """Host-side upper bound on the spans of any row: the number of span slots drawn per row.

    ``floor(L * mask_prob / mask_length + u) <= floor(seq_len * mask_prob / mask_length) + 1``
    for ``L <= seq_len`` and ``u < 1``; ``min_masks`` can raise it; both caps of the original apply.
    """
    n = max(math.floor(seq_len * (mask_prob / mask_length)) + 1, min_masks)
    return max(0, min(n, seq_len // mask_length, seq_len - mask_length + 1))


def compute_span_mask(frame_lengths: torch.Tensor, seq_len: int, mask_prob: float, mask_length: int,
                      min_masks: int = 0, generator: torch.Generator | None = None) -> torch.Tensor:
    """Random span mask ``BoolTensor[B, seq_len]`` on ``frame_lengths.device``.

    For utterance ``b`` with ``L = frame_lengths[b]`` frames (``0 <= L <= seq_len``; larger values
    are clamped to ``seq_len``), exactly as transformers' ``_compute_mask_indices``:

    * ``n = int(mask_prob * L / mask_length + u)``, ``u ~ U[0, 1)`` (probabilistic rounding),
      then ``n = max(n, min_masks)``, ``n = min(n, seq_len // mask_length)``,
      ``n = min(n, max(L - mask_length + 1, 0))``;
    * ``n`` span starts uniform *without replacement* from ``[0, L - mask_length]``; each masks
      ``mask_length`` frames; spans may overlap; frames ``>= L`` are never masked;
    * ``L < mask_length`` gives no span for that row.

    Choice: ``u`` is drawn once per utterance (the original draws one per batch). Each utterance's
    distribution is identical; utterances are independent instead of rounding up or down together.

    How (about 20 small kernels, no sort larger than ``[B, seq_len]``): per-row counts in float64
    on ``[B]``; uniform int32 keys on the ``seq_len - mask_length + 1`` possible starts, with keys of
    starts beyond the row's last valid one set to -1; ``topk(n_max)`` gives each row's starts in
    random order, so its first ``n`` are a uniform ``n``-subset; the enabled ones are scattered
    into a left-padded start map and dilated over ``mask_length`` frames by a windowed ``any``.
    (Key ties have probability ~2e-4 per row and only matter at the n-th key: negligible.)

    Raises ``ValueError`` for ``mask_prob`` outside ``[0, 1]``, ``mask_length < 1``,
    ``mask_length > seq_len``, ``min_masks < 0`` or a ``frame_lengths`` that is not 1-D.
    """
    seq_len, mask_length, min_masks = int(seq_len), int(mask_length), int(min_masks)
    mask_prob = float(mask_prob)
    if not 0.0 <= mask_prob <= 1.0:  # also rejects NaN
        raise ValueError(f"mask_prob must be in [0, 1], got mask_prob={mask_prob}")
    if mask_length < 1:
        raise ValueError(f"mask_length must be >= 1, got mask_length={mask_length}")
    if mask_length > seq_len:
        raise ValueError(f"mask_length ({mask_length}) must be <= seq_len ({seq_len})")
    if min_masks < 0:
        raise ValueError(f"min_masks must be >= 0, got min_masks={min_masks}")
    if frame_lengths.dim() != 1:
        raise ValueError(f"frame_lengths must be 1-D [B], got shape {tuple(frame_lengths.shape)}")

    dev, B = frame_lengths.device, frame_lengths.shape[0]
    n_max = _max_spans(seq_len, mask_prob, mask_length, min_masks)
    if n_max == 0 or B == 0:
        return torch.zeros(B, seq_len, dtype=torch.bool, device=dev)

    # Number of spans per row (float64; exact integers).
    lengths = frame_lengths.clamp(max=seq_len)
    n_starts = lengths - (mask_length - 1)  # valid start positions per row (may be <= 0)
    u = torch.rand(B, dtype=torch.float64, device=dev, generator=generator)
    n = torch.add(u, lengths, alpha=mask_prob / mask_length).floor_()
    n = torch.minimum(n.clamp_(min=min_masks, max=seq_len // mask_length), n_starts)  # < 0 -> none

    # Uniform random order of each row's valid starts; invalid starts rank after every valid one.
    width = seq_len - mask_length + 1
    keys = torch.randint(0, _INT32_KEY_HIGH, (B, width), dtype=torch.int32, device=dev,
                         generator=generator)
    keys.masked_fill_(torch.arange(width, device=dev) >= n_starts[:, None], -1)
    starts = keys.topk(n_max, dim=1, sorted=True).indices  # [B, n_max], distinct per row
    enabled = torch.arange(n_max, device=dev) < n[:, None]  # first n[b] slots of row b

    # Start map padded by mask_length-1 zeros on the left: frame t is masked iff a start lies in
    # [t - mask_length + 1, t], i.e. iff the window padded[t : t + mask_length] holds one.
    # Starts are distinct within a row, so the scatter writes each element at most once.
    padded = torch.zeros(B, seq_len + mask_length - 1, dtype=torch.bool, device=dev)
    padded[:, mask_length - 1:].scatter_(1, starts, enabled)
    return padded.unfold(1, mask_length, 1).any(-1)


def sample_negatives(mask: torch.Tensor, num_negatives: int,
                     generator: torch.Generator | None = None) -> torch.Tensor:
    """Negative indices ``LongTensor[B, T, K]`` into the flattened ``B*T`` frames, on ``mask.device``.

    As transformers' ``_sample_negative_indices``: for a masked frame ``(b, t)``, ``K`` indices drawn
    uniformly *with replacement* from the other masked frames of utterance ``b`` (never itself,
    never another utterance, never an unmasked or padding frame), offset by ``b * T``.
    Unmasked frames get ``b * T`` (as the original; the loss ignores them).

    Choices where the original has none (it raises inside numpy):
    * a row with exactly one masked frame: that frame's negatives all point to itself. The model
      sets logits of negatives equal to the positive to -inf, so such a frame contributes only
      its positive logit; the training step may also drop it from the loss;
    * a row with no masked frame: every entry is ``b * T``.

    How, with ``z`` = inclusive cumulative sum over the flattened ``B*T`` frames of
    ``mask + [t == 0]`` (one extra "row token" at each row start): row ``b``'s tokens are
    ``P_b`` (row start) and ``P_b + 1 .. P_b + m_b`` (its ``m_b`` masked frames in order), and
    ``searchsorted(z, q)`` (first index with ``z >= q``) maps token ``q`` to its frame, already in
    the flattened layout. For a masked frame with token ``g`` and ``m_b >= 2``:
    ``j = floor(u * (m_b - 1))`` (``u ~ U[0, 1)``), ``q = P_b + 1 + j``, ``q += (q >= g)``: uniform
    over the row's other masked frames. Unmasked frames use ``q = P_b`` (-> ``b * T``), a lone masked
    frame ``q = P_b + 1`` (itself). All values are integers < 2**24, exact in float32 (float64 is
    used beyond that size); ``floor(u * s) <= s - 1`` holds in float32 for every ``u < 1``.
    About 10 kernels on ``[B, T]`` and 7 on ``[B, T, K]`` (rand, mul, floor, add, ge, add,
    searchsorted); no sort.
    """
    num_negatives = int(num_negatives)
    if num_negatives < 0:
        raise ValueError(f"num_negatives must be >= 0, got num_negatives={num_negatives}")
    if mask.dim() != 2:
        raise ValueError(f"mask must be 2-D [B, T], got shape {tuple(mask.shape)}")
    B, T = mask.shape
    dev = mask.device
    if B * T == 0 or num_negatives == 0:
        return torch.zeros(B, T, num_negatives, dtype=torch.long, device=dev)
    if mask.dtype != torch.bool:
        mask = mask != 0
    ftype = torch.float32 if B * (T + 1) < _FLOAT32_EXACT else torch.float64

    tokens = mask.to(ftype, memory_format=torch.contiguous_format)  # a copy: mask is bool
    tokens[:, 0] += 1  # the row token
    z = tokens.view(-1).cumsum(0).view(B, T)
    first = (z[:, :1] - tokens[:, :1]).add_(1)  # P_b: the row token's value [B, 1]
    count = z[:, -1:] - first  # m_b: masked frames in the row           [B, 1]
    scale = mask * (count - 1)  # m_b - 1 for masked frames, else 0 (-0.0 if m_b == 0: harmless)
    base = mask + first  # P_b + 1 for masked frames, P_b for unmasked ones
    skip_from = torch.where(scale > 0, z, math.inf)  # own token g; inf: no skip (lone / unmasked)

    q = torch.rand(B, T, num_negatives, dtype=ftype, device=dev, generator=generator)
    q.mul_(scale[..., None]).floor_().add_(base[..., None])
    q.add_(q >= skip_from[..., None])
    return torch.searchsorted(z.view(-1), q)
