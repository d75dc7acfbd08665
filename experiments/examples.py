"""A printed tour of the distattn_jax API; every number it prints is computed here.

Run: ``make tour`` (or ``.venv/bin/python experiments/examples.py``).
"""

from __future__ import annotations

import math

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
from absl import app, logging
from flax import nnx

import distattn_jax as da
from distattn_jax import training


def fmt(values) -> str:
  return "[" + ", ".join(f"{v:.4f}" for v in np.asarray(values).ravel()) + "]"


def section(title: str) -> None:
  print(f"\n== {title} " + "=" * max(0, 76 - len(title)))


def tour_metrics() -> None:
  section("1. Every metric on one input: distance(x_0, y_j) for 4 keys, 8 features")
  x = jax.random.normal(jax.random.key(0), (1, 8))
  y = jax.random.normal(jax.random.key(1), (4, 8))
  # The weighted metrics with weights that favour the later features (all ones would repeat l1 and l2).
  feature_weights = jnp.linspace(0.25, 2.0, 8)
  for name in da.metrics.DistanceType:
    name = name.value
    kwargs = {"p": 3.0} if name == "lp" else {}
    if name.startswith("weighted_"):
      kwargs = {"metric_weights": feature_weights}
    values = np.asarray(da.metrics.get(name)(x, y, **kwargs))[0]
    label = {"lp": "lp (p=3)", "dot": "dot (similarity)"}.get(name, name)
    label += " (w=0.25..2)" if name.startswith("weighted_") else ""
    print(f"  {label:<26} " + "  ".join(f"{v:8.4f}" for v in values))

  section("2. distance_attention: one query over the same 4 keys, per metric (lam = default for D=8)")
  q = x.reshape(1, 1, 1, 8)
  k = y.reshape(1, 4, 1, 8)
  v = jnp.eye(4).reshape(1, 4, 1, 4)  # identity values: the output row is the attention distribution
  for name in map(str, da.metrics.DistanceType):
    lam = da.initializers.default_lambda(name, 8, 3.0)
    weights = feature_weights if name.startswith("weighted_") else None
    out = da.distance_attention(q, k, v, metric=name, lam=lam, p=3.0, metric_weights=weights)
    print(f"  {name:<12} lam={lam:7.3f}  weights " + "  ".join(f"{w:.3f}" for w in np.asarray(out).ravel()))


class TinyLM(nn.Module):
  """Embedding -> causal distance attention -> vocabulary logits, with a residual and layer norm."""

  vocab: int = 32
  width: int = 32
  metric: str = "l1"

  @nn.compact
  def __call__(self, tokens):
    h = nn.Embed(self.vocab, self.width)(tokens)
    h = h + da.DistanceBasedAttention(num_heads=4, metric=self.metric, name="attention")(nn.LayerNorm()(h),
                                                                                         is_causal=True)
    return nn.Dense(self.vocab)(nn.LayerNorm()(h))


def tour_module() -> None:
  section("3. DistanceBasedAttention inside a tiny causal language model")
  tokens = jax.random.randint(jax.random.key(2), (4, 16), 0, 32)
  model = TinyLM()
  params = model.init(jax.random.key(3), tokens)["params"]
  n_params = sum(a.size for a in jax.tree.leaves(params))
  lam = np.exp(np.asarray(params["attention"]["log_lambda"]))
  print(f"  parameters: {n_params}; attention params: {sorted(params['attention'])}")
  print(f"  initial lam per head (default for l1, head_dim 8): {fmt(lam)}")
  logits = model.apply({"params": params}, tokens)
  loss = optax.softmax_cross_entropy_with_integer_labels(logits[:, :-1], tokens[:, 1:]).mean()
  print(f"  logits {tuple(logits.shape)}; next-token loss {float(loss):.4f} (uniform guess: {math.log(32):.4f})")

  section("4. One gradient step on lambda alone (the other parameters frozen)")
  labels = jax.tree_util.tree_map_with_path(
      lambda path, _: "lambda" if path[-1].key == "log_lambda" else "frozen", params)
  optimizer = optax.multi_transform({"lambda": optax.sgd(0.5), "frozen": optax.set_to_zero()}, labels)

  def loss_fn(params):
    logits = model.apply({"params": params}, tokens)
    return optax.softmax_cross_entropy_with_integer_labels(logits[:, :-1], tokens[:, 1:]).mean()

  loss0, grads = jax.value_and_grad(loss_fn)(params)
  updates, _ = optimizer.update(grads, optimizer.init(params), params)
  new_params = optax.apply_updates(params, updates)
  loss1 = loss_fn(new_params)
  new_lam = np.exp(np.asarray(new_params["attention"]["log_lambda"]))
  print(f"  d loss / d log_lambda: {fmt(grads['attention']['log_lambda'])}")
  print(f"  lam: {fmt(lam)} -> {fmt(new_lam)}")
  print(f"  loss: {float(loss0):.5f} -> {float(loss1):.5f}")


def huber(t):
  """Huber loss of one coordinate difference (delta = 1): quadratic near 0, linear beyond."""
  a = jnp.abs(t)
  return jnp.where(a <= 1.0, 0.5 * t * t, a - 0.5)


