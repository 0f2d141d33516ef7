"""Where metrics go: output_dir/metrics.jsonl (always, rank 0), a tqdm bar (rank 0), and wandb when
`--report_to wandb`. wandb is imported only then, and a wandb that cannot start (not installed, no
login) is reported once and switched off: it never stops a run.
"""
from __future__ import annotations

import json
import math
import os
import time

from tqdm.auto import tqdm


class MetricsLogger:
    def __init__(self, output_dir: str | None, *, is_main: bool, total_steps: int, initial_step: int = 0,
                 report_to: str = "none", run_config: dict | None = None, project: str | None = None,
                 run_name: str | None = None):
        self.is_main = is_main
        self.path = os.path.join(output_dir, "metrics.jsonl") if (output_dir and is_main) else None
        self.bar = tqdm(total=total_steps, initial=initial_step, disable=not is_main, desc="train",
                        unit="step", dynamic_ncols=True)
        self.wandb = None
        if is_main and report_to == "wandb":
            self.wandb = _start_wandb(project or os.path.basename(os.path.abspath(output_dir or "run")),
                                      run_name, run_config, output_dir, self.write)
        self.closed = False

    def write(self, text: str) -> None:
        """A line above the progress bar (rank 0 only)."""
        if self.is_main:
            self.bar.write(text)

    def log(self, step: int, metrics: dict, split: str = "train") -> None:
        """One record: `metrics` may hold numbers, None (not measured here, e.g. MFU on CPU) and, for the
        guard, strings and lists; only numbers go to the progress line and wandb."""
        if not self.is_main or self.closed:
            return
        record = {"step": step, "split": split, "time": round(time.time(), 3), **metrics}
        if self.path:
            with open(self.path, "a") as fh:
                fh.write(json.dumps(record, allow_nan=True) + "\n")
        if split == "train":
            keep = {k: metrics[k] for k in ("loss", "grad_norm", "lr", "audio_s_per_s") if k in metrics}
            self.bar.set_postfix({k: _short(v) for k, v in keep.items()}, refresh=False)
        shown = {k: v for k, v in metrics.items() if v is not None and not isinstance(v, list)}
        self.write(f"[{split} step {step}] " + " | ".join(f"{k} {_short(v)}" for k, v in shown.items()))
        numbers = {f"{split}/{k}": v for k, v in shown.items() if isinstance(v, (int, float))}
        if self.wandb is not None and numbers:
            try:
                self.wandb.log(numbers, step=step)
            except Exception as exc:  # a tracker outage must not stop training
                self.write(f"wandb.log failed ({exc}); wandb logging switched off")
                self.wandb = None

    def advance(self, n: int = 1) -> None:
        self.bar.update(n)

    def close(self) -> None:
        """End the progress bar and the wandb run (idempotent)."""
        if self.closed:
            return
        self.closed = True
        self.bar.close()
        if self.wandb is not None:
            try:
                self.wandb.finish()
            except Exception:
                pass


def _short(v) -> str:
    if isinstance(v, float):
        if math.isnan(v) or math.isinf(v):
            return str(v)
        return f"{v:.4g}"
    return str(v)


def _start_wandb(project, run_name, run_config, output_dir, write):
    try:
        import wandb
        config = {k: (v if isinstance(v, (int, float, str, bool, list, type(None))) else str(v))
                  for k, v in (run_config or {}).items() if k != "hub_token"}
        if output_dir:
            os.makedirs(output_dir, exist_ok=True)
        return wandb.init(project=project, name=run_name, config=config, dir=output_dir or None)
    except Exception as exc:
        write(f"--report_to wandb: wandb could not start ({type(exc).__name__}: {exc}); "
              "continuing with metrics.jsonl only")
        return None


def read_metrics(output_dir: str) -> list[dict]:
    """The records of output_dir/metrics.jsonl (for reports and tests)."""
    path = os.path.join(output_dir, "metrics.jsonl")
    with open(path) as fh:
        return [json.loads(line) for line in fh if line.strip()]
