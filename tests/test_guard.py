"""The non-finite guard: a NaN loss or gradient skips the update without a trace under every ZeRO stage;
the run logs the step and utterance ids, goes on, and stops after too many; the collapse alarm."""
import json

import pytest
import torch

from conftest import tiny_flags, scratch_out
from engine.args import ArgError, parse_args
from engine.guard import NonFiniteGuard, TrainingStopped, poison_nonfinite
from engine.metrics import read_metrics
from engine.step import PretrainStep


class ListLogger:
    def __init__(self):
        self.records = []

    def log(self, step, metrics, split="train"):
        self.records.append({"step": step, "split": split, **metrics})

    def close(self):
        pass


def build_engine(corpus_dir, stage, precision, gas=1):
    """A DeepSpeed engine of the demo model as the trainer makes it, its step and 6 training batches."""
    import deepspeed
    from engine.data import build_datasets, build_loader
    from engine.ds_config import build_ds_config
    from engine.models import build_model, load_config
    from engine.step import MaskingSpec
    from engine.trainer import param_groups, setup_distributed

    d = setup_distributed()
    args = parse_args(tiny_flags(corpus_dir, scratch_out(corpus_dir), "--zero_stage", str(stage), "--precision", precision,
                                 "--per_device_train_batch_size", "2", "--gradient_accumulation_steps", str(gas)))
    config = load_config("demo")
    torch.manual_seed(0)
    model = build_model(config)
    engine, *_ = deepspeed.initialize(model=model, model_parameters=param_groups(model, 0.01),
                                      config=build_ds_config(args, 1, "cpu"))
    step = PretrainStep(engine.module, MaskingSpec.from_args(args, config), d.device,
                        generator=torch.Generator().manual_seed(0))
    train_ds, _ = build_datasets(args, 16000)
    batches = list(build_loader(train_ds, batch_size=2, shuffle=False, seed=0, epoch=0, rank=0, world_size=1,
                                num_workers=0, pad_to_multiple_of=None))
    return engine, step, batches


def micro_step(engine, step, batch, seed, nan=False):
    """One micro-step with masks and gumbel noise fixed by `seed`; `nan` poisons the audio."""
    step.generator.manual_seed(seed)
    torch.manual_seed(seed)
    if nan:
        batch = dict(batch, input_values=batch["input_values"] * float("nan"))
    loss, stats = step.forward(engine, step.prepare(batch))
    engine.backward(loss)
    engine.step()
    return stats


def snapshot(engine):
    """Model parameters (gathered under ZeRO-3), the optimizer's fp32 master weights and all its state."""
    import deepspeed
    params = list(engine.module.parameters())
    with deepspeed.zero.GatheredParameters(params, enabled=engine.zero_optimization_stage() == 3):
        model = [p.detach().float().clone() for p in params]
    opt = engine.basic_optimizer
    master = [p.detach().clone() for g in opt.param_groups for p in g["params"]]
    state = [v.detach().clone() for s in opt.state.values() for v in s.values() if torch.is_tensor(v)]
    return model, master, state


def same(a, b):
    return all(len(x) == len(y) and all(torch.equal(s, t) for s, t in zip(x, y)) for x, y in zip(a, b))


# ZeRO 1 shares ZeRO 2's optimizer class (DeepSpeedZeroOptimizer); stage 0 bf16 has its own wrapper.
@pytest.mark.parametrize("stage,precision", [(0, "fp32"), (0, "bf16"), (2, "fp32"), (2, "bf16"), (3, "fp32")])
def test_a_nonfinite_update_leaves_no_trace(corpus_dir, stage, precision):
    """Accumulation window [NaN batch, good batch] is skipped: parameters, fp32 masters, exp_avg/exp_avg_sq
    and the step count are untouched, and the next update equals that of a run that never saw it."""
    results = []
    for poisoned in (True, False):
        engine, step, b = build_engine(corpus_dir, stage, precision, gas=2)
        guard = NonFiniteGuard(engine, window=10, max_nonfinite=0, logger=ListLogger())
        for i, seed in ((0, 1), (1, 2)):  # one good update (creates the Adam state)
            guard.micro_step(micro_step(engine, step, b[i], seed)["loss_sum"], b[i]["ids"])
        assert guard.after_step(1) is False
        before = snapshot(engine)
        if poisoned:
            guard.micro_step(micro_step(engine, step, b[2], 3, nan=True)["loss_sum"], b[2]["ids"])
            guard.micro_step(micro_step(engine, step, b[3], 4)["loss_sum"], b[3]["ids"])
            assert guard.after_step(2) is True
            assert same(before, snapshot(engine)), "a skipped update changed parameters or optimizer state"
            assert guard.logger.records[-1]["nonfinite_loss_ids"] == b[2]["ids"]
            assert guard.logger.records[-1]["ids"] == b[2]["ids"] + b[3]["ids"]
        for i, seed in ((4, 5), (5, 6)):
            guard.micro_step(micro_step(engine, step, b[i], seed)["loss_sum"], b[i]["ids"])
        assert guard.after_step(3) is False
        after = snapshot(engine)
        assert not same(before, after) and all(torch.isfinite(t).all() for t in after[0])
        results.append(after)
    assert same(results[0], results[1]), "the skipped window left a trace in the next update"