def tour_registration() -> None:
  section("5. Registering a distance (Huber) and training the tiny model with it")
  if "huber" not in da.metrics.available():  # the tour may run twice in one process
    da.metrics.register(da.metrics.Metric(
        "huber", da.metrics.Elementwise(phi=huber), translation_invariant=True,
        gradient="sum over keys of clip(x_d - y_d, -1, 1)"))
  x = jnp.asarray([[0.0, 0.0], [3.0, 0.5]])
  print(f"  huber(x_0, x_j) = {fmt(da.metrics.get('huber')(x[:1], x))} (0.5 * 0.5^2 + 3 - 0.5 = 2.625)")
  tokens = jax.random.randint(jax.random.key(4), (4, 16), 0, 32)
  model = TinyLM(metric="huber")
  params = model.init(jax.random.key(5), tokens)["params"]
  optimizer = optax.adam(1e-2)

  @jax.jit
  def step(params, opt_state):
    def loss_fn(params):
      logits = model.apply({"params": params}, tokens)
      return optax.softmax_cross_entropy_with_integer_labels(logits[:, :-1], tokens[:, 1:]).mean()
    loss, grads = jax.value_and_grad(loss_fn)(params)
    updates, opt_state = optimizer.update(grads, opt_state, params)
    return optax.apply_updates(params, updates), opt_state, loss

  opt_state = optimizer.init(params)
  losses = []
  for _ in range(20):
    params, opt_state, loss = step(params, opt_state)
    losses.append(float(loss))
  lam = np.exp(np.asarray(params["attention"]["log_lambda"]))
  print(f"  20 Adam steps with metric='huber': loss {losses[0]:.4f} -> {losses[-1]:.4f}; lam {fmt(lam)}")



class TinyNNXLM(nnx.Module):
  """The tiny causal LM of section 3 in Flax NNX; ``attention_cls`` is nnx.MultiHeadAttention or the distance
  module, which takes the same arguments."""

  def __init__(self, attention_cls, *, vocab: int = 32, features: int = 32, rngs: nnx.Rngs, **attention_kwargs):
    self.embed = nnx.Embed(vocab, features, rngs=rngs)
    self.attention = attention_cls(4, features, decode=False, rngs=rngs, **attention_kwargs)
    self.norm = nnx.LayerNorm(features, rngs=rngs)
    self.head = nnx.Linear(features, vocab, rngs=rngs)

  def __call__(self, tokens):
    h = self.embed(tokens)
    h = h + self.attention(h, is_causal=True)
    return self.head(self.norm(h))


def tour_nnx() -> None:
  section("6. Flax NNX: swap nnx.MultiHeadAttention for the distance module, train with nnx.Optimizer")
  tokens = jax.random.randint(jax.random.key(6), (4, 16), 0, 32)
  dot_model = TinyNNXLM(nnx.MultiHeadAttention, rngs=nnx.Rngs(0))
  model = TinyNNXLM(da.nnx.DistanceBasedAttention, metric="l1", rngs=nnx.Rngs(1))
  nnx.update(model, nnx.state(dot_model, nnx.Param))  # the dot model's checkpoint loads as it is
  added = sorted(set(nnx.to_pure_dict(nnx.state(model.attention, nnx.Param)))
                 - set(nnx.to_pure_dict(nnx.state(dot_model.attention, nnx.Param))))
  print(f"  attention params: {sorted(nnx.to_pure_dict(nnx.state(model.attention, nnx.Param)))}; added: {added}")

  # The trainer's optimizer: log_lambda in its own Adam group without weight decay (training.param_labels).
  optim = training.default_config().optim
  optim.update(learning_rate=1e-2, lambda_learning_rate=5e-2, warmup_steps=5)
  steps = 40
  optimizer = nnx.Optimizer(model, training.make_optimizer(optim, steps), wrt=nnx.Param)

  def loss_fn(model):
    logits = model(tokens)
    return optax.softmax_cross_entropy_with_integer_labels(logits[:, :-1], tokens[:, 1:]).mean()

  @nnx.jit
  def step(model, optimizer):
    loss, grads = nnx.value_and_grad(loss_fn)(model)
    optimizer.update(model, grads)
    return loss

  lam0 = np.exp(np.asarray(model.attention.log_lambda[...]))
  losses = [float(step(model, optimizer)) for _ in range(steps)]
  lam = np.exp(np.asarray(model.attention.log_lambda[...]))
  print(f"  {steps} steps, metric='l1': nnx loss {losses[0]:.4f} -> {losses[-1]:.4f}")
  print(f"  nnx lam: {fmt(lam0)} -> {fmt(lam)}")

def main(argv) -> None:
  del argv
  logging.set_verbosity(logging.WARNING)  # keep the tour's output to what it computes
  print(f"distattn_jax {da.__version__} on {jax.default_backend()} ({jax.device_count()} device(s)); "
        f"metrics: {', '.join(map(str, da.metrics.DistanceType))}; kernels: {', '.join(da.kernels.available())}")
  tour_metrics()
  tour_module()
  tour_registration()
  tour_nnx()


if __name__ == "__main__":
  app.run(main)
