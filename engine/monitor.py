"""What the trainer knows about a run's health, gathered in one place: the statistics window, the
non-finite guard, the collapse alarm and the logged metrics (see docs/METRICS.md for their definitions).

    monitor = TrainMonitor(engine, step_fn, args, config, ds_cfg, logger, dist_info)
    per micro-step:  step_fn.measure_codes = monitor.will_log(completed + 1); ...; engine.step()
                     monitor.micro_step(stats, batch)
    per boundary:    monitor.after_step(completed + 1)     # may raise TrainingStopped
    per log step:    monitor.log(completed, epoch)         # one all-reduce + one host read
"""
from __future__ import annotations

import time

import torch

from engine.ds_config import precision_of
from engine.flops import mfu, peak_flops
from engine.guard import NonFiniteGuard, TrainingStopped
from engine.health import CollapseAlarm, default_collapse_threshold
from engine.step import StatsWindow, gumbel_temperature

THROUGHPUT_KEYS = ("samples", "flops")


class TrainMonitor:
    def __init__(self, engine, step_fn, args, config, ds_cfg: dict, logger, d, max_steps: int):
        self.engine, self.step_fn, self.args, self.logger, self.d = engine, step_fn, args, logger, d
        self.max_steps = max_steps
        self.precision = precision_of(ds_cfg)
        self.window, self.pending = StatsWindow(), StatsWindow()
        self.guard = NonFiniteGuard(engine, window=args.nan_guard_window, max_nonfinite=args.max_nonfinite_steps,
                                    logger=logger, fp16=self.precision == "fp16", is_main=d.is_main)
        threshold = args.min_codevector_perplexity
        if threshold is None:
            threshold = default_collapse_threshold(config)
        self.alarm = CollapseAlarm(threshold, stop=args.stop_on_collapse, logger=logger, is_main=d.is_main,
                                   codebook_size=config.num_codevector_groups * config.num_codevectors_per_group)
        self.peak = peak_flops(d.device, self.precision, args.peak_tflops)
        self.t_window = time.perf_counter()

    def will_log(self, step: int) -> bool:
        """Whether optimizer step `step` (1-based) is logged: its micro-steps measure the code perplexity."""
        return step % self.args.logging_steps == 0 or step == self.max_steps

    def micro_step(self, stats: dict, batch: dict) -> None:
        self.pending.add(stats)
        self.guard.micro_step(stats["loss_sum"], batch["ids"])

    def after_step(self, step: int) -> bool:
        """After the boundary `engine.step()`: keep the window's statistics, or only its throughput figures
        when the update was skipped. Returns True if skipped; raises TrainingStopped after too many."""
        try:
            skipped = self.guard.after_step(step)
        except TrainingStopped:
            self.logger.close()
            raise
        self.window.merge(self.pending, THROUGHPUT_KEYS if skipped else None)
        return skipped

    def log(self, step: int, epoch: int) -> dict:
        """Reduce the window over ranks, add the optimizer-side figures, log, and check the codebook."""
        elapsed = time.perf_counter() - self.t_window
        result = self.window.reduce(self.step_fn)
        audio_seconds = result.pop("samples", 0.0) / self.step_fn.sampling_rate
        flops = result.pop("flops", 0.0)
        engine = self.engine
        result.update(
            lr=engine.get_lr()[0], temperature=gumbel_temperature(self.args, step - 1),
            grad_norm=grad_norm(engine), audio_s_per_s=audio_seconds / max(elapsed, 1e-9),
            mfu=mfu(flops, elapsed, self.peak, self.d.world_size),
            gpu_mem_peak_gib=(torch.cuda.max_memory_allocated(self.d.device) / 2**30
                              if self.d.device.type == "cuda" else None),
            loss_scale=loss_scale(engine) if self.precision == "fp16" else None,
            skipped_steps=self.guard.skipped, epoch=epoch)
        if self.precision == "fp16":
            result["overflow_skips"] = self.guard.overflow_skips
        self.logger.log(step, result)
        try:
            self.alarm.check(step, result)
        except TrainingStopped:
            self.logger.close()
            raise
        self.t_window = time.perf_counter()
        return result


def grad_norm(engine) -> float:
    """The global gradient norm of the last update (inf for a skipped one). DeepSpeed computes it for
    ZeRO 1-3, bf16/fp16 and clipping; for ZeRO 0 fp32 the finite check (engine/guard.py) or
    `stash_grad_norm` measured it before the step."""
    norm = engine.get_global_grad_norm()
    if norm is None:
        norm = getattr(engine, "_w2v_grad_norm", None)
    if norm is None:
        return float("nan")
    return float(norm.item() if torch.is_tensor(norm) else norm)


def stash_grad_norm(engine) -> None:
    """Stage 0 keeps whole gradients in .grad after the boundary backward: measure their norm there."""
    grads = [p.grad for p in engine.module.parameters() if p.grad is not None]
    engine._w2v_grad_norm = torch.nn.utils.get_total_norm(grads) if grads else None


def loss_scale(engine) -> float | None:
    """The fp16 dynamic loss scale (DeepSpeed's optimizers expose it as `loss_scale` or `cur_scale`)."""
    for name in ("loss_scale", "cur_scale"):
        value = getattr(engine.optimizer, name, None)
        if value is not None:
            return float(value.item() if torch.is_tensor(value) else value)
    return None
