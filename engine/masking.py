"""Span masks and contrastive negatives for wav2vec 2.0 pre-training, vectorized on the device.

Semantics are those of transformers' numpy helpers ``_compute_mask_indices`` and
``_sample_negative_indices`` (modeling_wav2vec2.py), re-derived twice (see ``implementation``):

* on CUDA, Triton kernels (engine/_masking_triton.py): per function one ``torch.randint`` seed draw
  and one kernel, 4 kernels for mask + negatives (the torch path launches 37);
* elsewhere (CPU, meta, ``torch.compile`` tracing, no triton, ``W2V_MASKING_IMPL=torch``, rows
  longer than 8192 frames) a fixed number of torch ops, below.

Both paths:

* no numpy, no per-utterance Python loop, no host synchronisation (no ``.item()``, ``.tolist()``,
  ``.cpu()``, ``nonzero`` or boolean indexing, no tensor in a Python ``if``);
* every shape depends only on ``B``, ``seq_len``, ``mask_length``, ``num_negatives`` and host-side
  Python numbers, so both functions can run inside a CUDA-graph-captured training step (with a
  custom ``generator``, register it with the graph: ``graph.register_generator_state(gen)``);
* deterministic under a ``torch.Generator`` (bit-exact repeat on the same device); CPU and CUDA,
  torch and Triton draw from the same distributions but not the same random streams. Each call
  advances the generator on the device, so CUDA-graph replays draw fresh masks and negatives.

``torch.compile(fullgraph=True)`` traces both (the torch path) without a graph break when
``generator`` is None (dynamo cannot trace a ``torch.Generator`` argument).

The tests (tests/test_masking.py) compare both functions, on both paths (Triton's interpreter
on CPU), with the numpy originals statistically.
"""
from __future__ import annotations

import importlib
import math
import os
from types import ModuleType

import torch

__all__ = ["compute_span_mask", "sample_negatives", "implementation"]

_INT32_KEY_HIGH = 2**31  # span-start sort keys are uniform int32 in [0, 2**31)
_FLOAT32_EXACT = 2**24  # integers below this are exact in float32


_IMPL_ENV = "W2V_MASKING_IMPL"  # auto (default) | torch | triton
_triton_module: ModuleType | None = None
_triton_error: Exception | None = None


def _triton() -> ModuleType | None:
    """engine._masking_triton, imported on first use (None where triton is not importable)."""
    global _triton_module, _triton_error
    if _triton_module is None and _triton_error is None:
        try:
            _triton_module = importlib.import_module("engine._masking_triton")
        except Exception as exc:  # no triton (CPU-only installs, CI), or a broken one
            _triton_error = exc
    return _triton_module


def implementation(device: torch.device | str) -> str:
    """``"triton"`` or ``"torch"``: the path both functions take for tensors on ``device``.

    ``W2V_MASKING_IMPL`` (read on every call): ``auto`` (default) picks Triton on CUDA when triton
    imports and torch is not tracing (``torch.compile`` traces the torch path), torch elsewhere;
    ``torch`` forces the torch path; ``triton`` forces the kernels on any device (on CPU tensors
    they run in Triton's interpreter, which needs ``TRITON_INTERPRET=1`` before triton is first
    imported: the tests run them so) and raises ``ImportError`` where triton is missing. Either
    way, shapes the kernels don't cover (more than 8192 frames per row, ``T * num_negatives >
    2**30``) take the torch path.
    """
    choice = os.environ.get(_IMPL_ENV, "auto").strip().lower() or "auto"
    if choice == "torch":
        return "torch"
    if choice == "triton":
        if _triton() is None:
            raise ImportError(f"{_IMPL_ENV}=triton but triton is not importable: {_triton_error!r}")
        return "triton"
    if choice != "auto":
        raise ValueError(f"{_IMPL_ENV} must be auto, torch or triton, got {choice!r}")
    if torch.device(device).type != "cuda" or torch.compiler.is_compiling():
        return "torch"
    return "triton" if _triton() is not None else "torch"


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

    Deviation: a row that draws no span gets, in the original, the "dummy" start ``seq_len - 1``,
    i.e. its *padding* frame ``seq_len - 1`` is masked (and becomes a loss target). Not here.

    Choice: ``u`` is drawn once per utterance (the original draws one per batch). Each utterance's
    distribution is identical; utterances are independent instead of rounding up or down together.

    Triton (CUDA): one program per row: a uniform 32-bit Philox key per valid start; bisection on
    the key value finds the n-th largest (~log2(L) + 2 block reductions); a cumulative count of
    chosen starts, read back shifted by ``mask_length``, dilates them (engine/_masking_triton.py).

    Torch (16 kernels, topk counting as one; no sort, only a top-k over ``[B, seq_len]``): per-row
    counts in float64 on ``[B]``; uniform int32 keys on the ``seq_len - mask_length + 1`` possible
    starts, with keys of starts beyond the row's last valid one set to -1; ``topk(n_max)`` gives
    each row's starts in random order, so its first ``n`` are a uniform ``n``-subset; the enabled
    ones are scattered into a left-padded start map and dilated over ``mask_length`` frames by a
    windowed ``any``.
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
    if implementation(dev) == "triton" and _triton().supported_mask(seq_len):
        return _triton().span_mask(frame_lengths, seq_len, mask_prob, mask_length, min_masks, n_max, generator)
    return _span_mask_torch(frame_lengths, seq_len, mask_prob, mask_length, n_max, min_masks, generator)


