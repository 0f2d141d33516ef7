"""Shared fixtures: a tiny speech-like corpus made on the machine, and flag lists for tiny runs."""
import os
import socket

import pytest
import torch

torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))

# Without a GPU, Triton kernels can only run in Triton's interpreter (tests/test_masking.py runs the
# masking kernels so). Triton reads this when its @jit functions are defined, i.e. when triton is
# first imported (transformers imports it during collection), so it is set here, before any import.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")


def pytest_sessionfinish(session, exitstatus):
    # "no tests collected" (exit 5) is a failure for this project: CI must never pass on an empty run.
    if exitstatus == 5:
        session.exitstatus = 1


@pytest.fixture(scope="session")
def corpus_dir(tmp_path_factory):
    from engine.demo_corpus import make_demo_corpus
    return make_demo_corpus(str(tmp_path_factory.mktemp("corpus")), num_files=24, min_seconds=1.5,
                            max_seconds=2.5, seed=1)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def scratch_out(corpus) -> str:
    """An output dir beside the session's tiny corpus, for tests that build datasets but never train
    (the data index cache goes to --output_dir; it must not land in the checkout)."""
    return os.path.join(os.path.dirname(str(corpus)), "scratch-out")


def tiny_flags(corpus, out, *extra):
    """Flags of a short CPU run on the tiny corpus with the demo preset."""
    return ["--model_name_or_path", "demo", "--train_dir", str(corpus), "--output_dir", str(out),
            "--max_train_steps", "6", "--learning_rate", "5e-4", "--logging_steps", "1", "--saving_steps", "100",
            "--per_device_train_batch_size", "4", "--min_duration_in_seconds", "1", "--max_duration_in_seconds", "3",
            "--validation_split_percentage", "0", "--num_warmup_steps", "2", "--lr_scheduler_type", "linear",
            "--dataloader_num_workers", "0", *extra]


def first_batch(corpus, batch_size: int = 4) -> dict:
    """The first unshuffled batch of the tiny corpus, through the real data pipeline."""
    from engine.args import parse_args
    from engine.data import build_datasets, build_loader
    train_ds, _ = build_datasets(parse_args(tiny_flags(corpus, scratch_out(corpus))), 16000)
    return next(iter(build_loader(train_ds, batch_size=batch_size, shuffle=False, seed=0, epoch=0, rank=0,
                                  world_size=1, num_workers=0, pad_to_multiple_of=None)))
