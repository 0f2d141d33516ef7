"""The training loop: setup (distributed, config, data, model, DeepSpeed), then the seed's loop.

Every refusal that a flag can cause happens in `setup` before the model is built or moved to a device.
"""
from __future__ import annotations

import json
import math
import os
import socket
from dataclasses import dataclass
from functools import partial

import torch
import torch.distributed as dist
from transformers import get_scheduler, set_seed

from engine import checkpoint as ckpt
from engine import compat, preempt
from engine.export import export_pretrained, init_weights_from
from engine.args import ArgError
from engine.data import build_datasets, build_loader
from engine.ds_config import build_ds_config, offload_of, precision_of
from engine.metrics import MetricsLogger
from engine.models import build_model, count_parameters, load_config, load_feature_extractor
from engine.monitor import TrainMonitor, stash_grad_norm
from engine.step import MaskingSpec, PretrainStep, StatsWindow, gumbel_temperature


@dataclass
class Dist:
    rank: int
    world_size: int
    local_rank: int
    device: torch.device

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def configure_allocator() -> None:
    """Expandable segments for PyTorch's CUDA caching allocator, unless PYTORCH_CUDA_ALLOC_CONF is set: batches of
    varying shape fragment fixed-size segments (XLS-R 2B's plan at a 16 GiB cap ran out of memory with 13.0 GiB
    allocated and 15.8 GiB reserved, bench/RESULTS.md run 6). Call before the first CUDA allocation."""
    if os.environ.get("PYTORCH_CUDA_ALLOC_CONF") or os.environ.get("PYTORCH_ALLOC_CONF"):
        return
    os.environ["PYTORCH_CUDA_ALLOC_CONF"] = "expandable_segments:True"
    if torch.cuda.is_available():          # in case this process's allocator has already read its settings
        torch.cuda.memory._set_allocator_settings("expandable_segments:True")


def setup_distributed() -> Dist:
    """Join the process group that the deepspeed launcher describes, or make a one-process group; configure the
    CUDA allocator (`configure_allocator`); patch DeepSpeed's ZeRO-0 optimizer step (engine/ds_patches.py)."""
    configure_allocator()
    import deepspeed

    from engine import ds_patches
    ds_patches.apply()
    os.environ.setdefault("RANK", "0")
    os.environ.setdefault("LOCAL_RANK", "0")
    os.environ.setdefault("WORLD_SIZE", "1")
    os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
    os.environ.setdefault("MASTER_PORT", str(_free_port()))
    local_rank = int(os.environ["LOCAL_RANK"])
    if torch.cuda.is_available():
        torch.cuda.set_device(local_rank)
        device = torch.device("cuda", local_rank)
        cap = os.environ.get("W2V_GPU_MEMORY_CAP_GB")  # benchmarks: simulate a smaller card (e.g. 16)
        if cap:
            total = torch.cuda.get_device_properties(local_rank).total_memory
            torch.cuda.set_per_process_memory_fraction(min(1.0, float(cap) * 2**30 / total), local_rank)
    else:
        device = torch.device("cpu")
    if not dist.is_initialized():
        deepspeed.init_distributed(dist_backend="nccl" if device.type == "cuda" else "gloo", verbose=False)
    return Dist(dist.get_rank(), dist.get_world_size(), local_rank, device)


def param_groups(model: torch.nn.Module, weight_decay: float) -> list[dict]:
    """Weight decay on weight matrices and the codebook; none on biases and norm scales."""
    decay, no_decay = [], []
    for p in model.parameters():
        if p.requires_grad:
            (decay if p.ndim >= 2 else no_decay).append(p)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


RUN_MARKERS = ("run_args.json", "metrics.jsonl", os.path.join(ckpt.CKPT_DIR, "latest"))