def _span_mask_torch(frame_lengths: torch.Tensor, seq_len: int, mask_prob: float, mask_length: int, n_max: int,
                     min_masks: int, generator: torch.Generator | None) -> torch.Tensor:
    """compute_span_mask's torch path (arguments validated, n_max >= 1, B >= 1)."""
    dev, B = frame_lengths.device, frame_lengths.shape[0]

    # Number of spans per row, kept unfloored: with x real and k, c integers, k <= floor(x) iff
    # k <= x, max(floor(x), c) = floor(max(x, c)) and min(floor(x), c) = floor(min(x, c)).
    # The cap seq_len // mask_length is n_max (the slots drawn per row).
    rate = mask_prob / mask_length
    n_starts = frame_lengths.clamp(max=seq_len).sub_(mask_length - 1)  # valid starts, may be <= 0
    x = torch.empty(B, dtype=torch.float64, device=dev)
    x.uniform_((mask_length - 1) * rate, (mask_length - 1) * rate + 1, generator=generator)
    x.add_(n_starts, alpha=rate).clamp_(min=min_masks)  # u + L * rate, at least min_masks
    x = torch.minimum(x, n_starts)  # at most L - mask_length + 1 (< 1: no span)

    # Uniform random order of each row's valid starts; invalid starts rank after every valid one.
    width = seq_len - mask_length + 1
    keys = torch.randint(0, _INT32_KEY_HIGH, (B, width), dtype=torch.int32, device=dev,
                         generator=generator)
    keys.masked_fill_(torch.arange(width, device=dev) >= n_starts[:, None], -1)
    starts = keys.topk(n_max, dim=1, sorted=True).indices  # [B, n_max], distinct per row
    enabled = torch.arange(1, n_max + 1, device=dev) <= x[:, None]  # the first floor(x[b]) slots

    # Start map padded by mask_length-1 zeros on the left: frame t is masked iff a start lies in
    # [t - mask_length + 1, t], i.e. iff the window padded[t : t + mask_length] holds one.
    # Starts are distinct within a row, so the scatter writes each element at most once.
    padded = torch.zeros(B, seq_len + mask_length - 1, dtype=torch.bool, device=dev)
    padded[:, mask_length - 1:].scatter_(1, starts, enabled)
    return padded.unfold(1, mask_length, 1).any(-1)


def _slot_dtype(device: torch.device, n_slots: int) -> torch.dtype:
    """int32 slot indices halve the traffic on CUDA; CPU's index_select is ~3x slower with them."""
    return torch.int32 if device.type == "cuda" and n_slots < 2**31 else torch.int64


