"""Measured evidence that ``implementation="auto"`` reads on a GPU: where the fused "pallas" kernel was timed
faster than the blockwise one.

"auto" sends a request to the fused kernel only where a measurement on the same class of GPU, for the same
metric, head_dim and dtype, found it faster (forward+backward, the cost a training step pays); everywhere else
the blockwise kernel, whose speed is XLA's and needs no tuning, is the safer choice. The table is empty until a
GPU run fills it: ``experiments/gpu_report.py`` measures both kernels side by side and prints the entries to
paste here, with the report they come from. A missing entry is "no evidence", never a guess.

Gram metrics do not need an entry: on a GPU "auto" routes them to the platform's own flash attention
(:mod:`distattn_jax.kernels.routed`, cuDNN) wherever that accepts the request.
"""

from __future__ import annotations

import re

# (GPU class, metric, head_dim, dtype) -> the blockwise kernel's forward+backward time over the fused kernel's,
# median of 5 after a warm-up, batch 1, 16 heads, N = 8192 (experiments/gpu_report.py, part B). > 1 means the
# fused kernel was faster.
PALLAS_OVER_BLOCKWISE: dict[tuple[str, str, int, str], float] = {}


def gpu_class(device_kind: str) -> str:
  """The GPU's model as the table keys it: ``"NVIDIA H100 80GB HBM3"`` -> ``"H100"``, ``"NVIDIA A100-SXM4-80GB"``
  -> ``"A100"``; the whole ``device_kind`` when no model number is found. Memory size and form factor are left
  out: they move the timings far less than the generation does."""
  found = re.search(r"\b([A-Z]{1,2}\d{1,3}[A-Z]?)\b", device_kind.replace("-", " "))
  return found.group(1) if found else device_kind


def pallas_beats_blockwise(gpu: str, metric: str, head_dim: int | None, dtype: str | None) -> bool:
  """Whether a measurement on ``gpu`` found the fused kernel faster than blockwise for this metric, head_dim and
  dtype (False without one)."""
  if head_dim is None or dtype is None:
    return False
  return PALLAS_OVER_BLOCKWISE.get((gpu, metric, int(head_dim), dtype), 0.0) > 1.0
