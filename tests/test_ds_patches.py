"""engine/ds_patches.py: DeepSpeed's overflow check of ZeRO-0 (bf16) reads the host once, not once per parameter,
and gives the same answer (finite gradients: step taken; a NaN in one parameter: step skipped); the patched
FP16_Optimizer step equals DeepSpeed's bit for bit with a fixed handful of ops."""
import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from conftest import scratch_out, tiny_flags
from engine import ds_patches
from engine.args import parse_args


class _OpCount(TorchDispatchMode):
    """Counts the dispatched ops whose name `counts` accepts."""
    HOST_READS = ("_local_scalar_dense", "is_nonzero")
    FREE = ("detach", "view", "slice", "select", "alias", "lift_fresh", "_record_function_enter_new",
            "_record_function_exit")   # views and bookkeeping: no kernel launch on a GPU

    def __init__(self, counts):
        super().__init__()
        self.counts, self.count = counts, 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.count += bool(self.counts(func.__name__.split(".")[0]))
        return func(*args, **(kwargs or {}))


def _host_reads() -> _OpCount:
    return _OpCount(lambda name: name in _OpCount.HOST_READS)


def _computing_ops() -> _OpCount:
    return _OpCount(lambda name: name not in _OpCount.FREE)


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
    with _host_reads() as reads:
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
    with _host_reads() as slow:
        assert original(engine.optimizer.overflow_checker, params) is poison
    assert slow.count >= (n // 2 if poison else n) > 10       # the unpatched check reads once per parameter


def test_apply_is_idempotent():
    from deepspeed.runtime.utils import CheckOverflow
    ds_patches.apply()
    ds_patches.apply()
    assert CheckOverflow.has_overflow_serial is ds_patches._has_overflow_serial
    from deepspeed.runtime.fp16.fused_optimizer import FP16_Optimizer
    assert FP16_Optimizer.step is ds_patches._step and FP16_Optimizer._w2v_original_step is not ds_patches._step
    assert CheckOverflow._w2v_original_has_overflow_serial is not ds_patches._has_overflow_serial


def _fused_wrapper(dtype=torch.bfloat16):
    """DeepSpeed's FP16_Optimizer as the engine builds it on a GPU at ZeRO-0 (there the basic optimizer is FusedAdam;
    on CPU DeepSpeed would pick FP16_UnfusedOptimizer, so the wrapper is built directly around torch's AdamW)."""
    from deepspeed.runtime.fp16.fused_optimizer import FP16_Optimizer
    from engine.models import build_model, load_config
    torch.manual_seed(0)
    model = build_model(load_config("demo")).to(dtype)
    opt = FP16_Optimizer(torch.optim.AdamW(model.parameters(), lr=1e-3, weight_decay=0.01),
                         low_precision_dtype=dtype, clip_grad=1.0)
    return model, opt


def _set_grads(model, seed: int, scale: float, poison: bool = False):
    gen = torch.Generator().manual_seed(seed)
    params = list(model.parameters())
    for p in params:
        p.grad = (torch.randn(p.shape, generator=gen) * scale).to(p.dtype)
    if poison:
        params[5].grad.view(-1)[0] = float("inf")


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_fast_step_equals_deepspeeds_step(dtype):
    """The patched FP16_Optimizer.step gives bit-identical bf16 parameters, fp32 master weights and gradient norm to
    DeepSpeed's own step, through clipped, unclipped and skipped (inf gradient) steps, with far fewer ops."""
    from deepspeed.runtime.fp16.fused_optimizer import FP16_Optimizer
    ds_patches.apply()
    (m_ours, ours), (m_ref, ref) = _fused_wrapper(dtype), _fused_wrapper(dtype)
    start = [f.detach().clone() for f in ours.fp32_groups_flat]
    assert ds_patches._fast_step_applies(ours)
    n = sum(len(g) for g in ours.fp16_groups)
    for step, (scale, poison) in enumerate([(1e-3, False), (10.0, False), (1.0, True), (1e-2, False)]):
        for m in (m_ours, m_ref):
            _set_grads(m, step, scale, poison)
        with _computing_ops() as fast:
            skipped = ours.step()
        with _computing_ops() as slow:
            skipped_ref = FP16_Optimizer._w2v_original_step(ref)
        assert skipped == skipped_ref == poison
        assert ours._global_grad_norm == ref._global_grad_norm
        for a, b in zip(m_ours.parameters(), m_ref.parameters()):
            assert a.dtype == dtype and torch.equal(a, b)
            assert a.grad is None and b.grad is None
        for a, b in zip(ours.fp32_groups_flat, ref.fp32_groups_flat):
            assert torch.equal(a, b) and a.grad is None
        assert fast.count <= 25 < n < slow.count / 10, (fast.count, slow.count, n)
    for master, first in zip(ours.fp32_groups_flat, start):       # the steps moved (nearly) every master weight
        assert (master != first).float().mean() > 0.99


def test_fast_step_falls_back_when_parameters_left_the_flat_buffer():
    ds_patches.apply()
    model, opt = _fused_wrapper()
    p = next(model.parameters())
    p.data = p.data.clone()                               # no longer a view of the flat bf16 buffer
    assert not ds_patches._fast_step_applies(opt)
    _set_grads(model, 0, 1e-3)
    before = p.detach().clone()
    assert opt.step() is False                            # DeepSpeed's own step ran
    assert p.grad is None and not torch.equal(p, before)