def check_output_dir(args) -> None:
    """Refuse to start a new run in an output_dir that holds another one (its metrics and checkpoints)."""
    if args.resume is not None or not os.path.isdir(args.output_dir):
        return
    found = [m for m in RUN_MARKERS if os.path.exists(os.path.join(args.output_dir, m))]
    found += ckpt.complete_checkpoints(ckpt.checkpoint_root(args.output_dir))[-1:]
    if found:
        raise ArgError(f"--output_dir {args.output_dir!r} already holds a run ({', '.join(found)}); "
                       "pass --resume to continue it, or choose another --output_dir")


def check_hub_access(args) -> None:
    """Refuse --push_to_hub before training when the hub cannot be reached or the token is missing."""
    from huggingface_hub import HfApi
    try:
        HfApi().whoami(token=args.hub_token)
    except Exception as exc:
        raise ArgError(f"--push_to_hub: the hub is not reachable with this token ({type(exc).__name__}); "
                       "pass --hub_token, log in with `hf auth login`, or drop --push_to_hub") from exc


def push_to_hub(args, log) -> None:
    from huggingface_hub import HfApi
    api = HfApi(token=args.hub_token)
    repo_id = args.hub_model_id or os.path.basename(os.path.abspath(args.output_dir))
    api.create_repo(repo_id, exist_ok=True)
    api.upload_folder(repo_id=repo_id, folder_path=args.output_dir, ignore_patterns=["checkpoints/*"],
                      commit_message="End of training")
    log(f"pushed {args.output_dir} to the hub as {repo_id}")


def memory_plan(args, config, world_size: int, device_type: str):
    """The planner's choice for --gpu_memory_gb, applied to args (a simulated cap counts as the card)."""
    from engine.ds_config import resolve_precision
    from engine.planner import plan_from_args
    gpu_gb = args.gpu_memory_gb
    if gpu_gb == "auto" and os.environ.get("W2V_GPU_MEMORY_CAP_GB"):
        gpu_gb = os.environ["W2V_GPU_MEMORY_CAP_GB"]
    if gpu_gb == "auto" and device_type != "cuda":
        raise ArgError("--gpu_memory_gb auto needs a GPU to read; pass a number of GiB")
    precision = resolve_precision(args, device_type) if device_type == "cuda" else None
    plan = plan_from_args(args, config, world_size, precision=precision,
                          gpu_memory_gb=gpu_gb if gpu_gb == "auto" else float(gpu_gb))
    plan.apply(args)
    return plan


def plan_only(args) -> dict:
    """--plan_only: print the plan for this launch's world size, touching no GPU and no data."""
    config = load_config(args.config_name or args.model_name_or_path, cache_dir=args.cache_dir)
    world = int(os.environ.get("WORLD_SIZE", 1))
    plan = memory_plan(args, config, world, "cuda" if torch.cuda.is_available() else "cpu")
    print(plan.table())
    return plan.to_dict()


def setup(args):
    """Everything before the first step; refusals come before any model or device work."""
    d = setup_distributed()
    set_seed(args.seed)
    config = load_config(args.config_name or args.model_name_or_path, cache_dir=args.cache_dir,
                         flag="--config_name" if args.config_name else "--model_name_or_path")
    feature_extractor = load_feature_extractor(args.model_name_or_path or args.config_name, cache_dir=args.cache_dir)
    spec = MaskingSpec.from_args(args, config)
    compat.inherit_resume_stage(args, d.is_main)
    if args.gpu_memory_gb is not None:
        plan = memory_plan(args, config, d.world_size, d.device.type)
        if d.is_main:
            print(plan.table())
    ds_cfg = build_ds_config(args, d.world_size, d.device.type)
    resume_from = None
    if not args.preprocessing_only:
        check_output_dir(args)
        resume_from = compat.resume_point(args, config, ds_cfg, d.world_size, d.is_main)
        if args.push_to_hub:
            check_hub_access(args)
    train_ds, eval_ds = build_datasets(args, feature_extractor.sampling_rate)
    if not args.preprocessing_only:
        compat.check_batch_fits(args, len(train_ds), d.world_size)
    return d, config, feature_extractor, spec, ds_cfg, train_ds, eval_ds, resume_from


