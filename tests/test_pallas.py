"""The fused Pallas kernel against the reference kernel, run through Pallas' interpreter on CPU.

Every case compares the output, the log-sum-exp and the gradients of a fixed random linear function of the
output (plus the lse) with respect to q, k, v, lam, and the bias and a learned p where given, against the
materialised reference kernel (itself checked against float64 oracles in test_kernels.py). Shapes are tiny
(interpret mode runs each grid program in Python) with 16 x 16 tiles, lengths that are not multiples of the
tile, and grouped-query heads, so padding and the head index maps are exercised in every case.

Tolerances: float32 cases are compared to 2e-5 of the largest entry (the two kernels sum in different orders;
the measured gaps are below 2e-6). bfloat16 cases to 3e-2 of the largest entry: both kernels round the
softmax weights to bfloat16 before they meet the values, at different points of the online softmax, and the
fused kernel also rounds the score cotangent of gram forms to bfloat16 for the tensor cores (as
FlashAttention-2 does); the measured gaps are below 1e-2.
"""

import logging

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import distattn_jax as da
from distattn_jax import attention as attention_module
from distattn_jax import compat
from distattn_jax import kernels
from distattn_jax.kernels import pallas_gpu
from distattn_jax.kernels.pallas_gpu import config as pallas_config
from distattn_jax.kernels.pallas_gpu import tile as pallas_tile
from distattn_jax.metrics import record

TILE = 16
PALLAS = kernels.Pallas(block_q=TILE, block_k=TILE, interpret=True)
REFERENCE = kernels.get("reference")
ON_GPU = jax.default_backend() == "gpu"


def _offset_cosh(t):
  # phi(0) = 1: padded features (D = 8 is padded to 16 inside the kernel) would add to the sum if unmasked.
  return jnp.sqrt(1.0 + jnp.square(t))


def one_fast(values, fast, names=1):
  """``values`` of ``names`` parameters for parametrize, every one but ``fast`` marked slow: `make test-fast` runs
  one case of a sweep, `make test` all of them."""
  return [v if v == fast else pytest.param(*(v if names > 1 else (v,)), marks=pytest.mark.slow) for v in values]


USER_METRIC = record.Metric("test_pallas_offset", record.Elementwise(phi=_offset_cosh), translation_invariant=True)


@pytest.fixture(scope="module", autouse=True)
def registered():
  da.metrics.register(USER_METRIC)
  yield
  record._REGISTRY.pop(USER_METRIC.name)  # leave the registry as the other test files expect it


def _inputs(seed, *, batch=1, q_len=20, kv_len=24, heads=2, kv_heads=1, dim=8, dtype=jnp.float32):
  ks = jax.random.split(jax.random.PRNGKey(seed), 4)
  q = jax.random.normal(ks[0], (batch, q_len, heads, dim), dtype)
  k = jax.random.normal(ks[1], (batch, kv_len, kv_heads, dim), dtype)
  v = jax.random.normal(ks[2], (batch, kv_len, kv_heads, dim), dtype)
  lam = jnp.linspace(0.6, 1.4, heads).astype(jnp.float32)
  return q, k, v, lam


def _compare(metric, *, p=2.0, is_causal=False, bias=None, mask=None, segments=None, dtype=jnp.float32,
             tol=None, kernel=PALLAS, local_window=None, **shape):
  q, k, v, lam = _inputs(0, dtype=dtype, **shape)
  learned_p = not isinstance(p, float)
  tol = tol if tol is not None else (2e-5 if dtype == jnp.float32 else 3e-2)

  def loss(kernel, q, k, v, lam, bias, p_traced):
    result = kernel(q, k, v, lam=lam, bias=bias, mask=mask, segments=segments, local_window=local_window,
                    metric=metric, p=p_traced if learned_p else p, is_causal=is_causal, dropout=None,
                    precision=None, return_weights=False)
    weights = jnp.cos(jnp.arange(result.out.size, dtype=jnp.float32)).reshape(result.out.shape)
    lse = jnp.where(jnp.isfinite(result.lse), result.lse, 0.0)
    return jnp.sum(result.out.astype(jnp.float32) * weights) + 0.25 * jnp.sum(lse), result

  argnums = (0, 1, 2, 3) + ((4,) if bias is not None else ()) + ((5,) if learned_p else ())
  p_arg = p if learned_p else jnp.float32(0.0)  # a static p stays a Python float, closed over
  got, want = [jax.jit(jax.value_and_grad(lambda *a, kern=kern: loss(kern, *a), argnums, has_aux=True))(
      q, k, v, lam, bias, p_arg) for kern in (kernel, REFERENCE)]
  (_, got_result), got_grads = got
  (_, want_result), want_grads = want
  assert got_result.out.dtype == v.dtype
  assert got_result.lse.shape == want_result.lse.shape
  np.testing.assert_array_equal(np.isneginf(got_result.lse), np.isneginf(want_result.lse))
  finite = np.isfinite(np.asarray(want_result.lse))
  names = (["out", "lse", "dq", "dk", "dv", "dlam"] + (["dbias"] if bias is not None else [])
           + (["dp"] if learned_p else []))
  pairs = [(got_result.out, want_result.out),
           (np.where(finite, got_result.lse, 0.0), np.where(finite, want_result.lse, 0.0))]
  pairs += list(zip(got_grads, want_grads))
  assert len(pairs) == len(names)
  for name, (a, b) in zip(names, pairs):
    a, b = np.asarray(a, np.float32), np.asarray(b, np.float32)
    assert a.shape == b.shape, name
    scale = max(float(np.max(np.abs(b))), 1e-6)
    err = float(np.max(np.abs(a - b)))
    assert err <= tol * scale, f"{metric} {name}: max |pallas - reference| = {err:.2e}, largest {scale:.2e}"


