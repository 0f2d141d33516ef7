"""Checkpoints in-process: exact resume under ZeRO 0/3 and bf16, the atomic layout, every refusal of issue 8,
the fp32 export (ZeRO-3 shards, bf16 master weights), and the signal handler's second-signal exit."""
import json
import os
import shutil
import subprocess
import sys
from itertools import islice
from pathlib import Path

import pytest
import torch

import engine.trainer as trainer
from conftest import tiny_flags
from engine import checkpoint as ckpt
from engine import compat
from engine.args import ArgError, parse_args
from engine.export import consolidate, export_pretrained
from engine.export import main as export_main
from engine.metrics import read_metrics

ROOT = Path(__file__).resolve().parents[1]


def run(corpus, out, *extra):
    trainer.main(parse_args(tiny_flags(corpus, out, *extra)))
    return {r["step"]: r for r in read_metrics(str(out)) if r["split"] == "train"}


@pytest.fixture(scope="module")
def finished(corpus_dir, tmp_path_factory):
    """A 3-step ZeRO-2 fp32 run that kept every checkpoint."""
    out = tmp_path_factory.mktemp("finished")
    run(corpus_dir, out, "--max_train_steps", "3", "--saving_steps", "1", "--keep_last_checkpoints", "0",
        "--zero_stage", "2", "--precision", "fp32")
    return out


# ------------------------------------------------------------------------------------------- exactness
# ZeRO 0 runs with accumulation 2 and a validation split: 20 training utterances = 5 micro-batches per epoch,
# so step 3 accumulates the last micro-batch of epoch 0 and the first of epoch 1, after epoch 0's validation.
# The resumed run validates after every step instead (--eval_steps 1): evaluation must not move the RNG.
@pytest.mark.parametrize("stage,precision,extra", [
    (0, "fp32", ("--gradient_accumulation_steps", "2", "--validation_split_percentage", "20")),
    (3, "fp32", ()), (1, "bf16", ())], ids=["zero0-accum-eval", "zero3", "zero1-bf16"])
def test_resume_from_a_middle_checkpoint_continues_exactly(corpus_dir, tmp_path, stage, precision, extra):
    common = ("--max_train_steps", "4", "--zero_stage", str(stage), "--precision", precision, *extra)
    first = run(corpus_dir, tmp_path / "a", *common, "--saving_steps", "1", "--keep_last_checkpoints", "0")
    again = run(corpus_dir, tmp_path / "b", *common, *(("--eval_steps", "1") if extra else ()),
                "--resume", str(tmp_path / "a" / "checkpoints" / "step_2"))
    assert sorted(again) == [3, 4]
    for step in again:
        for key in ("loss", "contrastive_loss", "diversity_loss", "lr", "grad_norm", "temperature", "num_losses"):
            assert again[step][key] == first[step][key], (step, key)
    if extra:
        evals = [[r for r in read_metrics(str(tmp_path / d)) if r["split"] == "eval"] for d in "ab"]
        assert [r["step"] for r in evals[1]] == [3, 4]
        assert evals[1][-1]["val_loss"] == evals[0][-1]["val_loss"]  # both validate the weights after step 4


def test_init_from_an_export_copies_its_weights(finished, tmp_path):
    from engine.models import ModelError, build_model, load_config
    from engine.export import init_weights_from
    export_pretrained(str(finished / "checkpoints" / "step_3"), str(tmp_path / "hf"))
    model = build_model(load_config(str(tmp_path / "hf")))
    init_weights_from(model, str(tmp_path / "hf"))
    state = consolidate(str(finished / "checkpoints" / "step_3"))
    assert all(torch.equal(model.state_dict()[k], v) for k, v in state.items())
    other = load_config("demo")
    other.hidden_size = 32
    with pytest.raises(ModelError, match="--init_from .* do not fit"):
        init_weights_from(build_model(other), str(tmp_path / "hf"))


# ---------------------------------------------------------------------------------------------- layout
def _fake(root: Path, tag: str, complete=True):
    (root / tag).mkdir(parents=True)
    if complete:
        (root / tag / ckpt.META_FILE).write_text("{}")


