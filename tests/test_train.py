"""End-to-end training on CPU: every ZeRO stage in fp32 and bf16, export, resume basics."""
import os
import pytest
import torch

from conftest import first_batch, tiny_flags
from engine.args import parse_args
from engine.metrics import read_metrics
from engine.trainer import main as train


def run(corpus, out, *extra):
    args = parse_args(tiny_flags(corpus, out, *extra))
    train(args)
    return [r for r in read_metrics(str(out)) if r["split"] == "train"]


@pytest.mark.parametrize("precision", ["fp32", "bf16"])
@pytest.mark.parametrize("stage", [0, 1, 2, 3])
def test_loss_falls_under_every_zero_stage(corpus_dir, tmp_path, stage, precision):
    logs = run(corpus_dir, tmp_path, "--zero_stage", str(stage), "--precision", precision, "--max_train_steps", "10")
    losses = [r["loss"] for r in logs]
    assert len(losses) == 10 and all(l == l for l in losses), losses  # no NaN
    assert sum(losses[-3:]) / 3 < sum(losses[:3]) / 3, losses
    assert all(0.0 < r["grad_norm"] < 1e3 for r in logs)
    assert (tmp_path / "model.safetensors").exists() and (tmp_path / "ds_config.json").exists()


def test_saved_model_loads_for_pretraining_and_ctc(corpus_dir, tmp_path):
    from transformers import Wav2Vec2FeatureExtractor, Wav2Vec2ForCTC, Wav2Vec2ForPreTraining
    run(corpus_dir, tmp_path, "--zero_stage", "2", "--max_train_steps", "2")
    model = Wav2Vec2ForPreTraining.from_pretrained(tmp_path)
    ctc = Wav2Vec2ForCTC.from_pretrained(tmp_path, vocab_size=32)
    fe = Wav2Vec2FeatureExtractor.from_pretrained(tmp_path)
    assert fe.sampling_rate == 16000 and fe.do_normalize
    x = torch.randn(1, 16000)
    with torch.no_grad():
        hidden = model.wav2vec2(x).last_hidden_state
        assert torch.allclose(ctc.wav2vec2(x).last_hidden_state, hidden, atol=1e-5)
        assert ctc(x).logits.shape[-1] == 32


def test_step_loss_equals_the_transformers_model_loss(corpus_dir):
    """Our step's per-frame loss is the HF model's summed loss over the masked frames (fp32, 1e-5)."""
    from transformers import Wav2Vec2ForPreTraining
    from engine.models import build_model, load_config
    from engine.step import MaskingSpec, PretrainStep

    batch = first_batch(corpus_dir)
    torch.manual_seed(0)
    ours = build_model(load_config("demo")).eval()
    reference = Wav2Vec2ForPreTraining(load_config("demo")).eval()
    reference.load_state_dict(ours.state_dict())
    step = PretrainStep(ours, MaskingSpec(0.5, 5, 0, 20), torch.device("cpu"),
                        generator=torch.Generator().manual_seed(0))
    inputs = step.prepare(batch)
    loss, stats = step.forward(ours, inputs)
    ref = reference(input_values=batch["input_values"], attention_mask=batch["attention_mask"],
                    mask_time_indices=inputs["mask_time_indices"],
                    sampled_negative_indices=inputs["sampled_negative_indices"])
    n = inputs["mask_time_indices"].sum()
    assert n > 0
    assert torch.allclose(loss, ref.loss / n, rtol=1e-5), (loss, ref.loss / n)
    assert torch.allclose(stats["contrastive_sum"], ref.contrastive_loss, rtol=1e-5)
    frames = torch.arange(inputs["mask_time_indices"].shape[1])
    padding = frames[None, :] >= inputs["frame_lengths"][:, None]
    assert padding.any() and not inputs["mask_time_indices"][padding].any()