# ------------------------------------------------------------------------------------------------------------
# Equality with the reference.


@pytest.mark.parametrize("metric", one_fast([m.value for m in da.DistanceType], "sqeuclidean"))
def test_every_metric_forward_and_gradients(metric):
  # lp at 3.0 (lp at 2.0 is the l2 form); 3.0 multiplies directly, the next test's 3.5 rescales.
  _compare(metric, p=3.0)


@pytest.mark.slow
def test_lp_rescaled_order():
  # A non-integer order divides the differences by their largest magnitude first (Elementwise.rescale).
  _compare("lp", p=3.5)


@pytest.mark.slow
@pytest.mark.parametrize("metric,is_causal,window", one_fast([("l1", False, (3, 18)), ("sqeuclidean", True, (17, 0))],
                                                             ("sqeuclidean", True, (17, 0)), names=3))
def test_local_window_through_the_shared_mask_rule(metric, is_causal, window):
  # Multi-tile (block 16 over 40 x 44 positions) so whole key tiles fall outside the window and are skipped,
  # with a bias so the skipped tiles' bias gradient must come out 0.
  bias = jax.random.normal(jax.random.PRNGKey(7), (1, 2, 40, 44), jnp.float32)
  _compare(metric, is_causal=is_causal, local_window=window, bias=bias, q_len=40, kv_len=44,
           kernel=kernels.Pallas(block_q=16, block_k=16, interpret=True))


@pytest.mark.slow
def test_learned_p_gradient_causal():
  _compare("lp", p=jnp.float32(2.5), is_causal=True)


@pytest.mark.slow
def test_user_registered_metric_pads_features():
  _compare(USER_METRIC.name, is_causal=True)


def _segments(batch, q_len, kv_len):
  # Two segments per row, a key length cutting the second one short, and one query row past its length.
  q_ids = (jnp.arange(q_len)[None, :] >= 7).astype(jnp.int32) * jnp.ones((batch, 1), jnp.int32)
  kv_ids = (jnp.arange(kv_len)[None, :] >= 9).astype(jnp.int32) * jnp.ones((batch, 1), jnp.int32)
  return kernels.Segments(q_ids=q_ids, kv_ids=kv_ids, q_lengths=jnp.array([q_len - 2, q_len], jnp.int32),
                          kv_lengths=jnp.array([kv_len - 3, kv_len - 10], jnp.int32))


@pytest.mark.slow
@pytest.mark.parametrize("metric", one_fast(["chebyshev", "sqeuclidean"], "sqeuclidean"))
def test_causal_segments_lengths_and_bias(metric):
  batch, q_len, kv_len = 2, 20, 24
  bias = jax.random.normal(jax.random.PRNGKey(5), (batch, 1, q_len, kv_len))
  _compare(metric, is_causal=True, bias=bias, segments=_segments(batch, q_len, kv_len), batch=batch,
           q_len=q_len, kv_len=kv_len)


@pytest.mark.slow
def test_dense_mask_and_broadcast_bias_with_four_heads():
  heads, q_len, kv_len = 4, 18, 33
  mask = jax.random.bernoulli(jax.random.PRNGKey(6), 0.7, (1, 1, q_len, kv_len))
  mask = mask.at[0, 0, 3].set(False)  # a row that sees no key: lse -inf, output 0, gradient 0
  bias = jax.random.normal(jax.random.PRNGKey(7), (1, heads, 1, kv_len))
  _compare("dot", mask=mask, bias=bias, heads=heads, kv_heads=2, q_len=q_len, kv_len=kv_len, dim=16)


@pytest.mark.parametrize("shape", one_fast([(1, 1, 20, 24), (2, 1, 1, 24), (2, 2, 20, 24), (1, 2, 20, 1)],
                                           (1, 2, 20, 1)))
def test_bias_gradient_in_the_bias_shape(shape):
  # The dq program sums the bias gradient over the axes the bias broadcasts along: over batch and heads by
  # looping over them in one program ([1, 1, T, S]), over the two query tiles by one row per tile
  # ([B, 1, 1, S]), over the keys inside the tile ([1, H, T, 1]); [B, H, T, S] is stored as computed.
  bias = jax.random.normal(jax.random.PRNGKey(9), shape, jnp.float32)
  _compare("l1", is_causal=True, bias=bias, batch=2, heads=2, kv_heads=1, q_len=20, kv_len=24)


