"""Attention statistics per layer and head, and their plots.

For weights ``w [batch, heads, q_len, kv_len]`` (rows sum to 1 over the keys a query may see), each head gets,
averaged over the batch and the queries:

* ``entropy``: ``-sum_j w_ij ln w_ij`` in nats (``0 ln 0 = 0``); ``ln(i + 1)`` for a uniform causal row, 0 for a
  row that attends to one key;
* ``max_weight``: ``max_j w_ij``, how much of the row one key takes;
* ``mean_distance``: ``sum_j w_ij |i - j|``, how far back (or ahead) a query looks, in positions.

:func:`analyze_attention_patterns` (the seed's name) runs a model with ``sow_weights=True`` and adds each layer's
lam (and p); :func:`lambda_history` reads lam over training from ``metrics.jsonl``. The plots need matplotlib,
imported only by the plotting functions.
"""

from __future__ import annotations

import pathlib
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

Array = jax.Array
STATISTICS = ("entropy", "max_weight", "mean_distance")


def attention_statistics(weights: Array) -> dict[str, Array]:
  """``{"entropy", "max_weight", "mean_distance"}``, each ``[heads]``, from ``weights [batch, heads, T, S]``.

  Queries are the last ``T`` of the ``S`` key positions (``T == S`` for a full sequence)."""
  w = jnp.asarray(weights, jnp.float32)
  q_len, kv_len = w.shape[-2:]
  entropy = -jnp.sum(jnp.where(w > 0, w * jnp.log(jnp.where(w > 0, w, 1.0)), 0.0), axis=-1)
  query_pos = jnp.arange(q_len) + (kv_len - q_len)
  distance = jnp.abs(query_pos[:, None] - jnp.arange(kv_len)[None, :]).astype(jnp.float32)
  mean_distance = jnp.sum(w * distance.reshape((1,) * (w.ndim - 2) + distance.shape), axis=-1)
  per_row = {"entropy": entropy, "max_weight": jnp.max(w, axis=-1), "mean_distance": mean_distance}
  return {name: jnp.mean(v, axis=(0, 2)) for name, v in per_row.items()}


def attention_weights(model: Any, params: Any, tokens: Array) -> list[Array]:
  """The sown attention weights of every layer, in order: a list of ``[batch, heads, T, T]``."""
  _, state = model.apply({"params": params}, tokens, sow_weights=True, mutable=["intermediates"])
  blocks = state["intermediates"]["trunk"]
  return [blocks[f"block_{i}"]["attention"]["attention_weights"][0] for i in range(len(blocks))]


def analyze_attention_patterns(model: Any, params: Any, tokens: Array) -> list[dict[str, Any]]:
  """Per layer: the statistics of :func:`attention_statistics` on ``tokens``, plus ``lambda`` ([heads]) and,
  when it is learned, ``p``; every value a plain list or float (JSON-ready)."""
  layers = []
  for i, w in enumerate(attention_weights(model, params, tokens)):
    stats = {name: np.asarray(v).tolist() for name, v in attention_statistics(w).items()}
    attention = params["trunk"][f"block_{i}"]["attention"]
    if "log_lambda" in attention:
      stats["lambda"] = np.exp(np.asarray(attention["log_lambda"])).tolist()
    if "log_p" in attention:
      stats["p"] = float(np.exp(np.asarray(attention["log_p"])))
    layers.append({"layer": i, **stats})
  return layers


def lambda_history(records: list[dict[str, Any]]) -> dict[str, tuple[list[int], np.ndarray]]:
  """``{"block_0/attention/lambda": (steps, values [steps, heads]), ...}`` from the train records of
  ``metrics.jsonl`` (``p`` entries likewise, ``[steps, 1]``)."""
  history: dict[str, tuple[list[int], list]] = {}
  for record in records:
    if record.get("split") != "train":
      continue
    for key, value in record.items():
      if key.endswith(("/lambda", "/p")):
        steps, values = history.setdefault(key, ([], []))
        steps.append(record["step"])
        values.append(np.atleast_1d(np.asarray(value, np.float64)))
  return {k: (steps, np.stack(values)) for k, (steps, values) in history.items()}


def _pyplot():
  import matplotlib
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt
  return plt


def plot_statistics(layers: list[dict[str, Any]], path: str | pathlib.Path) -> None:
  """One heatmap (layers x heads) per statistic and for lam, annotated with the values."""
  plt = _pyplot()
  names = [n for n in STATISTICS + ("lambda",) if n in layers[0]]
  fig, axes = plt.subplots(1, len(names), figsize=(3.2 * len(names), 0.6 * len(layers) + 1.6), squeeze=False)
  for ax, name in zip(axes[0], names):
    grid = np.asarray([layer[name] for layer in layers])
    image = ax.imshow(grid, cmap="viridis", aspect="auto")
    ax.set_title(name)
    ax.set_xlabel("head")
    ax.set_ylabel("layer")
    ax.set_xticks(range(grid.shape[1]))
    ax.set_yticks(range(grid.shape[0]))
    for (r, c), v in np.ndenumerate(grid):
      ax.text(c, r, f"{v:.2f}", ha="center", va="center", color="w", fontsize=7)
    fig.colorbar(image, ax=ax, fraction=0.046)
  fig.tight_layout()
  fig.savefig(path, dpi=100)
  plt.close(fig)


def plot_attention_maps(weights: list[Array], path: str | pathlib.Path) -> None:
  """The first sequence's weights, one panel per (layer, head)."""
  plt = _pyplot()
  heads = weights[0].shape[1]
  fig, axes = plt.subplots(len(weights), heads, figsize=(2.2 * heads, 2.2 * len(weights)), squeeze=False)
  for layer, w in enumerate(weights):
    for head in range(heads):
      ax = axes[layer][head]
      ax.imshow(np.asarray(w[0, head]), cmap="magma", vmin=0.0)
      ax.set_title(f"layer {layer} head {head}", fontsize=8)
      ax.set_xticks([])
      ax.set_yticks([])
  fig.tight_layout()
  fig.savefig(path, dpi=100)
  plt.close(fig)


def plot_lambda_history(history: dict[str, tuple[list[int], np.ndarray]], path: str | pathlib.Path) -> None:
  """lam (and p) of every head against the training step, one panel per layer's parameter."""
  plt = _pyplot()
  fig, axes = plt.subplots(1, len(history), figsize=(4 * len(history), 3), squeeze=False)
  for ax, (name, (steps, values)) in zip(axes[0], sorted(history.items())):
    for head in range(values.shape[1]):
      ax.plot(steps, values[:, head], label=f"head {head}")
    ax.set_title(name, fontsize=9)
    ax.set_xlabel("step")
    ax.legend(fontsize=7)
  fig.tight_layout()
  fig.savefig(path, dpi=100)
  plt.close(fig)
