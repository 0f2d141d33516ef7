"""The DeepSpeed config of a run: picked or derived from ds_configs/, reconciled with the CLI.

One rule for values that both the CLI and a config can set (micro-batch size, accumulation, train
batch size, lr, betas, eps, weight decay, gradient clipping, ZeRO stage, offload, precision):

  * the CLI flag is the source of truth;
  * a config may leave such a key out or set it to "auto": it is filled from the flag;
  * a config that sets a concrete value different from the flag's is refused, naming both;
  * exception: `--precision auto` (the default) lets a config's concrete bf16/fp16 setting decide.

The effective config is what `build_ds_config` returns; the trainer prints it and saves it as
`output_dir/ds_config.json`.
"""
from __future__ import annotations

import copy
from pathlib import Path

import hjson
import torch

from engine.args import ArgError, deepspeed_config_path

CONFIG_DIR = Path(__file__).resolve().parent.parent / "ds_configs"
_OFFLOAD_DEVICE = {"device": "cpu", "pin_memory": True}


def load_config_file(path: str | Path) -> dict:
    """A DeepSpeed config file; comments are allowed (DeepSpeed itself reads configs with hjson)."""
    try:
        with open(path) as fh:
            cfg = hjson.load(fh)
    except (OSError, hjson.HjsonDecodeError) as exc:
        raise ArgError(f"--deepspeed: cannot read config {str(path)!r}: {exc}") from exc
    return _plain(cfg)


def _plain(obj):
    """hjson returns OrderedDicts; make the config plain dicts and lists (JSON-serializable, comparable)."""
    if isinstance(obj, dict):
        return {k: _plain(v) for k, v in obj.items()}
    if isinstance(obj, list):
        return [_plain(v) for v in obj]
    return obj


def offload_of(cfg: dict) -> str:
    zero = cfg.get("zero_optimization", {})
    has = lambda key: zero.get(key, {}).get("device", "none") not in ("none", None)  # noqa: E731
    if has("offload_param"):
        return "all"
    return "optimizer" if has("offload_optimizer") else "none"


def stage_config(stage: int, offload: str = "none") -> dict:
    """ds_configs/zero<stage>.json with the offload sections that `--offload` asks for."""
    cfg = load_config_file(CONFIG_DIR / f"zero{stage}.json")
    zero = cfg.setdefault("zero_optimization", {})
    if offload in ("optimizer", "all"):
        if stage == 0:
            raise ArgError("--offload needs ZeRO: use --zero_stage 1, 2 or 3")
        zero["offload_optimizer"] = dict(_OFFLOAD_DEVICE)
    if offload == "all":
        if stage != 3:
            raise ArgError(f"--offload all (parameters too) needs --zero_stage 3, got --zero_stage {stage}")
        zero["offload_param"] = dict(_OFFLOAD_DEVICE)
    return cfg


def resolve_precision(args, device_type: str, cfg: dict | None = None) -> str:
    """bf16, fp16 or fp32 for this run; refuses what the device cannot do (fp16 on CPU)."""
    wanted = args.precision
    if wanted == "auto" and cfg is not None:
        for name in ("bf16", "fp16"):
            if cfg.get(name, {}).get("enabled") is True:
                wanted = name
    if wanted == "auto":
        wanted = "bf16" if device_type == "cuda" and torch.cuda.is_bf16_supported() else "fp32"
    if wanted == "fp16" and device_type != "cuda":
        raise ArgError("--precision fp16 (or fp16 in the --deepspeed config) needs a GPU; on CPU use bf16 or fp32")
    if wanted == "fp16" and device_type == "cuda" and torch.cuda.get_device_capability() < (5, 3):
        raise ArgError(f"--precision fp16 (or fp16 in the --deepspeed config): this GPU "
                       f"({torch.cuda.get_device_name()}, compute capability "
                       f"{'.'.join(map(str, torch.cuda.get_device_capability()))}) has no fp16 arithmetic; "
                       "use --precision fp32")
    if wanted == "bf16" and device_type == "cuda" and not torch.cuda.is_bf16_supported():
        raise ArgError("--precision bf16: this GPU does not support bf16; use --precision fp16")
    return wanted


def _fill(cfg: dict, path: tuple[str, ...], value, flag: str) -> None:
    """Set cfg[path] to the flag's value if absent or "auto"; refuse a concrete value that disagrees."""
    node = cfg
    for key in path[:-1]:
        node = node.setdefault(key, {})
    current = node.get(path[-1], "auto")
    if current == "auto" or current is None:
        node[path[-1]] = value
    elif _differs(current, value):
        raise ArgError(f"DeepSpeed config sets {'.'.join(path)}={current!r} but {flag} is {value!r}; "
                       f"remove the key (or set it to \"auto\") or pass the same value to {flag}")