def test_latest_falls_back_to_the_newest_complete_checkpoint(tmp_path):
    root = tmp_path / "checkpoints"
    _fake(root, "step_2")
    _fake(root, "step_10")
    _fake(root, "step_12", complete=False)  # should not happen (rename is last), but is never trusted
    _fake(root, ".tmp-step_14")
    assert ckpt.find_checkpoint("latest", str(tmp_path)) == (str(root), "step_10")
    (root / "latest").write_text("step_2")
    assert ckpt.find_checkpoint("latest", str(tmp_path)) == (str(root), "step_2")
    (root / "latest").write_text("step_12")  # names an incomplete one: ignored
    assert ckpt.find_checkpoint("latest", str(tmp_path))[1] == "step_10"
    for path in (tmp_path, root):  # --resume accepts an output_dir or a checkpoints folder
        assert ckpt.find_checkpoint(str(path), "unused")[1] == "step_10"
    assert ckpt.find_checkpoint(str(root / "step_2"), "unused") == (str(root), "step_2")
    with pytest.raises(ckpt.CheckpointError, match="--resume.*unfinished"):
        ckpt.find_checkpoint(str(root / ".tmp-step_14"), "unused")
    assert ckpt.find_checkpoint("latest", str(tmp_path / "new")) is None


def test_prune_keeps_the_newest_and_leaves_an_abandoned_future_alone(tmp_path):
    for n in (1, 2, 3, 4, 9):
        _fake(tmp_path, f"step_{n}")
    ckpt.prune(str(tmp_path), keep_last=2, newest=4)
    assert sorted(os.listdir(tmp_path)) == ["step_3", "step_4", "step_9"]


def test_checkpoint_is_self_contained_and_records_the_run(finished):
    root = finished / "checkpoints"
    assert sorted(ckpt.complete_checkpoints(str(root))) == ["step_1", "step_2", "step_3"]
    assert (root / "latest").read_text() == "step_3" and not list(root.glob(".tmp-*"))
    meta = ckpt.read_meta(str(root / "step_2"))
    assert (meta["step"], meta["world_size"], meta["zero_stage"], meta["precision"]) == (2, 1, 2, "fp32")
    assert meta["model_config"]["hidden_size"] == 64 and meta["flags"]["seed"] == 0
    assert (root / "step_2" / "config.json").exists() and (root / "step_2" / "preprocessor_config.json").exists()
    state = torch.load(root / "step_2" / "mp_rank_00_model_states.pt", weights_only=False)
    assert {"rng", "rng_epoch_start", "gumbel_temperature", "epoch", "batch_in_epoch"} <= set(state)
    assert state["completed_steps"] == 2 and state["global_steps"] == 2 and state["lr_scheduler"]["last_epoch"] == 2


# -------------------------------------------------------------------------------------------- refusals
@pytest.fixture
def no_model(monkeypatch):
    """Refusals must come before the model is built (hence before any device work)."""
    def fail(*a, **k):
        raise AssertionError("the model was built before the refusal")
    monkeypatch.setattr(trainer, "build_model", fail)


def test_resume_with_incompatible_flags_says_what_differs(corpus_dir, tmp_path, finished, no_model):
    step2 = str(finished / "checkpoints" / "step_2")
    cfg = trainer.load_config("demo")
    cfg.num_hidden_layers = 3
    cfg.save_pretrained(tmp_path / "model")
    with pytest.raises(ArgError) as err:
        run(corpus_dir, tmp_path / "o", "--resume", step2, "--model_name_or_path", str(tmp_path / "model"),
            "--zero_stage", "3", "--precision", "bf16", "--mask_time_length", "7", "--learning_rate", "1e-3")
    msg = str(err.value)
    for part in ("num_hidden_layers 2 -> 3", "ZeRO stage (--zero_stage/--deepspeed): 2 -> 3",
                 "--precision: 'fp32' -> 'bf16'", "--mask_time_length: None -> 7", "--learning_rate: 0.0005 -> 0.001",
                 "python -m engine.export", "--init_from"):
        assert part in msg, (part, msg)