def sample_negatives(mask: torch.Tensor, num_negatives: int,
                     generator: torch.Generator | None = None) -> torch.Tensor:
    """Negative indices ``LongTensor[B, T, K]`` into the flattened ``B*T`` frames, on ``mask.device``.

    As transformers' ``_sample_negative_indices``: for a masked frame ``(b, t)``, ``K`` indices drawn
    uniformly *with replacement* from the other masked frames of utterance ``b`` (never itself,
    never another utterance, never an unmasked or padding frame), offset by ``b * T``.
    Unmasked frames get ``b * T`` (as the original; the loss ignores them).

    Choices where the original has none (numpy raises there):
    * a row with exactly one masked frame: that frame's negatives all point to itself. The model
      sets logits of negatives equal to the positive to -inf, so the frame adds exactly 0 to the
      contrastive loss (tested); it still counts in the number of masked frames;
    * a row with no masked frame: every entry is ``b * T``.

    Triton (CUDA): one kernel over (row, slice of the row's ``T*K`` entries): each program builds
    its row's rank and masked-frame tables in its own scratch, then draws ``j`` as
    ``umulhi(philox, m - 1)`` and reads the frame ``j + 1`` masked frames after its own, cyclically
    (the same rule as below, without the doubled table) (engine/_masking_triton.py).

    Torch (18 kernels, 5 of them over ``[B, T, K]``: rand, mul, to-int32, add, index_select; no sort,
    no search). A per-row lookup table lists the row's masked frames twice:
    ``table[b] = [b*T, f_1 .. f_m, f_1 .. f_m, unused]`` (``f_r``: flattened index of the row's
    r-th masked frame, built by two scatters). A masked frame of rank ``c`` (1-based) draws
    ``j = floor(u * (m - 1))`` with ``u ~ U[0, 1)`` and reads slot ``c + 1 + j``: slots ``c + 1 ..
    c + m - 1`` hold, cyclically, every masked frame of the row but itself, once each, so the
    negative is uniform over the others. Unmasked frames read slot 0 (``b*T``); a lone masked
    frame (``m = 1``) reads slot 2, itself. ``floor(u * s) <= s - 1`` holds in float32 for every
    float32 ``u < 1`` and integer ``s < 2**24`` (float64 is used beyond); slot indices are int32
    on CUDA.
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
    if implementation(dev) == "triton" and _triton().supported_negatives(T, num_negatives):
        return _triton().negatives(mask, num_negatives, generator)
    return _negatives_torch(mask, num_negatives, generator)


def _negatives_torch(mask: torch.Tensor, num_negatives: int, generator: torch.Generator | None) -> torch.Tensor:
    """sample_negatives' torch path (arguments validated, B * T >= 1, num_negatives >= 1)."""
    B, T = mask.shape
    dev = mask.device
    if mask.dtype != torch.bool:
        mask = mask != 0
    ftype = torch.float32 if T < _FLOAT32_EXACT else torch.float64
    width = 3 * T + 2  # slot 0, two copies (1 .. 2m), scatter dump for unmasked frames (> 2T)
    itype = _slot_dtype(dev, B * width)

    # Per-frame parameters on [B, T].
    rank = mask.cumsum(1, dtype=itype)  # 1-based rank of each masked frame in its row
    count = rank[:, -1:]  # m: masked frames per row
    scale = mask * (count - 1)  # m - 1 for masked frames, 0 for unmasked ones
    row_offset = torch.arange(0, B * width, width, dtype=itype, device=dev)[:, None]
    first_slot = torch.addcmul(row_offset, rank + 1, mask)  # flat slot c+1 (masked) or 0 (unmasked)

    # The table. Unmasked frames' scatters land in the unused part (> 2T), never read.
    frames = torch.arange(B * T, device=dev).view(B, T)
    table = frames[:, :1].expand(B, width).contiguous()  # b*T everywhere: slot 0 and any unused
    slot = torch.where(mask, rank, 2 * T + 1).long()  # scatter wants int64 indices
    table.scatter_(1, slot, frames)  # first copy: slot r holds f_r
    table.scatter_(1, slot.add_(count), frames)  # second copy: slot m + r holds f_r

    # Per-negative work on [B, T, K].
    u = torch.rand(B, T, num_negatives, dtype=ftype, device=dev, generator=generator)
    j = u.mul_(scale[..., None]).to(itype)  # floor(u * (m - 1)): truncation of a value >= 0
    j.add_(first_slot[..., None])
    return table.view(-1).index_select(0, j.view(-1)).view(B, T, num_negatives)
