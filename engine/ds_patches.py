"""Two fixes to DeepSpeed (0.19.x) for ZeRO-0 under bf16/fp16, applied by `apply()` before any engine is built
(engine.trainer.setup_distributed). For before/after measurements `W2V_DS_PATCHES=0` leaves DeepSpeed as it is and
`W2V_DS_PATCHES=overflow` applies only the first fix.

At ZeRO-0 DeepSpeed wraps the optimizer in `FP16_Optimizer` (fp32 master weights in one flat buffer per group;
the bf16 parameters are views of one flat bf16 buffer). Its step works parameter by parameter:

1. `CheckOverflow.has_overflow_serial` tests each gradient for inf/NaN and reads each answer on the host: one
   device->host synchronization per parameter (224 `cudaStreamSynchronize` per base step on an H100, bench/RESULTS.md
   run 5). Fix: the same per-parameter flags, read once (`_has_overflow_serial`).
2. `FP16_Optimizer.step` then converts each gradient to fp32 on its own, and copies each updated master slice back
   to its parameter on its own: with the overflow test, ~15 small kernels per parameter (~3,000 launches per base
   step, most of the host time of the step). Fix (`_step`): one concatenation of the bf16 gradients and one
   conversion, one norm kernel per group, the overflow decision from that norm (a non-finite gradient gives a
   non-finite norm, and DeepSpeed skips the step on either), one host read, and one copy of the master buffer into
   the flat bf16 buffer the parameters are views of. Same arithmetic on the same values, so the same parameters
   (tests/test_ds_patches.py compares with the original bit for bit). Cases it does not cover (the legacy fused
   Adam, MoE, model or pipeline parallelism, parameters that are no longer views of the flat buffer) go to
   DeepSpeed's own step.
"""
from __future__ import annotations

import math
import os

import torch
from torch._utils import _flatten_dense_tensors


def _has_overflow_serial(self, params) -> bool:
    flags = [self._has_inf_or_nan(p.grad.data, i) for i, p in enumerate(params) if p.grad is not None]
    if not flags:
        return False
    if all(torch.is_tensor(f) for f in flags) and len({f.device for f in flags}) == 1:
        return bool(torch.stack([f.reshape(()).bool() for f in flags]).any())
    return any(bool(f) for f in flags)


def _views_of(flat: torch.Tensor, params) -> bool:
    """Whether `params` are, in order, contiguous views of `flat` (as FP16_Optimizer lays them out)."""
    offset, base, size = 0, flat.data_ptr(), flat.element_size()
    for p in params:
        if p.data.data_ptr() != base + offset * size or not p.data.is_contiguous() or p.dtype != flat.dtype:
            return False
        offset += p.numel()
    return offset == flat.numel()


def _fast_step_applies(self) -> bool:
    if self.fused_adam_legacy or self.has_moe_layers or self.mpu is not None or self.using_pipeline:
        return False
    if any(getattr(p, "ds_pipe_replicated", False) for g in self.fp16_groups for p in g):
        return False
    return all(_views_of(flat, group) for flat, group in zip(self.fp16_groups_flat, self.fp16_groups))


def _step(self, closure=None):
    if not _fast_step_applies(self):
        return type(self)._w2v_original_step(self, closure)
    flats = []
    for i, group in enumerate(self.fp16_groups):
        grads = [torch.zeros_like(p) if p.grad is None else p.grad for p in group]
        flats.append(_flatten_dense_tensors(grads).to(self.fp32_groups_flat[i].dtype))
        for p in group:
            p.grad = None
    # The global norm exactly as DeepSpeed forms it (get_flattened_grad_norm, then get_global_norm): each group's
    # fp32 norm squared and summed in double, rounded through an fp32 tensor, square-rooted, squared, rooted.
    norms = torch.stack([f.norm(2) for f in flats]).tolist()            # the step's one host read
    summed = torch.tensor([sum(n ** 2.0 for n in norms)], dtype=torch.float32).item() ** 0.5
    if not math.isfinite(summed):
        return self._skip_invalid_grad_norm()
    total = math.sqrt(summed ** 2.0)
    self.overflow = False
    if self.loss_scale_config.use_grad_scaling:
        self._update_scale(False)
    self._global_grad_norm = total / self.loss_scale_config.cur_scale
    for i, flat in enumerate(flats):
        self.fp32_groups_flat[i].grad = flat
    self.unscale_and_clip_grads(flats, total)
    self.optimizer.step()
    for i, master in enumerate(self.fp32_groups_flat):
        master.grad = None
        self.fp16_groups_flat[i].copy_(master.data)
    self.has_executed_step = True
    return self.overflow


def apply() -> None:
    """Install both fixes (idempotent). A DeepSpeed without the patched methods is left alone."""
    which = os.environ.get("W2V_DS_PATCHES", "all")
    if which == "0":
        return
    try:
        from deepspeed.runtime.fp16.fused_optimizer import FP16_Optimizer
        from deepspeed.runtime.utils import CheckOverflow
    except ImportError:
        return
    fixes = [(CheckOverflow, "has_overflow_serial", _has_overflow_serial), (FP16_Optimizer, "step", _step)]
    for cls, name, new in fixes[:1] if which == "overflow" else fixes:
        original = getattr(cls, name, None)
        if original is None or getattr(cls, f"_w2v_original_{name}", None) is not None:
            continue
        setattr(cls, f"_w2v_original_{name}", original)
        setattr(cls, name, new)
