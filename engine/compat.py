"""What a checkpoint records about its run, and the refusals that compare it with the flags of a resume.

Everything here runs in `trainer.setup`, before the model is built or any device work starts.

A resume continues the run step for step only if everything that shapes the trajectory is the same:
the model config, the data (sources, filtering, order, batch), the optimizer and schedules, the
masking, the precision and the DeepSpeed partitioning. Those flags are `FIXED_FLAGS`; changing one is
refused with the list of differences. Flags that only say how long or how verbosely to train
(--max_train_steps, --logging_steps, --saving_steps, --eval_steps, --report_to, workers, ...) may change.
"""
from __future__ import annotations

import os

from engine.args import ArgError, deepspeed_config_path

FORMAT = 1
# Flags whose change breaks an exact continuation (data order and content, batch, optimizer, schedules, masking).
FIXED_FLAGS = (
    "dataset_name", "dataset_config_names", "dataset_split_names", "dataset_data_files", "train_dir",
    "train_manifest", "audio_column_name", "validation_split_percentage", "min_duration_in_seconds",
    "max_duration_in_seconds", "crop_long_audio", "max_batch_seconds", "pad_to_multiple_of",
    "per_device_train_batch_size", "gradient_accumulation_steps", "seed",
    "learning_rate", "weight_decay", "adam_beta1", "adam_beta2", "adam_epsilon", "max_grad_norm",
    "lr_scheduler_type", "num_warmup_steps",
    "max_gumbel_temperature", "min_gumbel_temperature", "gumbel_temperature_decay",
    "mask_time_prob", "mask_time_length", "mask_time_min_masks", "num_negatives",
)
# Model config keys that do not change the model's function.
_CONFIG_IGNORED = {"transformers_version", "architectures", "_name_or_path", "torch_dtype", "dtype",
                   "_attn_implementation", "_attn_implementation_autoset", "use_cache", "return_dict",
                   "output_hidden_states", "output_attentions", "gradient_checkpointing"}
HOW_TO_CONVERT = ("to continue with other settings, export the checkpoint (python -m engine.export {ckpt} DIR) "
                  "and start a new run with --model_name_or_path DIR --init_from DIR (weights carried over; "
                  "optimizer state, lr schedule and gumbel temperature start afresh)")


def jsonable(value):
    if isinstance(value, (int, float, str, bool, type(None))):
        return value
    if isinstance(value, (list, tuple)):
        return [jsonable(v) for v in value]
    return str(value)


def model_config_dict(config) -> dict:
    return {k: jsonable(v) for k, v in config.to_dict().items() if k not in _CONFIG_IGNORED}


def run_meta(args, config, *, world_size: int, zero_stage: int, precision: str, offload: str,
             param_groups: list[list[str]] | None = None) -> dict:
    """The description of a run stored with each of its checkpoints (w2v_checkpoint.json)."""
    from engine import __version__
    return {
        "format": FORMAT, "engine_version": __version__,
        "world_size": world_size, "zero_stage": zero_stage, "precision": precision, "offload": offload,
        "model_config": model_config_dict(config),
        "flags": {k: jsonable(v) for k, v in vars(args).items() if k != "hub_token"},
        "param_groups": param_groups,
    }


def _fmt(v) -> str:
    return repr(v)


