"""distance_attention against the float64 numpy oracle (tests/oracle.py): values, weights, gradients, masks,
GQA, dropout, dtypes and every documented bad input."""

import functools
import math

import chex
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.test_util import check_grads

import distattn_jax as da
import oracle
from conftest import normal
from distattn_jax import attention as attention_module

METRICS = da.metrics.available()


def one_fast(values, fast):
  """``values`` for parametrize, every one but ``fast`` marked slow: `make test-fast` runs one case of a sweep (a
  different metric in each test, so together they still meet every metric), `make test` all of them."""
  return [v if v == fast else pytest.param(v, marks=pytest.mark.slow) for v in values]


def inputs(seed, batch=(2,), t=5, s=6, h=4, kv=2, d=8, dv=3, dtype=np.float64, scale=1.0):
  return (normal(seed, batch + (t, h, d), dtype, scale), normal(seed + 1, batch + (s, kv, d), dtype, scale),
          normal(seed + 2, batch + (s, kv, dv), dtype, scale))


def rich_case(seed=0, batch=(2,), t=5, s=6, h=4):
  """Bias, a mask with one fully masked query row, causal masking and a per-head lam, all at once."""
  mask = np.random.default_rng(seed).random(batch + (1, t, s)) > 0.3
  mask[..., 0, 2, :] = False  # query 2 of every batch sees nothing
  return dict(bias=normal(seed + 3, (h, t, s)), mask=mask, is_causal=True,
              lam=np.linspace(0.5, 2.0, h))


def check_against_oracle(metric, q, k, v, rtol, atol, p=3.0, **kw):
  out, weights = da.distance_attention(q, k, v, metric=metric, p=p, return_weights=True, **kw)
  want_out, want_w = oracle.attention(q, k, v, metric=metric, p=p, **kw)
  np.testing.assert_allclose(np.asarray(out, np.float64), want_out, rtol=rtol, atol=atol)
  np.testing.assert_allclose(np.asarray(weights, np.float64), want_w, rtol=rtol, atol=atol)


@pytest.mark.usefixtures("x64")
@pytest.mark.parametrize("metric", one_fast(METRICS, "l1"))
def test_float64_plain(metric):
  check_against_oracle(metric, *inputs(0, h=2, kv=2), rtol=1e-10, atol=1e-12)


@pytest.mark.usefixtures("x64")
@pytest.mark.parametrize("metric", one_fast(METRICS, "cosine"))
def test_float64_bias_mask_causal_gqa_per_head_lam(metric):
  check_against_oracle(metric, *inputs(10), rtol=1e-10, atol=1e-12, **rich_case())


@pytest.mark.usefixtures("x64")
@pytest.mark.parametrize("metric", one_fast(["l1", "cosine"], "l1"))
def test_several_batch_dimensions_and_broadcast_operands(metric):
  q, k, v = inputs(20, batch=(2, 3), t=4, s=7)
  mask = np.random.default_rng(1).random((3, 1, 4, 7)) > 0.2   # broadcasts over the first batch dim and heads
  bias = normal(21, (2, 1, 4, 1, 7))                            # broadcasts over the second batch dim and queries
  check_against_oracle(metric, q, k, v, rtol=1e-10, atol=1e-12, mask=mask, bias=bias)


@pytest.mark.parametrize("metric", one_fast(METRICS, "lp"))
def test_float32_matches_oracle(metric):
  # float32 logits carry ~1e-6 relative error (the matmul forms' cancellation ~1e-5 of the distance); through the
  # softmax that is ~1e-5 of each weight, and outputs are weighted sums of O(1) values.
  q, k, v = inputs(30, dtype=np.float32)
  check_against_oracle(metric, q, k, v, rtol=1e-4, atol=2e-5, **rich_case(1))


class JitVariantsTest(chex.TestCase):

  @chex.variants(with_jit=True, without_jit=True)
  def test_l1_and_dot(self):
    q, k, v = inputs(40, dtype=np.float32)
    for metric in ("l1", "dot"):
      attend = self.variant(functools.partial(da.distance_attention, metric=metric, lam=1.5))
      want, _ = oracle.attention(q, k, v, metric=metric, lam=1.5)
      chex.assert_trees_all_close(np.asarray(attend(q, k, v), np.float64), want, rtol=1e-4, atol=2e-5)


