"""engine/ds_patches.py: DeepSpeed's overflow check of ZeRO-0 (bf16) reads the host once, not once per parameter,
and gives the same answer (finite gradients: step taken; a NaN in one parameter: step skipped)."""
import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from conftest import scratch_out, tiny_flags
from engine import ds_patches
from engine.args import parse_args


class _HostReads(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.count = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func.__name__.split(".")[0] in ("_local_scalar_dense", "is_nonzero"):
            self.count += 1
        return func(*args, **(kwargs or {}))


def _engine(corpus_dir):
    import deepspeed
    from engine.ds_config import build_ds_config
    from engine.models import build_model, load_config
    from engine.trainer import param_groups, setup_distributed

    setup_distributed()
    args = parse_args(tiny_flags(corpus_dir, scratch_out(corpus_dir), "--zero_stage", "0", "--precision", "bf16"))
    torch.manual_seed(0)
    model = build_model(load_config("demo"))
    engine, *_ = deepspeed.initialize(model=model, model_parameters=param_groups(model, 0.0),
                                      config=build_ds_config(args, 1, "cpu"))
    return engine


def _overflow_reads(engine, poison: bool):
    checker = engine.optimizer.overflow_checker
    params = list(engine.module.parameters())
    for p in params:
        p.grad = torch.ones_like(p)
    if poison:
        params[len(params) // 2].grad.view(-1)[3] = float("nan")
    with _HostReads() as reads:
        answer = checker.has_overflow_serial(params)
    return answer, reads.count, len(params)


@pytest.mark.parametrize("poison", [False, True])
def test_one_host_read_and_the_same_answer(corpus_dir, poison):
    engine = _engine(corpus_dir)           # setup_distributed applied the patch
    answer, reads, n = _overflow_reads(engine, poison)
    assert answer is poison
    assert reads == 1
    from deepspeed.runtime.utils import CheckOverflow
    original = CheckOverflow._w2v_original_has_overflow_serial
    params = list(engine.module.parameters())
    with _HostReads() as slow:
        assert original(engine.optimizer.overflow_checker, params) is poison
    assert slow.count >= (n // 2 if poison else n) > 10       # the unpatched check reads once per parameter


def test_apply_is_idempotent():
    from deepspeed.runtime.utils import CheckOverflow
    ds_patches.apply()
    ds_patches.apply()
    assert CheckOverflow.has_overflow_serial is ds_patches._has_overflow_serial
    assert CheckOverflow._w2v_original_has_overflow_serial is not ds_patches._has_overflow_serial
