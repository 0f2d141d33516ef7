"""DeepSpeed config derivation and the one rule for flags that the config can also set."""
import json

import pytest

from engine.args import ArgError, parse_args
from engine.ds_config import CONFIG_DIR, build_ds_config, load_config_file, offload_of, stage_config

BASE = ["--model_name_or_path", "demo", "--train_dir", ".", "--output_dir", "o"]


def cfg_for(*extra, world=1, device="cpu"):
    return build_ds_config(parse_args(BASE + list(extra)), world, device)


@pytest.mark.parametrize("stage", [0, 1, 2, 3])
def test_stage_flag_picks_the_stage_file(stage):
    cfg = cfg_for("--zero_stage", str(stage))
    assert cfg["zero_optimization"]["stage"] == stage
    assert offload_of(cfg) == "none"
    assert cfg["optimizer"]["params"]["torch_adam"] is True  # CPU: torch AdamW, not FusedAdam


@pytest.mark.parametrize("stage,offload,file", [(2, "optimizer", "zero2_offload.json"), (3, "all", "zero3_offload.json")])
def test_offload_flags_equal_the_offload_files(stage, offload, file):
    derived = cfg_for("--zero_stage", str(stage), "--offload", offload)
    from_file = cfg_for("--deepspeed", str(CONFIG_DIR / file))
    assert derived == from_file
    assert offload_of(derived) == offload
    assert "torch_adam" not in derived["optimizer"]["params"]  # DeepSpeedCPUAdam when offloading


def test_auto_values_are_filled_from_flags():
    cfg = cfg_for("--per_device_train_batch_size", "3", "--gradient_accumulation_steps", "5", "--learning_rate",
                  "0.002", "--adam_beta2", "0.98", "--weight_decay", "0.01", "--max_grad_norm", "1.5", world=4)
    assert cfg["train_micro_batch_size_per_gpu"] == 3 and cfg["gradient_accumulation_steps"] == 5
    assert cfg["train_batch_size"] == 60
    assert cfg["optimizer"]["params"] == {"lr": 0.002, "betas": [0.9, 0.98], "eps": 1e-8, "weight_decay": 0.01,
                                          "torch_adam": True}
    assert cfg["gradient_clipping"] == 1.5
    assert cfg["bf16"]["enabled"] is False and cfg["fp16"]["enabled"] is False  # auto on CPU = fp32


def test_bf16_flag_on_cpu():
    assert cfg_for("--precision", "bf16")["bf16"]["enabled"] is True


def test_disagreeing_config_is_refused(tmp_path):
    user = tmp_path / "ds.json"
    user.write_text(json.dumps({"train_micro_batch_size_per_gpu": 16, "zero_optimization": {"stage": 1}}))
    with pytest.raises(ArgError, match="train_micro_batch_size_per_gpu=16.*--per_device_train_batch_size"):
        cfg_for("--deepspeed", str(user))
    assert cfg_for("--deepspeed", str(user), "--per_device_train_batch_size", "16")["zero_optimization"]["stage"] == 1
    with pytest.raises(ArgError, match="--zero_stage 2 disagrees"):
        cfg_for("--deepspeed", str(user), "--per_device_train_batch_size", "16", "--zero_stage", "2")
    user.write_text(json.dumps({"optimizer": {"type": "AdamW", "params": {"lr": 0.1}}}))
    with pytest.raises(ArgError, match="--learning_rate"):
        cfg_for("--deepspeed", str(user))


def test_precision_auto_lets_the_config_decide_but_explicit_flags_must_agree(tmp_path):
    user = tmp_path / "ds.json"
    user.write_text(json.dumps({"bf16": {"enabled": True}}))
    assert cfg_for("--deepspeed", str(user))["bf16"]["enabled"] is True
    with pytest.raises(ArgError, match="--precision fp32 disagrees"):
        cfg_for("--deepspeed", str(user), "--precision", "fp32")


def test_config_files_parse_with_comments():
    for path in sorted(CONFIG_DIR.glob("*.json")):
        cfg = load_config_file(path)
        assert "zero_optimization" in cfg, path
    assert stage_config(3, "all")["zero_optimization"]["offload_param"]["device"] == "cpu"