@pytest.mark.usefixtures("x64")
@pytest.mark.parametrize("metric", one_fast(METRICS, "sqeuclidean"))
def test_gradients_match_finite_differences(metric):
  q, k, v = inputs(50, t=4, s=5)
  case = rich_case(2, t=4, s=5)
  mask, lam, bias = case["mask"], case["lam"], case["bias"]
  cotangent = normal(55, q.shape[:-1] + (v.shape[-1],))

  def loss(q, k, v, lam, bias):
    out = da.distance_attention(q, k, v, bias=bias, mask=mask, metric=metric, lam=lam, p=3.0, is_causal=True)
    return jnp.sum(out * cotangent)

  check_grads(loss, (q, k, v, lam, bias), order=1, modes=("rev",), eps=1e-6, atol=1e-6, rtol=1e-6)


@pytest.mark.parametrize("metric", one_fast(METRICS, "dot"))
def test_fully_masked_rows_give_zero_output_and_zero_gradients(metric):
  q, k, v = inputs(60, dtype=np.float32)
  mask = np.ones((1, 1, 5, 6), bool)
  mask[..., 3, :] = False

  def loss(q, k, v):
    return jnp.sum(da.distance_attention(q, k, v, mask=mask, metric=metric) ** 2)

  out = da.distance_attention(q, k, v, mask=mask, metric=metric)
  grads = jax.grad(loss, (0, 1, 2))(q, k, v)
  np.testing.assert_array_equal(np.asarray(out)[:, 3], 0.0)
  np.testing.assert_array_equal(np.asarray(grads[0])[:, 3], 0.0)
  assert all(np.all(np.isfinite(np.asarray(g))) for g in grads)


def test_everything_masked_gives_zeros_and_lse_minus_inf():
  q, k, v = inputs(61, dtype=np.float32)
  result = da.kernels.get("reference")(
      jnp.asarray(q), jnp.asarray(k), jnp.asarray(v), lam=jnp.ones(4), mask=jnp.zeros((1, 1, 5, 6), bool),
      metric="l2")
  np.testing.assert_array_equal(result.out, 0.0)
  assert np.all(np.isneginf(result.lse))


def test_grouped_query_equals_repeated_kv_heads():
  q, k, v = inputs(70, h=6, kv=2, dtype=np.float32)
  grouped = da.distance_attention(q, k, v, metric="chebyshev", lam=np.arange(1.0, 7.0))
  repeated = da.distance_attention(q, np.repeat(k, 3, axis=-2), np.repeat(v, 3, axis=-2), metric="chebyshev",
                                   lam=np.arange(1.0, 7.0))
  chex.assert_trees_all_close(grouped, repeated, rtol=1e-6)


def test_numeric_flax_masks_mean_nonzero_attends():
  q, k, v = inputs(80, batch=(2,), t=5, s=5, dtype=np.float32)
  float_mask = nn.make_causal_mask(jnp.ones((2, 5)))  # float32, as Flax builds it
  # Same masked logits; XLA may fuse the two programs differently, hence 1 ulp of float32 slack.
  chex.assert_trees_all_close(da.distance_attention(q, k, v, mask=float_mask),
                              da.distance_attention(q, k, v, is_causal=True), rtol=1e-6, atol=1e-6)


