"""Command line: `python -m engine.planner` (see engine/planner/__main__.py)."""
from __future__ import annotations

import argparse
import contextlib
import json
import os
import sys
from dataclasses import replace

from engine.planner.activations import calibrate
from engine.planner.common import OFFLOADS, PRECISIONS
from engine.planner.policy import PlanError, plan, runs_fast_forward
from engine.planner.result import Plan
from engine.planner.throughput import Throughput


# ----------------------------------------------------------------------------------------------
# CLI

def _load_config(name: str):
    from engine.models import load_config

    return load_config(name, flag="--model")


def build_parser() -> argparse.ArgumentParser:
    description = sys.modules[__package__].__doc__.split("\n\n")[0]  # the package docstring's first paragraph
    p = argparse.ArgumentParser(prog="python -m engine.planner", description=description,
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--model", "--model_name_or_path", dest="model", default=None,
                   help="preset name (base, large, xlsr-1b, xlsr-2b, ...) or a directory with config.json")
    p.add_argument("--gpu_memory_gb", default="auto", help="GiB the allocator may use per GPU, or 'auto'")
    p.add_argument("--host_memory_gb", type=float, default=None,
                   help="host RAM per node in GiB (default: MemAvailable of /proc/meminfo)")
    p.add_argument("--world_size", type=int, default=1)
    p.add_argument("--num_nodes", type=int, default=1)
    p.add_argument("--precision", default="bf16", choices=PRECISIONS)
    p.add_argument("--max_duration_in_seconds", type=float, default=20.0)
    p.add_argument("--per_device_train_batch_size", type=int, default=8,
                   help="with --gradient_accumulation_steps: the recipe whose effective batch is kept")
    p.add_argument("--gradient_accumulation_steps", type=int, default=1)
    p.add_argument("--effective_batch_seconds", type=float, default=None,
                   help="audio seconds per optimizer step, all GPUs (pins it; default: the recipe's)")
    p.add_argument("--attn_implementation", default="sdpa", choices=["sdpa", "eager", "flash_attention_2"])
    p.add_argument("--fast_forward", action=argparse.BooleanOptionalAction, default=True,
                   help="plan for engine/fastpath.py's forward (pretrain.py's default) or, with --no-fast_forward, "
                        "transformers' (more activation memory: the [K+1, B, T, D] negatives)")
    p.add_argument("--zero_stage", type=int, default=None, choices=[0, 1, 2, 3], help="restrict to this stage")
    p.add_argument("--offload", default=None, choices=OFFLOADS, help="restrict to this offload")
    p.add_argument("--min_gpu_seconds_per_step", type=float, default=8.0)
    p.add_argument("--gpu_tflops", type=float, default=Throughput.gpu_tflops)
    p.add_argument("--cpu_adam_params_per_s", type=float, default=Throughput.cpu_adam_params_per_s)
    p.add_argument("--pcie_gbps", type=float, default=Throughput.pcie_gbps)
    p.add_argument("--json", action="store_true", help="print the plan as JSON")
    p.add_argument("--calibrate", action="store_true", help="re-measure the activation coefficients and exit")
    return p


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    if args.calibrate:
        os.environ.setdefault("OMP_NUM_THREADS", "1")
        coeffs = calibrate()
        print("\nACTIVATION_COEFFS = " + json.dumps(coeffs, indent=4))
        return 0
    if not args.model:
        print("error: --model is required (or --calibrate)", file=sys.stderr)
        return 2
    try:
        # library chatter (DeepSpeed logs its accelerator choice on stdout at import) goes to stderr
        with contextlib.redirect_stdout(sys.stderr):
            p = _plan_cli(args)
    except (PlanError, ValueError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    print(json.dumps(p.to_dict(), indent=2, default=str) if args.json else p.table())
    return 0


def _plan_cli(args) -> Plan:
    config = _load_config(args.model)
    tp = replace(Throughput(), gpu_tflops=args.gpu_tflops, cpu_adam_params_per_s=args.cpu_adam_params_per_s,
                 pcie_gbps=args.pcie_gbps)
    return plan(config, gpu_memory_gb=args.gpu_memory_gb, host_memory_gb=args.host_memory_gb,
                world_size=args.world_size, num_nodes=args.num_nodes, precision=args.precision,
                max_duration_in_seconds=args.max_duration_in_seconds,
                effective_batch_seconds=args.effective_batch_seconds,
                per_device_train_batch_size=args.per_device_train_batch_size,
                gradient_accumulation_steps=args.gradient_accumulation_steps,
                attn_implementation=args.attn_implementation, zero_stage=args.zero_stage, offload=args.offload,
                min_gpu_seconds_per_step=args.min_gpu_seconds_per_step, throughput=tp, name=args.model,
                fast_forward=runs_fast_forward(args.fast_forward, config))