def test_nonfinite_loss_poisons_the_gradients():
    w = torch.ones(3, requires_grad=True)
    for value, finite in ((1.0, True), (float("inf"), False), (float("nan"), False)):
        w.grad = None
        loss = (w * 2).sum()
        poison_nonfinite(loss, torch.tensor(value)).backward()
        assert bool(torch.isfinite(w.grad).all()) == finite
        if finite:
            assert torch.equal(w.grad, torch.full((3,), 2.0))


class FakeEngine:
    def __init__(self):
        self.skipped_steps = 0
        self.optimizer = type("WrappedOptimizer", (), {"overflow": False})()


def test_the_guard_stops_after_max_nonfinite_steps_within_the_window():
    engine, logger = FakeEngine(), ListLogger()
    guard = NonFiniteGuard(engine, window=3, max_nonfinite=2, logger=logger)
    assert not guard.own_check  # a DeepSpeed wrapper has its own overflow check
    for step, skip in ((1, True), (2, False), (3, False), (4, True), (5, False), (6, False), (7, True)):
        guard.micro_step(torch.tensor(float("nan") if skip else 1.0), [f"u{step}"])
        engine.skipped_steps += skip
        assert guard.after_step(step) is skip  # skips 3 steps apart never reach 2 within 3 steps
    guard.micro_step(torch.tensor(float("nan")), ["u8"])
    engine.skipped_steps += 1
    with pytest.raises(TrainingStopped, match="--max_nonfinite_steps 2.*--nan_guard_window 3"):
        guard.after_step(8)
    assert [r["step"] for r in logger.records] == [1, 4, 7, 8]
    assert logger.records[-1]["ids"] == ["u8"] and logger.records[-1]["skipped_in_window"] == 2


def test_fp16_overflow_with_a_finite_loss_is_not_a_guard_event():
    engine, logger = FakeEngine(), ListLogger()
    guard = NonFiniteGuard(engine, window=3, max_nonfinite=1, logger=logger, fp16=True)
    guard.micro_step(torch.tensor(2.0), ["u1"])
    engine.skipped_steps += 1
    assert guard.after_step(1) is False and guard.overflow_skips == 1 and not logger.records


def nan_batches(monkeypatch, bad_calls):
    """Test-only injection: the audio of the `bad_calls`-th prepared training batches (1-based) is NaN."""
    original, calls = PretrainStep.prepare, {"n": 0}

    def prepare(self, batch):
        calls["n"] += 1  # these runs have no validation set: every call is a training batch
        if calls["n"] in bad_calls:
            batch = dict(batch, input_values=batch["input_values"] * float("nan"))
        return original(self, batch)

    monkeypatch.setattr(PretrainStep, "prepare", prepare)


@pytest.mark.parametrize("stage", [0, 2])
def test_a_run_with_a_nan_batch_skips_it_logs_it_and_continues(corpus_dir, tmp_path, monkeypatch, capsys, stage):
    from engine.trainer import main as train
    nan_batches(monkeypatch, {3})
    train(parse_args(tiny_flags(corpus_dir, tmp_path, "--zero_stage", str(stage))))
    records = read_metrics(str(tmp_path))
    guard = [r for r in records if r["split"] == "guard"]
    train_logs = [r for r in records if r["split"] == "train"]
    assert len(guard) == 1 and guard[0]["step"] == 3 and guard[0]["event"] == "nonfinite"
    assert len(guard[0]["ids"]) == 4 and guard[0]["nonfinite_loss_ids"] == guard[0]["ids"]
    assert "NaN GUARD: step 3 skipped" in capsys.readouterr().err
    assert [r["step"] for r in train_logs] == [1, 2, 3, 4, 5, 6]
    assert "loss" not in train_logs[2]  # the only update of that window was skipped
    assert all(r["loss"] == r["loss"] and 0 < r["grad_norm"] < 1e3 for i, r in enumerate(train_logs) if i != 2)
    assert train_logs[-1]["skipped_steps"] == 1
    from engine.report import summarize
    text, warnings = summarize(str(tmp_path))
    assert "skipped non-finite updates: 1 at steps [3]" in text and "non-finite loss -- utterances" in text
    assert warnings == ["1 updates skipped for non-finite loss/gradients"]
    from safetensors.torch import load_file
    assert all(torch.isfinite(t).all() for t in load_file(str(tmp_path / "model.safetensors")).values())


