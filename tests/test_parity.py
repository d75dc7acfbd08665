"""Parity with Flax and jax.nn, case by case as their own attention tests check it, with their attention swapped
for ``make_attention_fn("dot")`` / ``distance_attention(..., metric="dot")``: masks, padding (fully masked
rows), causal, dtypes and mixed precision, dropout draws, cached decoding, grouped-query attention, sequence
lengths and sliding windows. Flax and jax.nn are the oracles; tolerances are float32 reassociation (the kernels
sum in another order) unless stated."""

import chex
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import distattn_jax as da
from conftest import normal

DOT = da.make_attention_fn("dot")
TOL = dict(rtol=1e-5, atol=1e-6)


def qkv(seed, b=2, t=7, s=7, h=4, kv=4, d=8, dtype=np.float32):
  return (normal(seed, (b, t, h, d), dtype), normal(seed + 1, (b, s, kv, d), dtype),
          normal(seed + 2, (b, s, kv, d), dtype))


def padding_mask(t=7, s=7):
  """Flax's padding mask for rows of 5 and 7 real tokens: rows 5, 6 of the first example see nothing."""
  real_q = jnp.arange(t)[None, :] < jnp.asarray([[5], [t]])
  real_k = jnp.arange(s)[None, :] < jnp.asarray([[5], [s]])
  return nn.make_attention_mask(real_q, real_k)


def test_attention_fn_equals_flax_on_every_row_of_a_padded_batch():
  # Padded query rows see no key; Flax's large finite negative makes them the mean of the values. The drop-in
  # gives the same, while distance_attention's default gives 0 there (and is equal elsewhere).
  q, k, v = qkv(0)
  mask = padding_mask()
  want = nn.dot_product_attention(q, k, v, mask=mask)
  chex.assert_trees_all_close(DOT(q, k, v, mask=mask), want, **TOL)
  zero = np.asarray(da.distance_attention(q, k, v, mask=mask, metric="dot"))
  np.testing.assert_array_equal(zero[0, 5:], 0.0)
  np.testing.assert_allclose(zero[1], np.asarray(want)[1], **TOL)
  np.testing.assert_allclose(zero[0, :5], np.asarray(want)[0, :5], **TOL)


@pytest.mark.slow
@pytest.mark.parametrize("impl", ["reference", da.kernels.Blockwise(8, 8)])
def test_mean_rows_with_dropout_equal_flax(impl):
  # The fully masked rows under dropout: uniform weights dropped with Flax's draw, in both kernels.
  q, k, v = qkv(1, t=12, s=12)
  mask = padding_mask(12, 12)
  kw = dict(dropout_rng=jax.random.key(3), dropout_rate=0.3, deterministic=False)
  for broadcast in (True, False):
    want = nn.dot_product_attention(q, k, v, mask=mask, broadcast_dropout=broadcast, **kw)
    got = da.distance_attention(q, k, v, mask=mask, metric="dot", fully_masked_rows="mean", implementation=impl,
                                broadcast_dropout=broadcast, **kw)
    chex.assert_trees_all_close(got, want, **TOL)


@pytest.mark.slow
def test_multi_head_attention_with_padding_masks_and_dropout_is_unchanged_by_the_swap():
  x = normal(2, (2, 7, 16), np.float32)
  mask = padding_mask()
  flax_mha = nn.MultiHeadDotProductAttention(num_heads=4, dropout_rate=0.2)
  ours = nn.MultiHeadDotProductAttention(num_heads=4, dropout_rate=0.2, attention_fn=DOT)
  params = flax_mha.init(jax.random.key(0), x, deterministic=True)
  for deterministic in (True, False):
    kw = dict(mask=mask, deterministic=deterministic, rngs={"dropout": jax.random.key(1)})
    want, want_state = flax_mha.apply(params, x, sow_weights=True, mutable=["intermediates"], **kw)
    got, got_state = ours.apply(params, x, sow_weights=True, mutable=["intermediates"], **kw)
    chex.assert_trees_all_close(got, want, **TOL)
    chex.assert_trees_all_close(got_state, want_state, **TOL)  # sown weights, fully masked rows included


