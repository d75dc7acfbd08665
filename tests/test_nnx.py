"""The NNX module: nnx.MultiHeadAttention's parameters and outputs at metric='dot', lam=1 (masks, dropout draws,
the cache); the Linen module's outputs and gradients for every metric; training, checkpoints and transforms."""

import chex
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
import orbax.checkpoint as ocp
import pytest
from flax import nnx

import distattn_jax as da
from conftest import normal
import test_layers
from distattn_jax.training import optim

FEATURES, HEADS = 16, 4


def tokens(seed, batch=2, length=6, features=FEATURES):
  return jnp.asarray(normal(seed, (batch, length, features), np.float32))


def dot_twin(flax_module_kwargs, **ours):
  """nnx.MultiHeadAttention and the distance module at metric='dot', lam=1, with the same parameters (copied)."""
  theirs = nnx.MultiHeadAttention(HEADS, FEATURES, **flax_module_kwargs, rngs=nnx.Rngs(0))
  mine = da.nnx.DistanceBasedAttention(HEADS, FEATURES, **flax_module_kwargs, metric="dot", lambda_init=1.0,
                                       learnable_lambda=False, rngs=nnx.Rngs(1), **ours)
  nnx.update(mine, nnx.state(theirs))  # parameters and the stored dropout stream
  return theirs, mine


@pytest.mark.slow
def test_dot_module_equals_nnx_multi_head_attention_with_masks_and_dropout():
  kw = dict(qkv_features=24, out_features=8, num_kv_heads=2, in_kv_features=12, dropout_rate=0.3,
            normalize_qk=True, decode=False)
  theirs, mine = dot_twin(kw)
  # Same names and shapes: a checkpoint of the Flax module loads into the distance module.
  chex.assert_trees_all_equal_shapes(nnx.to_pure_dict(nnx.state(mine, nnx.Param)),
                                     nnx.to_pure_dict(nnx.state(theirs, nnx.Param)))
  x, kv = tokens(1), tokens(2, length=5, features=12)
  mask = jnp.asarray(np.random.default_rng(3).random((2, 1, 6, 5)) < 0.7)
  # Dropout drawn from the stream given to the call, and from the stored stream (called twice: it advances).
  for fresh in (True, False, False):
    want = theirs(x, kv, mask=mask, deterministic=False, rngs=nnx.Rngs(dropout=4) if fresh else None)
    got = mine(x, kv, mask=mask, deterministic=False, rngs=nnx.Rngs(dropout=4) if fresh else None)
    chex.assert_trees_all_close(got, want, rtol=1e-5, atol=1e-6)
  chex.assert_trees_all_close(mine(x, kv, mask=mask, deterministic=True, sow_weights=True),
                              theirs(x, kv, mask=mask, deterministic=True, sow_weights=True), rtol=1e-5, atol=1e-6)
  # sow_weights stores the weights where Flax does.
  sown = nnx.to_pure_dict(nnx.pop(mine, nnx.Intermediate))
  assert sown["attention_weights"][0].shape == (2, HEADS, 6, 5)
  chex.assert_trees_all_close(sown, nnx.to_pure_dict(nnx.pop(theirs, nnx.Intermediate)), rtol=1e-5, atol=1e-6)


def test_dot_module_decodes_like_nnx_multi_head_attention_under_jit():
  theirs, mine = dot_twin(dict(num_kv_heads=2, decode=True))
  x = tokens(5, length=5)
  theirs.init_cache(x.shape)
  mine.init_cache(x.shape)
  step = nnx.jit(lambda module, token: module(token))
  for t in range(5):
    chex.assert_trees_all_close(step(mine, x[:, t:t + 1]), step(theirs, x[:, t:t + 1]), rtol=1e-5, atol=1e-6)
  chex.assert_trees_all_close(mine.cached_key[...], theirs.cached_key[...], rtol=1e-6, atol=1e-6)
  assert int(mine.cache_index[...]) == int(theirs.cache_index[...]) == 5


@pytest.mark.slow
def test_chunked_decoding_equals_causal_attention_and_refuses_to_overflow():
  module = da.nnx.DistanceBasedAttention(HEADS, FEATURES, metric="l1", rotary_base=100.0, rngs=nnx.Rngs(0))
  x = tokens(6, length=6)
  want = module(x, is_causal=True)
  module.init_cache((2, 6, FEATURES))
  step = nnx.jit(lambda module, chunk: module(chunk, decode=True))
  got = jnp.concatenate([step(module, x[:, a:b]) for a, b in ((0, 3), (3, 4), (4, 6))], axis=1)
  chex.assert_trees_all_close(got, want, rtol=2e-5, atol=2e-5)
  with pytest.raises(jax.errors.JaxRuntimeError, match="the KV cache holds 6 positions and 6 are filled"):
    jax.block_until_ready(step(module, x[:, :1]))
  with pytest.raises(ValueError, match="call init_cache"):
    da.nnx.DistanceBasedAttention(HEADS, FEATURES, rngs=nnx.Rngs(0))(x, decode=True)