def test_a_diverged_run_stops_with_a_clear_message(corpus_dir, tmp_path, monkeypatch, capsys):
    import pretrain
    nan_batches(monkeypatch, set(range(2, 100)))
    code = pretrain.main(tiny_flags(corpus_dir, tmp_path, "--max_train_steps", "10", "--max_nonfinite_steps", "3",
                                    "--nan_guard_window", "5"))
    err = capsys.readouterr().err
    assert code == 3
    assert "pretrain.py: stopped: stopping at step 4: 3 updates skipped" in err and "--max_nonfinite_steps 3" in err
    guard = [r for r in read_metrics(str(tmp_path)) if r["split"] == "guard"]
    assert [r["step"] for r in guard] == [2, 3, 4]


def test_the_collapse_alarm_warns_and_can_stop(corpus_dir, tmp_path, capsys):
    from engine.trainer import main as train
    train(parse_args(tiny_flags(corpus_dir, tmp_path / "warn", "--max_train_steps", "2",
                                "--min_codevector_perplexity", "1000")))
    alarms = [r for r in read_metrics(str(tmp_path / "warn")) if r["split"] == "guard"]
    assert [r["event"] for r in alarms] == ["collapse", "collapse"] and alarms[0]["threshold"] == 1000
    assert capsys.readouterr().err.count("CODEBOOK COLLAPSE ALARM") == 1  # once per crossing, not every log
    with pytest.raises(TrainingStopped, match="--stop_on_collapse"):
        train(parse_args(tiny_flags(corpus_dir, tmp_path / "stop", "--max_train_steps", "2",
                                    "--min_codevector_perplexity", "1000", "--stop_on_collapse")))
    assert json.loads((tmp_path / "stop" / "metrics.jsonl").read_text().splitlines()[-1])["event"] == "collapse"


@pytest.mark.parametrize("flags,message", [
    (["--nan_guard_window", "0"], "--nan_guard_window"),
    (["--max_nonfinite_steps", "-1"], "--max_nonfinite_steps"),
    (["--max_nonfinite_steps", "20", "--nan_guard_window", "10"], "--nan_guard_window 10"),
    (["--min_codevector_perplexity", "-1"], "--min_codevector_perplexity"),
    (["--min_codevector_perplexity", "0", "--stop_on_collapse"], "--stop_on_collapse"),
    (["--peak_tflops", "0"], "--peak_tflops"),
])
def test_guard_flags_are_validated(tmp_path, flags, message):
    with pytest.raises(ArgError, match=message):
        parse_args(tiny_flags(tmp_path, tmp_path / "out", *flags))


def test_two_ranks_skip_together_and_log_the_bad_ranks_ids(corpus_dir, tmp_path):
    """Rank 1's third batch is NaN: both ranks skip step 3 (ZeRO 0 fp32: the guard's own check, all-reduced),
    the record holds both ranks' ids and names rank 1's batch, and training goes on."""
    import os
    import subprocess
    from pathlib import Path
    from conftest import free_port
    root = Path(__file__).resolve().parents[1]
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(root), W2V_NAN_AT="1:3")
    for key in ("RANK", "LOCAL_RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(key, None)
    cmd = ["deepspeed", "--num_accelerators", "2", "--master_port", str(free_port()), str(root / "tests" / "nan_inject.py"),
           *tiny_flags(corpus_dir, tmp_path, "--zero_stage", "0", "--precision", "fp32", "--max_train_steps", "5")]
    proc = subprocess.run(cmd, cwd=root, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    records = read_metrics(str(tmp_path))
    guard = [r for r in records if r["split"] == "guard"]
    assert len(guard) == 1 and guard[0]["step"] == 3
    assert len(guard[0]["ids"]) == 8 and len(guard[0]["nonfinite_loss_ids"]) == 4
    assert set(guard[0]["nonfinite_loss_ids"]) == set(guard[0]["ids"][4:])  # rank 1's micro-batch
    logs = [r for r in records if r["split"] == "train"]
    assert [r["step"] for r in logs] == [1, 2, 3, 4, 5] and "loss" not in logs[2]
    assert all(r["loss"] == r["loss"] for r in logs if r["step"] != 3) and logs[-1]["skipped_steps"] == 1
