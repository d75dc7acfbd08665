"""One cell of an ablation grid: train a model on a task at a fixed budget and measure it.

A cell is (task, metric, lambda mode, seed) plus the suite's budget (model size, steps, batch, learning rates).
Classification tasks train :class:`~distattn_jax.models.Encoder` with cross-entropy and report test accuracy;
``text`` trains the decoder :class:`~distattn_jax.models.TruthGPT` and reports validation bits per byte. The
steps, losses and scores are the trainer's (:mod:`~distattn_jax.training.steps`, by the task's kind) and so is
the optimizer (:func:`~distattn_jax.training.optim.make_optimizer`, with its lambda group). Lambda
mode ``learned`` learns one lam per head; ``fixed`` keeps every head at the calibrated default
(``initializers.default_lambda``).

The record holds the final metric, the learning curve (train loss and a held-out metric at every
``eval_every`` steps), lam per layer and head over training, the attention entropy per layer at the end
(nats, over real queries and keys), steps per second (excluding compilation and evaluation) and wall time.
Compiled steps are cached per process by the cell's shapes and hyperparameters, so seeds reuse them.
"""

from __future__ import annotations

import functools
import math
import time
from typing import Any

import jax
import ml_collections
import numpy as np

from distattn_jax import module_helpers
from distattn_jax.data import tasks
from distattn_jax.models import Encoder, TruthGPT, TruthGPTConfig
from distattn_jax.training import optim
from distattn_jax.training import steps as train_steps

LAMBDA_MODES = ("learned", "fixed")


def model_for(task_name: str, data: Any, metric: str, lambda_mode: str, budget: dict[str, Any]):
  if lambda_mode not in LAMBDA_MODES:
    raise ValueError(f"lambda mode {lambda_mode!r} is unknown; valid: {', '.join(LAMBDA_MODES)}")
  spec = tasks.spec(task_name)
  config = TruthGPTConfig(
      vocab_size=getattr(data, "vocab_size", None) or 1, width=budget["width"], depth=budget["depth"],
      num_heads=budget["num_heads"], mlp_dim=budget["mlp_dim"], max_len=data.max_len + 1, metric=metric,
      learnable_lambda=lambda_mode == "learned", p=float(budget["p"]))
  if spec.kind == "lm":
    return TruthGPT(config)
  return Encoder(config, num_classes=data.num_classes, embedding=spec.embedding, pooling=budget["pooling"])


def _optim_config(budget: dict[str, Any]) -> ml_collections.ConfigDict:
  return ml_collections.ConfigDict(dict(
      learning_rate=budget["learning_rate"], lambda_learning_rate=budget["lambda_learning_rate"],
      warmup_steps=budget["warmup_steps"], end_learning_rate_fraction=0.1, weight_decay=budget["weight_decay"],
      b1=0.9, b2=0.98, eps=1e-8, clip_norm=1.0))


def step_batch(kind: str, batch: dict[str, Any]) -> Any:
  """A task's batch as :mod:`~distattn_jax.training.steps` takes it for the task kind: the token windows of a
  language-model task, the classification batch as it is."""
  return batch["windows"] if kind == "lm" else batch


@functools.lru_cache(maxsize=32)
def _compiled(model, kind: str, optim_key: tuple, steps: int):
  """Jitted init, train step, eval step and attention weights for a model (Linen modules with frozen configs hash
  by value); the steps are the trainer's (:func:`~distattn_jax.training.steps.train_step`, ``eval_step``), with
  the loss and held-out totals of the task kind."""
  tx = optim.make_optimizer(ml_collections.ConfigDict(dict(optim_key)), steps)
  task = train_steps.objective(kind)

  def init(key, batch):
    params = model.init(key, *task.inputs(batch))["params"]
    return train_steps.TrainState.create(apply_fn=model.apply, params=params, tx=tx, kind=kind)

  def weights(params, batch):
    _, state = model.apply({"params": params}, *task.inputs(batch), sow_weights=True, mutable=["intermediates"])
    blocks = state["intermediates"]["trunk"]
    return [blocks[f"block_{i}"]["attention"]["attention_weights"][0] for i in range(len(blocks))]

  return (jax.jit(init), jax.jit(train_steps.train_step, donate_argnums=0), jax.jit(train_steps.eval_step),
          jax.jit(weights))


def evaluate(eval_step, state, batches, kind: str) -> float:
  """Accuracy (classification) or bits per byte (text) over ``batches`` (:func:`steps.score`)."""
  return train_steps.score(kind, [eval_step(state, step_batch(kind, batch)) for batch in batches])


