"""One fix to DeepSpeed (0.19.x), applied by `apply()` before any engine is built (engine.trainer.setup_distributed).

`deepspeed.runtime.utils.CheckOverflow.has_overflow_serial` tests the gradients parameter by parameter and reads
each answer on the host (`if ... and self._has_inf_or_nan(p.grad.data, i)`): one device->host synchronization per
parameter, every optimizer step of ZeRO-0 under bf16/fp16 (DeepSpeed's FP16_Optimizer / FP16_UnfusedOptimizer;
ZeRO 1-3 check a flat buffer instead). For base on an H100 that is 224 `cudaStreamSynchronize` per step, and the
GPU starves after each (bench/RESULTS.md run 5, host profile). The replacement computes the same per-parameter
flags on the device and reads their `any()` once. Same answer (tests/test_ds_patches.py).
"""
from __future__ import annotations

import torch


def _has_overflow_serial(self, params) -> bool:
    flags = [self._has_inf_or_nan(p.grad.data, i) for i, p in enumerate(params) if p.grad is not None]
    if not flags:
        return False
    if all(torch.is_tensor(f) for f in flags) and len({f.device for f in flags}) == 1:
        return bool(torch.stack([f.reshape(()).bool() for f in flags]).any())
    return any(bool(f) for f in flags)


def apply() -> None:
    """Install the fix (idempotent). A DeepSpeed without `CheckOverflow.has_overflow_serial` is left alone."""
    try:
        from deepspeed.runtime.utils import CheckOverflow
    except ImportError:
        return
    if getattr(CheckOverflow, "_w2v_original_has_overflow_serial", None) is not None:
        return
    original = getattr(CheckOverflow, "has_overflow_serial", None)
    if original is None:
        return
    CheckOverflow._w2v_original_has_overflow_serial = original
    CheckOverflow.has_overflow_serial = _has_overflow_serial
