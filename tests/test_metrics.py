"""Metrics: the FLOP model and MFU, code perplexity, what a run logs (JSONL, eval, wandb), the report, and
evidence that the demo recipe learns without a codebook collapse."""
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from transformers import Wav2Vec2Config

from conftest import tiny_flags, scratch_out
from engine.args import parse_args
from engine.flops import forward_flops, mfu, peak_flops, train_flops, train_flops_per_audio_second
from engine.health import CodePerplexityProbe, code_perplexity, default_collapse_threshold
from engine.metrics import read_metrics
from engine.models import build_model, load_config

ROOT = Path(__file__).resolve().parents[1]
TRAIN_KEYS = {"loss", "contrastive_loss", "diversity_loss", "codevector_perplexity", "code_perplexity", "grad_norm",
              "lr", "temperature", "masked_frac", "audio_s_per_s", "mfu", "padding_frac", "gpu_mem_peak_gib",
              "loss_scale", "skipped_steps", "num_losses", "epoch"}


def tiny_config(**kw):
    return Wav2Vec2Config(conv_dim=(4, 6), conv_kernel=(3, 2), conv_stride=(2, 2), hidden_size=8, num_hidden_layers=1,
                          num_attention_heads=2, intermediate_size=16, num_conv_pos_embeddings=4,
                          num_conv_pos_embedding_groups=2, num_codevector_groups=2, num_codevectors_per_group=3,
                          codevector_dim=4, proj_codevector_dim=5, num_negatives=3, **kw)


def test_flop_model_matches_a_manual_count():
    # 21 samples -> conv1: (21-3)//2+1 = 10 frames -> conv2: (10-2)//2+1 = 5 frames = T
    manual = (2 * 10 * 4 * 1 * 3          # conv 1: frames x C_out x C_in x kernel
              + 2 * 5 * 6 * 4 * 2         # conv 2
              + 2 * 5 * 6 * 8             # feature projection 6 -> 8
              + 2 * 5 * 8 * 4 * 4         # positional conv: d x d/groups x kernel
              + 2 * 5 * 4 * 8 * 8 + 2 * 5 * 2 * 8 * 16 + 4 * 5 * 5 * 8   # q,k,v,o + feed-forward + attention
              + 2 * 5 * 6 * 6 + 2 * 5 * 3 * 4                         # quantizer logits + codevector selection
              + 2 * 5 * 4 * 5 + 2 * 5 * 8 * 5                         # project_q + project_hid
              + 2 * 5 * 4 * 5)                                        # cosine similarity with 1 + 3 candidates
    assert forward_flops(tiny_config(), 21) == manual == 9680
    assert train_flops(tiny_config(), [21, 21]) == 6 * manual
    assert forward_flops(tiny_config(), 21, num_negatives=7) == manual + 2 * 5 * 4 * 5


@pytest.mark.parametrize("seconds", [1, 2])
def test_flop_model_agrees_with_torch_flop_counter(seconds):
    """torch's FlopCounterMode counts the matmuls and convolutions the demo model really runs; our count adds
    only the (non-matmul) codevector selection and cosine similarities on top."""
    from torch.utils.flop_counter import FlopCounterMode
    from engine.step import MaskingSpec, PretrainStep
    config = load_config("demo")
    model = build_model(config, attn_implementation="eager").eval()
    n = 16000 * seconds
    # transformers' forward: the FLOP model describes it (the fast path computes the same losses)
    step = PretrainStep(model, MaskingSpec(0.5, 5, 0, 20, fast_forward=False), torch.device("cpu"),
                        generator=torch.Generator().manual_seed(0))
    inputs = step.prepare({"input_values": torch.randn(1, n), "attention_mask": torch.ones(1, n, dtype=torch.long),
                           "ids": ["x"]})
    with FlopCounterMode(display=False) as counter, torch.no_grad():
        step.forward(model, inputs)
    T = inputs["mask_time_indices"].shape[1]
    elementwise = 2 * T * config.num_codevectors_per_group * config.codevector_dim \
        + 2 * T * (config.num_negatives + 1) * config.proj_codevector_dim
    assert forward_flops(config, n) - elementwise == pytest.approx(counter.get_total_flops(), rel=2e-3)
    assert inputs["flops"] == 3 * forward_flops(config, n, 20)


def test_base_needs_about_47_gflop_per_audio_second():
    base = load_config("base")
    assert train_flops_per_audio_second(base, 20) == pytest.approx(47.4e9, rel=0.01)
    assert 42e9 < train_flops_per_audio_second(base, 2) < train_flops_per_audio_second(base, 15) < 47e9


def test_peak_and_mfu():
    assert peak_flops(torch.device("cpu"), "fp32") is None
    assert peak_flops(torch.device("cpu"), "bf16", override_tflops=100) == 100e12
    assert mfu(1e12, 2.0, None) is None
    assert mfu(989e12, 1.0, 989e12, world_size=2) == 0.5


