"""Units and choice lists shared by the planner's modules."""
from __future__ import annotations

GIB = 2 ** 30
SAMPLING_RATE = 16_000

OFFLOADS = ("none", "optimizer", "all")
PRECISIONS = ("bf16", "fp16", "fp32")
