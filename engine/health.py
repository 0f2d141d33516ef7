"""Codebook health: the perplexity of the hard code assignments, and the codebook-collapse alarm.

Two perplexities describe the quantizer (fairseq logs both):

  codevector_perplexity  exp(entropy) of the *soft* code distribution averaged over the masked frames
                         of a batch, summed over groups -- what transformers returns, and what the
                         diversity loss pushes up. Max = groups x codevectors per group.
  code_perplexity        the same for the *hard* assignments (argmax of the quantizer logits): how many
                         codes are really used. In eval mode transformers' quantizer uses the argmax,
                         so there both are equal.

A codebook collapse (a handful of codes for every frame) shows as both falling towards the number of
groups; the contrastive task then becomes trivial and the representations useless.
"""
from __future__ import annotations

import sys

import torch


def code_perplexity(logits: torch.Tensor, mask: torch.Tensor, groups: int, codes: int) -> torch.Tensor:
    """Perplexity of argmax code assignments over the frames where `mask` is set, summed over groups.

    `logits` is the quantizer's `weight_proj` output [B, T, groups * codes]; `mask` is [B, T] bool.
    Vectorized on the logits' device; no host synchronisation.
    """
    B, T, _ = logits.shape
    idx = logits.detach().view(B, T, groups, codes).argmax(-1)
    idx = idx + torch.arange(groups, device=idx.device) * codes
    weights = mask[..., None].expand(B, T, groups).to(torch.float32)
    counts = torch.zeros(groups * codes, device=logits.device, dtype=torch.float32)
    counts.scatter_add_(0, idx.reshape(-1), weights.reshape(-1))
    probs = counts.view(groups, codes) / mask.sum().clamp_min(1).to(torch.float32)
    return torch.exp(-(probs * torch.log(probs + 1e-7)).sum(-1)).sum()


class CodePerplexityProbe:
    """A forward hook on `model.quantizer.weight_proj` that measures `code_perplexity` when armed.

    Arm it with the batch's mask right before a forward pass; `take()` returns the device scalar (or
    None when it was not armed). One probe per model: use `CodePerplexityProbe.of(model)`.
    """

    def __init__(self, model):
        quantizer = model.quantizer
        self.groups, self.codes = quantizer.num_groups, quantizer.num_vars
        self._mask: torch.Tensor | None = None
        self._value: torch.Tensor | None = None
        self.handle = quantizer.weight_proj.register_forward_hook(self._hook)

    @classmethod
    def of(cls, model) -> "CodePerplexityProbe":
        probe = model.quantizer.__dict__.get("_w2v_code_probe")
        if probe is None:
            probe = cls(model)
            model.quantizer.__dict__["_w2v_code_probe"] = probe
        return probe

    def arm(self, mask: torch.Tensor) -> None:
        self._mask, self._value = mask, None

    def take(self) -> torch.Tensor | None:
        value, self._value, self._mask = self._value, None, None
        return value

    def _hook(self, module, inputs, output):
        if self._mask is not None:
            with torch.no_grad():
                self._value = code_perplexity(output, self._mask, self.groups, self.codes)
            self._mask = None


def default_collapse_threshold(config) -> float:
    """The alarm's default: 2% of the codebook (12.8 of 640 for base and large), and at least 2 codes per
    group (4 for the demo's 2 x 32). Healthy runs sit at a large fraction of the codebook."""
    groups, codes = config.num_codevector_groups, config.num_codevectors_per_group
    return max(2.0 * groups, 0.02 * groups * codes)


class CollapseAlarm:
    """Warns loudly (stderr, metrics.jsonl split "guard") when the logged codevector perplexity falls
    under `threshold`, and again when it recovers; with `stop`, ends the run instead (TrainingStopped)."""

    def __init__(self, threshold: float | None, *, stop: bool, logger, codebook_size: int, is_main: bool = True):
        self.threshold, self.stop, self.logger = threshold, stop, logger
        self.codebook_size, self.is_main = codebook_size, is_main
        self.alarms = 0
        self.low = False

    def check(self, step: int, metrics: dict) -> None:
        from engine.guard import TrainingStopped
        ppl = metrics.get("codevector_perplexity")
        if self.threshold is None or self.threshold <= 0 or ppl is None or ppl != ppl:
            return
        if ppl < self.threshold:
            self.alarms += 1
            self.logger.log(step, {"event": "collapse", "codevector_perplexity": ppl, "threshold": self.threshold,
                                   "code_perplexity": metrics.get("code_perplexity")}, split="guard")
            message = (f"CODEBOOK COLLAPSE ALARM at step {step}: codevector perplexity {ppl:.3g} < "
                       f"--min_codevector_perplexity {self.threshold:g} (codebook size {self.codebook_size}). "
                       "The quantizer uses only a few codes: lower --learning_rate, raise --max_gumbel_temperature "
                       "or the config's diversity_loss_weight, or resume from an earlier checkpoint.")
            if self.stop:
                raise TrainingStopped(message + " Stopping (--stop_on_collapse).")
            if not self.low and self.is_main:
                print(message, file=sys.stderr, flush=True)
            self.low = True
        elif self.low:
            self.low = False
            self.logger.log(step, {"event": "collapse_recovered", "codevector_perplexity": ppl}, split="guard")
            if self.is_main:
                print(f"codebook perplexity recovered at step {step}: {ppl:.3g} >= {self.threshold:g}",
                      file=sys.stderr, flush=True)