def check_resume(saved: dict, now: dict, ckpt_path: str) -> list[str]:
    """Refuse (ArgError) a resume whose flags cannot continue `saved`'s run; returns notes to print."""
    how = HOW_TO_CONVERT.format(ckpt=ckpt_path)
    if saved.get("format") != FORMAT:
        raise ArgError(f"--resume {ckpt_path}: checkpoint format {saved.get('format')!r}, this engine reads {FORMAT}")
    problems, notes = [], []
    cfg_old, cfg_new = saved["model_config"], now["model_config"]
    diff = sorted(k for k in set(cfg_old) | set(cfg_new) if cfg_old.get(k) != cfg_new.get(k))
    if diff:
        shown = ", ".join(f"{k} {_fmt(cfg_old.get(k))} -> {_fmt(cfg_new.get(k))}" for k in diff[:8])
        problems.append(f"model config (--model_name_or_path/--config_name): {shown}"
                        + (f" and {len(diff) - 8} more" if len(diff) > 8 else ""))
    if saved["zero_stage"] != now["zero_stage"]:
        problems.append(f"ZeRO stage (--zero_stage/--deepspeed): {saved['zero_stage']} -> {now['zero_stage']}; "
                        "DeepSpeed checkpoints of different stages are laid out differently")
    if saved["offload"] != now["offload"]:
        problems.append(f"--offload: {_fmt(saved['offload'])} -> {_fmt(now['offload'])}")
    if saved["precision"] != now["precision"]:
        problems.append(f"--precision: {_fmt(saved['precision'])} -> {_fmt(now['precision'])}")
    if saved["world_size"] != now["world_size"]:
        if now["zero_stage"] > 0:
            problems.append(f"world size: {saved['world_size']} -> {now['world_size']} ranks; ZeRO-{now['zero_stage']} "
                            f"optimizer states are partitioned over the ranks that saved them: launch "
                            f"{saved['world_size']} ranks (deepspeed --num_gpus {saved['world_size']} ...)")
        else:
            notes.append(f"world size {saved['world_size']} -> {now['world_size']}: ZeRO 0 loads, but the global "
                         "batch, the data order and the per-rank random streams change: the run will not "
                         "reproduce an uninterrupted one")
    old_flags, new_flags = saved["flags"], now["flags"]
    for name in FIXED_FLAGS:
        if name in old_flags and name in new_flags and old_flags[name] != new_flags[name]:
            problems.append(f"--{name}: {_fmt(old_flags[name])} -> {_fmt(new_flags[name])}")
    if problems:
        raise ArgError(f"--resume {ckpt_path}: these flags differ from the run that wrote the checkpoint, "
                       "so it cannot continue exactly:\n  - " + "\n  - ".join(problems) +
                       "\nPass the same values to resume; " + how)
    for name in ("max_train_steps", "num_train_epochs"):
        if old_flags.get(name) != new_flags.get(name):
            notes.append(f"--{name} {_fmt(old_flags.get(name))} -> {_fmt(new_flags.get(name))}: the run gets longer "
                         "or shorter and the lr schedule follows the new length from here on")
    return notes


def check_batch_fits(args, num_train: int, world_size: int) -> None:
    """Refuse a batch that cannot be formed: one longer than the --max_batch_seconds memory budget, or more
    utterances per optimizer step than the training set holds."""
    budget = getattr(args, "max_batch_seconds", None)
    if budget:
        if args.max_duration_in_seconds > budget:
            raise ArgError(f"--max_duration_in_seconds {args.max_duration_in_seconds:g} is longer than the batch "
                           f"budget --max_batch_seconds {budget:g}: a longest utterance alone would exceed it; "
                           "raise --max_batch_seconds or lower --max_duration_in_seconds")
        return  # batch sizes follow the budget
    micro, gas = args.per_device_train_batch_size, args.gradient_accumulation_steps
    need = micro * gas * world_size
    if need > num_train:
        raise ArgError(f"one optimizer step needs --per_device_train_batch_size {micro} x "
                       f"--gradient_accumulation_steps {gas} x {world_size} rank(s) = {need} utterances, but the "
                       f"training set has {num_train} (after --min_duration_in_seconds/--max_duration_in_seconds "
                       "and --validation_split_percentage); lower those flags or add data")


def inherit_resume_stage(args, is_main: bool = True) -> None:
    """--resume without --zero_stage or --deepspeed: keep the checkpoint's ZeRO stage. The default stage depends
    on the number of GPUs (engine.ds_config.default_zero_stage) and a checkpoint loads only into its own stage."""
    from engine import checkpoint as ckpt
    if args.resume is None or args.zero_stage is not None or deepspeed_config_path(args) is not None:
        return
    try:
        where = ckpt.find_checkpoint(args.resume, args.output_dir)
        stage = ckpt.read_meta(os.path.join(*where)).get("zero_stage") if where is not None else None
    except Exception:  # noqa: BLE001 -- resume_point reports a missing or unreadable checkpoint
        return
    if stage in (0, 1, 2, 3):
        args.zero_stage = int(stage)
        if is_main:
            print(f"--resume: ZeRO stage {stage}, as the checkpoint was written (pass --zero_stage to override)")


def resume_point(args, config, ds_cfg: dict, world_size: int, is_main: bool = True):
    """(load_dir, tag) of the checkpoint to resume from, or None; refuses flags that cannot continue it."""
    from engine import checkpoint as ckpt
    from engine.ds_config import offload_of, precision_of
    if args.resume is None:
        return None
    where = ckpt.find_checkpoint(args.resume, args.output_dir)
    if where is None:
        return None
    path = os.path.join(*where)
    notes = check_resume(ckpt.read_meta(path), run_meta(
        args, config, world_size=world_size, zero_stage=ds_cfg["zero_optimization"].get("stage", 0),
        precision=precision_of(ds_cfg), offload=offload_of(ds_cfg)), path)
    if is_main:
        for note in notes:
            print(f"--resume: note: {note}")
    return where
