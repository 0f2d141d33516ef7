"""Command-line flags: every flag of HF's run_wav2vec2_pretraining_no_trainer.py (same names, meanings,
defaults), ours, and DeepSpeed's own (`deepspeed.add_config_arguments`, `--local_rank`).

`validate_args` refuses bad combinations before any data is read or any GPU work starts; every message
names the flag.
"""
from __future__ import annotations

import argparse
import os

from transformers import SchedulerType

from engine import data as data_module
from engine.convs import CONV_IMPLS, POS_CONV_IMPLS
from engine.fastpath import ATTENTION_MODES, COMPILE_SCOPES

SCHEDULERS = ["linear", "cosine", "cosine_with_restarts", "polynomial", "constant", "constant_with_warmup"]
ZERO_STAGES = (0, 1, 2, 3)
OFFLOADS = ("none", "optimizer", "all")
PRECISIONS = ("auto", "bf16", "fp16", "fp32")


class ArgError(ValueError):
    """A bad flag or flag combination; the message names the flag."""


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="pretrain.py",
        description="Pre-train a wav2vec 2.0 model on unlabeled audio with DeepSpeed "
                    "(drop-in for HF's run_wav2vec2_pretraining_no_trainer.py).",
        conflict_handler="resolve",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    hf = p.add_argument_group("HF example flags (same names, meanings and defaults)")
    a = hf.add_argument
    a("--dataset_name", type=str, default=None,
      help="Dataset to use via the datasets library (hub name, local dataset dir or builder). "
           "Alternatively use --train_dir / --train_manifest.")
    a("--dataset_config_names", nargs="+", type=str, default=None,
      help="Configuration names of the dataset, one per split in --dataset_split_names.")
    a("--dataset_split_names", nargs="+", type=str, default=None,
      help="Training split names; config/split pairs are concatenated (and shuffled with --seed).")
    a("--preprocessing_num_workers", type=int, default=None, help="Processes for preprocessing (listing, probing).")
    a("--overwrite_cache", action="store_true", help="Rebuild the cached training and evaluation index.")
    a("--preprocessing_only", action="store_true",
      help="Only build the cached, filtered data index (run this non-distributed before a multi-GPU run).")
    a("--cache_dir", type=str, default=None, help="Where datasets and hub configs are cached.")
    a("--validation_split_percentage", type=int, default=1,
      help="Percentage of the training data held out for validation when no validation set is given.")
    a("--logging_steps", type=int, default=500, help="Optimizer steps between logged metrics.")
    a("--saving_steps", type=int, default=500, help="Optimizer steps between checkpoints.")
    a("--audio_column_name", type=str, default="audio", help="Dataset column holding the audio.")
    a("--model_name_or_path", type=str, default=None,
      help="Preset (demo, base, large, xlsr-300m, xlsr-1b, xlsr-2b), local dir with config.json, or hub id. "
           "The model is initialized at random from this config, as in the HF example.")
    a("--config_name", type=str, default=None, help="Config (preset, dir or hub id) if not the same as the model's.")
    a("--train_cache_file_name", type=str, default=None, help="File for the cached training index.")
    a("--validation_cache_file_name", type=str, default=None, help="File for the cached validation index.")
    a("--per_device_train_batch_size", type=int, default=8, help="Utterances per device per micro-batch.")
    a("--per_device_eval_batch_size", type=int, default=8, help="Utterances per device per eval batch.")
    a("--learning_rate", type=float, default=5e-5, help="Peak learning rate (after warmup).")
    a("--weight_decay", type=float, default=0.0,
      help="AdamW weight decay (applied to weights, not to biases and norm scales).")
    a("--num_train_epochs", type=int, default=3, help="Epochs to train, unless --max_train_steps is given.")
    a("--max_train_steps", type=int, default=None, help="Optimizer steps to train; overrides --num_train_epochs.")
    a("--gradient_accumulation_steps", type=int, default=1, help="Micro-batches per optimizer step.")
    a("--gradient_checkpointing", action="store_true", help="Recompute activations in backward to save memory.")
    a("--lr_scheduler_type", type=SchedulerType, default="linear", choices=[SchedulerType(s) for s in SCHEDULERS],
      help="Learning-rate schedule (transformers' get_scheduler).")
    a("--num_warmup_steps", type=int, default=0, help="Warmup steps of the lr schedule.")
    a("--output_dir", type=str, default=None, help="Where checkpoints, logs and the final model go (required).")
    a("--seed", type=int, default=0, help="Seed for model init, data order and masking.")
    a("--max_gumbel_temperature", type=float, default=2.0, help="Gumbel softmax temperature at step 0.")
    a("--min_gumbel_temperature", type=float, default=0.5, help="Floor of the gumbel temperature.")
    a("--gumbel_temperature_decay", type=float, default=0.999995, help="Temperature multiplier per optimizer step.")
    a("--max_duration_in_seconds", type=float, default=5.0, help="Drop utterances longer than this.")
    a("--min_duration_in_seconds", type=float, default=3.0, help="Drop utterances shorter than this.")
    a("--pad_to_multiple_of", type=int, default=None, help="Pad each batch's length to a multiple of this (samples).")
    a("--adam_beta1", type=float, default=0.9, help="AdamW beta1.")
    a("--adam_beta2", type=float, default=0.999, help="AdamW beta2.")
    a("--adam_epsilon", type=float, default=1e-8, help="AdamW epsilon.")
    a("--push_to_hub", action="store_true", help="Push the final model to the hub (checked before training).")
    a("--hub_model_id", type=str, default=None, help="Hub repo to push to (default: output_dir's name).")
    a("--hub_token", type=str, default=None, help="Hub token for --push_to_hub.")
    a("--mask_time_prob", type=float, default=None,
      help="Fraction of frames that start a masked span (before overlap); default: the model config's.")
    a("--mask_time_length", type=int, default=None, help="Masked span length in frames; default: the config's.")

    ours = p.add_argument_group("engine flags")
    o = ours.add_argument
    o("--mask_time_min_masks", type=int, default=0,
      help="Minimum masked spans per utterance (the HF example uses 0).")
    o("--num_negatives", type=int, default=None, help="Distractors per masked frame; default: the config's (100).")
    o("--report_to", type=str, default="none", choices=["none", "wandb"],
      help="Also log to this tracker (metrics always go to output_dir/metrics.jsonl).")
    o("--wandb_project", type=str, default=None,
      help="wandb project for --report_to wandb (default: output_dir's name). WANDB_MODE=offline works; "
           "a wandb that cannot start (no login, no network) is reported and the run goes on without it.")
    o("--wandb_run_name", type=str, default=None, help="wandb run name for --report_to wandb (default: wandb's).")
    o("--nan_guard_window", type=int, default=100,
      help="Window (optimizer steps) in which skipped non-finite updates are counted for --max_nonfinite_steps.")
    o("--max_nonfinite_steps", type=int, default=5,
      help="Stop the run when this many updates were skipped for a NaN/inf loss or gradient within "
           "--nan_guard_window steps (0 = never stop; such updates are always skipped and logged).")
    o("--min_codevector_perplexity", type=float, default=None,
      help="Codebook-collapse alarm: warn when the logged codevector perplexity falls under this "
           "(default: 2%% of the codebook, at least 2 codes per group; 0 = no alarm).")
    o("--stop_on_collapse", action="store_true",
      help="Stop the run (instead of warning) when the codebook-collapse alarm fires.")
    o("--peak_tflops", type=float, default=None,
      help="Peak dense TFLOP/s of one device for the MFU figure (default: known for H100/H200/A100 "
           "per precision; MFU is null on CPU and unknown GPUs).")
    o("--resume", nargs="?", const="latest", default=None, metavar="CHECKPOINT",
      help="Resume from output_dir's latest complete checkpoint, or from CHECKPOINT (a checkpoints/step_N "
           "directory, a checkpoints folder or another run's output_dir). Flags that shape the run must match "
           "the checkpoint's (refused otherwise, with the list of differences).")
    o("--init_from", type=str, default=None, metavar="DIR",
      help="Start a new run from the weights of an exported model (python -m engine.export), e.g. to change "
           "the ZeRO stage, world size or precision of a run; optimizer state and schedules start afresh.")
    o("--zero_stage", type=int, default=None, choices=ZERO_STAGES,
      help="ZeRO stage; picks ds_configs/zero<N>.json. Default (without --deepspeed FILE): 0 on one GPU/process "
           "(stages 1-3 partition nothing there), 2 on several or with --offload.")
    o("--offload", type=str, default=None, choices=OFFLOADS,
      help="CPU offload: optimizer states (ZeRO 1-3) or optimizer states and parameters (ZeRO 3).")
    o("--precision", type=str, default="auto", choices=PRECISIONS,
      help="auto = bf16 on GPUs that support it, else fp32. fp16 needs a GPU.")
    o("--max_grad_norm", type=float, default=0.0,
      help="Clip the global gradient norm to this (0 = no clipping, as in the HF example).")
    o("--eval_steps", type=int, default=None,
      help="Optimizer steps between evaluations (default: at the end of each epoch, as the HF example).")
    o("--keep_last_checkpoints", type=int, default=2, help="DeepSpeed checkpoints kept in output_dir/checkpoints (0 = all).")
    o("--attn_implementation", type=str, default=None, choices=["eager", "sdpa"],
      help="Attention kernel of the transformers model (default: transformers' choice).")
    o("--fast_forward", action=argparse.BooleanOptionalAction, default=True,
      help="Our sync-free pre-training forward (engine/fastpath.py: same losses and gradients as transformers', "
           "on the same modules and parameters); --no-fast_forward runs transformers' forward.")
    o("--fast_attention", type=str, default="sdpa", choices=ATTENTION_MODES,
      help="Attention of the fast forward: sdpa (torch's choice: without padding a mask-free flash or cuDNN kernel, cuDNN on an H100 with torch 2.11; else a key-padding mask), "
           "sdpa-flash / sdpa-cudnn (flash / cuDNN attention first), eager, or varlen (padded batches packed to their real frames; "
           "flash varlen, torch>=2.10 on CUDA; needs attention_dropout 0 to apply in training).")
    o("--conv_impl", type=str, default="cudnn-cl", choices=CONV_IMPLS,
      help="Feature encoder convolutions of the fast forward, all the same function: cudnn-cl (cuDNN on "
           "channels-last activations), gemm (one matrix multiplication per layer, channels-last; "
           "engine/convs.py) or cudnn (transformers' Conv1d modules).")
    o("--pos_conv_impl", type=str, default="fft", choices=POS_CONV_IMPLS,
      help="Positional convolution (kernel 128, 16 groups) of the fast forward: fft (fp32, through the "
           "frequency domain, engine/convs.py) or cudnn (transformers' grouped Conv1d). Same function.")
    o("--torch_compile", nargs="?", const="layers", default="none", choices=COMPILE_SCOPES,
      help="torch.compile the fast forward: 'layers' (the conv encoder and one graph shared by all transformer "
           "layers; the default when the flag is bare) or 'full' (the whole forward). Not under ZeRO-3.")
    data_module.add_data_args(p)

    mem = p.add_argument_group("memory planner (engine/planner/)")
    mem.add_argument("--gpu_memory_gb", type=str, default=None, metavar="GB|auto",
                     help="Plan ZeRO stage, offload, micro-batch, checkpointing and accumulation to fit this much "
                          "GPU memory per device ('auto' reads the card), keeping the effective batch; printed "
                          "as a table before training. Flags you pass (--zero_stage, --offload) are kept.")
    mem.add_argument("--host_memory_gb", type=float, default=None,
                     help="Host RAM the planner may use for offload (default: MemAvailable).")
    mem.add_argument("--effective_batch_seconds", type=float, default=None,
                     help="Audio seconds per optimizer step the planner keeps (default: the recipe's "
                          "batch x max duration x accumulation x world size).")
    mem.add_argument("--plan_only", action="store_true",
                     help="Print the memory plan and exit (needs --gpu_memory_gb without a GPU).")

    ds = p.add_argument_group("DeepSpeed flags")
    import deepspeed  # heavy import; keep it out of module import time
    deepspeed.add_config_arguments(p)
    # DeepSpeed's --deepspeed is a bare switch; we also accept a config path after it (`--deepspeed cfg.json`).
    ds.add_argument("--deepspeed", nargs="?", const=True, default=False, metavar="CONFIG",
                    help="Use DeepSpeed with this config file (or bare, with --deepspeed_config).")
    ds.add_argument("--local_rank", type=int, default=int(os.environ.get("LOCAL_RANK", -1)),
                    help="Set by the deepspeed launcher.")
    return p


