"""Two CPU ranks through the real `deepspeed` launcher, and `python pretrain.py` refusals as a user sees them."""
import json
import os
import subprocess
import sys
from pathlib import Path

from conftest import free_port, tiny_flags

ROOT = Path(__file__).resolve().parents[1]


def test_two_ranks_through_the_deepspeed_launcher(corpus_dir, tmp_path):
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(ROOT))
    cmd = ["deepspeed", "--num_accelerators", "2", "--master_port", str(free_port()), str(ROOT / "pretrain.py"),
           *tiny_flags(corpus_dir, tmp_path, "--zero_stage", "2", "--max_train_steps", "3", "--saving_steps", "2")]
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "world 2" in proc.stdout
    records = [json.loads(l) for l in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records if r["split"] == "train"] == [1, 2, 3]
    cfg = json.loads((tmp_path / "ds_config.json").read_text())
    assert cfg["train_batch_size"] == 2 * 4
    assert (tmp_path / "model.safetensors").exists()


def test_cli_refuses_bad_input_before_training(tmp_path):
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    proc = subprocess.run([sys.executable, str(ROOT / "pretrain.py"), "--model_name_or_path", "demo",
                           "--output_dir", str(tmp_path)], env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2
    assert "missing dataset" in proc.stderr and "--dataset_name" in proc.stderr
    assert "Traceback" not in proc.stderr


def test_plan_only_prints_a_plan_and_refuses_what_cannot_fit(tmp_path):
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    base = [sys.executable, str(ROOT / "pretrain.py"), "--plan_only", "--max_duration_in_seconds", "20",
            "--per_device_train_batch_size", "2", "--gradient_accumulation_steps", "8"]
    ok = subprocess.run(base + ["--model_name_or_path", "xlsr-1b", "--gpu_memory_gb", "16", "--host_memory_gb", "64"],
                        env=env, capture_output=True, text=True, timeout=300)
    assert ok.returncode == 0, ok.stderr[-2000:]
    assert "offload" in ok.stdout and "optimizer" in ok.stdout and "GPU total (est.)" in ok.stdout
    bad = subprocess.run(base + ["--model_name_or_path", "xlsr-2b", "--gpu_memory_gb", "8", "--host_memory_gb", "16"],
                         env=env, capture_output=True, text=True, timeout=300)
    assert bad.returncode == 2 and "--gpu_memory_gb" in bad.stderr and "Traceback" not in bad.stderr