@pytest.mark.slow
@pytest.mark.parametrize("metric", one_fast(["l1", "dot"], "dot"))
def test_head_dim_not_a_power_of_two(metric):
  # 80 features padded to 128: the elementwise form reduces chunks 0..80 only (those past 80 are skipped, and
  # their gradient features written as zeros), the gram form multiplies the zero-padded 128 (see gram.py).
  assert pallas_tile.feature_chunks(_call_config("l1", 80, block_d=16), 128)[-1] == (64, 16)
  assert pallas_tile.feature_chunks(_call_config("l1", 72, block_d=16), 128)[-1] == (64, 16)  # 8 padded
  _compare(metric, dim=80, q_len=20, kv_len=17,
           kernel=kernels.Pallas(block_q=TILE, block_k=TILE, block_d=16, interpret=True))


def _call_config(metric, head_dim, block_d):
  tiles = pallas_gpu.Tiles(block_q=16, block_k=16, block_d=block_d)
  return pallas_config.CallConfig(
      metric=metric, p=2.0, is_causal=False, tiles=tiles, q_len=16, kv_len=16, head_dim=head_dim, group=1,
      precision=None, bias_shape=None, mask_shape=None, has_ids=False, has_kv_valid=False, interpret=True,
      geometry=None)


@pytest.mark.slow
@pytest.mark.parametrize("metric", one_fast(["l1", "dot", "cosine"], "cosine"))
def test_bfloat16(metric):
  # dot: causal over three tiles, so whole key tiles above the diagonal are skipped.
  length = 40 if metric == "dot" else 24
  _compare(metric, dtype=jnp.bfloat16, is_causal=metric == "dot", q_len=length, kv_len=length)


@pytest.mark.slow
@pytest.mark.parametrize("metric", ["l1", "sqeuclidean"])
def test_programs_with_their_own_tiles(metric, monkeypatch):
  """The forward, dq and dk/dv programs each with their own tiles (as the defaults give them): the lengths are
  padded to the largest, each program skips causal tiles at its own tile size, and the padded keys are masked
  in every program though some tiles divide the key length."""
  tiles = {"forward": pallas_gpu.Tiles(32, 16, 8, 4, 2), "dq": pallas_gpu.Tiles(16, 32, 4, 4, 2),
           "dkv": pallas_gpu.Tiles(16, 16, 16, 4, 2)}
  for key in pallas_config.DEFAULT_TILES:
    monkeypatch.setitem(pallas_config.DEFAULT_TILES, key, tiles)
  kernel = kernels.Pallas(interpret=True)
  assert [kernel.tiles(metric, 2.0, 8, 20, 48, "float32", role).block_k for role in ("forward", "dq", "dkv")] == [
      16, 32, 16]
  # 48 keys padded to 64 (the dq program's tile is 32), 20 queries to 32.
  bias = jax.random.normal(jax.random.PRNGKey(5), (1, 1, 20, 48), jnp.float32)
  _compare(metric, kernel=kernel, is_causal=True, bias=bias, q_len=20, kv_len=48, heads=1)


def test_public_entry_point_matches_reference():
  q, k, v, lam = _inputs(3, batch=2, q_len=17, kv_len=17, heads=2, kv_heads=2, dim=8)
  lengths = jnp.array([17, 11], jnp.int32)
  run = lambda impl: da.distance_attention(q, k, v, metric="l2", lam=lam, is_causal=True,  # noqa: E731
                                           key_value_seq_lengths=lengths, implementation=impl)
  np.testing.assert_allclose(run(PALLAS), run("reference"), rtol=2e-5, atol=2e-5)


def test_memory_is_linear_no_length_squared_array_outside_the_kernels():
  """Forward+backward without a bias: every array the program holds outside the three pallas_calls is O(N)."""
  n = 256
  q, k, v, lam = _inputs(8, q_len=n, kv_len=n, heads=1, kv_heads=1, dim=16)
  kernel = kernels.Pallas()  # traced only, never run: the compiled kernel needs a GPU

  def loss(q, k, v, lam):
    result = kernel(q, k, v, lam=lam, bias=None, mask=None, segments=None, local_window=None, metric="l1",
                    p=2.0, is_causal=True, dropout=None, precision=None, return_weights=False)
    return jnp.sum(result.out) + jnp.sum(result.lse)

  jaxpr = jax.make_jaxpr(jax.grad(loss, (0, 1, 2, 3)))(q, k, v, lam)
  sizes, calls = [], 0

  def walk(jaxpr):
    nonlocal calls
    for eqn in jaxpr.eqns:
      if eqn.primitive.name == "pallas_call":
        calls += 1
        continue  # inside a kernel only tiles exist
      sizes.extend(int(np.prod(var.aval.shape)) for var in eqn.outvars if hasattr(var.aval, "shape"))
      for param in eqn.params.values():
        inner = getattr(param, "jaxpr", None)
        if inner is not None:
          walk(getattr(inner, "jaxpr", inner))

  walk(jaxpr.jaxpr)
  assert calls == 3  # forward, dq, dk/dv
  assert max(sizes) < n * n // 8, max(sizes)  # the largest are [n, heads, features] arrays (n * 16 here)