def test_code_perplexity_counts_argmax_codes_over_masked_frames():
    torch.manual_seed(0)
    B, T, G, V = 3, 7, 2, 5
    logits = torch.randn(B, T, G * V)
    mask = torch.rand(B, T) < 0.5
    mask[0, 0] = True
    expected = 0.0
    for g in range(G):
        codes = [int(logits[b, t, g * V:(g + 1) * V].argmax()) for b in range(B) for t in range(T) if mask[b, t]]
        p = torch.tensor([codes.count(v) / len(codes) for v in range(V)])
        expected += math.exp(-float((p * torch.log(p + 1e-7)).sum()))
    assert float(code_perplexity(logits, mask, G, V)) == pytest.approx(expected, rel=1e-6)
    same_code = torch.zeros(B, T, G * V)
    same_code[..., 0] = same_code[..., V] = 1.0
    assert float(code_perplexity(same_code, mask, G, V)) == pytest.approx(G, rel=1e-5)  # full collapse: 1 per group


def test_the_probe_measures_only_when_armed_and_matches_the_eval_perplexity(corpus_dir):
    """In eval mode transformers' quantizer takes the argmax, so its perplexity is the code perplexity."""
    from engine.data import build_datasets, build_loader
    from engine.step import MaskingSpec, PretrainStep
    args = parse_args(tiny_flags(corpus_dir, scratch_out(corpus_dir)))
    batch = next(iter(build_loader(build_datasets(args, 16000)[0], batch_size=4, shuffle=False, seed=0, epoch=0,
                                   rank=0, world_size=1, num_workers=0, pad_to_multiple_of=None)))
    torch.manual_seed(0)
    model = build_model(load_config("demo")).eval()
    step = PretrainStep(model, MaskingSpec(0.5, 5, 0, 20), torch.device("cpu"), generator=torch.Generator().manual_seed(0))
    assert CodePerplexityProbe.of(model) is step.probe  # one hook per model
    inputs = step.prepare(batch)
    with torch.no_grad():
        _, stats = step.forward(model, inputs)
        assert "code_ppl" not in stats
        step.measure_codes = True
        _, stats = step.forward(model, inputs)
    assert float(stats["code_ppl"]) == pytest.approx(float(stats["ppl"]), rel=1e-5)
    assert 2 <= float(stats["code_ppl"]) <= 64


def test_default_collapse_threshold():
    assert default_collapse_threshold(load_config("base")) == pytest.approx(12.8)
    assert default_collapse_threshold(load_config("demo")) == 4.0


def test_a_run_logs_every_metric_and_evaluates_every_n_steps(corpus_dir, tmp_path):
    from engine.trainer import main as train
    train(parse_args(tiny_flags(corpus_dir, tmp_path, "--max_train_steps", "4", "--logging_steps", "2",
                                "--validation_split_percentage", "25", "--eval_steps", "2",
                                "--per_device_eval_batch_size", "3")))
    records = read_metrics(str(tmp_path))
    train_logs = [r for r in records if r["split"] == "train"]
    evals = [r for r in records if r["split"] == "eval"]
    assert [r["step"] for r in train_logs] == [2, 4] and [r["step"] for r in evals] == [2, 4]
    for r in train_logs:
        assert TRAIN_KEYS <= set(r), TRAIN_KEYS - set(r)
        assert r["mfu"] is None and r["gpu_mem_peak_gib"] is None and r["loss_scale"] is None  # CPU, fp32
        assert 0 < r["masked_frac"] < 1 and 0 <= r["padding_frac"] < 1 and r["audio_s_per_s"] > 0
        assert 2 <= r["code_perplexity"] <= 64 and r["skipped_steps"] == 0
    for r in evals:
        assert {"val_loss", "val_contrastive_loss", "val_diversity_loss", "val_codevector_perplexity",
                "val_code_perplexity"} <= set(r)
        assert r["val_code_perplexity"] == pytest.approx(r["val_codevector_perplexity"], rel=1e-5)  # argmax in eval
    assert evals[0]["val_loss"] != evals[1]["val_loss"]  # the model changed between the two evaluations


def test_wandb_offline_gets_project_and_run_name(corpus_dir, tmp_path, monkeypatch):
    wandb = pytest.importorskip("wandb")
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    calls, real_init = {}, wandb.init

    def init(**kwargs):
        calls.update(kwargs)
        run = real_init(**kwargs)
        real_log, calls["logged"] = run.log, []
        run.log = lambda data, **kw: (calls["logged"].append(data), real_log(data, **kw))[1]
        return run

    monkeypatch.setattr(wandb, "init", init)
    from engine.trainer import main as train
    train(parse_args(tiny_flags(corpus_dir, tmp_path, "--max_train_steps", "2", "--report_to", "wandb",
                                "--wandb_project", "w2v-test", "--wandb_run_name", "tiny-run")))
    assert calls["project"] == "w2v-test" and calls["name"] == "tiny-run" and calls["dir"] == str(tmp_path)
    assert calls["config"]["lr_scheduler_type"] == "linear" and "hub_token" not in calls["config"]
    assert len(calls["logged"]) == 2 and {"train/loss", "train/code_perplexity", "train/grad_norm"} <= set(calls["logged"][0])
    assert "train/mfu" not in calls["logged"][0]  # None (CPU) is left out, not sent
    assert any(name.startswith("offline-run-") for name in os.listdir(tmp_path / "wandb"))