@pytest.mark.slow
def test_causal_mask_and_is_causal_equal_flax_and_jax_nn():
  q, k, v = qkv(3, t=6, s=9)
  causal = nn.make_causal_mask(jnp.ones((2, 9)))[..., :6, :]
  want = nn.dot_product_attention(q, k, v, mask=causal)
  chex.assert_trees_all_close(DOT(q, k, v, mask=causal), want, **TOL)
  chex.assert_trees_all_close(DOT(q, k, v, is_causal=True), want, **TOL)
  chex.assert_trees_all_close(da.distance_attention(q, k, v, metric="dot", is_causal=True),
                              jax.nn.dot_product_attention(q, k, v, is_causal=True), **TOL)


def test_bias_and_mask_together_equal_flax():
  q, k, v = qkv(4)
  bias = normal(5, (1, 4, 7, 7), np.float32)
  mask = np.random.default_rng(0).random((2, 1, 7, 7)) > 0.4
  chex.assert_trees_all_close(DOT(q, k, v, bias=bias, mask=mask),
                              nn.dot_product_attention(q, k, v, bias=bias, mask=mask), **TOL)


@pytest.mark.slow
@pytest.mark.parametrize("force_fp32", [False, True])
def test_mixed_precision_dtypes_follow_flax(force_fp32):
  # Flax: q, k, v promoted to dtype; with force_fp32_for_softmax and a narrower dtype the weights stay float32
  # and so does the output; otherwise weights and output are in dtype. The values differ by bf16 rounding:
  # Flax rounds the logits and (without force) the softmax to bf16, ours keeps float32 statistics, so a weight
  # differs by ~2^-8 relative and an output of O(1) values by ~1e-2.
  q, k, v = (jnp.asarray(a, jnp.bfloat16) for a in qkv(6))
  mask = padding_mask()
  flax_mha = nn.MultiHeadDotProductAttention(num_heads=4, dtype=jnp.bfloat16, force_fp32_for_softmax=force_fp32)
  ours = nn.MultiHeadDotProductAttention(num_heads=4, dtype=jnp.bfloat16, force_fp32_for_softmax=force_fp32,
                                         attention_fn=DOT)
  x = normal(7, (2, 7, 16), np.float32)
  params = flax_mha.init(jax.random.key(0), x)
  want, want_state = flax_mha.apply(params, x, mask=mask, sow_weights=True, mutable=["intermediates"])
  got, got_state = ours.apply(params, x, mask=mask, sow_weights=True, mutable=["intermediates"])
  assert got.dtype == want.dtype
  chex.assert_trees_all_equal_dtypes(got_state, want_state)
  np.testing.assert_allclose(np.asarray(got, np.float32), np.asarray(want, np.float32), rtol=3e-2, atol=3e-2)
  # The attention function alone: output dtype as Flax's function.
  flax_out = nn.dot_product_attention(q, k, v, mask=mask, force_fp32_for_softmax=force_fp32)
  our_out = DOT(q, k, v, mask=mask, force_fp32_for_softmax=force_fp32)
  assert our_out.dtype == flax_out.dtype == (jnp.float32 if force_fp32 else jnp.bfloat16)
  np.testing.assert_allclose(np.asarray(our_out, np.float32), np.asarray(flax_out, np.float32), rtol=3e-2,
                             atol=3e-2)


def test_explicit_dtype_promotes_like_flax():
  q, k, v = qkv(8)
  q16 = jnp.asarray(q, jnp.bfloat16)
  for dtype in (None, jnp.float32, jnp.bfloat16):
    assert DOT(q16, k, v, dtype=dtype).dtype == nn.dot_product_attention(q16, k, v, dtype=dtype).dtype


@pytest.mark.slow
def test_dropout_draws_equal_flax_for_the_same_rng():
  q, k, v = qkv(9, b=3)
  for broadcast in (True, False):
    kw = dict(dropout_rng=jax.random.key(11), dropout_rate=0.5, deterministic=False, broadcast_dropout=broadcast)
    chex.assert_trees_all_close(DOT(q, k, v, **kw), nn.dot_product_attention(q, k, v, **kw), **TOL)


