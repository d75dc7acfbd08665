"""The optax pipeline: AdamW with warmup + cosine and global-norm clipping, and a lambda group of its own.

The attention's ``log_lambda`` (and ``log_p``, and a weighted metric's ``log_metric_weights``) are scale
parameters of the softmax and the metric, not weights: decaying them towards 0 would pull lam (or the feature
weights) towards 1 for no reason, and they want a larger step than the projections. So
``optax.multi_transform`` routes them, by name, to plain Adam with their own peak learning rate (same warmup +
cosine shape) and no weight decay; every other parameter gets clipping and AdamW, with decay on matrices only
(kernels and embeddings, not biases or norm scales).
"""

from __future__ import annotations

from typing import Any

import jax
import ml_collections
import optax

LAMBDA_PARAMS = ("log_lambda", "log_p", "log_metric_weights")
MAIN, LAMBDA = "main", "lambda"


def _name(path: tuple[Any, ...]) -> str | None:
  """A parameter's name: its last dict key (Linen's params and NNX's pure state end there; NNX's Variables add
  an attribute key, ``.value``, after it)."""
  keys = [entry.key for entry in path if isinstance(entry, jax.tree_util.DictKey)]
  return keys[-1] if keys else None


def param_labels(params: Any) -> Any:
  """``"lambda"`` for parameters named ``log_lambda``/``log_p``/``log_metric_weights``, ``"main"`` for the rest
  (Linen params or an NNX state, of Variables or of arrays: ``nnx.Optimizer`` labels the one at init and the
  other at each update)."""
  return jax.tree_util.tree_map_with_path(lambda path, _: LAMBDA if _name(path) in LAMBDA_PARAMS else MAIN, params)


def _decay_mask(params: Any) -> Any:
  return jax.tree.map(lambda a: a.ndim >= 2, params)


def learning_rate_schedule(peak: float, optim: ml_collections.ConfigDict, total_steps: int) -> optax.Schedule:
  """Linear warmup from 0 to ``peak`` over ``optim.warmup_steps``, then cosine decay to
  ``peak * optim.end_learning_rate_fraction`` at ``total_steps``."""
  warmup = optim.warmup_steps
  return optax.warmup_cosine_decay_schedule(
      init_value=0.0, peak_value=peak, warmup_steps=warmup, decay_steps=max(total_steps, warmup + 1),
      end_value=peak * optim.end_learning_rate_fraction)


def make_optimizer(optim: ml_collections.ConfigDict, total_steps: int) -> optax.GradientTransformation:
  main = optax.adamw(learning_rate_schedule(optim.learning_rate, optim, total_steps), b1=optim.b1, b2=optim.b2,
                     eps=optim.eps, weight_decay=optim.weight_decay, mask=_decay_mask)
  if optim.clip_norm > 0:
    main = optax.chain(optax.clip_by_global_norm(optim.clip_norm), main)
  lam = optax.adam(learning_rate_schedule(optim.lambda_learning_rate, optim, total_steps), b1=optim.b1,
                   b2=optim.b2, eps=optim.eps)
  return optax.multi_transform({MAIN: main, LAMBDA: lam}, param_labels)