def _pallas_outputs(fn, *args):
  """The output shapes of every pallas_call in ``fn``'s jaxpr, by kernel name (into linear_call maps too)."""
  found = []

  def walk(jaxpr):
    for eqn in jaxpr.eqns:
      if eqn.primitive.name == "pallas_call":
        found.append((str(eqn.params["name"]).split()[0],
                      [tuple(v.aval.shape) for v in eqn.outvars]))
        continue
      for param in eqn.params.values():
        inner = getattr(param, "jaxpr", None)
        if inner is not None:
          walk(getattr(inner, "jaxpr", inner))

  walk(jax.make_jaxpr(fn)(*args).jaxpr)
  return found


def test_bias_gradient_is_the_bias_shape_and_absent_when_not_needed():
  """A [1, 1, T, S] bias gets one [1, 1, T, S] gradient from the dq program, no [B, H, T, S] one; a bias that
  gets no gradient gets no T x S output at all, and grad in q alone runs no dk/dv program."""
  batch, heads, n = 2, 2, 32
  q, k, v, lam = _inputs(8, batch=batch, q_len=n, kv_len=n, heads=heads, kv_heads=1, dim=16)
  bias = jnp.zeros((1, 1, n, n), jnp.float32)

  def loss(q, k, v, lam, bias):
    result = PALLAS(q, k, v, lam=lam, bias=bias, mask=None, segments=None, local_window=None, metric="l1",
                    p=2.0, is_causal=False, dropout=None, precision=None, return_weights=False)
    return jnp.sum(result.out) + jnp.sum(result.lse)

  full = (batch, heads, n, n)
  calls = _pallas_outputs(jax.grad(loss, (0, 1, 2, 3, 4)), q, k, v, lam, bias)
  shapes = [shape for _, outs in calls for shape in outs]
  assert len(calls) == 3 and full not in shapes and (1, 1, n, n) in shapes, calls
  calls = _pallas_outputs(jax.grad(loss, (0, 1, 2, 3)), q, k, v, lam, bias)
  assert len(calls) == 3 and not [s for _, outs in calls for s in outs if len(s) == 4 and s[-1] == n], calls
  calls = _pallas_outputs(jax.grad(loss, 0), q, k, v, lam, bias)
  assert [name for name, _ in calls] == ["distance_attention_fwd", "distance_attention_dq"], calls
  # The same under vmap (the batched linear map keeps the needed-cotangent information).
  mapped = lambda q, *rest: jnp.sum(jax.vmap(loss, (0, None, None, None, None))(q, *rest))  # noqa: E731
  calls = _pallas_outputs(jax.grad(mapped, 0), jnp.stack([q, q]), k, v, lam, bias)
  assert [name for name, _ in calls] == ["distance_attention_fwd", "distance_attention_dq"], calls


# ------------------------------------------------------------------------------------------------------------
# Tiles, dispatch and bad input.


def test_default_tiles_are_powers_of_two_and_follow_the_form():
  for metric in da.metrics.available():
    for dim in (8, 64, 128):
      tiles = pallas_gpu.default_tiles(metric, 2.0, dim)
      for value in (tiles.block_q, tiles.block_k, tiles.block_d):
        assert value & (value - 1) == 0 and value >= 1
  assert pallas_gpu.default_tiles("dot", 2.0, 64).block_d == 64  # gram forms take the whole feature axis
  assert pallas_gpu.default_tiles("l1", 2.0, 64).block_d == 8
  # Clipped to the (power-of-two) length: a 20-long sequence runs in one 32-long tile, not a 128-long one.
  assert kernels.Pallas().tiles("dot", 2.0, 64, 20, 20).block_q == 32
  # Keyed by form, width and the dtype the programs load.
  assert pallas_gpu.default_tiles("dot", 2.0, 64, "bfloat16") == pallas_gpu.Tiles(128, 64, 64, 4, 3)
  assert pallas_gpu.default_tiles("dot", 2.0, 48, jnp.float32) == pallas_gpu.Tiles(64, 64, 64, 4, 2)
  assert pallas_gpu.default_tiles("dot", 2.0, 96, "bfloat16") == pallas_gpu.Tiles(64, 64, 128, 8, 2)
  assert pallas_gpu.default_tiles("l1", 2.0, 80, "bfloat16") == pallas_gpu.Tiles(64, 32, 8, 8, 2)
  # Each program has its own: the backward programs keep their own tile long and stream short tiles.
  assert pallas_gpu.default_tiles("dot", 2.0, 64, "bfloat16", "dq") == pallas_gpu.Tiles(128, 32, 64, 4, 2)
  assert pallas_gpu.default_tiles("dot", 2.0, 64, "bfloat16", "dkv") == pallas_gpu.Tiles(32, 128, 64, 4, 2)
  assert pallas_gpu.default_tiles("l1", 2.0, 64, "float32", "dkv") == pallas_gpu.Tiles(32, 32, 8, 4, 2)
  assert kernels.Pallas().tiles("dot", 2.0, 64, 500, 20, "bfloat16", "dkv") == pallas_gpu.Tiles(32, 32, 64, 4, 2)
  with pytest.raises(ValueError, match="role"):
    pallas_gpu.default_tiles("dot", 2.0, 64, "bfloat16", "backward")
  # The user's settings override the defaults; a gram form ignores block_d (it takes every feature at once).
  mine = kernels.Pallas(block_d=32, num_warps=2, num_stages=3)
  assert mine.tiles("l1", 2.0, 80, 500, 500) == pallas_gpu.Tiles(64, 32, 32, 2, 3)
  assert mine.tiles("l1", 2.0, 8, 500, 500).block_d == 16  # clipped to the padded width
  assert mine.tiles("dot", 2.0, 64, 500, 500, "bfloat16") == pallas_gpu.Tiles(128, 64, 64, 2, 3)