def _differs(a, b) -> bool:
    if isinstance(a, (list, tuple)) and isinstance(b, (list, tuple)):
        return len(a) != len(b) or any(_differs(x, y) for x, y in zip(a, b))
    if isinstance(a, (int, float)) and isinstance(b, (int, float)) and not isinstance(a, bool):
        return abs(float(a) - float(b)) > 1e-12 * max(1.0, abs(float(b)))
    return a != b


def default_zero_stage(world_size: int, offload: str | None) -> int:
    """The stage when neither --zero_stage nor --deepspeed gives one: 2 on several ranks (optimizer states and
    gradients partitioned) or with --offload; 0 on one rank, where stages 1-3 partition nothing and only add
    bookkeeping (base on one H100: 2,932 audio-s/s with ZeRO-0 vs 2,662 with ZeRO-2, bench/RESULTS.md run 5)."""
    return 2 if world_size > 1 or offload not in (None, "none") else 0


def build_ds_config(args, world_size: int, device_type: str) -> dict:
    """The effective DeepSpeed config for these flags on `world_size` ranks of `device_type`."""
    path = deepspeed_config_path(args)
    if path is not None:
        cfg = load_config_file(path)
        stage = cfg.get("zero_optimization", {}).get("stage", 0)
        if stage not in (0, 1, 2, 3) or isinstance(stage, bool):
            raise ArgError(f"--deepspeed {path}: zero_optimization.stage={stage!r} is not a ZeRO stage; "
                           "use 0, 1, 2 or 3 (or --zero_stage N without a config file)")
        if args.zero_stage is not None and args.zero_stage != stage:
            raise ArgError(f"--zero_stage {args.zero_stage} disagrees with zero_optimization.stage={stage} "
                           f"in {path}; pass one of them")
        if args.offload is not None and args.offload != offload_of(cfg):
            raise ArgError(f"--offload {args.offload} disagrees with {path} (offload: {offload_of(cfg)}); "
                           "pass one of them")
    else:
        stage = default_zero_stage(world_size, args.offload) if args.zero_stage is None else args.zero_stage
        cfg = stage_config(stage, args.offload or "none")
    cfg = copy.deepcopy(cfg)

    gas = args.gradient_accumulation_steps
    micro = args.per_device_train_batch_size
    _fill(cfg, ("train_micro_batch_size_per_gpu",), micro, "--per_device_train_batch_size")
    _fill(cfg, ("gradient_accumulation_steps",), gas, "--gradient_accumulation_steps")
    _fill(cfg, ("train_batch_size",), micro * gas * world_size,
          "--per_device_train_batch_size x --gradient_accumulation_steps x world size")
    _fill(cfg, ("gradient_clipping",), float(args.max_grad_norm), "--max_grad_norm")

    opt = cfg.setdefault("optimizer", {"type": "AdamW", "params": {}})
    if opt.get("type", "").lower() not in ("adamw", "adam"):
        raise ArgError(f"--deepspeed: optimizer type {opt.get('type')!r} is not supported; use AdamW")
    params = opt.setdefault("params", {})
    _fill(cfg, ("optimizer", "params", "lr"), args.learning_rate, "--learning_rate")
    _fill(cfg, ("optimizer", "params", "betas"), [args.adam_beta1, args.adam_beta2], "--adam_beta1/--adam_beta2")
    _fill(cfg, ("optimizer", "params", "eps"), args.adam_epsilon, "--adam_epsilon")
    _fill(cfg, ("optimizer", "params", "weight_decay"), args.weight_decay, "--weight_decay")
    offload = offload_of(cfg)
    if device_type != "cuda" and offload == "none":
        params["torch_adam"] = True  # FusedAdam is a CUDA op; torch's AdamW on CPU
    elif device_type == "cuda" and offload == "none":
        params.pop("torch_adam", None)  # FusedAdam

    precision = resolve_precision(args, device_type, cfg)
    for name in ("bf16", "fp16"):
        section = cfg.setdefault(name, {})
        want = precision == name
        if section.get("enabled", "auto") not in ("auto", None) and bool(section["enabled"]) != want \
                and args.precision != "auto":
            raise ArgError(f"--precision {args.precision} disagrees with {name}.enabled={section['enabled']} "
                           "in the DeepSpeed config")
        section["enabled"] = want
    return cfg


def precision_of(cfg: dict) -> str:
    if cfg.get("bf16", {}).get("enabled"):
        return "bf16"
    return "fp16" if cfg.get("fp16", {}).get("enabled") else "fp32"
