"""tied_qk=True (one projection for queries and keys, Kim et al. 2021's W^Q = W^K): the parameter tree, the
untied module with the key projection set to the query's as the oracle, Linen against NNX, cross-attention."""

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import distattn_jax as da
from conftest import normal

FEATURES, HEADS = 8, 2


def tokens(seed, length=5, features=FEATURES):
  return jnp.asarray(normal(seed, (2, length, features), np.float32))


@pytest.mark.parametrize("normalize_qk", [pytest.param(False, marks=pytest.mark.slow), True])
def test_linen_tied_module_has_no_key_projection_and_equals_the_untied_one_with_key_set_to_query(normalize_qk):
  x, kv = tokens(0), tokens(1, length=3)
  kw = dict(num_heads=HEADS, metric="l2", normalize_qk=normalize_qk, rotary_base=100.0)
  tied = da.DistanceBasedAttention(tied_qk=True, **kw)
  params = tied.init(jax.random.key(0), x)["params"]
  shared = {"query", "value", "out", "log_lambda"} | ({"query_ln"} if normalize_qk else set())
  assert set(params) == shared
  # Oracle: the untied module whose key (and key_ln) parameters are copies of the query's.
  untied = da.DistanceBasedAttention(**kw)
  untied_params = dict(params, key=params["query"], **({"key_ln": params["query_ln"]} if normalize_qk else {}))
  chex.assert_trees_all_equal_shapes(untied_params, untied.init(jax.random.key(0), x)["params"])
  for args in [(x,), (x, kv)]:  # self-attention, and cross-attention through the shared projection
    chex.assert_trees_all_close(tied.apply({"params": params}, *args),
                                untied.apply({"params": untied_params}, *args), rtol=1e-6, atol=1e-6)
  # In self-attention each query's key is itself: the l2 logit of the diagonal is 0, the largest possible.
  _, state = tied.apply({"params": params}, x, sow_weights=True, mutable=["intermediates"])
  weights = state["intermediates"]["attention_weights"][0]
  np.testing.assert_array_equal(np.argmax(weights, axis=-1), np.broadcast_to(np.arange(5), weights.shape[:-1]))


@pytest.mark.slow
def test_nnx_tied_module_equals_the_linen_one_forward_and_gradients():
  mine = da.nnx.DistanceBasedAttention(HEADS, FEATURES, metric="l2", normalize_qk=True, tied_qk=True,
                                       rngs=nnx.Rngs(0))
  assert mine.key is None and mine.key_ln is None
  params = nnx.to_pure_dict(nnx.state(mine, nnx.Param))
  assert set(params) == {"query", "query_ln", "value", "out", "log_lambda"}
  linen = da.DistanceBasedAttention(num_heads=HEADS, metric="l2", normalize_qk=True, tied_qk=True)
  x, kv = tokens(2), tokens(3, length=3)
  chex.assert_trees_all_equal_shapes(params, linen.init(jax.random.key(0), x, kv)["params"])
  want, want_grads = jax.value_and_grad(lambda p: jnp.sum(jnp.sin(linen.apply({"params": p}, x, kv))))(params)
  got, got_grads = nnx.value_and_grad(lambda m: jnp.sum(jnp.sin(m(x, kv))))(mine)
  np.testing.assert_allclose(got, want, rtol=1e-5)
  chex.assert_trees_all_close(nnx.to_pure_dict(got_grads), want_grads, rtol=1e-4, atol=1e-5)


def test_tied_projection_needs_matching_features_and_heads():
  with pytest.raises(ValueError, match=r"inputs_k has 6"):
    da.DistanceBasedAttention(num_heads=HEADS, tied_qk=True).init(jax.random.key(0), tokens(4),
                                                                  tokens(5, features=6))
  with pytest.raises(ValueError, match=r"in_kv_features must be None or in_features \(8\); got 6"):
    da.nnx.DistanceBasedAttention(HEADS, FEATURES, in_kv_features=6, tied_qk=True, rngs=nnx.Rngs(0))
  mine = da.nnx.DistanceBasedAttention(HEADS, FEATURES, tied_qk=True, rngs=nnx.Rngs(0))
  with pytest.raises(ValueError, match=r"inputs_k has 6"):
    mine(tokens(4), tokens(5, features=6))