def test_resume_on_another_world_size_is_refused_under_zero(corpus_dir, tmp_path, finished, no_model):
    copy = tmp_path / "step_2"
    shutil.copytree(finished / "checkpoints" / "step_2", copy)
    meta = json.loads((copy / ckpt.META_FILE).read_text())
    (copy / ckpt.META_FILE).write_text(json.dumps(dict(meta, world_size=4)))
    with pytest.raises(ArgError, match=r"world size: 4 -> 1 ranks.*partitioned.*--num_gpus 4"):
        run(corpus_dir, tmp_path / "o", "--resume", str(copy), "--zero_stage", "2", "--precision", "fp32")
    notes = compat.check_resume(dict(meta, world_size=4, zero_stage=0), dict(meta, world_size=1, zero_stage=0), "x")
    assert any("will not reproduce" in n for n in notes)  # ZeRO 0: allowed, with a warning


def test_output_dir_holding_another_run_is_refused(corpus_dir, tmp_path, finished, no_model):
    with pytest.raises(ArgError, match="--output_dir .* already holds a run.*--resume"):
        run(corpus_dir, finished)
    (tmp_path / "metrics.jsonl").write_text("")  # a run killed before its first checkpoint
    with pytest.raises(ArgError, match="already holds a run"):
        run(corpus_dir, tmp_path)


def test_batch_that_the_data_cannot_fill_is_refused(corpus_dir, tmp_path, no_model):
    with pytest.raises(ArgError, match=r"--per_device_train_batch_size 13 x --gradient_accumulation_steps 2 x 1 "
                                       r"rank\(s\) = 26 utterances, but the training set has 24"):
        run(corpus_dir, tmp_path, "--per_device_train_batch_size", "13", "--gradient_accumulation_steps", "2")
    with pytest.raises(ArgError, match="--max_duration_in_seconds 3 is longer than the batch budget "
                                       "--max_batch_seconds 2.5"):
        run(corpus_dir, tmp_path, "--max_batch_seconds", "2.5")


def test_damaged_checkpoint_is_reported_with_the_one_to_use_instead(corpus_dir, tmp_path, finished):
    shutil.copytree(finished / "checkpoints", tmp_path / "checkpoints")
    optim = tmp_path / "checkpoints" / "step_3" / "zero_pp_rank_0_mp_rank_00_optim_states.pt"
    optim.write_bytes(optim.read_bytes()[:1000])  # a bad disk: rename-based saves never leave this
    with pytest.raises(ckpt.CheckpointError, match=r"--resume: cannot load .*step_3 .*--resume .*step_2"):
        run(corpus_dir, tmp_path, "--max_train_steps", "3", "--saving_steps", "1", "--zero_stage", "2", "--precision", "fp32",
            "--resume")


def test_resume_keeps_the_checkpoints_zero_stage(corpus_dir, tmp_path, finished, capsys):
    """`finished` ran with --zero_stage 2; one process defaults to ZeRO-0, but a bare --resume continues with 2."""
    shutil.copytree(finished / "checkpoints", tmp_path / "checkpoints")
    steps = run(corpus_dir, tmp_path, "--max_train_steps", "4", "--saving_steps", "100", "--precision", "fp32",
                "--resume")
    assert "--resume: ZeRO stage 2, as the checkpoint was written" in capsys.readouterr().out
    assert 4 in steps
    with pytest.raises(ArgError, match="ZeRO stage .*2 -> 0"):
        run(corpus_dir, tmp_path, "--max_train_steps", "5", "--precision", "fp32", "--zero_stage", "0",
            "--resume")


