"""The search: the fastest configuration that fits (`plan`, `plan_from_args`, `estimate_memory`)."""
from __future__ import annotations

import math
from dataclasses import dataclass

from engine.planner.activations import ActivationEstimate, activation_bytes
from engine.planner.common import GIB, OFFLOADS, PRECISIONS
from engine.planner.facts import model_facts
from engine.planner.result import MemoryBreakdown, Plan
from engine.planner.states import DEFAULT_ZERO_CONFIG, StateEstimate, model_state_bytes
from engine.planner.throughput import Throughput, estimate_step

# Safety margin on top of the estimate: CUDA/cuBLAS/cuDNN workspaces, NCCL, allocator rounding and
# fragmentation (variable-length speech batches fragment the caching allocator). Calibrated on an H100 capped
# at 16 GiB (bench/RESULTS.md, run 3): plans estimated at 15.6-15.7 GiB with 0.5 GiB + 8 % ran out of memory
# (large ZeRO-0 3 x 20 s, XLS-R 1B ZeRO-1 + offload 2 x 20 s), so the margin was raised to 1.25 GiB + 15 %.
MARGIN_GIB = 1.25
MARGIN_FRACTION = 0.15          # of the activation peak

OFFLOAD_NAMES = {"none": "no offload", "optimizer": "optimizer offload", "all": "param+optimizer offload"}


class PlanError(ValueError):
    """Nothing fits; the message says what would be needed and which flag to change."""


@dataclass(frozen=True)
class _Candidate:
    stage: int
    offload: str
    checkpointing: bool

    @property
    def label(self) -> str:
        s = f"ZeRO-{self.stage}"
        if self.offload != "none":
            s += f" + {OFFLOAD_NAMES[self.offload]}"
        return s + (" + ckpt" if self.checkpointing else "")

    @property
    def order(self) -> tuple:  # preference among equally fast options
        return (OFFLOADS.index(self.offload), self.checkpointing, self.stage)


def _gpu_total(states: StateEstimate, act: ActivationEstimate) -> MemoryBreakdown:
    margin = MARGIN_GIB * GIB + MARGIN_FRACTION * act.peak
    acts = max(act.peak, states.step_transient)
    total = states.params + states.grads + states.optimizer + states.buffers + acts + margin
    return MemoryBreakdown(states.params, states.grads, states.optimizer, act.peak, states.buffers, margin, total,
                           states.step_transient)


def estimate_memory(config, *, zero_stage: int, offload: str = "none", gradient_checkpointing: bool = False,
                    micro_batch_size: int = 1, max_duration_in_seconds: float = 20.0, precision: str = "bf16",
                    world_size: int = 1, num_nodes: int = 1, attn_implementation: str = "sdpa",
                    padded: bool = True, zero_config: dict | None = None,
                    zero_init: bool = False, fast_forward: bool = False) -> tuple[MemoryBreakdown, float]:
    """(GPU peak breakdown, host bytes per node) of a given configuration: for checking a hand-made
    configuration (pretrain.py without the planner) or comparing with a measurement."""
    facts = model_facts(config)
    states = model_state_bytes(facts, stage=zero_stage, offload=offload or "none", precision=precision,
                               world_size=world_size, num_nodes=num_nodes, zero_config=zero_config,
                               zero_init=zero_init)
    act = activation_bytes(facts, max_duration_in_seconds, batch=micro_batch_size, precision=precision,
                           checkpointing=gradient_checkpointing, attn_implementation=attn_implementation,
                           padded=padded, fast_forward=fast_forward)
    return _gpu_total(states, act), states.host


def read_host_memory_gb() -> float:
    """MemAvailable of /proc/meminfo in GiB (MemTotal-based figures can start small on some GPU hosts:
    pass --host_memory_gb there)."""
    try:
        with open("/proc/meminfo") as fh:
            for line in fh:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024 / GIB
    except OSError:
        pass
    raise PlanError("cannot read host memory from /proc/meminfo; pass --host_memory_gb")


