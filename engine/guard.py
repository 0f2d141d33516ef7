"""The non-finite guard: a NaN/inf loss or gradient skips the update, is logged with the batch's utterance
ids, and too many of them in a window stop the run.

How an update is skipped (no parameter, no optimizer state, no lr-schedule step touched):

  * A non-finite loss poisons the gradients (`poison_nonfinite`: loss x where(isfinite(loss), 1, NaN), a
    device-side op in the step), so one check at the optimizer covers both loss and gradients.
  * DeepSpeed's optimizer wrappers already refuse a non-finite gradient norm: ZeRO 1/2
    (DeepSpeedZeroOptimizer), ZeRO 3, and stage 0 in bf16/fp16 (FP16_Optimizer family) zero the
    gradients, skip the optimizer and the lr scheduler, and count `engine.skipped_steps`.
  * ZeRO 0 in fp32 has no wrapper: `engine.optimizer` is the torch optimizer itself. For it,
    `install_finite_check` wraps `optimizer.step` with a check of the global gradient norm that sets
    `optimizer.overflow`; DeepSpeed's `_take_model_step` reads that attribute exactly as for its own
    wrappers (skip counter, no scheduler step) and zeroes the gradients after step() as usual.
  * The trainer reads `engine.skipped_steps` after each `engine.step()` at an accumulation boundary (a host
    integer: DeepSpeed already read its overflow flag, so this adds no device synchronisation).

Per-step cost: ZeRO 1-3 and bf16/fp16 -- none beyond DeepSpeed's own overflow check; ZeRO 0 fp32 -- one
foreach norm over the gradients and one `.item()` per optimizer step (the CPU waits for the backward to
finish before launching the optimizer, ~ the cost of one kernel launch queue drain). Only when a step is
skipped are the per-micro-batch loss flags read and the ids gathered from all ranks.

In fp16, DeepSpeed's dynamic loss scaler also skips steps whose scaled gradients overflow while the loss
is finite: these are normal, are counted as `overflow_skips` and do not count towards the stop.
"""
from __future__ import annotations

import functools
import sys
from collections import deque

import torch
import torch.distributed as dist


class TrainingStopped(RuntimeError):
    """The run was stopped by a health check (non-finite steps, codebook collapse); the message says why
    and which flag controls it."""


def poison_nonfinite(loss: torch.Tensor, value: torch.Tensor) -> torch.Tensor:
    """`loss`, whose gradients become NaN when `value` (the loss actually reported) is not finite."""
    one = torch.ones((), dtype=loss.dtype, device=loss.device)
    return loss * torch.where(torch.isfinite(value), one, torch.full_like(one, float("nan")))


def install_finite_check(engine) -> bool:
    """Make a bare torch optimizer (ZeRO 0, fp32) skip non-finite updates like DeepSpeed's wrappers do.

    Returns True when installed, False when `engine.optimizer` is a DeepSpeed wrapper that has its own
    overflow check (it has an `overflow` attribute that `_take_model_step` reads)."""
    opt = engine.optimizer
    if hasattr(opt, "overflow"):
        return False
    inner = opt.step
    world = dist.get_world_size() if dist.is_initialized() else 1

    @functools.wraps(inner)  # keeps torch's lr-scheduler marker on the step method
    def finite_checked_step(*args, **kwargs):
        grads = [p.grad for group in opt.param_groups for p in group["params"] if p.grad is not None]
        norm = torch.nn.utils.get_total_norm(grads) if grads else torch.zeros(())
        engine._w2v_grad_norm = norm  # the trainer's grad-norm logging reads it (ZeRO 0 has no other)
        ok = torch.isfinite(norm).to(torch.float32)
        if world > 1:  # gradients are all-reduced already, so every rank agrees; make it explicit
            dist.all_reduce(ok, op=dist.ReduceOp.MIN)
        opt.overflow = not bool(ok.item())  # the one host sync this adds per optimizer step
        if opt.overflow:
            return None
        return inner(*args, **kwargs)

    opt.overflow = False
    opt.step = finite_checked_step
    return True


class NonFiniteGuard:
    """Watches every optimizer step for a skipped (non-finite) update.

    The trainer calls `micro_step(loss_sum, ids)` after each micro-batch and `after_step(step)` after the
    `engine.step()` that closes an accumulation window; the latter returns True when the window's
    statistics must be dropped (the update was skipped because of a non-finite loss or gradient).
    """

    def __init__(self, engine, *, window: int, max_nonfinite: int, logger, fp16: bool = False,
                 is_main: bool = True):
        self.engine = engine
        self.window, self.max_nonfinite = window, max_nonfinite
        self.logger, self.fp16, self.is_main = logger, fp16, is_main
        self.own_check = install_finite_check(engine)
        self.recent: deque[int] = deque()
        self.skipped = 0          # non-finite updates skipped
        self.overflow_skips = 0   # fp16 loss-scale overflows (finite loss), DeepSpeed's normal business
        self._seen = engine.skipped_steps
        self._losses: list[torch.Tensor] = []
        self._ids: list[list[str]] = []

    def micro_step(self, loss_sum: torch.Tensor, ids) -> None:
        self._losses.append(loss_sum.detach())
        self._ids.append(list(ids))

    def after_step(self, step: int) -> bool:
        """Call after `engine.step()` at an accumulation boundary; `step` is the optimizer step just done
        (1-based). Returns True if the update was skipped for a non-finite value. May raise TrainingStopped."""
        losses, ids = self._losses, self._ids
        self._losses, self._ids = [], []
        if self.engine.skipped_steps == self._seen:
            return False
        self._seen = self.engine.skipped_steps
        finite = torch.stack(losses).isfinite().tolist() if losses else []  # read only on a skipped step
        gathered = [(ids, finite)]
        if dist.is_initialized() and dist.get_world_size() > 1:
            gathered = [None] * dist.get_world_size()
            dist.all_gather_object(gathered, (ids, finite))
        all_ids = [i for rank_ids, _ in gathered for batch in rank_ids for i in batch]
        bad_ids = [i for rank_ids, flags in gathered for batch, ok in zip(rank_ids, flags) if not ok for i in batch]
        if self.fp16 and not bad_ids:
            self.overflow_skips += 1
            return False
        self.skipped += 1
        self.recent.append(step)
        while self.recent and self.recent[0] <= step - self.window:
            self.recent.popleft()
        record = {"event": "nonfinite", "skipped_total": self.skipped, "skipped_in_window": len(self.recent),
                  "nonfinite_loss": bool(bad_ids), "ids": all_ids, "nonfinite_loss_ids": bad_ids}
        self.logger.log(step, record, split="guard")
        where = (f"non-finite loss in utterances {bad_ids}" if bad_ids
                 else f"finite loss but non-finite gradients; batch utterances {all_ids}")
        self._say(f"NaN GUARD: step {step} skipped ({where}); {len(self.recent)} skipped in the last "
                  f"{self.window} steps, {self.skipped} in total")
        if self.max_nonfinite and len(self.recent) >= self.max_nonfinite:
            raise TrainingStopped(
                f"stopping at step {step}: {len(self.recent)} updates skipped for non-finite loss/gradients "
                f"within {self.window} steps (--max_nonfinite_steps {self.max_nonfinite}, --nan_guard_window "
                f"{self.window}). The run has diverged: resume from the last checkpoint with a lower "
                "--learning_rate, more --num_warmup_steps or --max_grad_norm; the utterance ids are in "
                "metrics.jsonl (split 'guard'). --max_nonfinite_steps 0 never stops.")
        return True

    def _say(self, text: str) -> None:
        if self.is_main:
            print(text, file=sys.stderr, flush=True)