def _request(**kw):
  base = dict(batch=1, q_len=8, kv_len=8, num_heads=1, num_kv_heads=1, metric="l1", dtype="float32")
  return kernels.Request(**{**base, **kw})


def test_auto_picks_pallas_on_gpu_and_logs_why_it_falls_back(caplog, monkeypatch):
  # On a GPU "auto" takes the fused kernel only where kernels.evidence records it beating blockwise on that GPU
  # class for the metric, head_dim and dtype; the table ships empty, so without an entry the CPU rule applies.
  h100 = "NVIDIA H100 80GB HBM3"
  l1 = _request(head_dim=64)
  select = attention_module._select_kernel
  assert select("auto", l1, platform="gpu", device_kind=h100) is kernels.get("reference")
  monkeypatch.setitem(kernels.evidence.PALLAS_OVER_BLOCKWISE, ("H100", "l1", 64, "float32"), 1.8)
  assert select("auto", l1, platform="gpu", device_kind=h100) is kernels.get("pallas")
  assert select("auto", l1, platform="gpu", device_kind="NVIDIA A100-SXM4-80GB") is kernels.get("reference")
  assert select("auto", _request(head_dim=128), platform="gpu", device_kind=h100) is kernels.get("reference")
  big = _request(head_dim=128, q_len=4096, kv_len=4096)  # past the reference's size: blockwise, not pallas
  assert select("auto", big, platform="gpu", device_kind=h100) is kernels.get("blockwise")
  # The CPU policy is unchanged whatever the evidence says.
  assert select("auto", l1, platform="cpu", device_kind=h100) is kernels.get("reference")
  attention_module._log_fallback.cache_clear()
  with caplog.at_level(logging.WARNING, logger="distattn_jax"):
    chosen = select("auto", _request(head_dim=64, return_weights=True), platform="gpu", device_kind=h100)
  assert chosen is kernels.get("reference")
  assert "the fused 'pallas' kernel cannot return attention weights" in caplog.text
  # Gram metrics go to cuDNN's flash attention (the routed kernel) where it accepts the request, and fall back
  # with the reason where it does not (float32: cuDNN takes 16-bit inputs).
  routed = select("auto", _request(metric="sqeuclidean", dtype="bfloat16", head_dim=64), platform="gpu",
                  device_kind=h100)
  assert routed == kernels.Routed("cudnn")
  with caplog.at_level(logging.WARNING, logger="distattn_jax"):
    chosen = select("auto", _request(metric="cosine", head_dim=64), platform="gpu", device_kind=h100)
  assert chosen is kernels.get("reference") and "routed (cuDNN) kernel cannot take float32 inputs" in caplog.text
  assert kernels.get("pallas").unsupported(_request(local_window=(2, 2))) is None
  assert "cannot take float64 inputs" in kernels.get("pallas").unsupported(_request(dtype="float64"))


@pytest.mark.parametrize("kwargs, match", [
    (dict(block_q=24), "block_q must be None or a power of two >= 16"),
    (dict(block_k=8), "block_k must be None or a power of two >= 16"),
    (dict(block_d=12), "block_d must be None or a power of two"),
    (dict(num_warps=64), "num_warps must be None or a power of two from 1 to 32"),
    (dict(num_warps=3), "num_warps must be None or a power of two from 1 to 32"),
    (dict(num_stages=0), "num_stages must be None or an int >= 1"),
    (dict(num_stages=True), "num_stages must be None or an int >= 1"),
])
def test_bad_tiles(kwargs, match):
  with pytest.raises(ValueError, match=match):
    kernels.Pallas(**kwargs)
  with pytest.raises(TypeError, match="interpret must be a bool"):
    kernels.Pallas(interpret="yes")


@pytest.mark.parametrize("kwargs, match", [
    (dict(dropout_rate=0.1, dropout_rng=jax.random.PRNGKey(0)), "'pallas' cannot apply attention dropout"),
    (dict(return_weights=True), "'pallas' cannot return attention weights"),
])
def test_explicit_pallas_declines_with_reason(kwargs, match):
  q, k, v, _ = _inputs(1, q_len=8, kv_len=8)
  with pytest.raises(ValueError, match=match):
    da.distance_attention(q, k, v, implementation="pallas", **kwargs)