def read_gpu_memory_gb() -> float:
    """Free memory of the current CUDA device in GiB (what is left after this process's CUDA context and
    other processes). A cap set with torch.cuda.set_per_process_memory_fraction is not visible here:
    pass --gpu_memory_gb explicitly in that case."""
    import torch

    if not torch.cuda.is_available():
        raise PlanError("--gpu_memory_gb auto needs a CUDA device; pass the GPU memory in GiB")
    free, _total = torch.cuda.mem_get_info()
    return free / GIB


def plan(config, *, gpu_memory_gb="auto", host_memory_gb: float | None = None, world_size: int = 1,
         num_nodes: int = 1, precision: str = "bf16", max_duration_in_seconds: float = 20.0,
         effective_batch_seconds: float | None = None, per_device_train_batch_size: float = 8,
         gradient_accumulation_steps: int = 1, attn_implementation: str = "sdpa", padded: bool = True,
         zero_stage: int | None = None, offload: str | None = None, gradient_checkpointing: bool | None = None,
         min_gpu_seconds_per_step: float = 8.0, throughput: Throughput = Throughput(),
         zero_config: dict[int, dict] | None = None, zero_init: bool = False, name: str | None = None,
         fast_forward: bool = False) -> Plan:
    """Choose the fastest configuration that fits.

    Policy: offload tiers in order none -> optimizer -> all (a higher tier is used only when nothing
    fits below it); within a tier every (ZeRO stage, checkpointing) pair gets the largest micro-batch
    of whole max-duration utterances that fits, and the one with the best estimated throughput wins
    (ties: no checkpointing, then the lower stage). Gradient accumulation keeps the effective batch
    (`effective_batch_seconds`, default: per_device_train_batch_size x max_duration x
    gradient_accumulation_steps x world_size, the seed's recipe); under offload, unless the
    effective batch was given explicitly, accumulation is raised until a step holds
    `min_gpu_seconds_per_step` of GPU work, amortizing the CPU optimizer step.
    `zero_stage` / `offload` / `gradient_checkpointing` restrict the search when given. `padded`:
    batches carry padding and an attention mask (False with --crop_to_shortest). `zero_config`:
    {stage: zero_optimization section} whose bucket sizes the buffers are computed from (default:
    DEFAULT_ZERO_CONFIG, the values of ds_configs/).
    """
    if precision not in PRECISIONS:
        raise PlanError(f"--precision must be one of {PRECISIONS} for planning, got {precision!r}")
    if world_size < 1 or num_nodes < 1 or world_size % num_nodes:
        raise PlanError(f"--world_size {world_size} must be a positive multiple of --num_nodes {num_nodes}")
    if max_duration_in_seconds <= 0:
        raise PlanError("--max_duration_in_seconds must be > 0")
    if offload is not None and offload not in OFFLOADS:
        raise PlanError(f"--offload must be one of {OFFLOADS}, got {offload!r}")
    gpu_gb = read_gpu_memory_gb() if gpu_memory_gb in (None, "auto") else float(gpu_memory_gb)
    host_gb = read_host_memory_gb() if host_memory_gb in (None, "auto") else float(host_memory_gb)
    if gpu_gb <= 0 or host_gb <= 0:
        raise PlanError("--gpu_memory_gb and --host_memory_gb must be > 0")
    facts = model_facts(config)
    name = name or f"wav2vec2 {facts.num_layers}x{facts.hidden}"
    pinned = effective_batch_seconds is not None
    if effective_batch_seconds is None:
        effective_batch_seconds = (per_device_train_batch_size * max_duration_in_seconds
                                   * gradient_accumulation_steps * world_size)
    target_utts = max(effective_batch_seconds / world_size / max_duration_in_seconds, 1.0)
    budget = gpu_gb * GIB
    host_budget = host_gb * GIB
    dur = max_duration_in_seconds

    cands = []
    for off in OFFLOADS:
        stages = {"none": (0, 1, 2, 3), "optimizer": (1, 2, 3), "all": (3,)}[off]
        for st in stages:
            for ck in (False, True):
                c = _Candidate(st, off, ck)
                if zero_stage is not None and st != zero_stage:
                    continue
                if offload is not None and off != offload:
                    continue
                if gradient_checkpointing is not None and ck != gradient_checkpointing:
                    continue
                cands.append(c)
    if not cands:
        raise PlanError(f"no configuration matches --zero_stage {zero_stage} --offload {offload}")

    act1 = {ck: activation_bytes(facts, dur, batch=1, precision=precision, checkpointing=ck,
                                 attn_implementation=attn_implementation, padded=padded, fast_forward=fast_forward)
            for ck in (False, True)}
    fits, needs = [], []
    for c in cands:
        zc = (zero_config or {}).get(c.stage)
        states = model_state_bytes(facts, stage=c.stage, offload=c.offload, precision=precision,
                                   world_size=world_size, num_nodes=num_nodes, zero_config=zc, zero_init=zero_init)

        def mem(n, c=c, states=states):
            a = activation_bytes(facts, dur, batch=n, precision=precision, checkpointing=c.checkpointing,
                                 attn_implementation=attn_implementation, padded=padded, fast_forward=fast_forward)
            return _gpu_total(states, a)

        one = mem(1)
        needs.append((c, one.total, states.host))
        if states.host > host_budget or one.total > budget:
            continue
        # largest n with mem(n) <= budget (memory is affine in n)
        per_utt = act1[c.checkpointing].peak - act1[c.checkpointing].constant
        n_max = 1 + int((budget - one.total) / (per_utt * (1 + MARGIN_FRACTION)))
        while n_max > 1 and mem(n_max).total > budget:
            n_max -= 1
        while mem(n_max + 1).total <= budget and n_max < 100_000:
            n_max += 1
        amortize = c.offload != "none" and not pinned
        if amortize:
            n = n_max
            accum = max(1, math.ceil(target_utts / n - 1e-9))
        else:
            n, accum = _split_batch(target_utts, n_max)
        est = estimate_step(facts, stage=c.stage, offload=c.offload, checkpointing=c.checkpointing,
                            precision=precision, micro_utts=n, seconds=dur, accum=accum,
                            world_size=world_size, num_nodes=num_nodes, tp=throughput)
        if amortize and accum * est.micro_seconds < min_gpu_seconds_per_step:
            accum = max(accum, math.ceil(min_gpu_seconds_per_step / est.micro_seconds - 1e-9))
            est = estimate_step(facts, stage=c.stage, offload=c.offload, checkpointing=c.checkpointing,
                                precision=precision, micro_utts=n, seconds=dur, accum=accum,
                                world_size=world_size, num_nodes=num_nodes, tp=throughput)
        fits.append((c, n, n_max, accum, est, mem(n), states, zc))

    if not fits:
        raise PlanError(_refusal(name, facts, needs, gpu_gb, host_gb, world_size, dur, precision))

    tier = min(OFFLOADS.index(f[0].offload) for f in fits)
    in_tier = [f for f in fits if OFFLOADS.index(f[0].offload) == tier]
    best_aps = max(f[4].audio_per_second for f in in_tier)
    # among plans within 1% of the best estimate, prefer no checkpointing, then the lower stage
    chosen = min((f for f in in_tier if f[4].audio_per_second >= 0.99 * best_aps), key=lambda f: f[0].order)
    c, n, n_max, accum, est, gpu, states, zc = chosen

    others = sorted((f for f in fits if f is not chosen),
                    key=lambda f: (OFFLOADS.index(f[0].offload) != tier, -f[4].audio_per_second))
    alternatives = [dict(label=f[0].label, zero_stage=f[0].stage, offload=f[0].offload,
                         gradient_checkpointing=f[0].checkpointing, micro_batch_size=f[1],
                         gradient_accumulation_steps=f[3], est_gib=round(f[5].total / GIB, 2),
                         est_audio_seconds_per_second=round(f[4].audio_per_second, 1)) for f in others]
    reason = _reason(c, n, n_max, accum, est, fits, tier, pinned, target_utts, dur, world_size,
                     min_gpu_seconds_per_step, gpu_gb)
    zc_used = {**DEFAULT_ZERO_CONFIG.get(c.stage, {}), **(zc or {})}
    return Plan(
        model=name, total_params=facts.total_params, world_size=world_size, precision=precision,
        zero_stage=c.stage, offload=c.offload, gradient_checkpointing=c.checkpointing, micro_batch_size=n,
        micro_batch_seconds=n * dur, gradient_accumulation_steps=accum,
        effective_batch_seconds=n * dur * accum * world_size, target_effective_batch_seconds=effective_batch_seconds,
        max_duration_in_seconds=dur, gpu_memory_gb=gpu_gb, host_memory_gb=host_gb, gpu=gpu,
        host_bytes=states.host, est_step_seconds=est.step_seconds, est_audio_seconds_per_second=est.audio_per_second,
        reason=reason, zero_config=zc_used, alternatives=alternatives)