def lambda_table(params: Any, model, depth: int) -> list[list[float]]:
  """lam ``[layer][head]``: the learned values, or the fixed calibrated default each head keeps."""
  out = []
  for i in range(depth):
    attention = params["trunk"][f"block_{i}"]["attention"]
    if "log_lambda" in attention:
      out.append(np.exp(np.asarray(attention["log_lambda"], np.float64)).reshape(-1).tolist())
    else:
      c = model.config
      lam = module_helpers.initial_lambda(c.metric, c.head_dim, c.p, c.lambda_init)
      out.append([float(lam)] * c.num_heads)
  return out


def attention_entropy(weights: list, batch: dict[str, Any]) -> list[float]:
  """Mean entropy (nats) of each layer's attention rows over the batch's real queries (and real examples)."""
  out = []
  for w in weights:
    w = np.asarray(w, np.float64)  # [batch, heads, T, S]
    h = -np.sum(np.where(w > 0, w * np.log(np.where(w > 0, w, 1.0)), 0.0), axis=-1)  # [batch, heads, T]
    if "lengths" in batch:
      offset = w.shape[-1] - batch["inputs"].shape[1]  # 1 with a CLS token
      real = np.arange(w.shape[-2])[None, :] < (np.asarray(batch["lengths"]) + offset)[:, None]
      real = real & (np.asarray(batch["weights"]) > 0)[:, None]
      out.append(float(np.sum(h * real[:, None, :]) / (np.sum(real) * w.shape[1])))
    else:
      out.append(float(np.mean(h)))
  return out


def run_cell(task_name: str, metric: str, lambda_mode: str, seed: int, budget: dict[str, Any],
             cache_dir: str | None = None) -> dict[str, Any]:
  """Trains one cell and returns its record (JSON-ready)."""
  return train_cell(task_name, metric, lambda_mode, seed, budget, cache_dir)[0]


def train_cell(task_name: str, metric: str, lambda_mode: str, seed: int, budget: dict[str, Any],
               cache_dir: str | None = None) -> tuple[dict[str, Any], Any]:
  """Trains one cell: ``(record, params)``, the record of :func:`run_cell` and the trained parameters (for a
  non-finite run, those of its last step)."""
  start = time.perf_counter()
  data = tasks.load(task_name, cache_dir=cache_dir)
  kind = tasks.spec(task_name).kind
  model = model_for(task_name, data, metric, lambda_mode, budget)
  steps, batch_size = budget["steps"], budget["batch_size"]
  init, train_step, eval_step, weights_fn = _compiled(model, kind, tuple(sorted(_optim_config(budget).items())),
                                                      steps)
  curve_batches = data.eval_batches(budget["eval_batch_size"], limit=budget["curve_eval_examples"])
  final_batches = data.eval_batches(budget["eval_batch_size"], limit=budget["eval_examples"] or None)

  state = init(jax.random.key(seed), step_batch(kind, data.train_batch(0, batch_size, seed)))
  dropout_key = train_steps.dropout_key(seed)  # unused: the ablation's models have no dropout
  curve = {"step": [], "train_loss": [], "eval": [], "lambda": []}
  losses, train_time, timed_steps, finite, shapes = [], 0.0, 0, True, set()
  for step in range(steps):
    batch = data.train_batch(step, batch_size, seed)
    shape = tuple(v.shape for v in batch.values())
    t0 = time.perf_counter()
    state, metrics = train_step(state, step_batch(kind, batch), dropout_key)
    loss = float(metrics["loss"])
    if shape in shapes:  # a new bucket's first step compiles
      train_time += time.perf_counter() - t0
      timed_steps += 1
    shapes.add(shape)
    losses.append(loss)
    if not math.isfinite(loss):
      finite = False
      break
    if (step + 1) % budget["eval_every"] == 0 or step + 1 == steps:
      curve["step"].append(step + 1)
      curve["train_loss"].append(float(np.mean(losses[-budget["eval_every"]:])))
      curve["eval"].append(evaluate(eval_step, state, curve_batches, kind))
      curve["lambda"].append(lambda_table(state.params, model, model.config.depth))
  final = evaluate(eval_step, state, final_batches, kind) if finite else float("nan")
  entropy = (attention_entropy(weights_fn(state.params, step_batch(kind, final_batches[0])), final_batches[0])
             if finite else [])
  record = {
      "task": task_name, "metric": metric, "lambda_mode": lambda_mode, "seed": seed,
      "score_name": train_steps.objective(kind).score_name,
      "final": final, "finite": finite, "steps_done": len(losses),
      "steps_per_s": timed_steps / train_time if train_time > 0 else None,
      "final_lambda": lambda_table(state.params, model, model.config.depth),
      "attention_entropy": entropy, "curve": curve, "wall_s": time.perf_counter() - start,
      "eval_examples": int(sum(float(np.sum(b["weights"])) if "weights" in b else b["windows"].shape[0]
                              for b in final_batches)),
  }
  return record, state.params
