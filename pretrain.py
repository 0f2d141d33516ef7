#!/usr/bin/env python
"""Pre-train wav2vec 2.0 on unlabeled audio with DeepSpeed.

    deepspeed pretrain.py --deepspeed ds_configs/zero2.json --model_name_or_path base --dataset_name ...
    python pretrain.py --model_name_or_path demo --train_dir data/demo --output_dir outputs/demo

Every flag of HF's run_wav2vec2_pretraining_no_trainer.py works the same way; `--help` lists all.

    python pretrain.py report RUN_DIR      plots and a health summary of a run (= python -m engine.report)

Exit codes: 0 done, 2 bad flags/data/model, 3 stopped by a health check (NaN guard, collapse alarm).
"""
import sys

import torch

from engine.args import ArgError, parse_args
from engine.checkpoint import CheckpointError
from engine.data import DataError
from engine.guard import TrainingStopped
from engine.models import ModelError
from engine.planner import PlanError

USER_ERRORS = (ArgError, DataError, ModelError, PlanError, CheckpointError)
OOM_HINT = ("out of GPU memory: lower --per_device_train_batch_size (raise --gradient_accumulation_steps to keep "
            "the batch), --max_duration_in_seconds or --max_batch_seconds, or add --gradient_checkpointing, "
            "a higher --zero_stage or --offload")


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["report"]:
        from engine.report import main as report
        return report(argv[1:])
    try:
        args = parse_args(argv)
        from engine.trainer import main as train
        train(args)
    except USER_ERRORS as exc:  # bad flags, data or model: the message names the flag or file
        print(f"pretrain.py: error: {exc}", file=sys.stderr)
        return 2
    except TrainingStopped as exc:  # the run diverged or collapsed; metrics.jsonl says where
        print(f"pretrain.py: stopped: {exc}", file=sys.stderr)
        return 3
    except torch.OutOfMemoryError as exc:  # CUDA OOM: say which flags lower the memory
        print(f"pretrain.py: error: {OOM_HINT} ({str(exc).splitlines()[0] if str(exc) else type(exc).__name__})",
              file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
