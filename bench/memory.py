"""Memory/throughput benchmark of the planner's choice against plain ZeRO configs, under a GPU memory cap.

On the GPU machine (one H100, capped at 16 GiB like a 16 GB card):

    python bench/memory.py                                   # large, xlsr-1b, xlsr-2b x (plan, zero2, zero3)
    python bench/memory.py --models xlsr-1b --configs plan,zero2-offload --steps 2
    python bench/memory.py --json out/memory.json            # also write the rows

CPU smoke check (tiny model, a few seconds per config):

    python bench/memory.py --device cpu --tiny

Configs (per model):
  plan            the planner's choice for --cap_gb / --host_memory_gb (stage, offload, checkpointing,
                  micro-batch, accumulation)
  alt             the planner's runner-up (same offload tier first): checks the ranking
  zero2, zero3    plain ZeRO-2 / ZeRO-3 without offload at the seed's batch (--seed_batch utterances of
                  --max_duration s, --seed_accum accumulation, gradient checkpointing as in the seed's recipes)
  zero2-offload   ZeRO-2 + CPU optimizer offload at the seed's batch
  zero3-offload   ZeRO-3 + CPU param and optimizer offload at the seed's batch

Each config runs in its own subprocess (OOM or DeepSpeed leftovers cannot spill into the next one):
`torch.cuda.set_per_process_memory_fraction(cap / total)` before the model is built, DeepSpeed in
one process (RANK=0 ... MASTER_PORT set if missing), --warmup optimizer steps, then --steps timed
optimizer steps with synthetic utterances (the last one of each micro-batch 10% shorter, so the
attention gets a padding mask as in real batches). Reported: peak allocated / reserved memory, the
planner's estimate for that config, optimizer-step time, micro-step time and audio seconds per second.
"""
from __future__ import annotations

import argparse
import gc
import json
import os
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

GIB = 2 ** 30
GOALS = {"large": 700, "xlsr-1b": 150, "xlsr-2b": 50}  # issue 5, one H100 capped at 16 GiB
CONFIG_NAMES = ("plan", "alt", "zero2", "zero3", "zero2-offload", "zero3-offload")

def load_config(name: str):
    from engine.models import load_config as _load

    return _load(name, flag="--models")


def resolve_setting(args, model_name: str, which: str) -> dict:
    """stage / offload / checkpointing / micro-batch / accumulation (+ planner estimate) of one config."""
    from engine.planner import Plan, estimate_memory, plan

    config = load_config(model_name)
    dur = args.max_duration
    if which in ("plan", "alt"):
        p: Plan = plan(config, gpu_memory_gb=args.cap_gb, host_memory_gb=args.host_memory_gb, world_size=1,
                       precision=args.precision, max_duration_in_seconds=dur,
                       per_device_train_batch_size=args.seed_batch, gradient_accumulation_steps=args.seed_accum,
                       effective_batch_seconds=args.effective_batch_seconds, name=model_name,
                       fast_forward=not args.hf_forward)
        s = dict(stage=p.zero_stage, offload=p.offload, ckpt=p.gradient_checkpointing, micro=p.micro_batch_size,
                 accum=p.gradient_accumulation_steps, zero_config=p.zero_config, est_audio_per_s=p.est_audio_seconds_per_second)
        mem = p.gpu
        if which == "alt":  # the planner's runner-up (same offload tier first): checks its ranking
            if not p.alternatives:
                raise SystemExit("no alternative plan")
            a = p.alternatives[0]
            s.update(stage=a["zero_stage"], offload=a["offload"], ckpt=a["gradient_checkpointing"],
                     micro=a["micro_batch_size"], accum=a["gradient_accumulation_steps"], zero_config=None,
                     est_audio_per_s=a["est_audio_seconds_per_second"])
            mem, _host = estimate_memory(config, zero_stage=s["stage"], offload=s["offload"],
                                         gradient_checkpointing=s["ckpt"], micro_batch_size=s["micro"],
                                         max_duration_in_seconds=dur, precision=args.precision,
                                         fast_forward=not args.hf_forward)
    else:
        stage = 2 if which.startswith("zero2") else 3
        offload = "none" if not which.endswith("offload") else ("optimizer" if stage == 2 else "all")
        s = dict(stage=stage, offload=offload, ckpt=True, micro=args.seed_batch, accum=args.seed_accum,
                 zero_config=None, est_audio_per_s=None)
        mem, _host = estimate_memory(config, zero_stage=stage, offload=offload, gradient_checkpointing=True,
                                     micro_batch_size=args.seed_batch, max_duration_in_seconds=dur,
                                     precision=args.precision, fast_forward=not args.hf_forward)
    s["est_gib"] = round(mem.total / GIB, 2)
    s["est_states_gib"] = round((mem.params + mem.grads + mem.optimizer + mem.buffers) / GIB, 2)
    s["est_act_gib"] = round(mem.activations / GIB, 2)
    if args.accum is not None:
        s["accum"] = args.accum
    return s


