"""Nothing lost: kill -9 / SIGTERM at random steps then --resume reproduces the uninterrupted run's losses
exactly (CPU, fp32, fixed seed); a crash inside a save leaves the previous checkpoint usable.

Runs are subprocesses of `python pretrain.py` on the tiny corpus (8 steps, 6 micro-batches per epoch, so
the runs cross an epoch boundary), killed when metrics.jsonl shows the chosen step.
"""
import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from conftest import tiny_flags

ROOT = Path(__file__).resolve().parents[1]
STEPS = 8
ENV = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(ROOT), PYTHONUNBUFFERED="1")


def flags(corpus, out, *extra):
    return [sys.executable, str(ROOT / "pretrain.py"),
            *tiny_flags(corpus, out, "--max_train_steps", str(STEPS), "--saving_steps", "1", "--zero_stage", "2",
                        "--precision", "fp32", "--keep_last_checkpoints", "3", *extra)]


def start(cmd, log: Path, **env):
    fh = open(log, "a")
    return subprocess.Popen(cmd, cwd=ROOT, env=dict(ENV, **env), stdout=fh, stderr=subprocess.STDOUT)


def train_records(out: Path) -> list[dict]:
    path = out / "metrics.jsonl"
    if not path.exists():
        return []
    records = []
    for line in path.read_text().splitlines():
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError:  # a line being written
            pass
    return [r for r in records if r["split"] == "train"]


def losses(out: Path) -> dict[int, float]:
    """Per-step loss; a resumed run re-logs the steps after its checkpoint, the last record wins."""
    return {r["step"]: r["loss"] for r in train_records(out)}


def wait_for_step(proc, out: Path, step: int, timeout: float = 120) -> None:
    t0 = time.time()
    while time.time() - t0 < timeout:
        if any(r["step"] >= step for r in train_records(out)):
            return
        assert proc.poll() is None, f"run ended (rc {proc.returncode}) before step {step}"
        time.sleep(0.05)
    raise AssertionError(f"step {step} not reached in {timeout} s")


def finish(proc, timeout: float = 180) -> int:
    try:
        return proc.wait(timeout=timeout)
    finally:
        if proc.poll() is None:
            proc.kill()


@pytest.fixture(scope="module")
def reference(corpus_dir, tmp_path_factory):
    """The uninterrupted run (no DataLoader workers)."""
    out = tmp_path_factory.mktemp("reference")
    proc = start(flags(corpus_dir, out), out / "log.txt")
    assert finish(proc) == 0, (out / "log.txt").read_text()[-3000:]
    result = losses(out)
    assert sorted(result) == list(range(1, STEPS + 1))
    return result


def test_sigkill_and_sigterm_at_random_steps_then_resume_give_the_same_losses(corpus_dir, tmp_path, reference):
    """kill -9 twice and SIGTERM once, at seeded random steps, with 2 DataLoader workers: equal losses."""
    rng = random.Random(20240806)
    kill1 = rng.randint(1, 2)
    term = rng.randint(kill1 + 1, 4)
    kill2 = rng.randint(term + 1, 6)
    log = tmp_path / "log.txt"
    cmd = flags(corpus_dir, tmp_path, "--dataloader_num_workers", "2")

    proc = start(cmd, log)
    wait_for_step(proc, tmp_path, kill1)
    proc.send_signal(signal.SIGKILL)
    finish(proc)

    proc = start(cmd + ["--resume"], log)
    wait_for_step(proc, tmp_path, term)
    proc.send_signal(signal.SIGTERM)
    assert finish(proc) == 0, log.read_text()[-3000:]
    text = log.read_text()
    assert "SIGTERM received" in text and "Continue with the same command and --resume" in text
    stopped_at = max(losses(tmp_path))
    assert stopped_at < STEPS
    assert (tmp_path / "checkpoints" / "latest").read_text() == f"step_{stopped_at}"

    proc = start(cmd + ["--resume"], log)
    wait_for_step(proc, tmp_path, kill2)
    proc.send_signal(signal.SIGKILL)
    finish(proc)

    proc = start(cmd + ["--resume"], log)
    assert finish(proc) == 0, log.read_text()[-3000:]
    assert log.read_text().count("resumed from") == 3
    assert losses(tmp_path) == reference  # bit-equal floats: same ops, same order, same RNG streams


def test_crash_inside_a_save_leaves_the_previous_checkpoint_usable(corpus_dir, tmp_path, reference):
    """W2V_TEST_CRASH_IN_SAVE=4 kills the run after writing .tmp-step_4, before the rename."""
    log = tmp_path / "log.txt"
    cmd = flags(corpus_dir, tmp_path, "--saving_steps", "2")
    proc = start(cmd, log, W2V_TEST_CRASH_IN_SAVE="4")
    assert finish(proc) == 1
    root = tmp_path / "checkpoints"
    assert (root / "latest").read_text() == "step_2"
    assert (root / ".tmp-step_4").is_dir() and not (root / "step_4").exists()

    proc = start(cmd + ["--resume"], log)
    assert finish(proc) == 0, log.read_text()[-3000:]
    assert "resumed from" in log.read_text() and "step_2 at step 2" in log.read_text()
    assert not (root / ".tmp-step_4").exists()
    assert (root / "latest").read_text() == f"step_{STEPS}"
    # saving every 2 steps instead of every step changes nothing: a save consumes no randomness
    assert losses(tmp_path) == reference


def _group_alive(pgid: int) -> bool:
    try:
        os.killpg(pgid, 0)
        return True
    except ProcessLookupError:
        return False


def test_sigterm_to_a_two_rank_launcher_job_saves_and_resumes(corpus_dir, tmp_path):
    """SLURM-style preemption: SIGTERM to every process of the job (deepspeed runner, launch.py, both ranks,
    their DataLoader workers); launch.py forwards it again. Both ranks stop after the same step and save."""
    from conftest import free_port
    log = tmp_path / "log.txt"

    def cmd():
        return ["deepspeed", "--num_accelerators", "2", "--master_port", str(free_port()), *flags(
            corpus_dir, tmp_path, "--saving_steps", "100", "--dataloader_num_workers", "1", "--max_train_steps", "4")[1:]]

    fh = open(log, "a")
    proc = subprocess.Popen(cmd(), cwd=ROOT, env=ENV, stdout=fh, stderr=subprocess.STDOUT, start_new_session=True)
    wait_for_step(proc, tmp_path, 2, timeout=300)
    os.killpg(proc.pid, signal.SIGTERM)
    proc.wait(timeout=120)  # deepspeed's runner dies at once; launch.py and the ranks go on to save
    t0 = time.time()
    while _group_alive(proc.pid) and time.time() - t0 < 120:
        time.sleep(0.2)
    assert not _group_alive(proc.pid)
    text = log.read_text()
    assert text.count("SIGTERM received") == 2 and "exiting now" not in text, text[-3000:]
    stopped_at = max(losses(tmp_path))
    assert stopped_at < 4 and f"stopped by SIGTERM after step {stopped_at}" in text
    assert (tmp_path / "checkpoints" / "latest").read_text() == f"step_{stopped_at}"

    proc = subprocess.Popen(cmd() + ["--resume"], cwd=ROOT, env=ENV, stdout=fh, stderr=subprocess.STDOUT)
    assert finish(proc, timeout=300) == 0, log.read_text()[-3000:]
    assert f"resumed from {tmp_path / 'checkpoints' / f'step_{stopped_at}'} at step {stopped_at}" in log.read_text()
    assert sorted(losses(tmp_path)) == [1, 2, 3, 4]
