"""w2v-engine: wav2vec 2.0 pre-training on DeepSpeed.

Modules (one job each; see docs/ARCHITECTURE.md):
  args        CLI flags (the HF example's, ours, DeepSpeed's) and their validation
  models      presets, config loading, model construction, the perplexity fix
  masking     span masks and negative sampling on the model's device (torch; Triton kernels on CUDA)
  data/       audio sources -> decoded, resampled, normalized, batched tensors (index cache, length buckets)
  ds_config   DeepSpeed config: stage/offload/precision derivation and flag reconciliation
  step        one training micro-step (masking, forward, loss scaling) and eval step
  fastpath    sync-free pre-training forward (same losses and gradients as transformers'), torch.compile
  trainer     the training loop
  checkpoint  atomic DeepSpeed checkpoints and exact resume
  compat      what a checkpoint records about its run; resume refusals
  export      fp32 HF export of any checkpoint (python -m engine.export CKPT OUT), --init_from
  preempt     SIGTERM/SIGINT: finish the step, save, exit
  planner/    GPU memory planner (--gpu_memory_gb, python -m engine.planner)
  demo_corpus speech-like demo audio synthesized with numpy
  metrics     JSONL / tqdm / wandb logging
  monitor     what the loop logs and checks each step: statistics window, guard, alarm, MFU
  guard       skip non-finite updates, log their utterance ids, stop a diverged run
  health      code perplexity (argmax codes) and the codebook-collapse alarm
  flops       analytic FLOP model of wav2vec 2.0 and MFU
  report      plots and a health summary of a run (python -m engine.report RUN_DIR)
"""
__version__ = "0.1.0"
