"""Checkpoints for resume (DeepSpeed's save/load_checkpoint plus our client state) and the final
HuggingFace export (`save_pretrained`).

Layout of output_dir:
    checkpoints/step_<N>/      DeepSpeed checkpoint (model, optimizer, scheduler) + client state
    checkpoints/latest         tag of the newest complete checkpoint (written by DeepSpeed last)
    config.json, model.safetensors, preprocessor_config.json   the HF model
"""
from __future__ import annotations

import os
import random
import shutil

import numpy as np
import torch
import torch.distributed as dist

CKPT_DIR = "checkpoints"


def rng_state(generator: torch.Generator | None) -> dict:
    state = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state()
    if generator is not None:
        state["masking"] = generator.get_state()
    return state


def set_rng_state(state: dict, generator: torch.Generator | None) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])
    if generator is not None and "masking" in state:
        generator.set_state(state["masking"])


def checkpoint_root(output_dir: str) -> str:
    return os.path.join(output_dir, CKPT_DIR)


def save_checkpoint(engine, output_dir: str, step: int, client_state: dict, keep_last: int = 2) -> str:
    """Save a DeepSpeed checkpoint tagged step_<step> on every rank; prune older ones on rank 0."""
    root = checkpoint_root(output_dir)
    tag = f"step_{step}"
    engine.save_checkpoint(root, tag=tag, client_state=client_state, save_latest=True)
    if _rank() == 0 and keep_last > 0:
        tags = sorted((t for t in os.listdir(root) if t.startswith("step_") and t.split("_")[1].isdigit()),
                      key=lambda t: int(t.split("_")[1]))
        for old in tags[:-keep_last]:
            shutil.rmtree(os.path.join(root, old), ignore_errors=True)
    _barrier()
    return os.path.join(root, tag)


def resolve_resume(resume: str, output_dir: str) -> tuple[str, str] | None:
    """(load_dir, tag) for `--resume latest` or `--resume PATH`; None when there is nothing to resume."""
    if resume == "latest":
        root = checkpoint_root(output_dir)
        latest = os.path.join(root, "latest")
        if not os.path.isfile(latest):
            return None
        with open(latest) as fh:
            return root, fh.read().strip()
    path = os.path.abspath(resume.rstrip("/"))
    return os.path.dirname(path), os.path.basename(path)


def load_checkpoint(engine, load_dir: str, tag: str) -> dict:
    path, client_state = engine.load_checkpoint(load_dir, tag=tag, load_module_strict=True,
                                                load_optimizer_states=True, load_lr_scheduler_states=True)
    if path is None:
        raise FileNotFoundError(f"--resume: no loadable DeepSpeed checkpoint at {os.path.join(load_dir, tag)}")
    return client_state or {}


def full_state_dict(engine) -> dict | None:
    """The whole model's weights as fp32 CPU tensors on rank 0 (None elsewhere); gathers ZeRO-3 shards."""
    module = engine.module if hasattr(engine, "module") else engine
    if getattr(engine, "zero_optimization_partition_weights", lambda: False)():
        import deepspeed
        state = {}
        for name, param in module.named_parameters():
            with deepspeed.zero.GatheredParameters([param], modifier_rank=None):
                if _rank() == 0:
                    state[name] = param.detach().float().cpu().clone()
        for name, buf in module.named_buffers():
            if _rank() == 0:
                state[name] = buf.detach().float().cpu().clone()
        return state if _rank() == 0 else None
    if _rank() != 0:
        return None
    return {k: v.detach().float().cpu().clone() for k, v in module.state_dict().items()}


def export_pretrained(engine, config, feature_extractor, out_dir: str) -> None:
    """Write a HF checkpoint (fp32) to out_dir, atomically: to a temp dir first, then renamed into place."""
    state = full_state_dict(engine)
    if _rank() == 0:
        from transformers import Wav2Vec2ForPreTraining
        tmp = out_dir.rstrip("/") + ".tmp-export"
        shutil.rmtree(tmp, ignore_errors=True)
        with torch.device("meta"):
            model = Wav2Vec2ForPreTraining(config)
        model.load_state_dict(state, strict=True, assign=True)
        model.save_pretrained(tmp)
        feature_extractor.save_pretrained(tmp)
        os.makedirs(out_dir, exist_ok=True)
        for name in os.listdir(tmp):
            os.replace(os.path.join(tmp, name), os.path.join(out_dir, name))
        shutil.rmtree(tmp, ignore_errors=True)
    _barrier()


def _rank() -> int:
    return dist.get_rank() if dist.is_available() and dist.is_initialized() else 0


def _barrier() -> None:
    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        dist.barrier()
