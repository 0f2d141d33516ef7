"""Consolidate a checkpoint into a HuggingFace fp32 `save_pretrained` directory.

    python -m engine.export CHECKPOINT OUT_DIR

CHECKPOINT is a checkpoints/step_N directory, a checkpoints folder or a run's output_dir (its latest
checkpoint). OUT_DIR gets config.json, model.safetensors and preprocessor_config.json, loadable by
Wav2Vec2ForPreTraining / Wav2Vec2ForCTC.from_pretrained.

The weights are the optimizer's fp32 master weights, never the 16-bit copies a bf16/fp16 run computes
with:
  * ZeRO 1-3: DeepSpeed's zero_to_fp32 merges the fp32 partitions of every rank (ZeRO-3 shards too);
  * stage 0, bf16/fp16: the fp32 copies kept by DeepSpeed's mixed-precision optimizer, mapped back to
    parameter names through the parameter groups recorded in w2v_checkpoint.json;
  * stage 0, fp32: the module weights, which are the master weights.
The trainer calls `export_pretrained` after each checkpoint, so output_dir always holds the fp32 model
of its latest checkpoint.
"""
from __future__ import annotations

import argparse
import contextlib
import glob
import io
import os
import shutil
import sys

import torch

from engine import checkpoint as ckpt

MODEL_STATES = "mp_rank_00_model_states.pt"


def consolidate(ckpt_dir: str) -> dict[str, torch.Tensor]:
    """The full model's fp32 state dict (CPU) from one checkpoint directory, on any machine, any world size."""
    if glob.glob(os.path.join(ckpt_dir, "*_optim_states.pt")):
        from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint
        with contextlib.redirect_stdout(io.StringIO()):  # its progress prints, at every save
            state = get_fp32_state_dict_from_zero_checkpoint(os.path.dirname(ckpt_dir), tag=os.path.basename(ckpt_dir))
    else:
        state = _stage0_state(ckpt_dir)
    # zero_to_fp32 returns views into flat buffers: give every tensor its own storage for safetensors.
    return {k: v.detach().to(torch.float32).clone().contiguous() for k, v in state.items()}


def _stage0_state(ckpt_dir: str) -> dict[str, torch.Tensor]:
    path = os.path.join(ckpt_dir, MODEL_STATES)
    if not os.path.isfile(path):
        raise ckpt.CheckpointError(f"{ckpt_dir} is not a DeepSpeed checkpoint (no {MODEL_STATES} nor optimizer states)")
    sd = torch.load(path, map_location="cpu", weights_only=False, mmap=True)  # Adam moments stay on disk
    module = dict(sd["module"])
    optim = sd.get("optimizer") or {}
    groups = optim.get("fp32_groups") if isinstance(optim, dict) else None
    flat = optim.get("fp32_groups_flat") if isinstance(optim, dict) else None
    if groups is None and flat is None:
        return module  # fp32 training: the module weights are the master weights
    meta = ckpt.read_meta(ckpt_dir) if ckpt.is_complete(ckpt_dir) else {}
    names = meta.get("param_groups")
    if not names:
        raise ckpt.CheckpointError(f"{ckpt_dir}: a mixed-precision stage-0 checkpoint without the parameter "
                                   f"groups of {ckpt.META_FILE}; cannot map its fp32 master weights to names")
    if flat is not None:  # fused optimizer: one flat fp32 tensor per group
        groups = [list(torch.split(f, [module[n].numel() for n in group_names]))
                  for f, group_names in zip(flat, names)]
    for group_names, tensors in zip(names, groups, strict=True):
        for name, t in zip(group_names, tensors, strict=True):
            if t.numel() != module[name].numel():
                raise ckpt.CheckpointError(f"{ckpt_dir}: fp32 master of {name} has {t.numel()} elements, "
                                           f"the module {module[name].numel()}")
            module[name] = t.view(module[name].shape)
    return module


def export_pretrained(ckpt_dir: str, out_dir: str) -> str:
    """Write the fp32 HF model of `ckpt_dir` into out_dir (file by file through os.replace); returns out_dir."""
    from transformers import Wav2Vec2Config, Wav2Vec2FeatureExtractor, Wav2Vec2ForPreTraining
    config = Wav2Vec2Config.from_pretrained(ckpt_dir)
    feature_extractor = Wav2Vec2FeatureExtractor.from_pretrained(ckpt_dir)
    state = consolidate(ckpt_dir)
    with torch.device("meta"):
        model = Wav2Vec2ForPreTraining(config)
    missing, unexpected = model.load_state_dict(state, strict=False, assign=True)
    if missing or unexpected:
        raise ckpt.CheckpointError(f"{ckpt_dir}: weights do not match its config.json "
                                   f"(missing {missing[:5]}, unexpected {unexpected[:5]})")
    os.makedirs(out_dir, exist_ok=True)
    tmp = os.path.join(out_dir, ".tmp-export")
    shutil.rmtree(tmp, ignore_errors=True)
    model.save_pretrained(tmp)
    feature_extractor.save_pretrained(tmp)
    for name in os.listdir(tmp):
        os.replace(os.path.join(tmp, name), os.path.join(out_dir, name))
    shutil.rmtree(tmp, ignore_errors=True)
    return out_dir


def init_weights_from(model: torch.nn.Module, hf_dir: str) -> None:
    """`--init_from DIR`: copy the weights of an exported model into a freshly built one (same architecture)."""
    from transformers import Wav2Vec2ForPreTraining
    from engine.models import ModelError
    try:
        source = Wav2Vec2ForPreTraining.from_pretrained(hf_dir)
    except Exception as exc:
        raise ModelError(f"--init_from {hf_dir!r}: not a model directory ({type(exc).__name__}: {exc})") from exc
    try:
        model.load_state_dict(source.state_dict(), strict=True)
    except RuntimeError as exc:
        raise ModelError(f"--init_from {hf_dir!r}: its weights do not fit the model of --model_name_or_path/"
                         f"--config_name (pass --model_name_or_path {hf_dir}): {str(exc).splitlines()[0]}") from exc


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m engine.export", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("checkpoint", help="checkpoints/step_N directory, checkpoints folder, or a run's output_dir")
    p.add_argument("out_dir", help="where the HF model is written")
    a = p.parse_args(argv)
    try:
        where = ckpt.find_checkpoint(a.checkpoint, a.checkpoint, flag="CHECKPOINT")
        if where is None:
            raise ckpt.CheckpointError(f"{a.checkpoint!r} holds no complete checkpoint")
        src = os.path.join(*where)
        export_pretrained(src, a.out_dir)
    except (ckpt.CheckpointError, FileNotFoundError, ValueError) as exc:
        print(f"engine.export: error: {exc}", file=sys.stderr)
        return 2
    print(f"exported {src} -> {a.out_dir} (fp32)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
