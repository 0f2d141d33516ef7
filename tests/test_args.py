"""Flags: the seed's three README recipes parse; bad flags are refused with a message naming the flag."""
import re
import shlex
from pathlib import Path

import pytest

from engine.args import ArgError, parse_args
from engine.ds_config import build_ds_config

SEED_README = Path(__file__).resolve().parents[2] / "shared" / "reference" / "hf-speech-pretraining-README.md"


def seed_commands():
    """The demo, base and large commands of the HF README, launcher swapped for ours."""
    text = SEED_README.read_text()
    blocks = re.findall(r"```bash\n(accelerate launch run_wav2vec2_pretraining_no_trainer.py.*?)```", text, re.S)
    assert len(blocks) == 3
    return [shlex.split(b.replace("\\\n", " "))[3:] for b in blocks]  # drop "accelerate launch script.py"


@pytest.mark.skipif(not SEED_README.exists(), reason="../shared/reference not beside the checkout")
@pytest.mark.parametrize("i", [0, 1, 2], ids=["demo", "base", "large"])
def test_seed_recipes_parse(i):
    args = parse_args(seed_commands()[i])
    assert args.dataset_name == "librispeech_asr"
    assert args.gradient_checkpointing and args.mask_time_prob == 0.65 and args.mask_time_length == 10
    assert args.adam_beta2 == 0.98 and args.adam_epsilon == 1e-06
    cfg = build_ds_config(args, world_size=8, device_type="cpu")
    assert cfg["train_batch_size"] == args.per_device_train_batch_size * args.gradient_accumulation_steps * 8
    assert cfg["optimizer"]["params"]["lr"] == args.learning_rate


def test_hf_defaults_are_kept():
    a = parse_args(["--model_name_or_path", "demo", "--train_dir", ".", "--output_dir", "o"])
    assert (a.learning_rate, a.per_device_train_batch_size, a.max_duration_in_seconds, a.min_duration_in_seconds,
            a.logging_steps, a.saving_steps, a.max_gumbel_temperature, a.min_gumbel_temperature,
            a.gumbel_temperature_decay, a.validation_split_percentage, a.adam_beta2, a.num_train_epochs) == \
           (5e-5, 8, 5.0, 3.0, 500, 500, 2.0, 0.5, 0.999995, 1, 0.999, 3)


BASE = ["--model_name_or_path", "demo", "--train_dir", ".", "--output_dir", "o"]


@pytest.mark.parametrize("argv,flag", [
    (["--model_name_or_path", "demo", "--output_dir", "o"], "--dataset_name"),
    (BASE + ["--offload", "optimizer", "--zero_stage", "0"], "--offload"),
    (BASE + ["--offload", "all", "--zero_stage", "2"], "--zero_stage 3"),
    (BASE + ["--learning_rate", "0"], "--learning_rate"),
    (BASE + ["--mask_time_prob", "1.5"], "--mask_time_prob"),
    (BASE + ["--deepspeed", "missing.json"], "--deepspeed"),
    (["--model_name_or_path", "demo", "--train_dir", "."], "--output_dir"),
    (BASE + ["--dataset_name", "x", "--dataset_config_names", "a", "b", "--dataset_split_names", "c"],
     "--dataset_config_names"),
])
def test_bad_flags_are_refused_by_name(argv, flag):
    with pytest.raises(ArgError, match=re.escape(flag)):
        parse_args(argv)


def test_unknown_zero_stage_is_refused(capsys):
    with pytest.raises(SystemExit) as exc:
        parse_args(BASE + ["--zero_stage", "4"])
    assert exc.value.code == 2
    assert "--zero_stage" in capsys.readouterr().err


def test_fp16_on_cpu_is_refused():
    with pytest.raises(ArgError, match="--precision fp16.*GPU"):
        build_ds_config(parse_args(BASE + ["--precision", "fp16"]), 1, "cpu")


def test_help_documents_every_flag(capsys):
    with pytest.raises(SystemExit):
        parse_args(["--help"])
    out = capsys.readouterr().out
    for flag in ("--mask_time_min_masks", "--num_negatives", "--report_to", "--resume", "--zero_stage",
                 "--offload", "--deepspeed", "--local_rank", "--train_dir"):
        assert flag in out