@pytest.mark.usefixtures("x64")
def test_float64_is_declined_by_name():
  q, k, v, lam = (np.asarray(a, np.float64) for a in _inputs(1, q_len=8, kv_len=8))
  with pytest.raises(ValueError, match="implementation 'pallas' cannot take float64 inputs"):
    da.distance_attention(q, k, v, implementation="pallas")
  # The kernel is called only for requests its unsupported() accepted; the dtype rule lives there alone.
  request = kernels.Request(batch=1, q_len=8, kv_len=8, num_heads=q.shape[2], num_kv_heads=k.shape[2],
                            metric="l1", dtype="float64")
  assert PALLAS.unsupported(request) == "cannot take float64 inputs (only float32, bfloat16, float16)"
  assert PALLAS.unsupported(request._replace(dtype="bfloat16")) is None


def test_operands_past_int32_offsets_are_declined():
  # An int8 mask of [2, 1, 32768, 32768] has 2^31 elements: one past what the programs' int32 offsets reach.
  n = 32768
  request = _request(batch=2, q_len=n, kv_len=n, head_dim=64, v_dim=64)
  assert PALLAS.unsupported(request._replace(mask_shape=(1, 1, n, n))) is None  # 2^30 elements
  reason = PALLAS.unsupported(request._replace(mask_shape=(2, 1, n, n)))
  assert reason == ("cannot index a mask of 2147483648 elements in its padded layout (more than 2^31 - 1: the "
                    "Triton programs' int32 offsets would wrap); use implementation='blockwise'")
  assert "a bias (and its gradient) of 2147483648" in PALLAS.unsupported(request._replace(bias_shape=(2, 1, n, n)))
  # The key/value gradient is written per query head: 2 * 32768 * 256 * 128 = 2^31 elements at 256 heads.
  wide = request._replace(q_len=1024, num_heads=256, num_kv_heads=8, head_dim=128, v_dim=128)
  assert "key/value gradient per query head of 2147483648" in PALLAS.unsupported(wide)
  assert PALLAS.unsupported(wide._replace(num_heads=128)) is None
  # Padding counts: 32767 positions are laid out as 32768.
  assert "mask of 2147483648" in PALLAS.unsupported(request._replace(q_len=n - 1, mask_shape=(2, 1, n - 1, n)))


# ------------------------------------------------------------------------------------------------------------
# GPU: lowering (no GPU needed) and execution (GPU only).


@pytest.mark.parametrize("metric, dtype, dim", one_fast([
    ("dot", jnp.bfloat16, 8), ("l1", jnp.float32, 8), ("lp", jnp.bfloat16, 8),
    ("dot", jnp.bfloat16, 32), ("l1", jnp.bfloat16, 64), ("l1", jnp.float32, 96), ("cosine", jnp.bfloat16, 96),
    ("chebyshev", jnp.bfloat16, 128)], ("dot", jnp.bfloat16, 32), names=3))
def test_lowers_for_cuda_forward_and_backward(metric, dtype, dim):
  """Triton's block-shape and dtype rules are checked when the kernel is lowered for CUDA, which needs no GPU:
  a kernel that only runs interpreted would pass every test above and still fail on the first GPU. Widths 32
  to 128 at the default feature chunks, 96 with padding (skipped chunks and their zero stores)."""
  kernel = kernels.Pallas(block_q=32, block_k=32)
  q, k, v, lam = _inputs(2, q_len=40, kv_len=40, dtype=dtype, dim=dim)
  bias = jnp.zeros((1, 1, 40, 40), jnp.float32)
  segments = kernels.Segments(jnp.zeros((1, 40), jnp.int32), jnp.zeros((1, 40), jnp.int32), None,
                              jnp.array([30], jnp.int32))
  mask = jnp.ones((1, 1, 40, 40), bool)
  p = jnp.float32(3.0) if metric == "lp" else 2.0

  def loss(q, k, v, lam, bias, p):
    result = kernel(q, k, v, lam=lam, bias=bias, mask=mask, segments=segments, local_window=None, metric=metric,
                    p=p, is_causal=True, dropout=None, precision=None, return_weights=False)
    return jnp.sum(result.out.astype(jnp.float32)) + jnp.sum(result.lse)

  argnums = (0, 1, 2, 3, 4) + ((5,) if metric == "lp" else ())
  with compat.gpu_lowering_target():  # jax 0.11 on lowers for a GPU only with an abstract one set
    text = jax.jit(jax.grad(loss, argnums)).trace(q, k, v, lam, bias, p).lower(
        lowering_platforms=("cuda",)).as_text()
  assert text.count("__gpu$xla.gpu.triton") == 3  # forward, dq and dk/dv kernels
  # The softmax runs on exp2 with log2(e) folded into the logit scale (the Triton modules name libdevice's
  # functions); only a metric whose own functions call exp (none of these) would bring exp back.
  assert "__nv_exp2f" in text and "__nv_expf" not in text


