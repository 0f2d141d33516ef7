"""One micro-step of wav2vec 2.0 pre-training, the seed's semantics on the model's device.

    batch (CPU) --prepare--> device tensors + span mask + negatives --forward--> summed losses
    --scale--> loss_for_backward = loss_sum * world_size / masked_frames_all_ranks

The seed multiplies the gradients by world_size / num_losses after each backward (num_losses summed over
ranks), and DDP averages over ranks. Scaling the loss instead gives the same gradient for a micro-step
and works with every ZeRO stage (DeepSpeed averages over ranks and divides by the accumulation steps
itself). Unlike the seed, gradients of earlier micro-batches are not rescaled again by later ones.

Nothing here synchronizes with the host: statistics are returned as device tensors and read only
when they are logged.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.distributed as dist

import warnings

from engine import fastpath
from engine.flops import train_flops
from engine.guard import poison_nonfinite
from engine.health import CodePerplexityProbe
from engine.masking import compute_span_mask, sample_negatives
from engine.models import conv_output_length


@dataclass(frozen=True)
class MaskingSpec:
    """Masking hyper-parameters, and the forward path of the step (carried here so that every PretrainStep
    built from the spec, training and evaluation alike, runs the same path)."""
    mask_prob: float
    mask_length: int
    min_masks: int
    num_negatives: int
    fast_forward: bool = True       # engine/fastpath.py instead of transformers' forward (same losses)
    attention: str = "sdpa"         # fast path attention: sdpa | sdpa-flash | sdpa-cudnn | eager | varlen
    torch_compile: str = "none"     # none | layers | full
    conv_impl: str = "cudnn-cl"     # feature encoder of the fast path: cudnn-cl | gemm | cudnn (engine/convs.py)
    pos_conv_impl: str = "fft"      # positional convolution of the fast path: fft | cudnn

    @classmethod
    def from_args(cls, args, config) -> "MaskingSpec":
        """Flags win over the model config (the seed: `config.mask_time_prob if flag is None`)."""
        pick = lambda flag, default: default if flag is None else flag  # noqa: E731
        return cls(mask_prob=pick(args.mask_time_prob, config.mask_time_prob),
                   mask_length=pick(args.mask_time_length, config.mask_time_length),
                   min_masks=args.mask_time_min_masks,
                   num_negatives=pick(args.num_negatives, config.num_negatives),
                   fast_forward=getattr(args, "fast_forward", cls.fast_forward),
                   attention=getattr(args, "fast_attention", cls.attention),
                   torch_compile=getattr(args, "torch_compile", cls.torch_compile) or cls.torch_compile,
                   conv_impl=getattr(args, "conv_impl", cls.conv_impl),
                   pos_conv_impl=getattr(args, "pos_conv_impl", cls.pos_conv_impl))


_warned: set = set()


def _warn_once(message: str) -> None:
    if message not in _warned:
        _warned.add(message)
        warnings.warn(message, stacklevel=3)


class PretrainStep:
    """Turns CPU batches into model inputs and the scaled loss. `module` is the bare HF model.

    Set `measure_codes` to also measure the code perplexity of the next forwards (a hook on the
    quantizer, see engine/health.py); the trainer does it for the micro-steps of logged steps only.
    """

    def __init__(self, module, spec: MaskingSpec, device: torch.device, *, world_size: int = 1,
                 generator: torch.Generator | None = None):
        self.module = module
        self.config = module.config
        self.spec = spec
        self.device = device
        self.world_size = world_size
        self.generator = generator
        self.fast = spec.fast_forward
        self.attention = spec.attention
        self.compile = spec.torch_compile
        if self.fast:
            reason = fastpath.unsupported_reason(self.config)
            if reason is not None:
                _warn_once(f"fast forward off: the model config has {reason}; using transformers' forward")
                self.fast = False
        if not self.fast and self.compile != "none":
            _warn_once("--torch_compile applies to the fast forward only; transformers' forward runs eager")
        if self.fast:
            fastpath.install(module)
            if self.compile != "none" and fastpath.is_zero3(module):
                _warn_once("--torch_compile is ignored under ZeRO-3 (its parameter hooks do not trace)")
                self.compile = "none"
            if self.attention == "varlen" and device.type == "cuda" and not fastpath.varlen_available():
                _warn_once("--fast_attention varlen: this torch has no torch.nn.attention.varlen; using sdpa")
                self.attention = "sdpa"
            if self.attention == "varlen" and self.config.attention_dropout > 0:
                _warn_once("--fast_attention varlen: flash varlen attention has no dropout, so training batches "
                           f"with padding use sdpa (attention_dropout={self.config.attention_dropout})")
        self.measure_codes = False
        self.probe = CodePerplexityProbe.of(module)

    def prepare(self, batch: dict) -> dict:
        """Device tensors for the model: inputs, attention mask, span mask and negatives.

        Fast path with a host batch: the mask is not copied; the sample lengths are the batch's "lengths" (the
        loader's) or found on the host (a binary search per right-padded row), and B numbers travel instead of
        a [B, S] mask."""
        dtype = next(self.module.parameters()).dtype
        input_values = batch["input_values"].to(self.device, non_blocking=True).to(dtype)
        host_mask = batch["attention_mask"]
        seq_len = conv_output_length(self.config, input_values.shape[-1])
        padded = True
        # The CPU batch's lengths, read once on the host (no device sync): the fast path's input and the FLOP count.
        # The loader's batches carry them ("lengths"); other callers' are read off the mask.
        host_lengths = batch.get("lengths")
        if host_lengths is None or host_lengths.device.type != "cpu":
            host_lengths = right_padded_lengths(host_mask) if host_mask.device.type == "cpu" else None
        if self.fast and host_lengths is not None:
            padded = bool((host_lengths < host_mask.shape[-1]).any())
            sample_lengths = _to_device(host_lengths, self.device)
            attention_mask = None
        else:
            attention_mask = host_mask.to(self.device, non_blocking=True)
            sample_lengths = attention_mask.sum(-1)
        frame_lengths = self.module._get_feat_extract_output_lengths(sample_lengths).long()
        mask = compute_span_mask(frame_lengths, seq_len, self.spec.mask_prob, self.spec.mask_length,
                                 self.spec.min_masks, generator=self.generator)
        negatives = sample_negatives(mask, self.spec.num_negatives, generator=self.generator)
        inputs = {"input_values": input_values, "attention_mask": attention_mask, "sample_lengths": sample_lengths,
                  "mask_time_indices": mask, "sampled_negative_indices": negatives,
                  "frame_lengths": frame_lengths, "padded": padded}
        if self.fast and padded and self.attention == "varlen" and attention_mask is None:
            host_frames = self.module._get_feat_extract_output_lengths(host_lengths)
            inputs["packing"] = fastpath.packing_for(host_frames, seq_len, self.device)
        inputs["flops"] = (train_flops(self.config, host_lengths.tolist(), self.spec.num_negatives)
                           if host_lengths is not None and len(host_lengths) else 0.0)
        return inputs

    def global_sum(self, value: torch.Tensor) -> torch.Tensor:
        if self.world_size > 1:
            value = value.clone()
            dist.all_reduce(value)
        return value

    def forward(self, model, inputs: dict) -> tuple[torch.Tensor, dict]:
        """Forward through `model` (DeepSpeed engine or bare module); returns (loss to backprop, stats).
        A non-finite loss makes the gradients NaN (engine/guard.py), so the update is skipped."""
        if self.measure_codes:
            self.probe.arm(inputs["mask_time_indices"])
        if self.fast:
            fastpath.install(getattr(model, "module", model))
            # No padding: no frame lengths and no mask, so that sdpa can pick a flash kernel (flash or cuDNN attention).
            padded = inputs.get("padded", True)
            args = fastpath.FastPathArgs(attention=self.attention, compile=self.compile,
                                         frame_lengths=inputs["frame_lengths"] if padded else None,
                                         packing=inputs.get("packing"), conv=self.spec.conv_impl,
                                         pos_conv=self.spec.pos_conv_impl)
            out = model(input_values=inputs["input_values"], attention_mask=None,
                        mask_time_indices=inputs["mask_time_indices"],
                        sampled_negative_indices=inputs["sampled_negative_indices"], fast_path=args)
        else:
            out = model(input_values=inputs["input_values"], attention_mask=inputs["attention_mask"],
                        mask_time_indices=inputs["mask_time_indices"],
                        sampled_negative_indices=inputs["sampled_negative_indices"])
        num_losses = inputs["mask_time_indices"].sum()
        num_losses_all = self.global_sum(num_losses.float()).clamp_min(1.0)
        loss = poison_nonfinite(out.loss * (self.world_size / num_losses_all), out.loss)
        stats = {
            "loss_sum": out.loss.detach().float(),
            "contrastive_sum": out.contrastive_loss.detach().float(),
            "diversity_sum": out.diversity_loss.detach().float(),
            "num_losses": num_losses.detach().float(),
            "frames": inputs["frame_lengths"].sum().float(),
            # torch.full, not torch.tensor(x, device=...): a blocking host-to-device copy syncs the stream
            "padded_frames": torch.full((), float(inputs["mask_time_indices"].numel()), device=num_losses.device),
            "ppl": out.codevector_perplexity.detach().float(),
            "micro_batches": torch.ones((), device=num_losses.device),
            "samples": inputs["sample_lengths"].sum().float(),
            "flops": float(inputs.get("flops", 0.0)),
        }
        code_ppl = self.probe.take()
        if code_ppl is not None:
            stats["code_ppl"] = code_ppl.float()
            stats["code_ppl_batches"] = torch.ones((), device=num_losses.device)
        return loss, stats


def right_padded_lengths(mask: torch.Tensor) -> torch.Tensor:
    """Lengths of the rows of a host attention mask padded on the right (the batch contract): a binary
    search per row, O(B log S) instead of the O(B S) of `mask.sum(-1)` (3 ms for a 400 s batch)."""
    rows = mask.numpy()
    S = rows.shape[1]
    lengths = []
    for row in rows:
        lo, hi = 0, S
        while lo < hi:
            mid = (lo + hi) // 2
            if row[mid]:
                lo = mid + 1
            else:
                hi = mid
        lengths.append(lo)
    return torch.tensor(lengths, dtype=torch.long)


def _to_device(t: torch.Tensor, device: torch.device) -> torch.Tensor:
    if device.type == "cuda":
        t = t.pin_memory()  # served by torch's caching host allocator after the first steps
    return t.to(device, non_blocking=True)


class StatsWindow:
    """Sums per-micro-step statistics on the device between two logs (no host sync until `reduce`).
    Host numbers (the FLOP count) are summed on the host and joined to the device ones at `reduce`."""

    def __init__(self):
        self.sums: dict[str, torch.Tensor | float] = {}

    def add(self, stats: dict, keys=None) -> None:
        """Add `stats` (only `keys` of them, when given)."""
        for k, v in stats.items():
            if keys is not None and k not in keys:
                continue
            self.sums[k] = self.sums[k] + v if k in self.sums else (v.clone() if torch.is_tensor(v) else v)

    def snapshot(self) -> dict:
        """The sums on the CPU, for a checkpoint (a resumed run logs the same window)."""
        return {k: (v.detach().cpu() if torch.is_tensor(v) else v) for k, v in self.sums.items()}

    def restore(self, snapshot: dict, device: torch.device) -> None:
        self.sums = {k: (v.to(device) if torch.is_tensor(v) else v) for k, v in snapshot.items()}

    def merge(self, other: "StatsWindow", keys=None) -> None:
        """Add `other`'s sums (only `keys`, when given) and empty it."""
        self.add(other.sums, keys)
        other.sums = {}

    def reduce(self, step: PretrainStep, prefix: str = "") -> dict[str, float]:
        """All-reduce over ranks, read once, and turn sums into per-masked-frame figures (as the seed)."""
        if not self.sums:
            return {}
        keys = sorted(self.sums)
        packed = torch.stack([torch.as_tensor(self.sums[k], dtype=torch.float32, device=step.device).float()
                              for k in keys])
        s = dict(zip(keys, step.global_sum(packed).tolist()))
        self.sums = {}
        if "num_losses" not in s:  # every update of the window was skipped: throughput figures only
            return {k: s[k] for k in ("samples", "flops") if k in s}
        n = max(s["num_losses"], 1.0)
        code_ppl = s["code_ppl"] / s["code_ppl_batches"] if s.get("code_ppl_batches") else None
        return {
            f"{prefix}loss": s["loss_sum"] / n,
            f"{prefix}contrastive_loss": s["contrastive_sum"] / n,
            f"{prefix}diversity_loss": s["diversity_sum"] / n,
            f"{prefix}codevector_perplexity": s["ppl"] / s["micro_batches"],
            f"{prefix}code_perplexity": code_ppl,
            f"{prefix}masked_frac": s["num_losses"] / max(s["frames"], 1.0),
            f"{prefix}padding_frac": 1.0 - s["frames"] / max(s["padded_frames"], 1.0),
            f"{prefix}num_losses": s["num_losses"],
            f"{prefix}samples": s["samples"],
            f"{prefix}flops": s.get("flops", 0.0),
        }


def gumbel_temperature(args, completed_steps: int) -> float:
    """The seed's schedule: max * decay**step, floored at min."""
    return max(args.max_gumbel_temperature * args.gumbel_temperature_decay ** completed_steps,
               args.min_gumbel_temperature)
