"""What a plan is: the per-GPU memory breakdown and the Plan (applied to args, as a dict, as a table)."""
from __future__ import annotations

from dataclasses import asdict, dataclass, field

from engine.planner.common import GIB


# ----------------------------------------------------------------------------------------------
# The plan

@dataclass(frozen=True)
class MemoryBreakdown:
    """Estimated peak bytes per GPU. total = params + grads + optimizer + buffers
    + max(activations, optimizer_step_temp) + margin."""
    params: float
    grads: float
    optimizer: float             # persistent optimizer states on the GPU
    activations: float           # activation peak of one micro-step (saved tensors + backward transient)
    buffers: float               # DeepSpeed buckets, offload staging, ZeRO-3 gathered parameters
    margin: float                # workspaces and fragmentation
    total: float
    optimizer_step_temp: float = 0.0  # fp32 gradient copies of the optimizer step (after activations are freed)

    def gib(self) -> dict:
        return {k: round(v / GIB, 2) for k, v in asdict(self).items()}


@dataclass
class Plan:
    model: str
    total_params: int
    world_size: int
    precision: str
    zero_stage: int
    offload: str
    gradient_checkpointing: bool
    micro_batch_size: int                 # utterances of max_duration_in_seconds per micro-batch
    micro_batch_seconds: float            # = micro_batch_size * max_duration_in_seconds (audio budget)
    gradient_accumulation_steps: int
    effective_batch_seconds: float        # micro_batch_seconds * accumulation * world_size
    target_effective_batch_seconds: float
    max_duration_in_seconds: float
    gpu_memory_gb: float                  # budget the plan was made for (GiB)
    host_memory_gb: float                 # per node (GiB)
    gpu: MemoryBreakdown                  # estimated peak per GPU (bytes)
    host_bytes: float                     # estimated host memory per node (bytes)
    est_step_seconds: float
    est_audio_seconds_per_second: float
    reason: str
    zero_config: dict = field(default_factory=dict)
    # the other configurations that fit, same offload tier first, best estimate first: dicts with label,
    # zero_stage, offload, gradient_checkpointing, micro_batch_size, gradient_accumulation_steps,
    # est_gib, est_audio_seconds_per_second
    alternatives: list = field(default_factory=list)

    def apply(self, args, *, budget_batching: bool | None = None):
        """Write the plan into a pretrain.py args namespace (returns it): zero_stage, offload,
        gradient_checkpointing, gradient_accumulation_steps, precision (if 'auto'), and the micro-batch:
        per_device_train_batch_size = micro_batch_size, or with budget batching (default: when
        args.max_batch_seconds was set) max_batch_seconds = micro_batch_seconds (padded audio-s)."""
        if budget_batching is None:
            budget_batching = getattr(args, "max_batch_seconds", None) is not None
        args.zero_stage = self.zero_stage
        args.offload = self.offload
        args.per_device_train_batch_size = self.micro_batch_size
        if budget_batching:
            args.max_batch_seconds = self.micro_batch_seconds
        args.gradient_checkpointing = self.gradient_checkpointing
        args.gradient_accumulation_steps = self.gradient_accumulation_steps
        if getattr(args, "precision", None) in (None, "auto"):
            args.precision = self.precision
        return args

    def to_dict(self) -> dict:
        d = asdict(self)
        d["gpu_gib"] = self.gpu.gib()
        d["host_gib"] = round(self.host_bytes / GIB, 2)
        return d

    def table(self) -> str:
        g = self.gpu.gib()
        rows = [
            ("model", f"{self.model} ({self.total_params / 1e6:.1f}M params)"),
            ("hardware", f"{self.world_size} x GPU with {self.gpu_memory_gb:.1f} GiB, host {self.host_memory_gb:.1f} GiB"
                         f" per node, {self.precision}"),
            ("ZeRO stage", str(self.zero_stage)),
            ("offload", self.offload),
            ("gradient checkpointing", "yes" if self.gradient_checkpointing else "no"),
            ("micro-batch", f"{self.micro_batch_size} x {self.max_duration_in_seconds:g} s = "
                            f"{self.micro_batch_seconds:g} audio-s per GPU"),
            ("gradient accumulation", str(self.gradient_accumulation_steps)),
            ("effective batch", f"{self.effective_batch_seconds:g} audio-s (target {self.target_effective_batch_seconds:g})"),
            ("GPU params", f"{g['params']:.2f} GiB"),
            ("GPU grads", f"{g['grads']:.2f} GiB"),
            ("GPU optimizer states", f"{g['optimizer']:.2f} GiB"
                                     + (f" (+ {g['optimizer_step_temp']:.2f} GiB temp in the step, overlaps activations)"
                                        if self.gpu.optimizer_step_temp else "")),
            ("GPU activations (peak)", f"{g['activations']:.2f} GiB"),
            ("GPU DeepSpeed buffers", f"{g['buffers']:.2f} GiB"),
            ("GPU workspace/fragmentation", f"{g['margin']:.2f} GiB"),
            ("GPU total (est.)", f"{g['total']:.2f} of {self.gpu_memory_gb:.2f} GiB"),
            ("host total (est.)", f"{self.host_bytes / GIB:.1f} of {self.host_memory_gb:.1f} GiB"),
            ("step time (rough est.)", f"{self.est_step_seconds:.2f} s -> {self.est_audio_seconds_per_second:.0f} audio-s/s"),
        ]
        w = max(len(k) for k, _ in rows)
        lines = [f"{k:<{w}}  {v}" for k, v in rows]
        lines.append("")
        lines.append("why: " + self.reason)
        if self.alternatives:
            lines.append("other fits (same tier first): " + "; ".join(
                f"{a['label']}: {a['micro_batch_size']} utt, ~{a['est_audio_seconds_per_second']:.0f} audio-s/s"
                for a in self.alternatives[:6]))
        return "\n".join(lines)