def test_bad_deepspeed_and_precision_flags_are_refused(tmp_path, monkeypatch, capsys):
    from engine.ds_config import build_ds_config, resolve_precision
    base = ["--model_name_or_path", "demo", "--train_dir", ".", "--output_dir", str(tmp_path / "o")]
    user = tmp_path / "ds.json"
    user.write_text(json.dumps({"zero_optimization": {"stage": 4}}))
    with pytest.raises(ArgError, match="--deepspeed .*stage=4 is not a ZeRO stage"):
        build_ds_config(parse_args(base + ["--deepspeed", str(user)]), 1, "cpu")
    user.write_text(json.dumps({"fp16": {"enabled": True}}))
    with pytest.raises(ArgError, match="fp16 in the --deepspeed config.*needs a GPU"):
        build_ds_config(parse_args(base + ["--deepspeed", str(user)]), 1, "cpu")
    with pytest.raises(SystemExit):
        parse_args(base + ["--zero_stage", "5"])
    assert "--zero_stage: invalid choice: 5" in capsys.readouterr().err
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda *a: (5, 2))
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda *a: "Old GPU")
    with pytest.raises(ArgError, match=r"--precision fp16.*Old GPU, compute capability 5\.2.*no fp16"):
        resolve_precision(parse_args(base + ["--precision", "fp16"]), "cuda")


def test_cli_prints_checkpoint_errors_without_traceback(corpus_dir, tmp_path, capsys):
    import pretrain
    (tmp_path / "empty").mkdir()
    assert pretrain.main(tiny_flags(corpus_dir, tmp_path / "o", "--resume", str(tmp_path / "empty"))) == 2
    err = capsys.readouterr().err
    assert "--resume" in err and "holds no complete checkpoint" in err and "Traceback" not in err
    with pytest.raises(SystemExit):
        parse_args(tiny_flags(corpus_dir, tmp_path / "o", "--init_from"))
    with pytest.raises(ArgError, match="--init_from .* not a model directory"):
        parse_args(tiny_flags(corpus_dir, tmp_path / "o", "--init_from", str(tmp_path / "empty")))


# ---------------------------------------------------------------------------------------------- export
def _live_engine(corpus, out, stage, precision, steps=2):
    """A DeepSpeed engine trained for `steps` steps the way the trainer does it, and its run meta."""
    import deepspeed
    from engine.data import build_datasets, build_loader
    from engine.ds_config import build_ds_config
    from engine.models import build_model, load_config
    from engine.step import MaskingSpec, PretrainStep
    args = parse_args(tiny_flags(corpus, out, "--zero_stage", str(stage), "--precision", precision,
                                 "--learning_rate", "1e-2"))
    trainer.setup_distributed()
    torch.manual_seed(0)
    config = load_config("demo")
    model = build_model(config)
    groups = trainer.param_groups(model, 0.0)
    names = {id(p): n for n, p in model.named_parameters()}
    group_names = [[names[id(p)] for p in g["params"]] for g in groups]  # before DeepSpeed swaps in fp32 copies
    ds_cfg = build_ds_config(args, 1, "cpu")
    engine, *_ = deepspeed.initialize(model=model, model_parameters=groups, config=ds_cfg)
    step = PretrainStep(engine.module, MaskingSpec.from_args(args, config), torch.device("cpu"),
                        generator=torch.Generator().manual_seed(0))
    train_ds, _ = build_datasets(args, 16000)
    for batch in islice(build_loader(train_ds, batch_size=4, shuffle=True, seed=0, epoch=0, rank=0, world_size=1,
                                     num_workers=0, pad_to_multiple_of=None), steps):
        loss, _ = step.forward(engine, step.prepare(batch))
        engine.backward(loss)
        engine.step()
    meta = compat.run_meta(args, config, world_size=1, zero_stage=stage, precision=precision, offload="none",
                           param_groups=group_names)
    path = ckpt.save_checkpoint(engine, str(out), steps, {}, meta=meta, keep_last=0,
                                write_extra=lambda d: (config.save_pretrained(d),
                                                       trainer.load_feature_extractor("demo").save_pretrained(d)))
    return engine, path