def ds_config(setting: dict, precision: str, device: str) -> dict:
    from engine.planner import DEFAULT_ZERO_CONFIG

    zero = {"stage": setting["stage"], **DEFAULT_ZERO_CONFIG.get(setting["stage"], {}),
            **(setting.get("zero_config") or {})}
    zero["contiguous_gradients"] = setting["stage"] > 0
    if setting["offload"] in ("optimizer", "all"):
        zero["offload_optimizer"] = {"device": "cpu", "pin_memory": device == "cuda"}
    if setting["offload"] == "all":
        zero["offload_param"] = {"device": "cpu", "pin_memory": device == "cuda"}
    params = {"lr": 1e-4, "betas": [0.9, 0.98], "eps": 1e-6, "weight_decay": 0.01}
    if device != "cuda" and setting["offload"] == "none":
        params["torch_adam"] = True  # FusedAdam is CUDA-only
    cfg = {
        "train_micro_batch_size_per_gpu": setting["micro"],
        "gradient_accumulation_steps": setting["accum"],
        "gradient_clipping": 0.0,
        "optimizer": {"type": "AdamW", "params": params},
        "zero_optimization": zero,
        "steps_per_print": 10 ** 9,
        "wall_clock_breakdown": False,
    }
    if precision in ("bf16", "fp16"):
        cfg[precision] = {"enabled": True}
    return cfg