@pytest.mark.slow
def test_cached_decoding_through_multi_head_attention_equals_the_default():
  # Flax builds the decode-step mask from its cache index; prompt-free, one token at a time.
  length = 6
  x = normal(12, (2, length, 16), np.float32)
  flax_mha = nn.MultiHeadDotProductAttention(num_heads=4, decode=True)
  ours = nn.MultiHeadDotProductAttention(num_heads=4, decode=True, attention_fn=DOT)
  variables = flax_mha.init(jax.random.key(0), x)
  params, cache_flax = variables["params"], variables["cache"]
  cache_ours = cache_flax
  for i in range(length):
    step = x[:, i:i + 1]
    want, cache_flax = flax_mha.apply({"params": params, "cache": cache_flax}, step, mutable=["cache"])
    got, cache_ours = ours.apply({"params": params, "cache": cache_ours}, step, mutable=["cache"])
    chex.assert_trees_all_close(got, want, **TOL)
    cache_flax, cache_ours = cache_flax["cache"], cache_ours["cache"]


@pytest.mark.slow
@pytest.mark.parametrize("impl", ["reference", da.kernels.Blockwise(8, 8)])
def test_grouped_query_attention_equals_jax_nn(impl):
  q, k, v = qkv(13, t=19, s=21, h=6, kv=2)
  for causal in (False, True):
    chex.assert_trees_all_close(
        da.distance_attention(q, k, v, metric="dot", is_causal=causal, implementation=impl),
        jax.nn.dot_product_attention(q, k, v, is_causal=causal), **TOL)


@pytest.mark.slow
@pytest.mark.parametrize("impl", ["reference", da.kernels.Blockwise(8, 8)])
def test_lengths_and_window_equal_jax_nn(impl):
  # jax.nn's lengths and window, with causal and GQA. "mean" reproduces jax.nn on every row (its fully masked
  # rows are the mean of the values, and rows past query_seq_lengths are 0); the default "zero" on every row
  # that sees at least one key.
  q, k, v = qkv(14, t=21, s=19, h=4, kv=2)
  q_lengths = jnp.asarray([15, 21], jnp.int32)
  kv_lengths = jnp.asarray([19, 4], jnp.int32)
  for window, causal in ((None, True), (3, False), ((5, 0), True), ((2, 6), False)):
    kw = dict(query_seq_lengths=q_lengths, key_value_seq_lengths=kv_lengths, local_window_size=window,
              is_causal=causal)
    want = np.asarray(jax.nn.dot_product_attention(q, k, v, **kw))
    mean = da.distance_attention(q, k, v, metric="dot", implementation=impl, fully_masked_rows="mean", **kw)
    np.testing.assert_allclose(mean, want, **TOL)
    zero = np.asarray(da.distance_attention(q, k, v, metric="dot", implementation=impl, **kw))
    t, s = np.arange(21)[:, None], np.arange(19)[None, :]
    left, right = (19, 19) if window is None else (window, window) if isinstance(window, int) else window
    sees = ((s >= t - left) & (s <= t + right) & ((s <= t) | (not causal)))[None] & (
        s[None] < np.asarray(kv_lengths)[:, None, None]) & (t[None] < np.asarray(q_lengths)[:, None, None])
    rows = sees.any(-1)  # [B, T]
    assert rows.any() and not rows.all()
    np.testing.assert_allclose(zero[rows], want[rows], **TOL)
    np.testing.assert_array_equal(zero[~rows], 0.0)


