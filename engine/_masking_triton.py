"""Triton kernels behind engine/masking.py on CUDA: one kernel per function (plus one seed draw).

Imported lazily by engine/masking.py (only when the Triton path is taken), so that CPU-only installs
without triton never import it. Under ``TRITON_INTERPRET=1`` (set before this module is imported)
the same kernels run on CPU tensors through Triton's numpy interpreter: that is how the tests
exercise them without a GPU.

Randomness: each call draws one int64 seed on the device from the caller's ``torch.Generator`` (or
the default one) with ``torch.randint``; the kernels load it and feed it to Triton's Philox4x32-10
(``tl.philox``) with counters that name each random value uniquely: ``(position, row, stream, 0)``.
No host read, a launch grid that depends only on shapes, and the seed draw advances the generator's
Philox offset on the device, so a CUDA-graph replay draws a fresh seed (as the torch path's draws do).
Bounded integers come from ``umulhi(r, s)`` (``floor(r * s / 2**32)``, bias below ``s / 2**32``).
"""
from __future__ import annotations

import contextlib
import functools
import struct

import torch
import triton
import triton.language as tl

MAX_BLOCK = 8192  # rows up to this many frames run here (one block per row); longer -> torch path
_CHUNK4 = 256  # negatives: 4 * _CHUNK4 = 1024 output entries per loop step and program
_MAX_ITERS = 64  # negatives: at most this many chunks per program
_SEED_HIGH = 2**62


@triton.jit(do_not_specialize=["B", "seq_len", "mask_length", "min_masks", "n_cap", "rate_bits"])
def _span_mask_kernel(len_ptr, seed_ptr, scratch_ptr, out_ptr, B, seq_len, mask_length, min_masks, n_cap, rate_bits,
                      BLOCK: tl.constexpr, ROWS: tl.constexpr):
    """ROWS rows per program; per row: the span count n, n distinct starts, the dilated mask.

    Starts: every valid start ``p < L - mask_length + 1`` gets an iid uniform 32-bit key; the n
    largest keys win (a uniform n-subset). The n-th largest is found by bisection on the key value
    (count of keys >= mid, one reduction per step), stopping as soon as exactly n keys are >= lo:
    about log2(#valid) + 2 steps, 33 at most. Keys tied at the final lo (probability ~ N / 2**32 per
    row) are taken in position order to keep exactly n.
    """
    pid = tl.program_id(0)
    rows = pid * ROWS + tl.arange(0, ROWS)  # [R]
    row_ok = rows < B
    pos = tl.arange(0, BLOCK)  # [BLOCK]
    seed = tl.load(seed_ptr)

    L = tl.load(len_ptr + rows, mask=row_ok, other=0).to(tl.int64)
    L = tl.minimum(L, seq_len)
    n_valid = L - mask_length + 1  # number of valid starts (<= 0: none)

    # Span count: n = floor(L * rate + u) (u ~ U[0, 1), one per row), then the caps of the original.
    zero_r = tl.zeros([ROWS], dtype=tl.uint32)
    ur, _, _, _ = tl.philox(seed, zero_r, rows.to(tl.uint32), zero_r + 1, zero_r)
    u = ur.to(tl.float64) * 2.3283064365386963e-10  # r / 2**32: exact, in [0, 1)
    rate = rate_bits.to(tl.int64).to(tl.float64, bitcast=True)  # mask_prob / mask_length, fp64
    n = (L.to(tl.float64) * rate + u).to(tl.int64)  # truncation == floor for L >= 0
    n = tl.maximum(n, min_masks)
    n = tl.minimum(tl.minimum(n, n_cap), n_valid)
    n = tl.maximum(n, 0)  # [R]

    # Keys: uint32 -> int64 (zero-extended); invalid starts get -1, below every probe.
    zero_rb = tl.zeros([ROWS, BLOCK], dtype=tl.uint32)
    kr, _, _, _ = tl.philox(seed, zero_rb + pos[None, :].to(tl.uint32), zero_rb + rows[:, None].to(tl.uint32),
                            zero_rb, zero_rb)
    valid = pos[None, :] < n_valid[:, None]
    key = tl.where(valid, kr.to(tl.int64), -1)  # [R, BLOCK]

    # Bisection for lo with count(key >= lo) == n. Invariant: count(key >= lo) = cnt_lo >= n and
    # count(key >= hi) < n (n >= 1). n == 0: lo = hi = 2**32 (nothing selected) from the start.
    top = tl.full([ROWS], 4294967296, dtype=tl.int64)
    lo = tl.where(n == 0, top, 0)
    hi = top
    cnt_lo = tl.where(n == 0, 0, tl.maximum(n_valid, 0))
    active = (hi - lo > 1) & (cnt_lo != n)
    while tl.max(active.to(tl.int32), axis=0) > 0:
        mid = (lo + hi) // 2
        c = tl.sum((key >= mid[:, None]).to(tl.int32), axis=1).to(tl.int64)
        up = active & (c >= n)
        down = active & (c < n)
        lo = tl.where(up, mid, lo)
        cnt_lo = tl.where(up, c, cnt_lo)
        hi = tl.where(down, mid, hi)
        active = (hi - lo > 1) & (cnt_lo != n)

    # Keys > lo are in; keys == lo (one, or several tied) fill up to n in position order.
    above = key > lo[:, None]
    tie = key == lo[:, None]
    need = n - tl.sum(above.to(tl.int32), axis=1).to(tl.int64)
    tie_rank = tl.cumsum(tie.to(tl.int32), axis=1)
    chosen = above | (tie & (tie_rank.to(tl.int64) <= need[:, None]))

    # Dilation: frame t is masked iff a start lies in (t - mask_length, t], i.e. iff the count of
    # chosen starts up to t exceeds the count up to t - mask_length. The shifted read goes through
    # this program's own scratch row (a CTA barrier orders the writes before the reads).
    csum = tl.cumsum(chosen.to(tl.int32), axis=1)
    scr = scratch_ptr + rows[:, None].to(tl.int64) * BLOCK + pos[None, :]
    tl.store(scr, csum, mask=row_ok[:, None])
    tl.debug_barrier()
    back = pos[None, :] >= mask_length
    before = tl.load(scr - mask_length, mask=row_ok[:, None] & back, other=0)
    masked = csum > before
    offs = rows[:, None].to(tl.int64) * seq_len + pos[None, :]
    tl.store(out_ptr + offs, masked, mask=row_ok[:, None] & (pos[None, :] < seq_len))