def _split_batch(target_utts: float, n_max: int) -> tuple[int, int]:
    """(micro-batch, accumulation) covering `target_utts` per GPU: the micro-batch stays within 75% of
    the largest that fits; among those, the smallest overshoot of the target, then the larger micro-batch."""
    n_cap = min(n_max, max(1, math.ceil(target_utts - 1e-9)))
    best = None
    for n in range(n_cap, max(1, math.ceil(0.75 * n_cap)) - 1, -1):
        accum = max(1, math.ceil(target_utts / n - 1e-9))
        m = max(1, math.ceil(target_utts / accum - 1e-9))  # same accumulation, smallest micro-batch
        key = (m * accum - target_utts, -m)
        if best is None or key < best[0]:
            best = (key, m, accum)
    return best[1], best[2]


def _reason(c, n, n_max, accum, est, fits, tier, pinned, target_utts, dur, world, min_gpu_s, gpu_gb) -> str:
    parts = []
    if tier == 0:
        parts.append("model states fit the GPU without offload")
    else:
        lower = OFFLOADS[tier - 1]
        parts.append(f"nothing fits {gpu_gb:g} GiB with {OFFLOAD_NAMES[lower]} (not even 1 x {dur:g} s), "
                     f"so {OFFLOAD_NAMES[c.offload]}")
    parts.append(f"{c.label} gives the best estimated throughput in this tier"
                 + (f" with up to {n_max} x {dur:g} s per micro-batch" if n_max > 1 else " with 1 utterance per micro-batch"))
    if c.checkpointing:
        nock = [f for f in fits if f[0].offload == c.offload and f[0].stage == c.stage and not f[0].checkpointing]
        if nock:
            parts.append(f"without checkpointing only {nock[0][2]} x {dur:g} s would fit, which is slower per audio-s")
        else:
            parts.append("without checkpointing not even one utterance fits")
    if c.offload != "none" and not pinned:
        parts.append(f"accumulation {accum} so that a step holds ~{accum * est.micro_seconds:.1f} s of GPU work "
                     f"(>= {min_gpu_s:g} s) to amortize the CPU optimizer step (effective batch raised to "
                     f"{n * dur * accum * world:g} s; pass --effective_batch_seconds to pin it)")
    else:
        parts.append(f"accumulation {accum} keeps the effective batch at >= {target_utts * dur * world:g} audio-s")
    return "; ".join(parts) + "."


