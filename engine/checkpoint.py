"""Checkpoints for exact resume: DeepSpeed's save/load_checkpoint, made atomic, plus our client state.

Layout of output_dir:
    checkpoints/step_<N>/          one complete checkpoint: DeepSpeed's files (model, optimizer, lr
                                   scheduler, our client state) + w2v_checkpoint.json (the run's flags,
                                   model config, world size, ZeRO stage, precision) + config.json and
                                   preprocessor_config.json (so that `python -m engine.export` needs nothing else)
    checkpoints/.tmp-step_<N>/     a checkpoint being written (ignored by resume, removed by the next save)
    checkpoints/latest             tag of the newest complete checkpoint
    config.json, model.safetensors, preprocessor_config.json   the HF model (fp32), see engine/export.py

Atomic protocol (`save_checkpoint`): every rank writes into `.tmp-step_N` (DeepSpeed, save_latest=False),
fsyncs what it wrote, barrier; rank 0 writes w2v_checkpoint.json last, renames the directory to `step_N`
and points `latest` at it through a temporary file + os.replace; barrier. A crash at any moment leaves
`latest` naming a complete checkpoint (or none yet). DeepSpeed's loader joins (load_dir, tag) and reads
no tag recorded inside the files, so a renamed directory loads as is.

Test hook (test-only, never set it in production): W2V_TEST_CRASH_IN_SAVE=<step> makes every rank
exit with status 1 in the save of that step, after the temporary directory is complete and before
the rename.
"""
from __future__ import annotations

import contextlib
import json
import os
import pickle
import random
import shutil

import numpy as np
import torch
import torch.distributed as dist

CKPT_DIR = "checkpoints"
TMP_PREFIX = ".tmp-"
META_FILE = "w2v_checkpoint.json"
CRASH_ENV = "W2V_TEST_CRASH_IN_SAVE"


class CheckpointError(ValueError):
    """A checkpoint that cannot be used; the message names the flag (--resume) or the path."""


# ----------------------------------------------------------------------------------------------- RNG
def rng_state(generator: torch.Generator | None = None) -> dict:
    """Python, numpy, torch CPU (and current CUDA device) RNG states, and `generator`'s if given."""
    state = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state()
    if generator is not None:
        state["masking"] = generator.get_state()
    return state


def set_rng_state(state: dict, generator: torch.Generator | None = None) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])
    if generator is not None and "masking" in state:
        generator.set_state(state["masking"])


@contextlib.contextmanager
def rng_preserved(generator: torch.Generator | None = None):
    """Run a block (evaluation, a save) without moving any RNG the training consumes: the trajectory then
    does not depend on --eval_steps, the validation set or --saving_steps."""
    state = rng_state(generator)
    try:
        yield
    finally:
        set_rng_state(state, generator)


# -------------------------------------------------------------------------------------------- layout
def checkpoint_root(output_dir: str) -> str:
    return os.path.join(output_dir, CKPT_DIR)


def step_of(tag: str) -> int | None:
    """N for a tag `step_N`, else None."""
    if tag.startswith("step_") and tag[5:].isdigit():
        return int(tag[5:])
    return None


def is_complete(path: str) -> bool:
    """A checkpoint directory written to the end by `save_checkpoint` (its metadata file is written last)."""
    return os.path.isfile(os.path.join(path, META_FILE))


def read_meta(path: str) -> dict:
    with open(os.path.join(path, META_FILE)) as fh:
        return json.load(fh)


def complete_checkpoints(root: str) -> list[str]:
    """Tags of the complete `step_N` checkpoints under root, oldest first."""
    if not os.path.isdir(root):
        return []
    tags = [t for t in os.listdir(root) if step_of(t) is not None and is_complete(os.path.join(root, t))]
    return sorted(tags, key=step_of)


def latest_checkpoint(root: str) -> str | None:
    """The tag `latest` names if that checkpoint is complete, else the newest complete one, else None."""
    latest = os.path.join(root, "latest")
    if os.path.isfile(latest):
        with open(latest) as fh:
            tag = fh.read().strip()
        if tag and is_complete(os.path.join(root, tag)):
            return tag
    tags = complete_checkpoints(root)
    return tags[-1] if tags else None


def find_checkpoint(resume: str, output_dir: str, flag: str = "--resume") -> tuple[str, str] | None:
    """(load_dir, tag) for `--resume` (latest of output_dir) or `--resume PATH`, None when there is none yet.

    PATH may be a checkpoint directory (checkpoints/step_N), a checkpoints folder, or an output_dir."""
    if resume == "latest":
        root = checkpoint_root(output_dir)
        tag = latest_checkpoint(root)
        return (root, tag) if tag else None
    path = os.path.abspath(resume.rstrip("/"))
    if os.path.basename(path).startswith(TMP_PREFIX):
        raise CheckpointError(f"{flag} {resume!r} is an unfinished checkpoint (its save was interrupted); "
                              "resume from a step_N directory or pass --resume alone")
    if is_complete(path):
        return os.path.dirname(path), os.path.basename(path)
    for root in (path, checkpoint_root(path)):
        tag = latest_checkpoint(root)
        if tag:
            return root, tag
    raise CheckpointError(f"{flag} {resume!r} holds no complete checkpoint (no {META_FILE}); pass a "
                          "checkpoints/step_N directory or a run's output_dir")