def linen_twin(metric, **kw):
  """The NNX module and the Linen module with the NNX module's parameters."""
  mine = da.nnx.DistanceBasedAttention(HEADS, FEATURES, metric=metric, rngs=nnx.Rngs(0), **kw)
  # lam away from its initial value, so that a wrongly initialised copy would show.
  mine.log_lambda[...] = mine.log_lambda[...] + jnp.linspace(-0.3, 0.3, HEADS)
  linen = da.DistanceBasedAttention(num_heads=HEADS, metric=metric, **kw)
  return mine, linen, nnx.to_pure_dict(nnx.state(mine, nnx.Param))


# make test-fast runs lp (with its learnable p), make test every metric.
@pytest.mark.parametrize("metric", [m if m == "lp" else pytest.param(m, marks=pytest.mark.slow)
                                    for m in da.metrics.available()])
def test_nnx_module_equals_the_linen_module_forward_and_gradients(metric):
  kw = dict(num_kv_heads=2, normalize_qk=True, rotary_base=100.0, p=3.0,
            learnable_p=da.metrics.get(metric).parametric)
  mine, linen, params = linen_twin(metric, **kw)
  x, kv = tokens(10), tokens(11, length=5)
  mask = jnp.asarray(np.random.default_rng(12).random((2, 1, 6, 5)) < 0.8)
  # Shapes and names are the Linen module's, so its init builds the same tree.
  chex.assert_trees_all_equal_shapes(params, linen.init(jax.random.key(0), x, kv, mask=mask)["params"])

  def linen_loss(params):
    return jnp.sum(jnp.sin(linen.apply({"params": params}, x, kv, mask=mask)))

  def nnx_loss(module):
    return jnp.sum(jnp.sin(module(x, kv, mask=mask)))

  want_loss, want_grads = jax.value_and_grad(linen_loss)(params)
  got_loss, got_grads = nnx.value_and_grad(nnx_loss)(mine)
  # One computation on the same arrays; only op order under different tracing can differ.
  np.testing.assert_allclose(got_loss, want_loss, rtol=1e-5)
  chex.assert_trees_all_close(nnx.to_pure_dict(got_grads), want_grads, rtol=1e-4, atol=1e-5)


class TinyLM(nnx.Module):
  def __init__(self, vocab, features, *, rngs):
    self.embed = nnx.Embed(vocab, features, rngs=rngs)
    self.attention = da.nnx.DistanceBasedAttention(2, features, metric="l2", rngs=rngs)
    self.head = nnx.Linear(features, vocab, rngs=rngs)

  def __call__(self, ids):
    h = self.embed(ids)
    return self.head(h + self.attention(h, is_causal=True))


def lm_loss(model, ids):
  return optax.softmax_cross_entropy_with_integer_labels(model(ids)[:, :-1], ids[:, 1:]).mean()


@pytest.mark.slow
def test_training_moves_lambda_lowers_the_loss_and_round_trips_through_orbax(tmp_path):
  ids = jax.random.randint(jax.random.key(0), (4, 12), 0, 16)
  model = TinyLM(16, 16, rngs=nnx.Rngs(0))
  config = ml_collections.ConfigDict(dict(
      learning_rate=1e-2, lambda_learning_rate=5e-2, warmup_steps=2, end_learning_rate_fraction=0.1, b1=0.9,
      b2=0.99, eps=1e-8, weight_decay=0.1, clip_norm=1.0))
  optimizer = nnx.Optimizer(model, optim.make_optimizer(config, 20), wrt=nnx.Param)
  lam0 = np.exp(np.asarray(model.attention.log_lambda[...]))

  @nnx.jit
  def train_step(model, optimizer, ids):
    loss, grads = nnx.value_and_grad(lm_loss)(model, ids)
    optimizer.update(model, grads)
    return loss

  # The lambda group's first step, by hand: plain Adam at warmup lr = 5e-2 * 1/2 moves each log lam by
  # exactly lr (Adam's first step is lr * sign(grad), up to eps), with no weight decay.
  grads0 = nnx.grad(lm_loss)(model, ids).attention.log_lambda[...]
  log_lam0 = np.asarray(model.attention.log_lambda[...])
  losses = [float(train_step(model, optimizer, ids))]
  np.testing.assert_allclose(np.asarray(model.attention.log_lambda[...]),
                             log_lam0, rtol=0, atol=0)  # warmup starts at lr 0
  losses += [float(train_step(model, optimizer, ids))]
  np.testing.assert_allclose(np.asarray(model.attention.log_lambda[...]) - log_lam0,
                             -2.5e-2 * np.sign(grads0), rtol=1e-4, atol=1e-6)
  losses += [float(train_step(model, optimizer, ids)) for _ in range(18)]
  lam = np.exp(np.asarray(model.attention.log_lambda[...]))
  assert np.all(np.abs(lam / lam0 - 1) > 0.02), (lam0, lam)
  assert losses[-1] < losses[0] - 0.1, losses

  checkpointer = ocp.StandardCheckpointer()
  checkpointer.save(tmp_path / "state", nnx.state(model))
  checkpointer.wait_until_finished()
  graphdef, abstract = nnx.split(nnx.eval_shape(lambda: TinyLM(16, 16, rngs=nnx.Rngs(1))))
  restored = nnx.merge(graphdef, checkpointer.restore(tmp_path / "state", abstract))
  chex.assert_trees_all_equal(nnx.to_pure_dict(nnx.state(restored)), nnx.to_pure_dict(nnx.state(model)))
  np.testing.assert_array_equal(restored(ids), model(ids))