@pytest.mark.parametrize("shape", one_fast([(1, 1, 40, 40), (2, 1, 1, 40), (1, 2, 40, 1)], (2, 1, 1, 40)))
def test_lowers_for_cuda_with_a_broadcast_bias_gradient(shape):
  """The dq program that loops over the batch or heads a bias is shared by (and reduces its rows or columns)
  lowers for CUDA; its bias gradient is the bias's shape (one row per query tile where it broadcasts over T)."""
  kernel = kernels.Pallas(block_q=32, block_k=32)
  q, k, v, lam = _inputs(2, batch=2, q_len=40, kv_len=40, dtype=jnp.bfloat16, dim=64)
  bias = jnp.zeros(shape, jnp.float32)

  def loss(q, k, v, lam, bias):
    result = kernel(q, k, v, lam=lam, bias=bias, mask=None, segments=None, local_window=None, metric="l1",
                    p=2.0, is_causal=True, dropout=None, precision=None, return_weights=False)
    return jnp.sum(result.out.astype(jnp.float32)) + jnp.sum(result.lse)

  grad = jax.grad(loss, (0, 1, 2, 3, 4))
  with compat.gpu_lowering_target():
    text = jax.jit(grad).trace(q, k, v, lam, bias).lower(lowering_platforms=("cuda",)).as_text()
  assert text.count("__gpu$xla.gpu.triton") == 3
  dq_outputs = dict(_pallas_outputs(grad, q, k, v, lam, bias))["distance_attention_dq"]
  padded = tuple(64 if n == 40 else n for n in shape)  # 40 positions in two 32-long tiles
  want = padded[:2] + ((2,) if shape[2] == 1 else (64,)) + padded[3:]
  assert dq_outputs[-1] == want, dq_outputs


def _triton_modules(fn, *args) -> dict:
  """The Triton IR (MLIR text) of every kernel of ``fn`` lowered for CUDA, by kernel name. The modules travel as
  MLIR bytecode in the custom calls' backend config; they are parsed back with the Triton dialect registered."""
  lowering = pytest.importorskip("jax._src.pallas.triton.lowering")
  from jax._src.lib.mlir import ir

  with compat.gpu_lowering_target():
    module = jax.jit(fn).trace(*args).lower(lowering_platforms=("cuda",)).compiler_ir("stablehlo")
  blobs = []

  def walk(op):
    for region in op.regions:
      for block in region.blocks:
        for inner in block.operations:
          if inner.operation.name == "stablehlo.custom_call" and "mhlo.backend_config" in inner.attributes:
            config = ir.DictAttr(inner.attributes["mhlo.backend_config"])
            if "ir" in config:
              blobs.append(ir.StringAttr(config["ir"]).value_bytes)
          walk(inner.operation)

  walk(module.operation)
  texts = {}
  for blob in blobs:
    with lowering._new_ir_context():
      text = str(ir.Module.parse(blob))
    texts[text.split("tt.func public @")[1].split("(")[0]] = text
  return texts


def _dots(text: str) -> list[tuple[str, str, str]]:
  """``(lhs element type, rhs element type, input precision)`` of every ``tt.dot`` in a Triton module."""
  found = []
  for line in text.splitlines():
    if "tt.dot " in line:
      lhs, rhs = (t.rsplit("x", 1)[1].rstrip(">") for t in line.split(" : ")[1].split(" -> ")[0].split(" * "))
      found.append((lhs, rhs, line.split("inputPrecision = ")[1].split()[0] if "inputPrecision" in line else "ieee"))
  return found


@pytest.mark.parametrize("metric, dtype, want", one_fast([
    ("cosine", jnp.float32, 6), ("sqeuclidean", jnp.bfloat16, 3), ("dot", jnp.float16, 1),
    ("dot", jnp.float32, 6), ("cosine", jnp.float16, 3)], ("cosine", jnp.float32, 6), names=3))
def test_gram_matmuls_run_on_the_tensor_cores(metric, dtype, want):
  """The gram matmuls lower to ``tt.dot`` of 16-bit operands (float32 accumulation): a float32 operand (float32
  inputs; 16-bit inputs centred or normalised in float32) is split into bfloat16 pieces, three for float32
  inputs (six products), two for 16-bit ones (three products); 16-bit inputs of an uncentred form multiply
  as they are. No kernel has an IEEE float32 ``tt.dot`` (Triton's scalar-FMA path): the only float32 ``tt.dot``
  left is ``P V`` (and ``dO V^T``) of float32 values at the default precision, which Triton runs as TF32."""
  kernel = kernels.Pallas(block_q=32, block_k=32)
  q, k, v, lam = _inputs(2, q_len=40, kv_len=40, dtype=dtype, dim=32)

  def loss(q, k, v, lam):
    result = kernel(q, k, v, lam=lam, bias=None, mask=None, segments=None, local_window=None, metric=metric,
                    p=2.0, is_causal=True, dropout=None, precision=None, return_weights=False)
    return jnp.sum(result.out.astype(jnp.float32)) + jnp.sum(result.lse)

  texts = _triton_modules(jax.grad(loss, (0, 1, 2, 3)), q, k, v, lam)
  assert sorted(texts) == ["distance_attention_dkv", "distance_attention_dq", "distance_attention_fwd"]
  half = {"bf16", "f16"}
  for name, text in texts.items():
    dots = _dots(text)
    assert dots, name
    for lhs, rhs, precision in dots:
      assert lhs == rhs, (name, dots)
      assert lhs in half or precision == "tf32", (name, dots)  # never an IEEE float32 dot
  forward = _dots(texts["distance_attention_fwd"])
  pv = 1  # P V, in the values' dtype
  assert sum(lhs in half for lhs, _, _ in forward) == want + (pv if dtype != jnp.float32 else 0), forward
  assert len(forward) == want + pv, forward
  if dtype == jnp.float16 and metric == "dot":
    # Uncentred 16-bit inputs keep their dtype, and so does the score cotangent that meets them.
    assert all(lhs == "f16" for name in texts for lhs, _, _ in _dots(texts[name])), texts