def test_a_missing_wandb_login_does_not_stop_a_run(corpus_dir, tmp_path):
    """A real wandb in online mode without any API key: the run warns and finishes (own process, since wandb
    keeps its first settings for the life of a process)."""
    pytest.importorskip("wandb")
    launcher = ("RANK", "LOCAL_RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")  # set by in-process runs
    env = {k: v for k, v in os.environ.items() if not k.startswith("WANDB_") and k not in launcher}
    # a HOME without wandb settings or .netrc; DeepSpeed's JIT-built ops stay where they were built
    extensions = os.environ.get("TORCH_EXTENSIONS_DIR", os.path.expanduser("~/.cache/torch_extensions"))
    env.update(HOME=str(tmp_path), WANDB_CONFIG_DIR=str(tmp_path / "wandb-config"), WANDB_MODE="online",
               TORCH_EXTENSIONS_DIR=extensions, OMP_NUM_THREADS="1", PYTHONPATH=str(ROOT))
    out = tmp_path / "run"
    proc = subprocess.run([sys.executable, "pretrain.py", *tiny_flags(corpus_dir, out, "--max_train_steps", "1",
                                                                      "--report_to", "wandb")],
                          env=env, cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "--report_to wandb: wandb could not start" in proc.stdout + proc.stderr
    assert [r["step"] for r in read_metrics(str(out)) if r["split"] == "train"] == [1]


@pytest.fixture(scope="module")
def demo_run(corpus_dir, tmp_path_factory):
    """The demo recipe for 60 steps on the tiny corpus (~15 s on a free CPU core)."""
    from engine.trainer import main as train
    out = tmp_path_factory.mktemp("demo_run")
    train(parse_args(tiny_flags(corpus_dir, out, "--max_train_steps", "60", "--logging_steps", "10",
                                "--learning_rate", "1e-3", "--num_warmup_steps", "10",
                                "--lr_scheduler_type", "constant_with_warmup", "--zero_stage", "0")))
    return out


def test_the_demo_recipe_learns_without_codebook_collapse(demo_run):
    records = read_metrics(str(demo_run))
    logs = [r for r in records if r["split"] == "train"]
    assert len(logs) == 6 and not [r for r in records if r["split"] == "guard"]  # no skip, no collapse alarm
    first = (logs[0]["loss"] + logs[1]["loss"]) / 2
    last = (logs[-2]["loss"] + logs[-1]["loss"]) / 2
    assert last < 0.97 * first, [r["loss"] for r in logs]
    threshold = default_collapse_threshold(load_config("demo"))
    assert min(r["codevector_perplexity"] for r in logs) > 2 * threshold
    assert min(r["code_perplexity"] for r in logs) > threshold
    assert logs[-1]["codevector_perplexity"] > logs[0]["codevector_perplexity"]  # the codebook spreads out


@pytest.mark.skipif(not os.environ.get("W2V_SLOW"), reason="300 CPU steps (1-5 min); set W2V_SLOW=1")
def test_the_demo_recipe_over_300_steps(corpus_dir, tmp_path):
    """The longer evidence: loss -30%, both perplexities rising far from collapse (docs/METRICS.md)."""
    from engine.trainer import main as train
    train(parse_args(tiny_flags(corpus_dir, tmp_path, "--max_train_steps", "300", "--logging_steps", "10",
                                "--learning_rate", "1e-3", "--num_warmup_steps", "30", "--saving_steps", "1000")))
    logs = [r for r in read_metrics(str(tmp_path)) if r["split"] == "train"]
    assert sum(r["loss"] for r in logs[-5:]) < 0.8 * sum(r["loss"] for r in logs[:5])
    assert min(r["code_perplexity"] for r in logs) > 2 * default_collapse_threshold(load_config("demo"))
    assert logs[-1]["codevector_perplexity"] > 2 * logs[0]["codevector_perplexity"]


def test_report_plots_and_summarizes_a_real_run(demo_run, capsys):
    from engine.report import PLOTS, main as report
    assert report([str(demo_run)]) == 0
    text = capsys.readouterr().out
    for line in ("steps logged: 6 (step 10 to 60)", "grad norm: median", "codevector_perplexity: first",
                 "code_perplexity: first", "of 64", "skipped non-finite updates: 0", "codebook collapse alarms: 0",
                 "throughput: median", "verdict: HEALTHY"):
        assert line in text, text
    for name in (*PLOTS, "overview"):
        path = demo_run / "report" / f"{name}.png"
        assert path.stat().st_size > 10_000 and path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert (demo_run / "report" / "summary.txt").read_text().startswith("run ")
    import pretrain
    assert pretrain.main(["report", str(demo_run), "--no_plots"]) == 0
    assert pretrain.main(["report", str(demo_run / "nothing")]) == 2