@triton.jit(do_not_specialize=["T"])
def _negatives_kernel(mask_ptr, seed_ptr, scratch_ptr, out_ptr, T,
                      K: tl.constexpr, BLOCK_T: tl.constexpr, CHUNK4: tl.constexpr, ITERS: tl.constexpr):
    """Program (b, s): entries [s * span, (s + 1) * span) of row b's flattened [T, K] output,
    span = ITERS * 4 * CHUNK4 (a fixed trip count: the grid alone adapts to T * K).

    Each program first builds row b's tables in its own scratch (no other program touches it):
    ``ranks[t]`` (1-based rank of masked frame t, 0 if unmasked) and ``frames[r]`` (the r-th masked
    frame, 0-based r), then a CTA barrier makes them visible to all its threads. An entry (t, k) of
    a masked frame with rank c among m draws j = umulhi(r, m - 1), uniform in [0, m - 2], and reads
    frames[(c + j) mod m]: the frames after t, cyclically, skipping t itself (m == 1: t itself).
    Unmasked frames get b * T. Random r: Philox counter (group of 4 entries, b, 0, 0), 4 outputs.
    """
    b = tl.program_id(0)
    s = tl.program_id(1)
    nsplit = tl.num_programs(1)
    t = tl.arange(0, BLOCK_T)
    in_row = t < T
    row_base = b.to(tl.int64) * T
    m = tl.load(mask_ptr + row_base + t, mask=in_row, other=0) != 0
    mi = m.to(tl.int32)
    rank = tl.cumsum(mi, axis=0)
    count = tl.sum(mi, axis=0)
    total = T * K
    start = s * (ITERS * 4 * CHUNK4)
    ranks_ptr = scratch_ptr + (b * nsplit + s).to(tl.int64) * (2 * BLOCK_T)
    frames_ptr = ranks_ptr + BLOCK_T
    # ranks: only of the frames whose entries this program writes; frames: all the row's masked frames
    mine = in_row & (t >= start // K) & (t <= (start + (ITERS * 4 * CHUNK4 - 1)) // K)
    tl.store(ranks_ptr + t, tl.where(m, rank, 0), mask=mine)
    tl.store(frames_ptr + rank - 1, t, mask=m)
    tl.debug_barrier()  # the tables are read below by other threads of this program

    seed = tl.load(seed_ptr)
    g = tl.arange(0, CHUNK4)[:, None]  # [C4, 1]: groups of 4 entries
    i = tl.arange(0, 4)[None, :]  # [1, 4]
    zero_g = tl.zeros([CHUNK4, 1], dtype=tl.uint32)
    b_u = zero_g + b.to(tl.uint32)
    scale = (count - 1).to(tl.uint32)  # m - 1 (unused when m == 0)
    out_row = out_ptr + row_base * K
    for it in range(ITERS):
        c = start + it * (4 * CHUNK4)
        flat = c + 4 * g + i  # [C4, 4]: entry index within the row, t * K + k
        ok = flat < total
        r0, r1, r2, r3 = tl.philox(seed, zero_g + (c // 4 + g).to(tl.uint32), b_u, zero_g, zero_g)
        r = tl.where(i == 0, r0, tl.where(i == 1, r1, tl.where(i == 2, r2, r3)))
        frame = flat // K
        rk = tl.load(ranks_ptr + frame, mask=ok, other=0)
        j = tl.umulhi(r, scale).to(tl.int32)
        slot = rk + j  # 0-based slot of the masked frame after t, j + 1 places on
        slot = tl.where(slot >= count, slot - count, slot)
        neg = tl.load(frames_ptr + slot, mask=ok & (rk > 0), other=0)
        tl.store(out_row + flat, row_base + neg.to(tl.int64), mask=ok)


def _cdiv(a: int, b: int) -> int:  # (triton.cdiv and next_power_of_2 cost ~4 us a call on the host)
    return -(-a // b)


def _pow2(n: int) -> int:
    return 1 << max(0, n - 1).bit_length()


def _seed(device: torch.device, generator: torch.Generator | None) -> torch.Tensor:
    return torch.randint(0, _SEED_HIGH, (1,), dtype=torch.int64, device=device, generator=generator)


def _on(device: torch.device):
    """Triton launches on the current CUDA device: make it the tensors' one (no-op when it is)."""
    if device.type == "cuda" and device.index is not None and device.index != torch.cuda.current_device():
        return torch.cuda.device(device)
    return contextlib.nullcontext()


def _warps(block: int) -> int:
    return 4 if block <= 1024 else 8 if block <= 4096 else 16


@functools.lru_cache(maxsize=None)
def _sm_count(device: torch.device) -> int:
    return torch.cuda.get_device_properties(device).multi_processor_count


def span_mask(frame_lengths: torch.Tensor, seq_len: int, mask_prob: float, mask_length: int, min_masks: int,
              n_cap: int, generator: torch.Generator | None, rows_per_program: int | None = None) -> torch.Tensor:
    """compute_span_mask's Triton path (arguments validated, ``n_cap >= 1``, ``B >= 1``)."""
    dev, B = frame_lengths.device, frame_lengths.shape[0]
    lengths = frame_lengths
    if lengths.dtype not in (torch.int32, torch.int64):
        lengths = lengths.to(torch.int64)
    lengths = lengths.contiguous()
    out = torch.empty(B, seq_len, dtype=torch.bool, device=dev)
    block = max(16, _pow2(seq_len))
    scratch = torch.empty(B, block, dtype=torch.int32, device=dev)
    # One row per program on the GPU; the interpreter runs programs one after another, so batch rows.
    rows = rows_per_program or (1 if dev.type == "cuda" else min(max(1, 2**17 // block), _pow2(B)))
    rate_bits = struct.unpack("<q", struct.pack("<d", mask_prob / mask_length))[0]  # fp64 via int64 bits
    with _on(dev):
        _span_mask_kernel[(_cdiv(B, rows),)](
            lengths, _seed(dev, generator), scratch, out, B, seq_len, mask_length, min_masks, n_cap, rate_bits,
            BLOCK=block, ROWS=rows, num_warps=_warps(block * rows))
    return out


def negatives(mask: torch.Tensor, num_negatives: int, generator: torch.Generator | None,
              programs_per_row: int | None = None, chunk4: int | None = None) -> torch.Tensor:
    """sample_negatives' Triton path (arguments validated, ``B * T >= 1``, ``num_negatives >= 1``)."""
    dev = mask.device
    B, T = mask.shape
    K = num_negatives
    mask = mask.contiguous()
    cuda = dev.type == "cuda"
    # The interpreter (CPU tensors) runs programs one after another at ~0.1 ms per op: big chunks.
    chunk4 = chunk4 or (_CHUNK4 if cuda else 4096)
    chunks = _cdiv(T * K, 4 * chunk4)  # per row
    if programs_per_row is None:  # ~2 programs per SM over the whole batch (one wave); CPU: 2
        programs_per_row = -(-2 * _sm_count(dev) // B) if cuda else 2
    # Chunks per program: a power of two (few compiled variants), about chunks / programs_per_row.
    iters = min(_MAX_ITERS, 1 << max(0, (chunks // max(1, programs_per_row)).bit_length() - 1))
    nsplit = _cdiv(chunks, iters)
    block_t = max(16, _pow2(T))
    scratch = torch.empty(B * nsplit * 2 * block_t, dtype=torch.int32, device=dev)
    out = torch.empty(B, T, K, dtype=torch.int64, device=dev)
    with _on(dev):
        _negatives_kernel[(B, nsplit)](mask, _seed(dev, generator), scratch, out, T,
                                       K=K, BLOCK_T=block_t, CHUNK4=chunk4, ITERS=iters, num_warps=_warps(block_t))
    return out


def supported_mask(seq_len: int) -> bool:
    return seq_len <= MAX_BLOCK


def supported_negatives(T: int, num_negatives: int) -> bool:
    return T <= MAX_BLOCK and T * num_negatives <= 2**30  # entry indices within a row stay int32