def test_logged_losses_equal_the_transformers_model_losses(corpus_dir, tmp_path, monkeypatch):
    """The JSONL of a 1-step run whose one batch is the whole corpus holds the loss, contrastive loss,
    diversity loss and codevector perplexity that an unpatched transformers model computes from the same
    initial weights, batch, masks, negatives, gumbel noise and temperature (fp32, train mode)."""
    from transformers import Wav2Vec2ForPreTraining
    from engine.models import load_config
    from engine.step import PretrainStep

    seen = {}
    original_forward = PretrainStep.forward

    def forward(self, model, inputs):  # capture what the trainer's step feeds the model
        if not seen:
            seen.update(inputs={k: v.clone() for k, v in inputs.items() if torch.is_tensor(v)},
                        weights={k: v.clone() for k, v in self.module.state_dict().items()},
                        rng=torch.get_rng_state(), temperature=self.module.quantizer.temperature)
        return original_forward(self, model, inputs)

    monkeypatch.setattr(PretrainStep, "forward", forward)
    logs = run(corpus_dir, tmp_path, "--max_train_steps", "1", "--per_device_train_batch_size", "24",
               "--zero_stage", "0", "--precision", "fp32")
    assert len(logs) == 1 and seen["inputs"]["input_values"].shape[0] == 24

    reference = Wav2Vec2ForPreTraining(load_config("demo")).train()  # transformers' own perplexity
    reference.load_state_dict(seen["weights"])
    reference.set_gumbel_temperature(seen["temperature"])
    torch.set_rng_state(seen["rng"])  # the same gumbel noise
    inputs = seen["inputs"]
    if "attention_mask" not in inputs:  # the fast path passes sample lengths instead of the mask
        samples = torch.arange(inputs["input_values"].shape[1])
        inputs["attention_mask"] = (samples[None, :] < inputs["sample_lengths"][:, None]).long()
    with torch.no_grad():
        ref = reference(input_values=inputs["input_values"], attention_mask=inputs["attention_mask"],
                        mask_time_indices=inputs["mask_time_indices"],
                        sampled_negative_indices=inputs["sampled_negative_indices"])
    n = float(inputs["mask_time_indices"].sum())
    assert logs[0]["num_losses"] == n
    assert logs[0]["loss"] == pytest.approx(float(ref.loss) / n, rel=1e-5)
    assert logs[0]["contrastive_loss"] == pytest.approx(float(ref.contrastive_loss) / n, rel=1e-5)
    assert logs[0]["diversity_loss"] == pytest.approx(float(ref.diversity_loss) / n, rel=1e-5)
    assert logs[0]["codevector_perplexity"] == pytest.approx(float(ref.codevector_perplexity), rel=1e-5)


def test_resume_continues_from_the_last_checkpoint(corpus_dir, tmp_path):
    run(corpus_dir, tmp_path, "--max_train_steps", "4", "--saving_steps", "2")
    assert (tmp_path / "checkpoints" / "latest").read_text().strip() == "step_4"
    with pytest.raises(Exception, match="--resume"):
        run(corpus_dir, tmp_path, "--max_train_steps", "6")
    logs = run(corpus_dir, tmp_path, "--max_train_steps", "6", "--resume")
    assert [r["step"] for r in logs][-2:] == [5, 6]


def test_configure_allocator_defaults_to_expandable_segments_but_keeps_the_users(monkeypatch):
    from engine.trainer import configure_allocator
    monkeypatch.delenv("PYTORCH_CUDA_ALLOC_CONF", raising=False)
    monkeypatch.delenv("PYTORCH_ALLOC_CONF", raising=False)
    configure_allocator()
    assert os.environ["PYTORCH_CUDA_ALLOC_CONF"] == "expandable_segments:True"
    monkeypatch.setenv("PYTORCH_CUDA_ALLOC_CONF", "max_split_size_mb:128")
    configure_allocator()
    assert os.environ["PYTORCH_CUDA_ALLOC_CONF"] == "max_split_size_mb:128"