def deepspeed_config_path(args) -> str | None:
    """The config file the user named, through `--deepspeed FILE` or `--deepspeed_config FILE`."""
    if isinstance(args.deepspeed, str):
        return args.deepspeed
    return getattr(args, "deepspeed_config", None)


def validate_args(args) -> None:
    """Refuse what cannot work, before any data is read or any device work starts."""
    if args.model_name_or_path is None and args.config_name is None:
        raise ArgError("--model_name_or_path is required (a preset such as 'base', a model dir or a hub id)")
    if not (args.preprocessing_only or args.plan_only) and not args.output_dir:
        raise ArgError("--output_dir is required: checkpoints, metrics and the final model are written there")
    if not args.plan_only and not (args.dataset_name or getattr(args, "train_dir", None)
                                   or getattr(args, "train_manifest", None)):
        raise ArgError("missing dataset: pass --dataset_name, --train_dir or --train_manifest")
    if args.dataset_name and args.dataset_config_names and args.dataset_split_names \
            and len(args.dataset_config_names) != len(args.dataset_split_names):
        raise ArgError(f"--dataset_config_names has {len(args.dataset_config_names)} names but "
                       f"--dataset_split_names has {len(args.dataset_split_names)}; they are paired one to one")
    positive = ["per_device_train_batch_size", "per_device_eval_batch_size", "gradient_accumulation_steps",
                "logging_steps", "saving_steps", "num_train_epochs"]
    for name in positive:
        if getattr(args, name) is not None and getattr(args, name) < 1:
            raise ArgError(f"--{name} must be >= 1, got {getattr(args, name)}")
    if args.nan_guard_window < 1:
        raise ArgError(f"--nan_guard_window must be >= 1, got {args.nan_guard_window}")
    if args.max_nonfinite_steps < 0:
        raise ArgError(f"--max_nonfinite_steps must be >= 0 (0 = never stop), got {args.max_nonfinite_steps}")
    if args.max_nonfinite_steps > args.nan_guard_window:
        raise ArgError(f"--max_nonfinite_steps {args.max_nonfinite_steps} can never be reached within "
                       f"--nan_guard_window {args.nan_guard_window}; lower it or widen the window")
    if args.min_codevector_perplexity is not None and args.min_codevector_perplexity < 0:
        raise ArgError(f"--min_codevector_perplexity must be >= 0, got {args.min_codevector_perplexity}")
    if args.peak_tflops is not None and args.peak_tflops <= 0:
        raise ArgError(f"--peak_tflops must be > 0, got {args.peak_tflops}")
    if args.stop_on_collapse and args.min_codevector_perplexity == 0:
        raise ArgError("--stop_on_collapse needs the alarm: --min_codevector_perplexity 0 switches it off")
    if args.max_train_steps is not None and args.max_train_steps < 1:
        raise ArgError(f"--max_train_steps must be >= 1, got {args.max_train_steps}")
    if args.learning_rate <= 0:
        raise ArgError(f"--learning_rate must be > 0, got {args.learning_rate}")
    if args.min_duration_in_seconds > args.max_duration_in_seconds:
        raise ArgError(f"--min_duration_in_seconds ({args.min_duration_in_seconds}) is larger than "
                       f"--max_duration_in_seconds ({args.max_duration_in_seconds})")
    if args.mask_time_prob is not None and not 0.0 <= args.mask_time_prob <= 1.0:
        raise ArgError(f"--mask_time_prob must be in [0, 1], got {args.mask_time_prob}")
    if args.mask_time_length is not None and args.mask_time_length < 1:
        raise ArgError(f"--mask_time_length must be >= 1, got {args.mask_time_length}")
    if args.num_negatives is not None and args.num_negatives < 1:
        raise ArgError(f"--num_negatives must be >= 1, got {args.num_negatives}")
    if not 0 < args.min_gumbel_temperature <= args.max_gumbel_temperature:
        raise ArgError("--min_gumbel_temperature must be > 0 and <= --max_gumbel_temperature")
    if args.offload not in (None, "none") and args.zero_stage == 0:
        raise ArgError(f"--offload {args.offload} needs ZeRO: use --zero_stage 1, 2 or 3 (stage 0 cannot offload)")
    if args.offload == "all" and args.zero_stage not in (None, 3):
        raise ArgError(f"--offload all (parameters too) needs --zero_stage 3, got --zero_stage {args.zero_stage}")
    cfg = deepspeed_config_path(args)
    if cfg is not None and not os.path.isfile(cfg):
        raise ArgError(f"--deepspeed: config file {cfg!r} does not exist")
    if args.push_to_hub and not args.output_dir:
        raise ArgError("--push_to_hub needs --output_dir")
    if args.resume not in (None, "latest") and not os.path.isdir(args.resume):
        raise ArgError(f"--resume: {args.resume!r} is not a checkpoint directory")
    if args.gpu_memory_gb not in (None, "auto"):
        try:
            if float(args.gpu_memory_gb) <= 0:
                raise ValueError
        except ValueError:
            raise ArgError(f"--gpu_memory_gb must be a positive number of GiB or 'auto', got {args.gpu_memory_gb!r}")
    if args.init_from is not None and not os.path.isfile(os.path.join(args.init_from, "config.json")):
        raise ArgError(f"--init_from {args.init_from!r} is not a model directory (no config.json); "
                       "export one with `python -m engine.export CHECKPOINT DIR`")
    if args.output_dir and os.path.isfile(args.output_dir):
        raise ArgError(f"--output_dir {args.output_dir!r} is a file")


def parse_args(argv: list[str] | None = None):
    args = build_parser().parse_args(argv)
    validate_args(args)
    return args