def test_elementwise_feature_sums_reduce_the_leading_axis():
  """The difference tile is feature-major, ``[block_d, bq, bk]``: every feature sum of the three kernels reduces
  its leading axis (which Triton's default layout keeps in each thread's registers; features last would spread
  them over lanes). The other 3-d reductions are the gradients' sums over the streamed tile, which keep the
  features leading too (``[block_d, rows]`` accumulators)."""
  kernel = kernels.Pallas(block_q=32, block_k=32)
  q, k, v, lam = _inputs(2, q_len=40, kv_len=40, dim=32)

  def loss(q, k, v, lam):
    result = kernel(q, k, v, lam=lam, bias=None, mask=None, segments=None, local_window=None, metric="l1",
                    p=2.0, is_causal=True, dropout=None, precision=None, return_weights=False)
    return jnp.sum(result.out) + jnp.sum(result.lse)

  texts = _triton_modules(jax.grad(loss, (0, 1, 2, 3)), q, k, v, lam)
  block_d = kernel.tiles("l1", 2.0, 32, 40, 40).block_d
  for name, text in texts.items():
    reductions = []
    for line in text.splitlines():
      if line.strip().startswith("})") and "tensor<" in line and " -> " in line:
        shape = line.split("tensor<")[1].split("x")[:-1]
        if len(shape) == 3:
          reductions.append(tuple(int(n) for n in shape))
    assert reductions, name
    assert all(shape == (block_d, 32, 32) for shape in reductions), (name, reductions)
  forward = texts["distance_attention_fwd"]
  assert '<{axis = 0 : i32}> ({' in forward and '<{axis = 2 : i32}> ({' not in forward


@pytest.mark.skipif(not ON_GPU, reason="needs a GPU")
@pytest.mark.parametrize("metric", ["dot", "l1", "lp", "cosine", "sqeuclidean"])
def test_compiled_on_gpu_matches_reference(metric):
  q, k, v, lam = _inputs(4, batch=2, q_len=200, kv_len=300, heads=4, kv_heads=2, dim=64)
  kernel = kernels.Pallas()
  got = kernel(q, k, v, lam=lam, bias=None, mask=None, segments=None, local_window=None, metric=metric, p=3.0,
               is_causal=True, dropout=None, precision=jax.lax.Precision.HIGHEST, return_weights=False)
  want = REFERENCE(q, k, v, lam=lam, bias=None, mask=None, segments=None, local_window=None, metric=metric,
                   p=3.0, is_causal=True, dropout=None, precision=jax.lax.Precision.HIGHEST,
                   return_weights=False)
  # float32 on a GPU: the matmuls of both kernels may round differently (TF32 is off at HIGHEST).
  np.testing.assert_allclose(got.out, want.out, rtol=1e-4, atol=1e-4)
  # Gradients at the default precision: XLA's float32 matmuls in the reference may use TF32 on the GPU (2^-11 per
  # product, as experiments/selfcheck.py allows for), and so do the fused kernel's P V and dO V^T; its score
  # matmuls are float32-level (bfloat16 pieces on the tensor cores, gram.py).
  _compare(metric, p=3.0, tol=2e-3, kernel=kernels.Pallas(block_q=32, block_k=32), is_causal=True, q_len=100,
           kv_len=70, heads=4, kv_heads=2, dim=64)


@pytest.mark.skipif(not ON_GPU, reason="needs a GPU")
@pytest.mark.parametrize("shape", [(1, 1, 100, 70), (2, 1, 1, 70), (2, 4, 100, 70)])
def test_compiled_on_gpu_bias_gradients_match_reference(shape):
  # A bias shared by the batch or the heads is summed by one dq program looping over them, adding into its own
  # output tile (a load after a store in one Triton program); compiled, that must give the reference's gradient.
  bias = jax.random.normal(jax.random.PRNGKey(11), shape, jnp.float32)
  _compare("l1", bias=bias, tol=2e-3, kernel=kernels.Pallas(block_q=32, block_k=32), is_causal=True, batch=2,
           q_len=100, kv_len=70, heads=4, kv_heads=2, dim=64)

