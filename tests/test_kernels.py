"""The blockwise kernel against the reference kernel (the materialised oracle, itself checked against scipy in
test_attention.py): outputs, log-sum-exp and every gradient, over metrics, masks, causal, GQA, odd lengths and
block sizes; its dropout bits; its memory growth; and the "auto" rule."""

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import distattn_jax as da
from conftest import kernel_sweep_metrics, normal
from distattn_jax import attention as attention_module
from distattn_jax.kernels import Blockwise, blockwise, dropout, tiles

METRICS = kernel_sweep_metrics()


def one_fast(values, fast):
  """``values`` for parametrize, every one but ``fast`` marked slow: `make test-fast` runs one case of a sweep,
  `make test` all of them."""
  return [v if v == fast else pytest.param(*(v if isinstance(v, tuple) else (v,)), marks=pytest.mark.slow)
          for v in values]


def case(seed, t, s, h=4, kv=2, d=8, dv=5, batch=2, dtype=np.float32):
  q = normal(seed, (batch, t, h, d), dtype)
  k = normal(seed + 1, (batch, s, kv, d), dtype)
  v = normal(seed + 2, (batch, s, kv, dv), dtype)
  rng = np.random.default_rng(seed)
  mask = rng.random((batch, 1, t, s)) > 0.25
  mask[:, :, t // 2] = False  # a fully masked query row
  bias = normal(seed + 3, (h, t, s), dtype)
  cotangent = normal(seed + 4, (batch, t, h, dv), dtype)
  return q, k, v, mask, bias, cotangent


def outputs_and_grads(impl, q, k, v, mask, bias, cotangent, **kw):
  lam = jnp.linspace(0.5, 1.5, q.shape[-2])

  def loss(q, k, v, lam, bias):
    out = da.distance_attention(q, k, v, bias=bias, mask=mask, lam=lam, implementation=impl, **kw)
    return jnp.sum(out * cotangent), out

  (_, out), grads = jax.value_and_grad(loss, argnums=(0, 1, 2, 3, 4), has_aux=True)(q, k, v, lam, bias)
  return (out,) + grads


def assert_relative_close(got, want, rtol):
  # Relative to each array's largest entry: summation order differs between the kernels, so entries near 0
  # carry absolute (not relative) rounding of the size of the array's scale.
  for g, w in zip(got, want):
    g, w = np.asarray(g, np.float32), np.asarray(w, np.float32)
    np.testing.assert_allclose(g, w, rtol=rtol, atol=rtol * max(1.0, float(np.max(np.abs(w)))))


@pytest.mark.parametrize("metric", one_fast(METRICS, "cosine"))
def test_blockwise_equals_reference_with_everything_on(metric):
  # Lengths 129 and 70 with 32 x 48 tiles: neither divides, so the padded tail of both loops is exercised,
  # together with bias, a mask with a fully masked row, causal masking, GQA (4 query heads on 2 kv heads) and
  # a per-head lam whose gradient is checked along with q, k, v and bias.
  q, k, v, mask, bias, ct = case(0, t=129, s=70)
  kw = dict(metric=metric, p=3.0, is_causal=True)
  want = outputs_and_grads("reference", q, k, v, mask, bias, ct, **kw)
  got = outputs_and_grads(Blockwise(32, 48), q, k, v, mask, bias, ct, **kw)
  # float32: both kernels round each logit the same way; only the order of the sums differs.
  assert_relative_close(got, want, rtol=1e-5)


@pytest.mark.parametrize("metric", ["l1", "dot"])
@pytest.mark.parametrize("length,blocks", one_fast([(1, (8, 8)), (7, (8, 8)), (7, (2, 3)), (1000, (8, 40)),
                                                    (1000, (96, 128))], (7, (2, 3))))
def test_lengths_and_block_sizes(metric, length, blocks):
  q, k, v, mask, bias, ct = case(10, t=length, s=length, batch=1)
  kw = dict(metric=metric, is_causal=length > 1)
  want = outputs_and_grads("reference", q, k, v, mask, bias, ct, **kw)
  got = outputs_and_grads(Blockwise(*blocks), q, k, v, mask, bias, ct, **kw)
  assert_relative_close(got, want, rtol=1e-5)


@pytest.mark.slow
def test_bfloat16_blockwise_matches_reference():
  q, k, v, mask, bias, ct = case(20, t=40, s=33, dtype=np.float32)
  q, k, v = (jnp.asarray(a, jnp.bfloat16) for a in (q, k, v))
  for metric in ("l1", "sqeuclidean"):
    want = da.distance_attention(q, k, v, mask=mask, metric=metric, implementation="reference")
    got = da.distance_attention(q, k, v, mask=mask, metric=metric, implementation=Blockwise(16, 16))
    assert got.dtype == jnp.bfloat16
    # Both accumulate in float32, but round to bfloat16 (2^-8 = 0.4% relative) at different points: the
    # reference rounds the normalised weights and the output, the blockwise kernel each tile's unnormalised
    # probabilities and the output. Two such roundings of outputs up to |v| ~ 3 allow 3 * 2 * 0.4% ~ 2.4%.
    np.testing.assert_allclose(np.asarray(got, np.float32), np.asarray(want, np.float32), rtol=2e-2, atol=3e-2)


@pytest.mark.slow
def test_learned_p_gradient_matches_reference():
  q, k, v, _, _, ct = case(30, t=20, s=17)
  grads = [jax.grad(lambda p: jnp.sum(da.distance_attention(q, k, v, metric="lp", p=p, implementation=impl) * ct))(
      jnp.float32(2.6)) for impl in ("reference", Blockwise(8, 8))]
  np.testing.assert_allclose(grads[1], grads[0], rtol=1e-5)


@pytest.mark.slow
def test_log_sum_exp_and_its_gradient_match_reference():
  q, k, v, mask, bias, _ = case(40, t=24, s=19)
  args = [jnp.asarray(a).reshape(a.shape) for a in (q, k, v)]
  lam = jnp.ones(4)
  weights = normal(41, (2, 4, 24))

  def lse_loss(q, kernel):
    res = kernel(q, args[1], args[2], lam=lam, mask=jnp.asarray(mask), metric="cosine", is_causal=True)
    finite = jnp.where(jnp.isfinite(res.lse), res.lse, 0.0)
    return jnp.sum(finite * weights), res.lse

  (_, ref_lse), ref_grad = jax.value_and_grad(lse_loss, has_aux=True)(args[0], da.kernels.get("reference"))
  (_, bw_lse), bw_grad = jax.value_and_grad(lse_loss, has_aux=True)(args[0], Blockwise(8, 8))
  np.testing.assert_array_equal(np.isneginf(bw_lse), np.isneginf(ref_lse))  # fully masked rows: -inf
  finite = np.isfinite(ref_lse)
  np.testing.assert_allclose(np.asarray(bw_lse)[finite], np.asarray(ref_lse)[finite], rtol=1e-6)
  np.testing.assert_allclose(bw_grad, ref_grad, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("broadcast", one_fast([True, False], True))
def test_dropout_is_the_reference_draw_forward_and_backward(broadcast):
  q, k, v, mask, bias, ct = case(50, t=37, s=29)
  kw = dict(metric="l2", is_causal=True, dropout_rng=jax.random.key(3), dropout_rate=0.35,
            broadcast_dropout=broadcast)
  want = outputs_and_grads("reference", q, k, v, mask, bias, ct, **kw)
  got = outputs_and_grads(Blockwise(8, 16), q, k, v, mask, bias, ct, **kw)
  assert_relative_close(got, want, rtol=1e-5)


def test_tile_dropout_bits_equal_jax_random_bernoulli():
  key = jax.random.key(11)
  full = np.asarray(jax.random.bernoulli(key, 0.7, (3, 5, 37, 29)))
  rows = (np.arange(3 * 5)[:, None] * 37 + np.arange(37)[None, :]).reshape(3, 5, 37, 1).astype(np.uint32)
  cols = np.arange(29, dtype=np.uint32)[None, None, None, :]
  np.testing.assert_array_equal(dropout.keep_mask(key, 0.7, jnp.asarray(rows), jnp.asarray(cols), 29), full)


def test_64_bit_counter_arithmetic_matches_numpy():
  rng = np.random.default_rng(0)
  a = rng.integers(0, 2**32, 1000, dtype=np.uint64)
  for b in (1, 29, 65535, 65536, 2**31 + 7, 2**32 - 1):
    high, low = dropout.mul_u32(jnp.asarray(a.astype(np.uint32)), b)
    np.testing.assert_array_equal((np.asarray(high, np.uint64) << np.uint64(32)) | np.asarray(low, np.uint64),
                                  a * np.uint64(b))


def test_fully_masked_rows_are_zero_with_finite_gradients():
  q, k, v, _, _, ct = case(60, t=20, s=20)
  mask = np.ones((1, 1, 20, 20), bool)
  mask[..., 5, :] = False
  f = lambda q, k, v: jnp.sum(da.distance_attention(q, k, v, mask=mask, metric="chebyshev",
                                                    implementation=Blockwise(8, 8)) * ct)
  out = da.distance_attention(q, k, v, mask=mask, metric="chebyshev", implementation=Blockwise(8, 8))
  grads = jax.grad(f, (0, 1, 2))(q, k, v)
  np.testing.assert_array_equal(np.asarray(out)[:, 5], 0.0)
  np.testing.assert_array_equal(np.asarray(grads[0])[:, 5], 0.0)
  assert all(np.all(np.isfinite(g)) for g in grads)


@pytest.mark.parametrize("is_causal,window", [(True, None), (False, (5, 3)), (True, (9, 4)), (False, (0, 17))])
def test_block_ranges_skip_exactly_the_blocks_no_query_can_see(is_causal, window):
  # Brute force over positions: a (query block, key block) pair is visited iff some pair of positions in it is
  # inside the causal triangle and the window.
  for block_q, block_k, length in ((8, 8, 64), (8, 24, 70), (32, 8, 100), (5, 7, 36)):
    cfg = tiles.TileConfig("dot", 2.0, is_causal, block_q, block_k, length, length, 1, 0.0, True, None, window)
    num_q, num_k = -(-length // block_q), -(-length // block_k)
    left, right = window or (length, length)
    for i in range(num_q):
      first, end = (int(x) for x in tiles.kv_block_range(cfg, i, num_k))
      for j in range(num_k):
        first_q, end_q = (int(x) for x in tiles.q_block_range(cfg, j, num_q))
        visible = any((t >= s or not is_causal) and t - left <= s <= t + right
                      for t in range(i * block_q, (i + 1) * block_q) for s in range(j * block_k, (j + 1) * block_k))
        assert (first <= j < end) == visible, (block_q, block_k, i, j)
        assert (first_q <= i < end_q) == visible, (block_q, block_k, i, j)


@pytest.mark.parametrize("metric", one_fast(["dot", "l1"], "dot"))
def test_compiled_memory_grows_linearly(metric):
  # memory_analysis() of the compiled forward+backward is deterministic; from N to 4N the temporaries may grow
  # by at most 5x for the blockwise kernel, while the reference's logits alone grow 16x.
  def temp_bytes(n, impl):
    shape = jax.ShapeDtypeStruct((1, n, 4, 32), jnp.float32)
    loss = lambda q, k, v: jnp.sum(da.distance_attention(q, k, v, metric=metric, implementation=impl))
    return jax.jit(jax.grad(loss, (0, 1, 2))).lower(shape, shape, shape).compile().memory_analysis(
        ).temp_size_in_bytes

  assert temp_bytes(4096, "blockwise") <= 5 * temp_bytes(1024, "blockwise")
  assert temp_bytes(4096, "reference") >= 10 * temp_bytes(1024, "reference")


def test_no_recompilation_for_the_same_shapes():
  q, k, v, mask, _, _ = case(70, t=40, s=40)

  @jax.jit
  @chex.assert_max_traces(n=1)
  def step(q, k, v, lam):
    return jax.grad(lambda q: jnp.sum(da.distance_attention(q, k, v, mask=mask, lam=lam, metric="l1",
                                                            implementation="blockwise")))(q)

  step(q, k, v, jnp.float32(1.0))
  step(q * 2, k, v, jnp.float32(0.5))


def test_auto_picks_reference_for_small_and_blockwise_for_large_logits():
  def select(impl, weights, logits, rng):
    request = da.kernels.Request(batch=1, q_len=1, kv_len=logits, num_heads=1, num_kv_heads=1, metric="l1",
                                 return_weights=weights,
                                 dropout=None if rng is None else da.kernels.Dropout(0.1, rng, True))
    return attention_module._select_kernel(impl, request)

  small = attention_module.AUTO_REFERENCE_MAX_BYTES // 4
  assert select("auto", False, small, None) is da.kernels.get("reference")
  assert select(None, False, small + 1, None) is da.kernels.get("blockwise")
  assert select("auto", True, small + 1, None) is da.kernels.get("reference")  # weights need the reference
  # A dropout key the tile-wise draw cannot reproduce keeps "auto" on the reference ...
  rbg = jax.random.key(0, impl="rbg")
  assert select("auto", False, small + 1, rbg) is da.kernels.get("reference")
  with pytest.raises(ValueError, match="tile-wise dropout needs a threefry dropout_rng"):
    dropout.check_rng(rbg)
  # ... and an explicit blockwise kernel says why it declines.
  with pytest.raises(ValueError, match="implementation 'blockwise' cannot draw this dropout"):
    select("blockwise", False, small + 1, rbg)


def test_dropout_under_x64_is_the_reference_draw_or_a_clear_error(x64):
  # jax.random.bernoulli draws float64 uniforms under x64, which no tile-wise float32 draw reproduces: the
  # blockwise kernel declines, and "auto" (whatever the size) stays on the reference, which draws exactly as
  # Flax does.
  q, k, v, _, _, _ = case(90, t=24, s=24, batch=1)
  kw = dict(metric="l1", dropout_rng=jax.random.key(5), dropout_rate=0.3)
  with pytest.raises(ValueError, match="cannot reproduce jax.random.bernoulli under jax_enable_x64"):
    da.distance_attention(q, k, v, implementation=Blockwise(8, 8), **kw)
  weights = da.distance_attention(q, k, v, metric="l1", implementation="reference", return_weights=True)[1]
  keep = jax.random.bernoulli(jax.random.key(5), 0.7, (1, 1, 24, 24))
  want = jnp.einsum("bhts,bshd->bthd", weights * keep / 0.7, jnp.repeat(jnp.asarray(v), 2, axis=2))
  np.testing.assert_allclose(da.distance_attention(q, k, v, **kw), want, rtol=1e-5, atol=1e-6)


def test_blockwise_errors():
  q, k, v, _, _, _ = case(80, t=8, s=8)
  with pytest.raises(ValueError, match="'blockwise' cannot return attention weights"):
    da.distance_attention(q, k, v, implementation="blockwise", return_weights=True)
  with pytest.raises(ValueError, match=r"Blockwise: block_q must be a positive int or None; got 0"):
    Blockwise(block_q=0)


  class Unhashable:
    __hash__ = None

    def __call__(self, *args, **kwargs):
      raise AssertionError("never called")

  with pytest.raises(TypeError, match="must be a registered name or a hashable kernel object"):
    da.distance_attention(q, k, v, implementation=Unhashable())


def segment_case(seed, t, s, batch=2):
  """Packed ids (runs of 0..3, 0 included as padding), lengths not a multiple of the tile, and the dense mask
  they mean, written from the definition."""
  rng = np.random.default_rng(seed)
  q_ids = np.sort(rng.integers(0, 4, (batch, t)), axis=-1).astype(np.int32)
  kv_ids = np.sort(rng.integers(0, 4, (batch, s)), axis=-1).astype(np.int32)
  q_lengths = np.array([t - 3, t][:batch], np.int32)
  kv_lengths = np.array([s, s - 11][:batch], np.int32)
  window = (9, 4)
  ti, si = np.arange(t)[:, None], np.arange(s)[None, :]
  dense = ((q_ids[:, :, None] == kv_ids[:, None, :]) & (ti < q_lengths[:, None, None])[..., :1]
           & (si < kv_lengths[:, None, None]) & (si >= ti - window[0]) & (si <= ti + window[1]))
  kw = dict(q_segment_ids=q_ids, kv_segment_ids=kv_ids, query_seq_lengths=q_lengths,
            key_value_seq_lengths=kv_lengths, local_window_size=window)
  return kw, dense[:, None]


@pytest.mark.parametrize("metric", one_fast(METRICS, "dot"))
def test_segments_lengths_and_window_equal_the_dense_mask(metric):
  # Lengths 45 and 38 with 16 x 16 tiles: three query and three key tiles, neither divisible. Ids, lengths and
  # window together with a random mask, bias, causal and GQA; the oracle is the reference kernel given the same
  # constraints as one dense mask. Outputs and the gradients of q, k, v, lam and bias.
  q, k, v, mask, bias, ct = case(100, t=45, s=38)
  seg_kw, dense = segment_case(101, 45, 38)
  kw = dict(metric=metric, p=3.0, is_causal=True)
  want = outputs_and_grads("reference", q, k, v, mask & dense, bias, ct, **kw)
  for impl in ("reference", Blockwise(16, 16)):
    got = outputs_and_grads(impl, q, k, v, mask, bias, ct, **kw, **seg_kw)
    assert_relative_close(got, want, rtol=1e-5)


@pytest.mark.slow
def test_window_skips_blocks_and_matches_reference_without_causal():
  # A window without causal reaches right of the diagonal; 8 x 8 tiles of 100 positions: most key blocks are
  # outside every query block's window (the block ranges above say which), and the result is unchanged.
  q, k, v, mask, bias, ct = case(110, t=100, s=100, batch=1)
  kw = dict(metric="l2", local_window_size=(6, 13))
  want = outputs_and_grads("reference", q, k, v, mask, bias, ct, **kw)
  got = outputs_and_grads(Blockwise(8, 8), q, k, v, mask, bias, ct, **kw)
  assert_relative_close(got, want, rtol=1e-5)


@pytest.mark.slow
def test_compiled_memory_with_segment_ids_grows_linearly():
  # Segment ids and lengths are [B, T] / [B] arrays evaluated per tile: doubling the length must not quadruple
  # the temporaries of the forward+backward (a dense [T, S] mask would).
  def temp_bytes(n):
    shape = jax.ShapeDtypeStruct((1, n, 4, 32), jnp.float32)
    ids = jax.ShapeDtypeStruct((1, n), jnp.int32)
    lengths = jax.ShapeDtypeStruct((1,), jnp.int32)

    def loss(q, k, v, ids, lengths):
      return jnp.sum(da.distance_attention(q, k, v, metric="l1", implementation=Blockwise(256, 256),
                                           q_segment_ids=ids, kv_segment_ids=ids, key_value_seq_lengths=lengths,
                                           local_window_size=(512, 0)))

    return jax.jit(jax.grad(loss, (0, 1, 2))).lower(shape, shape, shape, ids, lengths).compile(
        ).memory_analysis().temp_size_in_bytes

  small, large = temp_bytes(2048), temp_bytes(4096)
  assert large <= 2.5 * small, (small, large)