def _refusal(name, facts, needs, gpu_gb, host_gb, world, dur, precision) -> str:
    lines = [f"{name} ({facts.total_params / 1e6:.0f}M params, {precision}, {world} GPU(s)) does not fit "
             f"--gpu_memory_gb {gpu_gb:g} with host memory {host_gb:.1f} GiB (--host_memory_gb), "
             f"even at 1 x {dur:g} s per micro-batch. Smallest needs:"]
    for off in OFFLOADS:
        opts = [(g, h, c) for c, g, h in needs if c.offload == off]
        if not opts:
            continue
        g, h, c = min(opts, key=lambda x: (x[0], x[1]))
        lines.append(f"  {OFFLOAD_NAMES[off]}: {c.label} needs >= {g / GIB:.1f} GiB GPU (--gpu_memory_gb) and "
                     f">= {h / GIB:.1f} GiB host (--host_memory_gb)")
    lines.append("Options: more GPU or host memory, more GPUs (--world_size, partitions ZeRO states), "
                 "or a shorter --max_duration_in_seconds.")
    return "\n".join(lines)


def plan_from_args(args, config, world_size: int, *, precision: str | None = None, gpu_memory_gb=None,
                   host_memory_gb=None) -> Plan:
    """Plan for a pretrain.py args namespace (raises PlanError, a ValueError, when nothing fits).

    Reads when present: gpu_memory_gb ('auto' or GiB), host_memory_gb, num_nodes, precision,
    max_duration_in_seconds, the recipe whose effective batch is kept (per_device_train_batch_size, or
    max_batch_seconds, x gradient_accumulation_steps x world_size) unless effective_batch_seconds is
    given, attn_implementation, fast_forward (engine/fastpath.py's activation memory unless --no-fast_forward
    or an unsupported config), crop_to_shortest (no padding), zero_stage / offload / a --deepspeed
    config file as constraints (None = free), and the bucket sizes of ds_configs/ (or of that file).
    `precision`: the resolved one (ds_config.resolve_precision); otherwise args.precision, where
    'auto' means bf16 (fp16 on a CUDA device without bf16): planning is for GPUs."""
    get = lambda k, d=None: getattr(args, k, d) if getattr(args, k, None) is not None else d  # noqa: E731
    precision = precision or get("precision", "auto")
    if precision == "auto":
        precision = "bf16"
        try:
            import torch
            if torch.cuda.is_available() and not torch.cuda.is_bf16_supported():
                precision = "fp16"
        except Exception:
            pass
    dur = float(get("max_duration_in_seconds", 20.0))
    accum = get("gradient_accumulation_steps", 1)
    if get("max_batch_seconds") is not None:  # budget batching: the recipe in padded seconds
        recipe_utts = get("max_batch_seconds") / dur
    else:
        recipe_utts = get("per_device_train_batch_size", 8)
    zero_stage, offload = get("zero_stage"), get("offload")
    zero_config = _repo_zero_configs()
    ds_file = _deepspeed_file(args)
    if ds_file is not None:
        from engine.ds_config import load_config_file, offload_of

        cfg = load_config_file(ds_file)
        zero_stage = cfg.get("zero_optimization", {}).get("stage", 0)
        offload = offload_of(cfg)
        zero_config[zero_stage] = _numeric(cfg.get("zero_optimization", {}))
    return plan(
        config,
        gpu_memory_gb=gpu_memory_gb if gpu_memory_gb is not None else get("gpu_memory_gb", "auto"),
        host_memory_gb=host_memory_gb if host_memory_gb is not None else get("host_memory_gb"),
        world_size=world_size, num_nodes=get("num_nodes", 1), precision=precision,
        max_duration_in_seconds=dur, effective_batch_seconds=get("effective_batch_seconds"),
        per_device_train_batch_size=recipe_utts, gradient_accumulation_steps=accum,
        attn_implementation=get("attn_implementation", "sdpa") or "sdpa",
        padded=not get("crop_to_shortest", False),
        zero_stage=zero_stage, offload=None if offload in (None, "auto") else offload,
        zero_config=zero_config, name=get("model_name_or_path") or get("config_name"),
        fast_forward=runs_fast_forward(getattr(args, "fast_forward", True), config),
    )


def runs_fast_forward(requested: bool, config) -> bool:
    """Whether the step will run engine/fastpath.py (its activation memory differs from transformers'): asked
    for (--fast_forward) and the config supported (engine.step falls back to transformers' forward otherwise)."""
    if not requested:
        return False
    from engine.fastpath import unsupported_reason
    return unsupported_reason(config) is None


def _numeric(zero: dict) -> dict:
    return {k: v for k, v in zero.items() if isinstance(v, (int, float)) and not isinstance(v, bool)
            or k == "overlap_comm" and isinstance(v, bool)}


def _repo_zero_configs() -> dict:
    """zero_optimization sections of ds_configs/zero{1,2,3}.json (what pretrain.py derives configs from)."""
    out = {}
    try:
        from engine.ds_config import stage_config
    except ImportError:
        return out
    for stage in (1, 2, 3):
        try:
            out[stage] = _numeric(stage_config(stage).get("zero_optimization", {}))
        except Exception:
            pass
    return out


def _deepspeed_file(args):
    try:
        from engine.args import deepspeed_config_path
    except ImportError:
        return None
    try:
        return deepspeed_config_path(args) if hasattr(args, "deepspeed") else None
    except Exception:
        return None