def loader_for(args, dataset, d: Dist, epoch: int, *, train: bool, start_batch: int = 0):
    return build_loader(dataset, batch_size=args.per_device_train_batch_size if train else args.per_device_eval_batch_size,
                        shuffle=train, seed=args.seed, epoch=epoch, rank=d.rank, world_size=d.world_size,
                        num_workers=args.dataloader_num_workers, pad_to_multiple_of=args.pad_to_multiple_of,
                        start_batch=start_batch, max_batch_seconds=args.max_batch_seconds if train else None,
                        crop_to_shortest=args.crop_to_shortest and train,
                        # bool: 5 instead of 12 bytes per sample through shared memory and pinning; the
                        # step reads the batch's lengths, and the HF model's loss is bit-identical with it
                        mask_dtype=torch.bool)


def evaluate(engine, step_fn: PretrainStep, args, eval_ds, d: Dist) -> dict:
    """The seed's validation losses (summed over the set, divided by its masked frames). Masks come from a
    generator reseeded each time, so successive evaluations compare like with like."""
    gen = torch.Generator(device=d.device).manual_seed(args.seed + 10_000 + d.rank)
    eval_step = PretrainStep(step_fn.module, step_fn.spec, d.device, world_size=d.world_size, generator=gen)
    eval_step.measure_codes = True
    window = StatsWindow()
    engine.eval()
    with torch.no_grad():
        for batch in loader_for(args, eval_ds, d, 0, train=False):
            _, stats = eval_step.forward(engine, eval_step.prepare(batch))
            window.add(stats)
    engine.train()
    result = window.reduce(eval_step, prefix="val_")
    result.pop("val_flops", None)
    return result


