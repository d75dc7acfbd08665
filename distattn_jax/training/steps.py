"""The train state and the two pure steps, ``train_step`` and ``eval_step``.

Both take token windows ``[batch, length + 1]`` (inputs are ``[:, :-1]``, targets ``[:, 1:]``). Randomness is
an argument: the dropout key of step ``s`` is ``fold_in(dropout_key, s)``, so a resumed run draws exactly what
an uninterrupted one does.
"""

from __future__ import annotations

import math
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import optax
from flax.training import train_state

from distattn_jax.training import optim

Array = jax.Array
TrainState = train_state.TrainState


def create_train_state(model: nn.Module, tx: optax.GradientTransformation, seed: int, seq_len: int) -> TrainState:
  """Parameters from ``seed`` (float32 whatever the compute dtype: the optimizer's master copy)."""
  tokens = jnp.zeros((1, seq_len), jnp.int32)
  params = jax.jit(model.init)(param_key(seed), tokens)["params"]
  return TrainState.create(apply_fn=model.apply, params=params, tx=tx)


def param_key(seed: int) -> Array:
  return jax.random.fold_in(jax.random.key(seed), 0)


def dropout_key(seed: int) -> Array:
  return jax.random.fold_in(jax.random.key(seed), 1)


def next_token_loss(logits: Array, windows: Array) -> Array:
  """Mean cross-entropy (nats) of predicting ``windows[:, 1:]`` from ``logits`` of ``windows[:, :-1]``."""
  return optax.softmax_cross_entropy_with_integer_labels(logits.astype(jnp.float32), windows[:, 1:]).mean()


def loss_and_grads(state: TrainState, windows: Array, rng: Array, grad_accum: int = 1) -> tuple[Array, Any]:
  """Mean next-token loss of ``windows [batch, length + 1]`` and its gradient with respect to ``state.params``;
  with ``grad_accum > 1`` the batch is split into that many microbatches whose gradients are averaged (a
  ``lax.scan``, so memory is one microbatch's)."""

  def loss_fn(params, micro, rng):
    logits = state.apply_fn({"params": params}, micro[:, :-1], deterministic=False, rngs={"dropout": rng})
    return next_token_loss(logits, micro)

  grad_fn = jax.value_and_grad(loss_fn)
  if grad_accum == 1:
    return grad_fn(state.params, windows, rng)
  micro = windows.reshape((grad_accum, windows.shape[0] // grad_accum) + windows.shape[1:])

  def accumulate(carry, xs):
    i, batch = xs
    loss, grads = grad_fn(state.params, batch, jax.random.fold_in(rng, i))
    return jax.tree.map(jnp.add, carry, (loss, grads)), None

  zeros = (jnp.zeros((), jnp.float32), jax.tree.map(jnp.zeros_like, state.params))
  (loss, grads), _ = jax.lax.scan(accumulate, zeros, (jnp.arange(grad_accum), micro))
  return jax.tree.map(lambda x: x / grad_accum, (loss, grads))


def all_finite(tree: Any) -> Array:
  """One boolean: every element of every array in ``tree`` is finite."""
  return jnp.all(jnp.stack([jnp.all(jnp.isfinite(leaf)) for leaf in jax.tree.leaves(tree)]))


def train_step(state: TrainState, windows: Array, dropout_key: Array, *, grad_accum: int = 1,
               axis_name: str | None = None) -> tuple[TrainState, dict[str, Array]]:
  """One optimizer step on ``windows [batch, length + 1]`` (:func:`loss_and_grads`).

  The metrics are the loss, the gradient's global norm (non-finite exactly when some gradient is, or when the
  norm overflows) and ``params_finite``, whether every updated parameter is finite: one reduction over the
  parameters, cheap beside the step, so the loop can refuse to save a state without reading it back.

  ``axis_name``: under ``jax.pmap`` (or ``shard_map``) over that axis, each device holds an equal share of the
  batch; the loss and gradients are averaged over it (``lax.pmean``) before the update, so every device applies
  the update of the whole batch (:func:`distributed.pmap_train_step`).
  """
  rng = jax.random.fold_in(dropout_key, state.step)
  loss, grads = loss_and_grads(state, windows, rng, grad_accum)
  if axis_name is not None:
    loss, grads = jax.lax.pmean((loss, grads), axis_name)
  new = state.apply_gradients(grads=grads)
  return new, {"loss": loss, "grad_norm": optax.tree.norm(grads), "params_finite": all_finite(new.params)}


def eval_step(state: TrainState, windows: Array) -> dict[str, Array]:
  """Summed next-token loss (nats) and token count, so batches combine exactly."""
  logits = state.apply_fn({"params": state.params}, windows[:, :-1], deterministic=True)
  nll = optax.softmax_cross_entropy_with_integer_labels(logits.astype(jnp.float32), windows[:, 1:])
  return {"nll_sum": jnp.sum(nll), "tokens": jnp.asarray(nll.size, jnp.float32)}


def bits_per_byte(nll_sum: float, tokens: float) -> float:
  """Byte-level tokens: bits per byte is the mean loss in nats over ln 2."""
  return float(nll_sum) / float(tokens) / math.log(2)


def lambda_values(params: Any) -> dict[str, Array]:
  """lam (and p) of every attention layer: ``{"block_0/attention/lambda": [heads], ...}`` from the learned
  ``log_lambda`` / ``log_p`` (exp of the stored logs)."""
  out = {}
  for path, leaf in jax.tree_util.tree_flatten_with_path(params)[0]:
    name = path[-1].key
    if name in optim.LAMBDA_PARAMS:
      prefix = "/".join(p.key for p in path[:-1] if p.key != "trunk")
      out[f"{prefix}/{'lambda' if name == 'log_lambda' else 'p'}"] = jnp.exp(leaf)
  return out
