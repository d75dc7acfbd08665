"""The train state and the two pure steps, ``train_step`` and ``eval_step``, for every task kind.

What a step computes from a batch is the state's task kind (``TrainState.kind``, one of :data:`OBJECTIVES`):

* ``"lm"`` (language modelling, the trainer's and the ablation's ``text``): a batch is token windows
  ``[batch, length + 1]`` (inputs are ``[:, :-1]``, targets ``[:, 1:]``); the loss is the mean next-token
  cross-entropy and the held-out score bits per byte.
* ``"classify"`` (the ablation's classification tasks): a batch is ``{"inputs", "lengths", "labels",
  "weights"}``; the loss is the cross-entropy averaged with the examples' weights (0 for padding examples) and
  the held-out score accuracy.

Randomness is an argument: the dropout key of step ``s`` is ``fold_in(dropout_key, s)``, so a resumed run draws
exactly what an uninterrupted one does.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, Callable

import flax.linen as nn
import jax
import jax.numpy as jnp
import optax
from flax import struct
from flax.training import train_state

Array = jax.Array


class TrainState(train_state.TrainState):
  """Flax's train state plus ``kind``, the task kind whose loss and held-out totals the steps compute (a static
  field, like ``apply_fn``: not saved in checkpoints, set by whoever builds the state)."""

  kind: str = struct.field(pytree_node=False, default="lm")


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


def next_token_totals(logits: Array, windows: Array) -> dict[str, Array]:
  """Summed next-token loss (nats) and token count, so batches combine exactly."""
  nll = optax.softmax_cross_entropy_with_integer_labels(logits.astype(jnp.float32), windows[:, 1:])
  return {"nll_sum": jnp.sum(nll), "tokens": jnp.asarray(nll.size, jnp.float32)}


def bits_per_byte(nll_sum: float, tokens: float) -> float:
  """Byte-level tokens: bits per byte is the mean loss in nats over ln 2."""
  return float(nll_sum) / float(tokens) / math.log(2)


def classification_loss(logits: Array, batch: dict[str, Array]) -> Array:
  """Cross-entropy (nats) of ``batch["labels"]``, averaged with ``batch["weights"]`` (0 for padding examples)."""
  w = batch["weights"]
  nll = optax.softmax_cross_entropy_with_integer_labels(logits.astype(jnp.float32), batch["labels"])
  return jnp.sum(nll * w) / jnp.maximum(jnp.sum(w), 1.0)


def classification_totals(logits: Array, batch: dict[str, Array]) -> dict[str, Array]:
  """Summed weights of the correctly classified examples and of all examples, so batches combine exactly."""
  w = batch["weights"]
  correct = (jnp.argmax(logits, -1) == batch["labels"]).astype(jnp.float32)
  return {"correct": jnp.sum(correct * w), "count": jnp.sum(w)}


def accuracy(correct: float, count: float) -> float:
  return float(correct) / float(count)


@dataclasses.dataclass(frozen=True)
class Objective:
  """What the steps compute for one task kind.

  Attributes:
    inputs: the model's positional inputs from a batch.
    loss: the mean loss minimised, from a batch's logits and the batch.
    totals: sums over a batch's examples that combine exactly over batches (``eval_step`` returns them).
    score_name: the held-out score's name.
    score: the held-out score from the totals summed over batches, as keyword arguments.
  """

  inputs: Callable[[Any], tuple]
  loss: Callable[[Array, Any], Array]
  totals: Callable[[Array, Any], dict[str, Array]]
  score_name: str
  score: Callable[..., float]


OBJECTIVES: dict[str, Objective] = {
    "lm": Objective(inputs=lambda windows: (windows[:, :-1],), loss=next_token_loss, totals=next_token_totals,
                    score_name="bits_per_byte", score=bits_per_byte),
    "classify": Objective(inputs=lambda batch: (batch["inputs"], batch["lengths"]), loss=classification_loss,
                          totals=classification_totals, score_name="accuracy", score=accuracy),
}


def objective(kind: str) -> Objective:
  """The :class:`Objective` of task kind ``kind``; an unknown kind is a ValueError naming the valid ones."""
  if kind not in OBJECTIVES:
    raise ValueError(f"task kind {kind!r} is unknown; valid kinds: {', '.join(OBJECTIVES)}")
  return OBJECTIVES[kind]


def score(kind: str, totals: list[dict[str, Any]]) -> float:
  """The held-out score of task kind ``kind`` over the ``eval_step`` totals of several batches (summed in
  float64 on the host, in order)."""
  if not totals:
    raise ValueError("score: totals must hold the totals of at least one batch; got none")
  return objective(kind).score(**{name: sum(float(t[name]) for t in totals) for name in totals[0]})


def loss_and_grads(state: TrainState, batch: Any, rng: Array, grad_accum: int = 1) -> tuple[Array, Any]:
  """Mean loss of ``batch`` (the state's task kind's: token windows ``[batch, length + 1]`` for ``"lm"``) and
  its gradient with respect to ``state.params``; with ``grad_accum > 1`` the batch is split into that many
  microbatches whose losses and gradients are averaged (a ``lax.scan``, so memory is one microbatch's)."""
  task = objective(state.kind)

  def loss_fn(params, micro, rng):
    logits = state.apply_fn({"params": params}, *task.inputs(micro), deterministic=False, rngs={"dropout": rng})
    return task.loss(logits, micro)

  grad_fn = jax.value_and_grad(loss_fn)
  if grad_accum == 1:
    return grad_fn(state.params, batch, rng)
  micro = jax.tree.map(lambda a: a.reshape((grad_accum, a.shape[0] // grad_accum) + a.shape[1:]), batch)

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


def train_step(state: TrainState, batch: Any, dropout_key: Array, *, grad_accum: int = 1,
               axis_name: str | None = None) -> tuple[TrainState, dict[str, Array]]:
  """One optimizer step on ``batch`` (:func:`loss_and_grads`; token windows ``[batch, length + 1]`` for a
  language model).

  The metrics are the loss, the gradient's global norm (non-finite exactly when some gradient is, or when the
  norm overflows) and ``params_finite``, whether every updated parameter is finite: one reduction over the
  parameters, cheap beside the step, so the loop can refuse to save a state without reading it back.

  ``axis_name``: under ``jax.pmap`` (or ``shard_map``) over that axis, each device holds an equal share of the
  batch; the loss and gradients are averaged over it (``lax.pmean``) before the update, so every device applies
  the update of the whole batch (:func:`distributed.pmap_train_step`).
  """
  rng = jax.random.fold_in(dropout_key, state.step)
  loss, grads = loss_and_grads(state, batch, rng, grad_accum)
  if axis_name is not None:
    loss, grads = jax.lax.pmean((loss, grads), axis_name)
  new = state.apply_gradients(grads=grads)
  return new, {"loss": loss, "grad_norm": optax.tree.norm(grads), "params_finite": all_finite(new.params)}


def eval_step(state: TrainState, batch: Any) -> dict[str, Array]:
  """The held-out totals of ``batch`` for the state's task kind (for ``"lm"``: the summed next-token loss in
  nats, ``nll_sum``, and the token count, ``tokens``), so batches combine exactly (:func:`score`)."""
  task = objective(state.kind)
  logits = state.apply_fn({"params": state.params}, *task.inputs(batch), deterministic=True)
  return task.totals(logits, batch)


_LOGGED = {"log_lambda": "lambda", "log_p": "p"}


def lambda_values(params: Any) -> dict[str, Array]:
  """lam (and p) of every attention layer: ``{"block_0/attention/lambda": [heads], ...}`` from the learned
  ``log_lambda`` / ``log_p`` (exp of the stored logs)."""
  out = {}
  for path, leaf in jax.tree_util.tree_flatten_with_path(params)[0]:
    name = path[-1].key
    if name in _LOGGED:  # a weighted metric's [kv_heads, head_dim] feature weights are not logged
      prefix = "/".join(p.key for p in path[:-1] if p.key != "trunk")
      out[f"{prefix}/{_LOGGED[name]}"] = jnp.exp(leaf)
  return out