def main(args) -> dict:
    import deepspeed
    if args.plan_only:
        return plan_only(args)
    d, config, feature_extractor, spec, ds_cfg, train_ds, eval_ds, resume_from = setup(args)
    say = print if d.is_main else (lambda *a, **k: None)
    if args.preprocessing_only:
        say(f"preprocessing done: {len(train_ds)} training utterances"
            + (f", {len(eval_ds)} validation" if eval_ds is not None else ""))
        return {}

    micro_per_epoch = len(loader_for(args, train_ds, d, 0, train=True))
    if micro_per_epoch == 0:
        raise ArgError(f"no training batch: {len(train_ds)} utterances for {d.world_size} rank(s) of "
                       f"--per_device_train_batch_size {args.per_device_train_batch_size}")
    updates_per_epoch = math.ceil(micro_per_epoch / args.gradient_accumulation_steps)
    max_steps = args.max_train_steps or args.num_train_epochs * updates_per_epoch
    num_epochs = math.ceil(max_steps / updates_per_epoch)

    model = build_model(config, gradient_checkpointing=args.gradient_checkpointing,
                        attn_implementation=args.attn_implementation)
    if args.init_from and resume_from is None:
        init_weights_from(model, args.init_from)
    groups = param_groups(model, args.weight_decay)
    names = {id(p): n for n, p in model.named_parameters()}
    meta = compat.run_meta(args, config, world_size=d.world_size, zero_stage=ds_cfg["zero_optimization"].get("stage", 0),
                           precision=precision_of(ds_cfg), offload=offload_of(ds_cfg),
                           param_groups=[[names[id(p)] for p in g["params"]] for g in groups if g["params"]])
    scheduler = partial(_scheduler, args=args, max_steps=max_steps)
    engine, _, _, _ = deepspeed.initialize(model=model, model_parameters=groups, config=ds_cfg, lr_scheduler=scheduler)
    gen = torch.Generator(device=d.device).manual_seed(args.seed + d.rank)
    step_fn = PretrainStep(engine.module, spec, d.device, world_size=d.world_size, generator=gen)

    completed, start_epoch, start_batch, state = 0, 0, 0, None
    if args.resume is not None and resume_from is None:
        say(f"--resume: no checkpoint in {ckpt.checkpoint_root(args.output_dir)} yet; starting from scratch")
    if resume_from is not None:
        state = ckpt.load_checkpoint(engine, *resume_from)
        completed, start_epoch, start_batch = state["completed_steps"], state["epoch"], state["batch_in_epoch"]
        saved_world = len(state["rng"])
        if saved_world != d.world_size:  # ZeRO 0 only (compat refuses the others): same samples seen
            start_batch = start_batch * saved_world // d.world_size
        engine.micro_steps = completed * args.gradient_accumulation_steps  # DeepSpeed does not restore it
        engine.module.set_gumbel_temperature(state["gumbel_temperature"])
        say(f"resumed from {os.path.join(*resume_from)} at step {completed} (epoch {start_epoch}, "
            f"micro-batch {start_batch})")
    else:
        engine.module.set_gumbel_temperature(gumbel_temperature(args, 0))

    if d.is_main:
        os.makedirs(args.output_dir, exist_ok=True)
        with open(os.path.join(args.output_dir, "ds_config.json"), "w") as fh:
            json.dump(ds_cfg, fh, indent=2)
        with open(os.path.join(args.output_dir, "run_args.json"), "w") as fh:
            json.dump(meta["flags"], fh, indent=2)
    say(f"model: {count_parameters(model) / 1e6:.1f}M params | ZeRO {ds_cfg['zero_optimization'].get('stage', 0)} "
        f"| {precision_of(ds_cfg)} | world {d.world_size} | {len(train_ds)} train utterances | "
        f"{micro_per_epoch} micro-batches/epoch/rank | {max_steps} steps | masking {spec}")
    say("effective DeepSpeed config: " + json.dumps(ds_cfg))

    logger = MetricsLogger(args.output_dir, is_main=d.is_main, total_steps=max_steps, initial_step=completed,
                           report_to=args.report_to, run_config=vars(args), project=args.wandb_project,
                           run_name=args.wandb_run_name)
    step_fn.sampling_rate = feature_extractor.sampling_rate
    monitor = TrainMonitor(engine, step_fn, args, config, ds_cfg, logger, d, max_steps)
    window = monitor.window
    if state is not None:
        window.restore(state.get("stats_window", {}), d.device)
    result: dict = {}
    epoch_rng = ckpt.rng_state()

    def save(epoch: int, batch_in_epoch: int, export: bool = True) -> str:
        """All ranks: checkpoint the state after `completed` steps, then export the fp32 HF model. RNG-neutral."""
        rngs, epoch_rngs = [None] * d.world_size, [None] * d.world_size
        dist.all_gather_object(rngs, ckpt.rng_state(gen))
        dist.all_gather_object(epoch_rngs, epoch_rng)
        client = {"completed_steps": completed, "epoch": epoch, "batch_in_epoch": batch_in_epoch,
                  "rng": rngs, "rng_epoch_start": epoch_rngs,
                  "gumbel_temperature": engine.module.quantizer.temperature,
                  "stats_window": window.snapshot()}

        def write_extra(path):
            config.save_pretrained(path)
            feature_extractor.save_pretrained(path)

        with ckpt.rng_preserved(gen):
            path = ckpt.save_checkpoint(engine, args.output_dir, completed, client, meta=meta,
                                        keep_last=args.keep_last_checkpoints, write_extra=write_extra)
            if d.is_main and export:
                export_pretrained(path, args.output_dir)
            ckpt.barrier()
        return path

    needs_own_norm = engine.zero_optimization_stage() == 0 and not ds_cfg.get("gradient_clipping")
    engine.train()
    epoch, batch_in_epoch, stopped = start_epoch, start_batch, False
    if completed >= max_steps:
        say(f"--resume: the checkpoint is at step {completed}, --max_train_steps/--num_train_epochs ask for "
            f"{max_steps}: nothing to train")
        num_epochs = start_epoch  # skip the loop and the final save
    with preempt.StopRequest(d.world_size) as stop:
        for epoch in range(start_epoch, num_epochs):
            first = start_batch if epoch == start_epoch else 0
            batch_in_epoch = first
            resuming = state is not None and epoch == start_epoch
            if resuming:  # replay the RNG as it was when this epoch's loader started, then as at the save
                r = min(d.rank, len(state["rng"]) - 1)
                epoch_rng = state["rng_epoch_start"][r]
                ckpt.set_rng_state(epoch_rng)
                after_start = partial(ckpt.set_rng_state, state["rng"][r], gen)
            else:
                epoch_rng, after_start = ckpt.rng_state(), None
            loader = loader_for(args, train_ds, d, epoch, train=True, start_batch=first)
            for batch in _started(loader, after_start):
                inputs = step_fn.prepare(batch)
                boundary = engine.is_gradient_accumulation_boundary()
                step_fn.measure_codes = monitor.will_log(completed + 1)
                loss, stats = step_fn.forward(engine, inputs)
                engine.backward(loss)
                if boundary and needs_own_norm and (completed + 1) % args.logging_steps == 0:
                    stash_grad_norm(engine)
                engine.step()
                monitor.micro_step(stats, batch)
                batch_in_epoch += 1
                if not boundary:
                    continue
                monitor.after_step(completed + 1)
                engine.module.set_gumbel_temperature(gumbel_temperature(args, completed))  # seed: before increment
                completed += 1
                logger.advance()
                if monitor.will_log(completed):
                    result = monitor.log(completed, epoch)
                if args.eval_steps and eval_ds is not None and completed % args.eval_steps == 0:
                    with ckpt.rng_preserved():  # the eval loader draws a seed from torch's RNG
                        val = evaluate(engine, step_fn, args, eval_ds, d)
                    logger.log(completed, val, split="eval")
                path = None
                if completed % args.saving_steps == 0 and completed < max_steps:
                    path = save(epoch, batch_in_epoch)
                if completed < max_steps and stop.should_stop():
                    path = path or save(epoch, batch_in_epoch, export=False)  # launchers kill ~30 s later
                    say(f"stopped by {stop.name} after step {completed}; checkpoint {path}. "
                        "Continue with the same command and --resume")
                    stopped = True
                    break
                if completed >= max_steps:
                    break
            state = None
            if stopped:
                break
            if eval_ds is not None and not args.eval_steps:  # the seed validates after every epoch
                with ckpt.rng_preserved():
                    val = evaluate(engine, step_fn, args, eval_ds, d)
                result.update(val)
                logger.log(completed, val, split="eval")
            if completed >= max_steps:
                break
        if not stopped and num_epochs > start_epoch:
            save(epoch, batch_in_epoch)
    logger.close()
    if stopped:
        return dict(result, preempted=True, completed_steps=completed)
    say(f"done: {completed} steps; model saved to {args.output_dir}")
    if args.push_to_hub and d.is_main:
        push_to_hub(args, say)
    return result


def _started(loader, after_start=None):
    """Iterate `loader`, calling `after_start()` once its iterator exists (it has drawn its worker seed from
    torch's RNG, which a resume therefore replays from the epoch's start) and before the first batch is used."""
    batches = iter(loader)
    first = next(batches, None)
    if after_start is not None:
        after_start()
    if first is None:
        return
    yield first
    yield from batches


def _scheduler(optimizer, *, args, max_steps):
    return get_scheduler(args.lr_scheduler_type, optimizer=optimizer, num_warmup_steps=args.num_warmup_steps,
                         num_training_steps=max_steps)