@pytest.mark.slow
def test_segment_ids_equal_jax_nn_with_the_dense_mask():
  q, k, v = qkv(15, t=10, s=10)
  ids = jnp.asarray([[1, 1, 1, 2, 2, 2, 2, 0, 0, 0], [4, 4, 5, 5, 5, 5, 5, 5, 5, 5]], jnp.int32)
  dense = (ids[:, :, None] == ids[:, None, :])[:, None]
  chex.assert_trees_all_close(
      da.distance_attention(q, k, v, metric="dot", q_segment_ids=ids, kv_segment_ids=ids, is_causal=True),
      jax.nn.dot_product_attention(q, k, v, mask=dense, is_causal=True), **TOL)


# jax's own tests of jax.nn.dot_product_attention (tests/nn_test.py: testDotProductAttention over grouped heads
# and vmap, testDotProductAttentionMask over these mask modes) at small float32 shapes, with
# return_residual=True on both sides.
JAX_NN_MASK_MODES = [("bias",), ("causal",), ("padding",), ("custom",), ("causal", "padding"), ("custom", "padding"),
                     ("bias", "causal"), ("causal", "sliding_window"), ("groups=2",), ("groups=4", "vmap")]


# make test-fast runs two of the modes (lengths with a causal and with a custom mask); make test all of them.
FAST_MODES = [("causal", "padding"), ("custom", "padding")]


@pytest.mark.parametrize("mode", [m if m in FAST_MODES else pytest.param(m, marks=pytest.mark.slow)
                                  for m in JAX_NN_MASK_MODES], ids="+".join)
def test_residual_equals_jax_nn_on_jax_nn_test_cases(mode):
  # Out and lse [B, T, N] equal jax.nn's (float32 reassociation: TOL) on every row that sees a key. A row that
  # sees none (here: queries past query_seq_lengths) differs by design: jax.nn fills masked logits with a large
  # finite negative, so its lse there is that number (-0.7 * float32 max; log S is below its rounding) where
  # ours is -inf, the log of the empty sum with a zero gradient; both outputs are 0 there.
  b, t, s, n, h = 2, 16, 16, 4, 8
  groups = int(next((m.split("=")[1] for m in mode if m.startswith("groups=")), 1))
  q, k, v = qkv(16, b=b, t=t, s=s, h=n, kv=n // groups, d=h)
  bias = jnp.asarray(normal(19, (1, n, t, s), np.float32)) if "bias" in mode else None
  mask = jnp.tril(jnp.ones((t, s), bool))[None, None] if "custom" in mode else None
  kw = dict(is_causal="causal" in mode)
  if "padding" in mode:
    kw.update(query_seq_lengths=jnp.asarray([t // 2, t // 4], jnp.int32),
              key_value_seq_lengths=jnp.asarray([s // 4, s // 2], jnp.int32))
  if "sliding_window" in mode:
    kw.update(local_window_size=(3, 2))
  ours = lambda q, k, v: da.distance_attention(q, k, v, bias, mask, metric="dot", lam=1.0,  # noqa: E731
                                               return_residual=True, implementation=da.kernels.Blockwise(8, 8),
                                               **kw)
  theirs = lambda q, k, v: jax.nn.dot_product_attention(q, k, v, bias, mask, return_residual=True,  # noqa: E731
                                                        **kw)
  if "vmap" in mode:  # over the batch, each example without a batch axis
    ours, theirs = jax.vmap(ours), jax.vmap(theirs)
  (out, lse), (want, want_lse) = ours(q, k, v), theirs(q, k, v)
  assert lse.shape == want_lse.shape == (b, t, n) and lse.dtype == want_lse.dtype == jnp.float32
  chex.assert_trees_all_close(out, want, **TOL)
  seen = np.isfinite(np.asarray(lse))
  if "padding" in mode:
    rows = np.arange(t)[None, :, None] < np.asarray([t // 2, t // 4])[:, None, None]
    np.testing.assert_array_equal(seen, np.broadcast_to(rows, seen.shape))
    assert np.isneginf(np.asarray(lse)[~seen]).all()
    np.testing.assert_array_equal(np.asarray(want_lse)[~seen], np.float32(-0.7 * np.finfo(np.float32).max))
  else:
    assert seen.all()
  np.testing.assert_allclose(np.asarray(lse)[seen], np.asarray(want_lse)[seen], **TOL)