def run_one(args, model_name: str, which: str) -> dict:
    """Build, train a few steps, measure. Runs in the subprocess."""
    for k, v in (("RANK", "0"), ("LOCAL_RANK", "0"), ("WORLD_SIZE", "1"), ("MASTER_ADDR", "127.0.0.1")):
        os.environ.setdefault(k, v)
    os.environ["MASTER_PORT"] = str(args.port)  # one port per config: no clash with a lingering predecessor
    if args.device == "cuda":  # JIT-built DeepSpeed ops (cpu_adam, fused_adam) in an ignored dir kept between runs
        os.environ.setdefault("TORCH_EXTENSIONS_DIR", str(ROOT / "build" / "torch_extensions"))
    import torch

    from engine.planner import PlanError

    row = {"model": model_name, "config": which}
    try:
        setting = resolve_setting(args, model_name, which)
    except PlanError as exc:
        row["status"] = "no plan: " + str(exc).splitlines()[0][:150]
        return row
    row.update({k: setting.get(k) for k in ("stage", "offload", "ckpt", "micro", "accum", "est_gib",
                                            "est_states_gib", "est_act_gib", "est_audio_per_s")})
    cuda = args.device == "cuda"
    if cuda:
        from engine.trainer import configure_allocator
        configure_allocator()
        total = torch.cuda.get_device_properties(0).total_memory
        torch.cuda.set_per_process_memory_fraction(min(1.0, args.cap_gb * GIB / total))
        row["gpu"] = torch.cuda.get_device_name(0)
    step_times, micro_times = [], []
    audio_per_step = None
    try:
        audio_per_step = _train(args, model_name, setting, row, step_times, micro_times)
        row.setdefault("status", "ok")
    except torch.OutOfMemoryError:
        row["status"] = "OOM"
    except RuntimeError as exc:  # NCCL/cuBLAS allocation failures surface as RuntimeError
        msg = str(exc)
        row["status"] = "OOM" if "out of memory" in msg.lower() else f"error: {msg.splitlines()[0][:160] if msg else exc!r}"
    if cuda:
        row["peak_alloc_gib"] = round(torch.cuda.max_memory_allocated() / GIB, 2)
        row["peak_reserved_gib"] = round(torch.cuda.max_memory_reserved() / GIB, 2)
    if step_times:
        st = sorted(step_times)[len(step_times) // 2]
        row["step_s"] = round(st, 3)
        # micro-steps except the boundary one (whose time includes the optimizer step)
        inner = [t for i, t in enumerate(micro_times) if (i + 1) % setting["accum"]] or micro_times
        row["micro_s"] = round(sorted(inner)[len(inner) // 2], 3)
        row["audio_per_s"] = round(audio_per_step / st, 1)
    gc.collect()
    return row


def _train(args, model_name, setting, row, step_times, micro_times) -> float:
    import torch
    import deepspeed
    import transformers
    from engine.models import build_model  # Wav2Vec2ForPreTraining with the perplexity fix
    from engine.step import MaskingSpec, PretrainStep

    cuda = args.device == "cuda"
    transformers.logging.set_verbosity_error()
    torch.manual_seed(0)
    config = load_config(model_name)
    model = build_model(config, gradient_checkpointing=setting["ckpt"], attn_implementation=args.attn)
    t0 = time.perf_counter()
    from engine import ds_patches
    ds_patches.apply()
    engine, *_ = deepspeed.initialize(model=model, model_parameters=[p for p in model.parameters() if p.requires_grad],
                                      config=ds_config(setting, args.precision, args.device))
    row["init_s"] = round(time.perf_counter() - t0, 1)
    if cuda:
        row["after_init_gib"] = round(torch.cuda.memory_allocated() / GIB, 2)
        torch.cuda.reset_peak_memory_stats()
    device = engine.device
    samples = int(args.max_duration * 16000)
    B = setting["micro"]
    lengths = [samples] * B
    if B > 1:
        lengths[-1] = int(samples * 0.9)
    engine.module.set_gumbel_temperature(2.0)
    # The engine's own step (engine/step.py): masking on the device, and the fast forward unless --hf_forward.
    step_fn = PretrainStep(engine.module, MaskingSpec(0.65, 10, 2, config.num_negatives, fast_forward=not args.hf_forward),
                           device, generator=torch.Generator(device=device).manual_seed(0))

    def micro_batch():
        x = torch.randn(B, samples, dtype=torch.float32)
        att = torch.zeros(B, samples, dtype=torch.long)
        for i, n in enumerate(lengths):
            att[i, :n] = 1
            x[i, n:] = 0
        return step_fn.prepare({"input_values": x, "attention_mask": att, "ids": [str(i) for i in range(B)]})

    def sync():
        if cuda:
            torch.cuda.synchronize()

    for step in range(args.warmup + args.steps):
        sync()
        t_step = time.perf_counter()
        for _ in range(setting["accum"]):
            inputs = micro_batch()
            sync()
            t_micro = time.perf_counter()
            loss, _ = step_fn.forward(engine, inputs)
            engine.backward(loss)
            engine.step()
            sync()
            if step >= args.warmup:
                micro_times.append(time.perf_counter() - t_micro)
        if step >= args.warmup:
            step_times.append(time.perf_counter() - t_step)
        if not torch.isfinite(loss.detach()).item():
            row["status"] = "nan loss"
    return sum(lengths) / 16000 * setting["accum"]


def fmt_table(rows: list[dict]) -> str:
    cols = [("model", "model"), ("config", "config"), ("stage", "ZeRO"), ("offload", "offload"), ("ckpt", "ckpt"),
            ("micro", "micro"), ("accum", "accum"), ("est_states_gib", "est states"), ("after_init_gib", "init alloc"),
            ("est_act_gib", "est act"), ("est_gib", "est total"), ("peak_alloc_gib", "peak alloc"),
            ("peak_reserved_gib", "peak rsvd"), ("step_s", "step s"), ("micro_s", "micro s"),
            ("audio_per_s", "audio-s/s"), ("est_audio_per_s", "est a-s/s"), ("status", "status")]

    def cell(r, k):
        v = r.get(k)
        if v is None:
            return "-"
        if isinstance(v, float):
            return f"{v:.2f}" if k.endswith("gib") or k.endswith("_s") else f"{v:.0f}"
        return str(v)

    table = [[h for _, h in cols]] + [[cell(r, k) for k, _ in cols] for r in rows]
    widths = [max(len(row[i]) for row in table) for i in range(len(cols))]
    lines = ["  ".join(c.ljust(w) for c, w in zip(row, widths)) for row in table]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--models", default="large,xlsr-1b,xlsr-2b")
    p.add_argument("--configs", default="plan,zero2,zero3", help=f"comma list of {', '.join(CONFIG_NAMES)}")
    p.add_argument("--device", default="cuda", choices=["cuda", "cpu"])
    p.add_argument("--tiny", action="store_true", help="CPU smoke check: the tiny model, 2 s utterances, 1 step")
    p.add_argument("--cap_gb", type=float, default=16.0, help="GPU memory cap (GiB) and the planner's budget")
    p.add_argument("--host_memory_gb", type=float, default=None,
                   help="planner's host budget per node; default 120 with --device cuda (the H100 machine has "
                        "128 GiB, but its /proc/meminfo can start low), else MemAvailable")
    p.add_argument("--precision", default="bf16", choices=["bf16", "fp16", "fp32"])
    p.add_argument("--attn", default="sdpa", choices=["sdpa", "eager"])
    p.add_argument("--hf_forward", action="store_true",
                   help="time transformers' forward (as runs 3-4 did) instead of the engine's fast forward")
    p.add_argument("--max_duration", type=float, default=20.0, help="seconds per utterance")
    p.add_argument("--seed_batch", type=int, default=2, help="the seed's per-device utterances (large recipe)")
    p.add_argument("--seed_accum", type=int, default=8, help="the seed's gradient accumulation (large recipe)")
    p.add_argument("--effective_batch_seconds", type=float, default=None, help="pin the planner's effective batch")
    p.add_argument("--accum", type=int, default=None, help="override accumulation of every config (shorter runs)")
    p.add_argument("--warmup", type=int, default=1, help="untimed optimizer steps")
    p.add_argument("--steps", type=int, default=2, help="timed optimizer steps")
    p.add_argument("--port", type=int, default=29500)
    p.add_argument("--timeout", type=float, default=1800, help="seconds per config")
    p.add_argument("--time_budget", type=float, default=520,
                   help="seconds for the whole run (gpu_suite.sh's memory stage allows 540): configs that would "
                        "start later are skipped, the running one is stopped at the budget")
    p.add_argument("--json", default=None, help="also write the rows here")
    p.add_argument("--inline", action="store_true", help="run configs in this process (no subprocess)")
    p.add_argument("--_one", default=None, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.tiny:
        args.models = "tiny" if args.models == p.get_default("models") else args.models
        args.max_duration = 2.0 if args.max_duration == p.get_default("max_duration") else args.max_duration
        args.warmup, args.steps = min(args.warmup, 1), min(args.steps, 1)
        args.accum = args.accum or 2
        if args.device == "cpu" and args.precision == "fp16":
            args.precision = "bf16"
    if args.device == "cpu":
        os.environ.setdefault("DS_ACCELERATOR", "cpu")
    elif args.host_memory_gb is None:
        args.host_memory_gb = 120.0
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    if args._one:
        model_name, which = args._one.split(":")
        row = run_one(args, model_name, which)
        print("BENCH_ROW " + json.dumps(row), flush=True)
        return 0
    models = [m for m in args.models.split(",") if m]
    configs = [c for c in args.configs.split(",") if c]
    bad = [c for c in configs if c not in CONFIG_NAMES]
    if bad:
        print(f"unknown --configs {bad}; choose from {CONFIG_NAMES}", file=sys.stderr)
        return 2
    rows = []
    argv = list(sys.argv[1:] if argv is None else argv)
    t_start = time.monotonic()
    # the planner's choices first for every model, then the baselines: a time budget cut loses baselines
    for i, (m, c) in enumerate((m, c) for c in configs for m in models):
        left = args.time_budget - (time.monotonic() - t_start)
        if left < 20:
            rows.append({"model": m, "config": c, "status": "skipped (--time_budget)"})
            continue
        print(f"== {m} / {c}", flush=True)
        if args.inline:
            try:
                row = run_one(args, m, c)
            except Exception as exc:  # keep going with the other configs
                row = {"model": m, "config": c, "status": f"error: {exc}"[:140]}
        else:
            cmd = [sys.executable, str(Path(__file__).resolve()), *argv, "--_one", f"{m}:{c}",
                   "--port", str(args.port + i)]
            env = dict(os.environ, PYTHONPATH=str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""))
            try:
                proc = subprocess.run(cmd, capture_output=True, text=True, timeout=min(args.timeout, left), env=env)
                found = [ln for ln in proc.stdout.splitlines() if ln.startswith("BENCH_ROW ")]
                if found:
                    row = json.loads(found[-1][len("BENCH_ROW "):])
                else:
                    tail = (proc.stderr or proc.stdout).strip().splitlines()[-3:]
                    oom = any("out of memory" in ln.lower() or "OutOfMemory" in ln for ln in tail)
                    row = {"model": m, "config": c, "status": "OOM" if oom else f"failed rc={proc.returncode}: "
                           + " | ".join(tail)[-200:]}
            except subprocess.TimeoutExpired:
                row = {"model": m, "config": c, "status": f"timeout {min(args.timeout, left):.0f}s"}
        rows.append(row)
        print(json.dumps(row), flush=True)
        print(fmt_table(rows), flush=True)  # a table survives even if an outer timeout stops the run
    print()
    print(f"device {args.device}, cap {args.cap_gb:g} GiB, planner host budget "
          f"{args.host_memory_gb if args.host_memory_gb is not None else 'MemAvailable'} GiB, "
          f"{args.precision}, {args.max_duration:g} s utterances, "
          f"{args.steps} timed step(s) after {args.warmup} warm-up")
    print(fmt_table(rows))
    print("(GiB; 'est' = engine.planner's estimate: states = params + grads + optimizer + DeepSpeed buffers, "
          "act = activation peak, total incl. margin; compare 'est total' with 'peak rsvd')")
    for m in models:
        ok = [r for r in rows if r["model"] == m and r.get("audio_per_s")]
        if m in GOALS and ok:
            best = max(ok, key=lambda r: r["audio_per_s"])
            print(f"goal {m}: >= {GOALS[m]} audio-s/s; best here {best['audio_per_s']:.0f} ({best['config']}) -> "
                  + ("met" if best["audio_per_s"] >= GOALS[m] else "NOT met"))
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps(rows, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