def test_zero3_export_equals_the_live_model(corpus_dir, tmp_path):
    import deepspeed
    from transformers import Wav2Vec2ForCTC, Wav2Vec2ForPreTraining
    engine, path = _live_engine(corpus_dir, tmp_path, stage=3, precision="fp32")
    assert export_main([str(tmp_path), str(tmp_path / "hf")]) == 0  # the CLI, given the run's output_dir
    exported = Wav2Vec2ForPreTraining.from_pretrained(tmp_path / "hf").eval()
    assert all(p.dtype == torch.float32 for p in exported.parameters())
    for name, p in engine.module.named_parameters():
        with deepspeed.zero.GatheredParameters([p]):
            assert p.numel() > 0 and torch.equal(exported.get_parameter(name), p.detach()), name
    x = torch.randn(2, 16000, generator=torch.Generator().manual_seed(1))
    engine.eval()
    with torch.no_grad():
        live = engine.module.wav2vec2(x).last_hidden_state
        assert torch.allclose(exported.wav2vec2(x).last_hidden_state, live, rtol=0, atol=1e-6)
        ctc = Wav2Vec2ForCTC.from_pretrained(tmp_path / "hf", vocab_size=32).eval()
        assert torch.allclose(ctc.wav2vec2(x).last_hidden_state, live, rtol=0, atol=1e-6)


@pytest.mark.parametrize("stage", [0, 2])
def test_bf16_export_holds_the_fp32_master_weights(corpus_dir, tmp_path, stage):
    from deepspeed.utils import safe_get_full_fp32_param
    engine, path = _live_engine(corpus_dir, tmp_path, stage=stage, precision="bf16")
    state = consolidate(path)
    finer = 0
    for name, p in engine.module.named_parameters():
        assert p.dtype == torch.bfloat16 and state[name].dtype == torch.float32
        assert torch.equal(state[name].to(torch.bfloat16), p.detach()), name  # the bf16 copy rounds the master
        finer += not torch.equal(state[name], p.detach().float())
        if stage > 0:
            assert torch.equal(state[name], safe_get_full_fp32_param(p)), name
    assert finer > 0.9 * len(state)  # the masters carry more than bf16's 8 bits of mantissa
    export_pretrained(path, str(tmp_path / "hf"))
    from safetensors.torch import load_file
    saved = load_file(str(tmp_path / "hf" / "model.safetensors"))
    assert all(torch.equal(saved[k], state[k]) for k in state)


# --------------------------------------------------------------------------------------------- signals
SIGNAL_SCRIPT = r"""
import os, signal, sys, time
from engine.preempt import REPEAT_WINDOW_S, StopRequest
with StopRequest() as stop:
    pid = os.fork()
    if pid == 0:  # a DataLoader worker would be forked like this: it must not die of the launcher's SIGTERM
        os._exit(0 if signal.SIGTERM in signal.pthread_sigmask(signal.SIG_BLOCK, []) else 3)
    assert os.waitpid(pid, 0)[1] == 0, "SIGTERM not blocked in the forked child"
    os.kill(os.getpid(), signal.SIGINT)
    assert stop.requested and stop.should_stop(), "first signal did not set the flag"
    print("first signal: flag set", flush=True)
    os.kill(os.getpid(), signal.SIGTERM)  # a launcher forwarding the request: the same request
    print("a repeat within the window is ignored", flush=True)
    time.sleep(REPEAT_WINDOW_S + 0.1)
    os.kill(os.getpid(), signal.SIGTERM)
    print("still alive after the second signal", flush=True)
"""


def test_second_signal_exits_at_once_and_children_ignore_signals():
    proc = subprocess.run([sys.executable, "-c", SIGNAL_SCRIPT], cwd=ROOT, capture_output=True, text=True,
                          timeout=120, env=dict(os.environ, PYTHONPATH=str(ROOT)))
    assert proc.returncode == 128 + 15, proc.stdout + proc.stderr
    assert "first signal: flag set" in proc.stdout and "a repeat within the window is ignored" in proc.stdout
    assert "still alive" not in proc.stdout
    assert "SIGINT received" in proc.stderr and "SIGTERM again: exiting now" in proc.stderr
