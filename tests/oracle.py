"""A float64 numpy oracle for distance attention, written from the formula with scipy's cdist, independent of
the library's code. Loops over batch and heads for clarity, so keep shapes small."""

import math

import numpy as np
from scipy.spatial.distance import cdist

# The weighted metrics at their default weights (all ones) are their base metrics; tests/test_weighted_metrics.py
# checks them with weights.
SCIPY = {"l1": "cityblock", "l2": "euclidean", "sqeuclidean": "sqeuclidean", "cosine": "cosine",
         "chebyshev": "chebyshev", "weighted_l1": "cityblock", "weighted_l2": "euclidean"}


def scores(metric: str, q: np.ndarray, k: np.ndarray, p: float = 2.0) -> np.ndarray:
  """``-distance`` (or ``+q.k`` for dot), float64, ``[N, M]``."""
  q = np.asarray(q, np.float64)
  k = np.asarray(k, np.float64)
  if metric == "dot":
    return q @ k.T
  if metric == "lp":
    return -(cdist(q, k, "chebyshev") if math.isinf(p) else cdist(q, k, "minkowski", p=p))
  return -cdist(q, k, SCIPY[metric])


def attention(q, k, v, *, metric, lam=1.0, p=2.0, bias=None, mask=None, is_causal=False):
  """``q [batch..., T, H, D]``, ``k [batch..., S, K, D]``, ``v [batch..., S, K, Dv]`` ->
  ``(out [batch..., T, H, Dv], weights [batch..., H, T, S])``; a row with nothing to attend to gives 0."""
  q, k, v = (np.asarray(a, np.float64) for a in (q, k, v))
  batch_shape = q.shape[:-3]
  t, h, d = q.shape[-3:]
  s, kv_heads = k.shape[-3:-1]
  group = h // kv_heads
  full = batch_shape + (h, t, s)
  bias = np.zeros(full) if bias is None else np.broadcast_to(np.asarray(bias, np.float64), full)
  allowed = np.ones(full, bool) if mask is None else np.broadcast_to(np.asarray(mask) != 0, full)
  if is_causal:
    allowed = allowed & (np.arange(t)[:, None] >= np.arange(s)[None, :])
  lam = np.broadcast_to(np.asarray(lam, np.float64), (h,))
  out = np.zeros(batch_shape + (t, h, v.shape[-1]))
  weights = np.zeros(full)
  for idx in np.ndindex(*batch_shape):
    for head in range(h):
      kv = head // group
      logits = lam[head] * scores(metric, q[idx][:, head], k[idx][:, kv], p) / math.sqrt(d)
      logits = logits + bias[idx][head]
      ok = allowed[idx][head]
      shifted = np.where(ok, logits, -np.inf)
      row_max = np.max(shifted, axis=-1, keepdims=True)
      e = np.where(ok, np.exp(shifted - np.where(np.isfinite(row_max), row_max, 0.0)), 0.0)
      denom = e.sum(-1, keepdims=True)
      w = np.where(denom > 0, e / np.where(denom > 0, denom, 1.0), 0.0)
      weights[idx][head] = w
      out[idx][:, head] = w @ v[idx][:, kv]
  return out, weights