# ------------------------------------------------------------------------------------------ save/load
def save_checkpoint(engine, output_dir: str, step: int, client_state: dict, *, meta: dict,
                    keep_last: int = 2, write_extra=None) -> str:
    """Save an atomic checkpoint `step_<step>` (all ranks call this); returns its path.

    `meta` is written as w2v_checkpoint.json, `write_extra(dir)` (rank 0) adds files such as config.json.
    """
    root = checkpoint_root(output_dir)
    tag, tmp_tag = f"step_{step}", f"{TMP_PREFIX}step_{step}"
    tmp, final = os.path.join(root, tmp_tag), os.path.join(root, tag)
    if _rank() == 0:
        os.makedirs(root, exist_ok=True)
        for name in os.listdir(root):  # leftovers of interrupted saves
            if name.startswith(TMP_PREFIX):
                shutil.rmtree(os.path.join(root, name), ignore_errors=True)
    barrier()
    engine.save_checkpoint(root, tag=tmp_tag, client_state=client_state, save_latest=False)
    _fsync_tree(tmp)
    barrier()
    if _rank() == 0:
        if write_extra is not None:
            write_extra(tmp)
        _write_atomic(os.path.join(tmp, META_FILE), json.dumps(dict(meta, step=step), indent=1))
        _fsync_path(tmp)
    if os.environ.get(CRASH_ENV) == str(step):  # test-only: a crash after writing, before the rename
        os._exit(1)
    if _rank() == 0:
        if os.path.exists(final):  # a step reached again after resuming from an earlier checkpoint
            old = os.path.join(root, f"{TMP_PREFIX}old-{tag}")
            os.replace(final, old)
            os.replace(tmp, final)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, final)
        _write_atomic(os.path.join(root, "latest"), tag)
        _fsync_path(root)
        prune(root, keep_last, newest=step)
    barrier()
    return final


def prune(root: str, keep_last: int, newest: int) -> None:
    """Keep the `keep_last` newest checkpoints up to step `newest` (0 = keep all). Checkpoints after
    `newest` (a timeline abandoned by resuming from an earlier one) are left alone until overwritten."""
    if keep_last <= 0:
        return
    tags = [t for t in complete_checkpoints(root) if step_of(t) <= newest]
    for old in tags[:-keep_last]:  # renamed out of sight first: a kill mid-delete leaves no half checkpoint
        doomed = os.path.join(root, f"{TMP_PREFIX}prune-{old}")
        os.replace(os.path.join(root, old), doomed)
        shutil.rmtree(doomed, ignore_errors=True)


CLIENT_KEYS = ("completed_steps", "epoch", "batch_in_epoch", "rng", "rng_epoch_start", "gumbel_temperature")


def load_checkpoint(engine, load_dir: str, tag: str) -> dict:
    """Load model, optimizer, lr scheduler and DeepSpeed counters; returns our client state.
    A damaged checkpoint (truncated file, bad disk) is reported as a CheckpointError naming the others."""
    where = os.path.join(load_dir, tag)
    try:
        path, client_state = engine.load_checkpoint(load_dir, tag=tag, load_module_strict=True,
                                                    load_optimizer_states=True, load_lr_scheduler_states=True)
    except (RuntimeError, EOFError, OSError, KeyError, ValueError, pickle.UnpicklingError) as exc:
        others = [t for t in complete_checkpoints(load_dir) if t != tag]
        raise CheckpointError(f"--resume: cannot load {where} ({type(exc).__name__}: {str(exc).splitlines()[0][:300]}); "
                              + (f"resume from an earlier one: --resume {os.path.join(load_dir, others[-1])}"
                                 if others else "no other checkpoint to fall back on")) from exc
    if path is None:
        raise CheckpointError(f"--resume: no loadable DeepSpeed checkpoint at {where}")
    missing = [k for k in CLIENT_KEYS if k not in (client_state or {})]
    if missing:
        raise CheckpointError(f"--resume: {where} lacks the resume state {missing} (written by another version?)")
    return client_state


# ------------------------------------------------------------------------------------------- helpers
def _write_atomic(path: str, text: str) -> None:
    tmp = f"{path}.tmp{os.getpid()}"
    with open(tmp, "w") as fh:
        fh.write(text)
        fh.flush()
        os.fsync(fh.fileno())
    os.replace(tmp, path)


def _fsync_tree(path: str) -> None:
    """Flush what this node wrote under path to disk (kill -9 needs no fsync; a node crash does)."""
    for dirpath, _, files in os.walk(path):
        for name in files:
            _fsync_path(os.path.join(dirpath, name))
        _fsync_path(dirpath)


def _fsync_path(path: str) -> None:
    """fsync one file or directory; best effort (some filesystems refuse fsync on directories)."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def _rank() -> int:
    return dist.get_rank() if dist.is_available() and dist.is_initialized() else 0


def barrier() -> None:
    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        dist.barrier()