@pytest.mark.slow
def test_jit_split_merge_and_vmap_over_a_batch_of_models():
  x = tokens(20)
  module = da.nnx.DistanceBasedAttention(HEADS, FEATURES, metric="sqeuclidean", rngs=nnx.Rngs(0))
  want = module(x)
  chex.assert_trees_all_close(nnx.jit(lambda m, x: m(x))(module, x), want, rtol=1e-5, atol=1e-6)
  graphdef, state = nnx.split(module)
  np.testing.assert_array_equal(nnx.merge(graphdef, state)(x), want)

  @nnx.split_rngs(splits=3)
  @nnx.vmap(in_axes=0, out_axes=0)
  def create(rngs):
    return da.nnx.DistanceBasedAttention(HEADS, FEATURES, metric="l1", rngs=rngs)

  models = create(nnx.Rngs(0))
  assert models.log_lambda[...].shape == (3, HEADS)
  got = nnx.vmap(lambda m, x: m(x), in_axes=(0, None))(models, x)
  graphdef, state = nnx.split(models)
  for i in range(3):
    one = nnx.merge(graphdef, jax.tree.map(lambda a, i=i: a[i], state))
    chex.assert_trees_all_close(got[i], one(x), rtol=1e-5, atol=1e-6)
  assert not np.allclose(got[0], got[1])  # the three models were initialised apart


@pytest.mark.parametrize("fields,message", test_layers.CONFIG_ERRORS)
def test_configuration_errors_are_the_linen_modules(fields, message):
  with pytest.raises(ValueError, match=message) as linen_error:
    da.DistanceBasedAttention(**fields).init(jax.random.key(0), tokens(14))
  with pytest.raises(ValueError, match=message) as nnx_error:
    da.nnx.DistanceBasedAttention(in_features=FEATURES, rngs=nnx.Rngs(0), **fields)
  assert str(nnx_error.value) == str(linen_error.value)
  with pytest.raises(TypeError, match="attention_fn is not an argument"):
    da.nnx.DistanceBasedAttention(HEADS, FEATURES, attention_fn=da.make_attention_fn(), rngs=nnx.Rngs(0))


def test_position_arguments_reach_distance_attention_and_a_decode_step_refuses_them():
  x = tokens(30, length=9)
  module = da.nnx.DistanceBasedAttention(HEADS, FEATURES, metric="l1", rngs=nnx.Rngs(0))
  ids = jnp.asarray([[1, 1, 1, 2, 2, 2, 2, 0, 0], [3] * 9], jnp.int32)
  lengths = jnp.asarray([7, 9], jnp.int32)
  t = jnp.arange(9)
  dense = ((ids[:, :, None] == ids[:, None, :]) & (t[None, None, :] < lengths[:, None, None])
           & (t[None, None, :] >= t[None, :, None] - 2) & (t[None, None, :] <= t[None, :, None] + 1))[:, None]
  chex.assert_trees_all_close(module(x, q_segment_ids=ids, key_value_seq_lengths=lengths, local_window_size=(2, 1)),
                              module(x, mask=dense), rtol=1e-6, atol=1e-6)
  module.init_cache(x.shape)
  with pytest.raises(ValueError, match="q_segment_ids index the call's own positions"):
    module(x[:, :1], decode=True, q_segment_ids=ids[:, :1])
