"""PLACEHOLDER (replaced by the masking branch): simple vectorized span mask + negatives."""
from __future__ import annotations
import torch


def compute_span_mask(frame_lengths, seq_len, mask_prob, mask_length, min_masks=0, generator=None):
    if mask_length < 1:
        raise ValueError("mask_length")
    dev = frame_lengths.device
    B = frame_lengths.shape[0]
    L = frame_lengths.clamp(max=seq_len)
    u = torch.rand(B, device=dev, generator=generator)
    n = (mask_prob * L / mask_length + u).floor().long().clamp(min=min_masks)
    n = torch.minimum(n, (L - mask_length + 1).clamp(min=0)).clamp(max=seq_len // mask_length)
    n_starts = seq_len - mask_length + 1
    keys = torch.rand(B, max(n_starts, 1), device=dev, generator=generator)
    pos = torch.arange(max(n_starts, 1), device=dev)
    keys = torch.where(pos[None] < (L - mask_length + 1)[:, None], keys, torch.full_like(keys, -1.0))
    order = keys.argsort(dim=1, descending=True)
    rank = torch.empty_like(order)
    rank.scatter_(1, order, pos.expand(B, -1).contiguous())
    starts = rank < n[:, None]
    mask = torch.zeros(B, seq_len + mask_length, dtype=torch.int32, device=dev)
    for k in range(mask_length):
        mask[:, k:k + starts.shape[1]] += starts.int()
    return mask[:, :seq_len] > 0


def sample_negatives(mask, num_negatives, generator=None):
    B, T = mask.shape
    dev = mask.device
    c = mask.long().cumsum(1)
    m = c[:, -1:]
    own = (c - 1).clamp(min=0)
    u = torch.rand(B, T, num_negatives, device=dev, generator=generator)
    r = (u * (m - 1).clamp(min=1)[:, :, None]).floor().long()
    r = torch.where(r >= own[:, :, None], r + 1, r)
    r = torch.minimum(r, (m - 1).clamp(min=0)[:, :, None])
    idx = torch.searchsorted(c, (r + 1).reshape(B, -1)).reshape(B, T, num_negatives)
    idx = torch.where(mask[:, :, None], idx.clamp(max=T - 1), torch.zeros_like(idx))
    return idx + (torch.arange(B, device=dev) * T)[:, None, None]