def test_dot_metric_at_lam_one_equals_jax_and_flax_attention():
  q, k, v = inputs(90, dtype=np.float32, h=4, kv=4, d=8, dv=8)
  mask = np.random.default_rng(3).random((2, 1, 5, 6)) > 0.2
  mask[..., 0] = True
  ours = da.distance_attention(q, k, v, mask=mask, metric="dot")
  chex.assert_trees_all_close(ours, jax.nn.dot_product_attention(q, k, v, mask=mask), rtol=1e-5, atol=1e-6)
  chex.assert_trees_all_close(ours, nn.dot_product_attention(q, k, v, mask=mask), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("broadcast", one_fast([True, False], True))
def test_dropout_follows_flax_bit_for_bit(broadcast):
  q, k, v = inputs(100, batch=(2, 2), dtype=np.float32, h=4, kv=4)
  rng = jax.random.key(7)
  kw = dict(dropout_rng=rng, dropout_rate=0.4, deterministic=False, broadcast_dropout=broadcast)
  ours = da.distance_attention(q, k, v, metric="dot", **kw)
  chex.assert_trees_all_close(ours, nn.dot_product_attention(q, k, v, **kw), rtol=1e-5, atol=1e-6)
  # Deterministic given the rng, different for another rng, and off when deterministic=True.
  chex.assert_trees_all_equal(ours, da.distance_attention(q, k, v, metric="dot", **kw))
  other = da.distance_attention(q, k, v, metric="dot", **{**kw, "dropout_rng": jax.random.key(8)})
  assert not np.allclose(ours, other)
  no_dropout = da.distance_attention(q, k, v, metric="dot", **{**kw, "deterministic": True})
  chex.assert_trees_all_close(no_dropout, da.distance_attention(q, k, v, metric="dot"), rtol=1e-6)


@pytest.mark.slow
def test_learned_p_and_lam_are_differentiable():
  q, k, v = inputs(110, dtype=np.float32)

  def loss(lam, p):
    return jnp.sum(da.distance_attention(q, k, v, metric="lp", lam=lam, p=p) ** 2)

  g_lam, g_p = jax.grad(loss, (0, 1))(jnp.ones(4), jnp.float32(2.5))
  assert g_lam.shape == (4,) and np.all(np.isfinite(g_lam)) and np.all(g_lam != 0)
  # The gradient through a traced p agrees with a central difference in p (float32: 1e-3 relative).
  numeric = (loss(jnp.ones(4), 2.5 + 1e-2) - loss(jnp.ones(4), 2.5 - 1e-2)) / 2e-2
  np.testing.assert_allclose(g_p, numeric, rtol=2e-2)


@pytest.mark.parametrize("metric", one_fast(METRICS, "l2"))
def test_bfloat16_large_magnitudes_have_finite_outputs_and_gradients(metric):
  q, k, v = (jnp.asarray(a, jnp.bfloat16) for a in inputs(120, dtype=np.float32, scale=1e4))

  def loss(q, k, v):
    return jnp.sum(da.distance_attention(q, k, v, metric=metric, p=3.0, is_causal=True).astype(jnp.float32))

  out = da.distance_attention(q, k, v, metric=metric, p=3.0, is_causal=True)
  assert out.dtype == jnp.bfloat16
  assert np.all(np.isfinite(np.asarray(out, np.float32)))
  grads = jax.grad(loss, (0, 1, 2))(q, k, v)
  assert all(np.all(np.isfinite(np.asarray(g, np.float32))) for g in grads)


def test_bfloat16_statistics_are_float32():
  q, k, v = (jnp.asarray(a, jnp.bfloat16) for a in inputs(130, dtype=np.float32))
  out, weights = da.distance_attention(q, k, v, metric="l1", return_weights=True)
  assert out.dtype == jnp.bfloat16 and weights.dtype == jnp.float32
  np.testing.assert_allclose(np.asarray(weights).sum(-1), 1.0, rtol=1e-6)
  # Close to the float32 computation on the same (bf16-rounded) inputs: only the output rounding differs.
  ref = da.distance_attention(*(a.astype(jnp.float32) for a in (q, k, v)), metric="l1")
  np.testing.assert_allclose(np.asarray(out, np.float32), ref, rtol=1e-2, atol=1e-2)


@pytest.mark.parametrize("metric", one_fast(METRICS, "chebyshev"))
def test_nan_inputs_propagate(metric):
  q, k, v = inputs(140, dtype=np.float32)
  q[0, 1, 0, 0] = np.nan
  out = np.asarray(da.distance_attention(q, k, v, metric=metric, p=3.0))
  assert np.all(np.isnan(out[0, 1, 0])), out[0, 1, 0]
  assert np.all(np.isfinite(out[1]))


def test_no_recompilation_across_calls_with_the_same_shapes():
  q, k, v = inputs(150, dtype=np.float32)

  @jax.jit
  @chex.assert_max_traces(n=1)
  def attend(q, k, v, lam):
    return da.distance_attention(q, k, v, metric="l1", lam=lam, is_causal=True)

  attend(q, k, v, jnp.float32(1.0))
  attend(q + 1, k, v * 2, jnp.float32(3.0))
  # Eager calls share one compiled kernel too: the jitted core is cached by shape and static options.
  da.distance_attention(q, k, v, metric="cosine", lam=1.0)
  before = attention_module._attend._cache_size()  # counted after the first call: other tests may share it
  for lam in (2.0, 0.5):
    da.distance_attention(q * lam, k, v, metric="cosine", lam=lam)
  assert attention_module._attend._cache_size() == before


# ------------------------------------------------------------------------------------------------------------
# Bad input: a ValueError or TypeError naming the argument and the value, raised while tracing.

Q, K, V = inputs(160, dtype=np.float32)


@pytest.mark.parametrize("kwargs,args,error,message", [
    (dict(metric="manhattan"), None, ValueError,
     r"metric='manhattan' is not a registered metric; valid names: l1, l2, sqeuclidean, lp, cosine, chebyshev"),
    (dict(implementation="flash"), None, ValueError, r"implementation='flash' is not registered; valid names: auto, "
                                                     r"blockwise, pallas, reference, ring"),
    (dict(metric="lp", p=0.0), None, ValueError, r"p must be > 0 \(inf allowed\); got 0.0"),
    (dict(metric="lp", p=-2.0), None, ValueError, r"p must be > 0 \(inf allowed\); got -2.0"),
    (dict(metric="lp", p=float("nan")), None, ValueError, r"p must be > 0 \(inf allowed\); got nan"),
    ({}, (Q, K[..., :5], V), ValueError, r"key head_dim \(5\) must equal query head_dim \(8\)"),
    ({}, (Q[..., :3, :], K, V), ValueError, r"query heads \(3\) must be a multiple of key/value heads \(2\)"),
    ({}, (Q, K, V[:1]), ValueError, r"value batch and length dimensions \(1, 6\) must equal key's \(2, 6\)"),
    ({}, (Q, K, V[:, :4]), ValueError, r"value batch and length dimensions \(2, 4\) must equal key's \(2, 6\)"),
    ({}, (Q[:1], K, V), ValueError, r"key batch dimensions \(2,\) must equal query's \(1,\)"),
    (dict(mask=np.ones((3, 6), bool)), None, ValueError,
     r"mask with shape \(3, 6\) does not broadcast to \[batch..., heads, q_len, kv_len\] = \(2, 4, 5, 6\)"),
    (dict(bias=np.ones((2, 2, 4, 5, 6), np.float32)), None, ValueError,
     r"bias with shape \(2, 2, 4, 5, 6\) does not broadcast"),
    (dict(bias=np.ones((5, 6), bool)), None, TypeError, r"bias must be a numeric array .* got dtype bool"),
    ({}, (Q.astype(np.int32), K, V), TypeError, r"query must be a floating-point array; got dtype int32"),
    ({}, (Q, K, V.astype(np.int8)), TypeError, r"value must be a floating-point array; got dtype int8"),
    (dict(lam=0.0), None, ValueError, r"lam must be > 0 and finite; got 0.0"),
    (dict(lam=np.array([1.0, -1.0, 1.0, 1.0])), None, ValueError, r"lam must be > 0 and finite; got \[1.0, -1.0"),
    (dict(lam=np.ones(3)), None, ValueError, r"lam must be a scalar or have shape \(4,\).*got shape \(3,\)"),
    (dict(dropout_rate=1.0, dropout_rng=jax.random.key(0)), None, ValueError,
     r"dropout_rate must be in \[0, 1\); got 1.0"),
    (dict(dropout_rate=-0.1), None, ValueError, r"dropout_rate must be in \[0, 1\); got -0.1"),
    (dict(dropout_rate=0.1), None, ValueError, r"dropout_rng is required when dropout is active \(dropout_rate=0.1"),
    (dict(dtype=jnp.int32), None, TypeError, r"dtype must be a floating-point dtype or None; got"),
    (dict(qk_attn_weights_einsum=jnp.einsum), None, ValueError, r"qk_attn_weights_einsum must be None"),
    (dict(scale=2.0), None, TypeError, r"scale is not an argument of distance_attention \(got scale=2.0\)"),
    ({}, (Q.astype(np.complex64), K, V), TypeError,
     r"query must be a real floating-point array; got dtype complex64 \(complex inputs are not supported"),
    (dict(q_segment_ids=np.ones((2, 5), np.float32), kv_segment_ids=np.ones((2, 6), np.int32)), None, TypeError,
     r"q_segment_ids must be an integer array \[batch..., q_len\]; got dtype float32"),
    (dict(q_segment_ids=np.ones((2, 6), np.int32), kv_segment_ids=np.ones((2, 6), np.int32)), None, ValueError,
     r"q_segment_ids must have shape \[batch..., q_len\] = \(2, 5\); got shape \(2, 6\)"),
    (dict(q_segment_ids=np.ones((2, 5), np.int32)), None, ValueError,
     r"kv_segment_ids is required when q_segment_ids is given and q_len \(5\) != kv_len \(6\)"),
    (dict(query_seq_lengths=np.ones((2,), bool)), None, TypeError,
     r"query_seq_lengths must be an integer array \[batch...\]; got dtype bool"),
    (dict(key_value_seq_lengths=np.ones((2, 1), np.int32)), None, ValueError,
     r"key_value_seq_lengths must have shape \[batch...\] = \(2,\); got shape \(2, 1\)"),
    (dict(key_value_seq_lengths=np.array([3, -1], np.int32)), None, ValueError,
     r"key_value_seq_lengths must be in \[0, 6\] \(the sequence's length\); got \[3, -1\]"),
    (dict(query_seq_lengths=np.array([5, 6], np.int32)), None, ValueError,
     r"query_seq_lengths must be in \[0, 5\] \(the sequence's length\); got \[5, 6\]"),
    (dict(local_window_size=(2, -1)), None, ValueError, r"local_window_size must be non-negative .* got \(2, -1\)"),
    (dict(local_window_size=(1, 2, 3)), None, TypeError,
     r"local_window_size must be None, an int or a \(left, right\) pair of ints; got \(1, 2, 3\)"),
    (dict(local_window_size=1.5), None, TypeError, r"local_window_size must be None, an int or a \(left, right\)"),
    (dict(fully_masked_rows="nan"), None, ValueError, r"fully_masked_rows must be one of 'zero', 'mean'; got 'nan'"),
    (dict(force_fp32_for_softmax="yes"), None, TypeError, r"force_fp32_for_softmax must be a Python bool or None"),
])
def test_bad_input_raises_a_clear_error_at_trace_time(kwargs, args, error, message):
  args = args or (Q, K, V)
  with pytest.raises(error, match=message):
    da.distance_attention(*args, **kwargs)
  # The same error comes out of tracing under jit (array checks run on shapes and dtypes only).
  if not any(isinstance(a, (float, np.ndarray)) and not isinstance(a, np.ndarray) for a in kwargs.values()):
    with pytest.raises(error, match=message):
      jax.jit(lambda q, k, v: da.distance_attention(q, k, v, **kwargs)).lower(*args)


def test_make_attention_fn_rejects_what_it_cannot_fix():
  with pytest.raises(TypeError, match="cannot fix dropout_rate; the arguments that can be fixed are lam, p"):
    da.make_attention_fn("l1", dropout_rate=0.1)
  with pytest.raises(ValueError, match="metric='hamming'"):
    da.make_attention_fn("hamming")
  # Fixed values are checked when the function is made, before any model calls it.
  with pytest.raises(ValueError, match=r"fully_masked_rows must be one of 'zero', 'mean'; got 'nan'"):
    da.make_attention_fn("l1", fully_masked_rows="nan")
