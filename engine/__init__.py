"""w2v-engine: wav2vec 2.0 pre-training on DeepSpeed.

Modules (one job each; see docs/ARCHITECTURE.md):
  args        CLI flags (the HF example's, ours, DeepSpeed's) and their validation
  models      presets, config loading, model construction, the perplexity fix
  masking     span masks and negative sampling, vectorized torch on the model's device
  data        audio sources -> decoded, resampled, normalized, batched tensors
  ds_config   DeepSpeed config: stage/offload/precision derivation and flag reconciliation
  step        one training micro-step (masking, forward, loss scaling) and eval step
  trainer     the training loop
  checkpoint  save/resume
  metrics     JSONL / tqdm / wandb logging
  monitor     what the loop logs and checks each step: statistics window, guard, alarm, MFU
  guard       skip non-finite updates, log their utterance ids, stop a diverged run
  health      code perplexity (argmax codes) and the codebook-collapse alarm
  flops       analytic FLOP model of wav2vec 2.0 and MFU
  report      plots and a health summary of a run (python -m engine.report RUN_DIR)
"""
__version__ = "0.1.0"
