"""Every JAX transformation through every kernel, against JAX's autodiff of a plain float64 formula.

The elementwise metric forms (a feature loop forward, key and query loops backward) and the kernels' tiled
derivatives are hand-written; the oracles here are the textbook formulas on broadcast ``[..., N, M, D]``
differences and a materialised, masked softmax, differentiated by plain autodiff, so they share no code with
the library. Each case class is covered once (a metric form, a transformation, a kernel, a mask kind) on
multi-tile shapes with lengths that are not multiples of the tiles, rather than the full cross product.

Tolerances: in float64 the forms and the plain formula round differently (a loop over features against a
vectorised sum, a root through exp2/log2 against ``**``), a few ulps per operation on values of order 1, so
derivatives agree to about 1e-14 relative; 1e-8 leaves six orders of magnitude for the accumulation over
pairs and features while still catching any wrong term (a dropped tie share or d/dp term is O(1)).
"""

import functools
import math

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import distattn_jax as da
from conftest import normal
from distattn_jax.kernels import Blockwise

M = da.metrics
RTOL = 1e-8


def huber(t):
  a = M.elementwise.symmetric_abs(t)
  return jnp.where(a <= 1.0, 0.5 * t * t, a - 0.5)


USER = "test_transformations_huber"


@pytest.fixture(scope="module", autouse=True)
def user_metric():
  M.register(M.Metric(USER, M.Elementwise(phi=huber)), overwrite=True)
  yield
  M.unregister(USER)


def plain_metric(name, x, y, p):
  """The distance from the broadcast differences ``[..., N, M, D]``, differentiated by plain autodiff."""
  if name == "cosine":
    norms = jnp.linalg.norm(x, axis=-1)[..., :, None] * jnp.linalg.norm(y, axis=-1)[..., None, :]
    return 1.0 - jnp.einsum("...nd,...md->...nm", x, y) / norms
  if name == "dot":
    return -jnp.einsum("...nd,...md->...nm", x, y)
  t = x[..., :, None, :] - y[..., None, :, :]
  a = jnp.abs(t)
  if name == "l1":
    return a.sum(-1)
  if name == "chebyshev":
    return a.max(-1)
  if name == "lp":
    return (a ** p).sum(-1) ** (1.0 / p)
  return jnp.where(a <= 1.0, 0.5 * t * t, a - 0.5).sum(-1)


def lean_metric(name, x, y, p):
  return M.get(name)(x, y, p=p) if name == "lp" else M.get(name)(x, y)


def assert_close(actual, expected, rtol=RTOL):
  """Each leaf within ``rtol`` of the largest magnitude of its expected value."""
  for a, e in zip(jax.tree.leaves(actual), jax.tree.leaves(expected)):
    scale = float(np.max(np.abs(e))) or 1.0
    chex.assert_trees_all_close(a, e, atol=rtol * scale, rtol=0.0)


@pytest.fixture
def pair(x64):
  # Odd sizes and a batch axis that broadcasts (2 against 1); random values, so no distance is 0 and no
  # feature difference ties (where plain autodiff's conventions differ from the forms' documented ones).
  del x64
  return (jnp.asarray(normal(0, (2, 5, 3))), jnp.asarray(normal(1, (1, 4, 3))), jnp.float64(3.0),
          jnp.asarray(normal(2, (2, 5, 4))))


@pytest.mark.parametrize("name", ["l1", "lp", USER])
def test_metric_forward_mode_equals_plain_autodiff(name, pair):
  x, y, p, w = pair
  tangents = (jnp.asarray(normal(3, x.shape)), jnp.asarray(normal(4, y.shape)), jnp.float64(0.7))
  f_lean = jax.jit(lambda x, y, p: lean_metric(name, x, y, p))
  f_plain = lambda x, y, p: plain_metric(name, x, y, p)  # noqa: E731
  (value, tangent), (value_0, tangent_0) = (jax.jvp(f, (x, y, p), tangents) for f in (f_lean, f_plain))
  assert_close(value, value_0)
  assert_close(tangent, tangent_0)
  # linearize evaluates the same tangent map, and vmapped (jacfwd) it is the Jacobian.
  _, f_lin = jax.linearize(f_lean, x, y, p)
  assert_close(f_lin(*tangents), tangent_0)
  assert_close(jax.jacfwd(f_lean, argnums=(0, 2))(x, y, p), jax.jacfwd(f_plain, argnums=(0, 2))(x, y, p))


@pytest.mark.parametrize("name", ["chebyshev"])
def test_metric_second_order_equals_plain_autodiff(name, pair):
  x, y, p, w = pair
  argnums = (0, 1, 2) if name == "lp" else (0, 1)
  loss = lambda f: lambda x, y, p: jnp.sum(jnp.sin(f(name, x, y, p)) * w)  # noqa: E731
  hessian = lambda f: jax.jit(jax.hessian(loss(f), argnums))(x, y, p)  # noqa: E731
  assert_close(hessian(lean_metric), hessian(plain_metric))

  # Forward over reverse: the Hessian-vector product of a gradient taken through the transposed tangent map.
  def hvp(f):
    grad = jax.grad(loss(f), argnums)
    return jax.jit(lambda x, y, p: jax.jvp(grad, (x, y, p), (jnp.ones_like(x), -y, jnp.float64(0.3))))(x, y, p)

  assert_close(hvp(lean_metric), hvp(plain_metric))


def test_metric_derivatives_never_hold_pairs_times_features():
  # Compiled temporaries of jit(grad) and jit(jvp) of l1 at N = M = 256, D = 64 in float32: the [N, M, D]
  # difference tensor plain autodiff would hold is 16 MiB; the loops hold a few [N, M] arrays (256 KiB each).
  n, d = 256, 64
  x = jax.ShapeDtypeStruct((n, d), jnp.float32)
  loss = lambda x, y: jnp.sum(M.l1(x, y))  # noqa: E731
  forward = lambda x, y: jax.jvp(loss, (x, y), (x, y))  # noqa: E731
  pairs_by_features = n * n * d * 4
  for fn in (jax.grad(loss, (0, 1)), forward):
    temp = jax.jit(fn).lower(x, x).compile().memory_analysis().temp_size_in_bytes
    assert temp < pairs_by_features / 4, (fn, temp)


# ------------------------------------------------------------------------------------------------------------
# Attention. Layout as Flax: q [B, T, H, D], k and v [B, S, K, D] with query head h reading kv head h // (H // K).

B, H, K, D = 2, 4, 2, 8
BLOCKS = Blockwise(block_q=8, block_k=8)


def dense_allowed(t, s, *, mask=None, is_causal=False, window=None, q_ids=None, kv_ids=None, q_lengths=None,
                  kv_lengths=None):
  """Bool ``[B, H, T, S]`` from the per-position rules, written out with numpy."""
  ti, si = np.arange(t)[:, None], np.arange(s)[None, :]
  ok = np.ones((B, H, t, s), bool)
  if mask is not None:
    ok &= np.asarray(mask)
  if is_causal:
    ok &= si <= ti
  if window is not None:
    ok &= (si >= ti - window[0]) & (si <= ti + window[1])
  for b in range(B):
    if q_ids is not None:
      ok[b] &= np.asarray(q_ids)[b][:, None] == np.asarray(kv_ids)[b][None, :]
    if q_lengths is not None:
      ok[b] &= ti < int(q_lengths[b])
    if kv_lengths is not None:
      ok[b] &= si < int(kv_lengths[b])
  return ok


def plain_attention(q, k, v, lam, bias, p, *, metric, allowed):
  """``(out [B, T, H, D], lse [B, T, H])`` from a materialised softmax; rows that see no key give 0 and -inf."""
  group = q.shape[2] // k.shape[2]
  kh = jnp.repeat(k, group, axis=2).transpose(0, 2, 1, 3)
  vh = jnp.repeat(v, group, axis=2).transpose(0, 2, 1, 3)
  logits = -lam[None, :, None, None] * plain_metric(metric, q.transpose(0, 2, 1, 3), kh, p) / math.sqrt(q.shape[-1])
  if bias is not None:
    logits = logits + bias
  logits = jnp.where(allowed, logits, -jnp.inf)
  top = jax.lax.stop_gradient(jnp.max(logits, axis=-1, keepdims=True))
  e = jnp.exp(logits - jnp.where(jnp.isfinite(top), top, 0.0))
  total = jnp.sum(e, axis=-1, keepdims=True)
  out = jnp.einsum("bhts,bhsd->bthd", e / jnp.where(total > 0, total, 1.0), vh)
  lse = (jnp.where(jnp.isfinite(top), top, 0.0) + jnp.log(total))[..., 0]
  return out, lse.transpose(0, 2, 1)


def attention_case(seed, kind, t=19, s=23):
  """Inputs and keyword arguments of one masking case, and its dense mask for the oracle.

  ``"dense"``: a bias and a random mask, grouped-query heads, segment ids and both sequence lengths.
  ``"positional"``: causal, a (5, 2) local window and query lengths (T = S).
  """
  t = s if kind == "positional" else t
  q = jnp.asarray(normal(seed, (B, t, H, D)))
  k = jnp.asarray(normal(seed + 1, (B, s, K, D)))
  v = jnp.asarray(normal(seed + 2, (B, s, K, D)))
  lam = jnp.asarray(np.linspace(0.6, 1.6, H))
  bias = jnp.asarray(normal(seed + 3, (B, 1, t, s), scale=0.5))
  p = jnp.float64(3.0)
  rng = np.random.default_rng(seed)
  if kind == "dense":
    mask = rng.uniform(size=(B, H, t, s)) > 0.25
    q_ids = np.sort(rng.integers(0, 2, (B, t)), axis=1)
    kv_ids = np.sort(rng.integers(0, 2, (B, s)), axis=1)
    lengths = dict(query_seq_lengths=np.array([t, t - 4]), key_value_seq_lengths=np.array([s - 3, s]))
    kwargs = dict(mask=jnp.asarray(mask), q_segment_ids=jnp.asarray(q_ids), kv_segment_ids=jnp.asarray(kv_ids),
                  **{n: jnp.asarray(x) for n, x in lengths.items()})
    allowed = dense_allowed(t, s, mask=mask, q_ids=q_ids, kv_ids=kv_ids, q_lengths=lengths["query_seq_lengths"],
                            kv_lengths=lengths["key_value_seq_lengths"])
  else:
    lengths = np.array([t, t - 5])
    kwargs = dict(is_causal=True, local_window_size=(5, 2), query_seq_lengths=jnp.asarray(lengths))
    allowed = dense_allowed(t, s, is_causal=True, window=(5, 2), q_lengths=lengths)
  return (q, k, v, lam, bias, p), kwargs, jnp.asarray(allowed)


def attend(impl, metric, kwargs, q, k, v, lam, bias, p, **extra):
  extra = dict(extra, p=p) if metric == "lp" else extra
  return da.distance_attention(q, k, v, bias, metric=metric, lam=lam, implementation=impl, **kwargs, **extra)


def random_tangents(seed, args):
  return tuple(jnp.asarray(normal(seed + i, np.shape(a))) for i, a in enumerate(args))


@pytest.mark.usefixtures("x64")
@pytest.mark.parametrize("impl, metric, kind, transform", [
    (BLOCKS, "cosine", "dense", "jvp"), (BLOCKS, "l1", "positional", "jvp"), (BLOCKS, "lp", "dense", "jvp"),
    (BLOCKS, USER, "positional", "linearize"), ("reference", "lp", "positional", "jvp")])
def test_jvp_in_every_input_equals_the_oracle(impl, metric, kind, transform):
  # Tangents in q, k, v, lam, the bias and (lp) a traced p at once, under every mask kind the kernels evaluate;
  # linearize evaluates the same tangent map from its linear jaxpr.
  args, kwargs, allowed = attention_case(10, kind)
  tangents = random_tangents(20, args)
  lean = lambda *a: attend(impl, metric, kwargs, *a)  # noqa: E731
  if transform == "jvp":
    out, d_out = jax.jit(lambda *a: jax.jvp(lean, a, tangents))(*args)
  else:
    out, lean_lin = jax.linearize(lean, *args)
    d_out = jax.jit(lean_lin)(*tangents)
  want, d_want = jax.jvp(lambda *a: plain_attention(*a, metric=metric, allowed=allowed)[0], args, tangents)
  assert_close(out, want)
  assert_close(d_out, d_want)


def scalar_loss(out):
  # A fixed, non-symmetric function of the output, so no derivative vanishes by symmetry.
  return jnp.sum(jnp.sin(out) * jnp.linspace(-1.0, 2.0, out.shape[-1]).reshape((1,) * (out.ndim - 1) + (-1,)))


@pytest.mark.usefixtures("x64")
def test_jacfwd_and_forward_over_reverse_blockwise_l1():
  # jacfwd vmaps the tangent map (over the 4 heads' lam); the Hessian-vector product takes jvp of a gradient
  # whose backward pass is the transposed tangent map, through l1's transposed feature loop.
  args, kwargs, allowed = attention_case(30, "positional")
  lean = lambda *a: attend(BLOCKS, "l1", kwargs, *a)  # noqa: E731
  plain = lambda *a: plain_attention(*a, metric="l1", allowed=allowed)[0]  # noqa: E731
  jacobian = lambda f: jax.jacfwd(f, argnums=3)(*args)  # noqa: E731
  assert_close(jax.jit(lambda: jacobian(lean))(), jacobian(plain))

  def hvp(f):
    grad = jax.grad(lambda q: scalar_loss(f(q, *args[1:])))
    return jax.jvp(grad, (args[0],), (jnp.asarray(normal(31, args[0].shape)),))[1]

  assert_close(jax.jit(lambda: hvp(lean))(), hvp(plain))


@pytest.mark.slow
@pytest.mark.usefixtures("x64")
def test_hessian_blockwise_lp_traced_p():
  # The Hessian (jacfwd of jacrev) in lam and the traced p together.
  args, kwargs, allowed = attention_case(40, "dense")
  lean = lambda *a: attend(BLOCKS, "lp", kwargs, *a)  # noqa: E731
  plain = lambda *a: plain_attention(*a, metric="lp", allowed=allowed)[0]  # noqa: E731

  def hessian(f):
    loss = lambda lam, p: scalar_loss(f(*args[:3], lam, args[4], p))  # noqa: E731
    return jax.hessian(loss, argnums=(0, 1))(args[3], args[5])

  assert_close(jax.jit(lambda: hessian(lean))(), hessian(plain))


# ------------------------------------------------------------------------------------------------------------
# The log-sum-exp residual.


@pytest.mark.parametrize("impl", ["reference", BLOCKS])
def test_return_residual_is_jax_nn_residual(impl):
  # metric="dot" at lam = 1 is standard attention: out and lse are jax.nn.dot_product_attention's, in its layout
  # [B, T, H], under causality, key lengths and grouped heads. float32 on both sides; 1e-5 of the largest entry
  # covers the different summation orders (measured gaps below 1e-6).
  q = jnp.asarray(normal(50, (B, 19, H, D), np.float32))
  k, v = (jnp.asarray(normal(s, (B, 23, K, D), np.float32)) for s in (51, 52))
  lengths = jnp.asarray([23, 10])
  out, lse = da.distance_attention(q, k, v, metric="dot", lam=1.0, is_causal=True, key_value_seq_lengths=lengths,
                                   implementation=impl, return_residual=True)
  want, want_lse = jax.nn.dot_product_attention(q, k, v, is_causal=True, key_value_seq_lengths=lengths,
                                                return_residual=True)
  assert lse.shape == want_lse.shape == (B, 19, H) and lse.dtype == jnp.float32
  assert_close(out, want, rtol=1e-5)
  assert_close(lse, want_lse, rtol=1e-5)


@pytest.mark.usefixtures("x64")
def test_residual_is_differentiable_and_minus_inf_on_rows_that_see_nothing():
  # The second batch row's queries at and past its length 18 see no key: lse = -inf there, with no gradient.
  args, kwargs, allowed = attention_case(60, "positional")
  lean = lambda *a: attend(BLOCKS, "l1", kwargs, *a, return_residual=True)  # noqa: E731
  plain = lambda *a: plain_attention(*a, metric="l1", allowed=allowed)  # noqa: E731
  tangents = random_tangents(61, args)
  (out, lse), (d_out, d_lse) = jax.jit(lambda *a: jax.jvp(lean, a, tangents))(*args)
  (want, want_lse), (d_want, d_want_lse) = jax.jvp(plain, args, tangents)
  assert bool(jnp.all(jnp.isneginf(lse[1, 18:]))) and bool(jnp.all(jnp.isfinite(lse[1, :18])))
  seen = jnp.isfinite(want_lse)
  assert_close(jnp.where(seen, lse, 0.0), jnp.where(seen, want_lse, 0.0))
  assert_close(d_lse, jnp.where(seen, d_want_lse, 0.0))
  assert_close((out, d_out), (want, d_want))
  # The gradient of a weighted sum of the finite lse entries; and a cotangent on the -inf entries alone, which
  # reaches no input.
  d_lse_seen = jnp.where(seen, jnp.asarray(normal(62, lse.shape)), 0.0)

  def pullbacks(f, *a):
    _, vjp = jax.vjp(f, *a)
    return vjp((jnp.zeros_like(out), d_lse_seen)), vjp((jnp.zeros_like(out), jnp.where(seen, 0.0, 1.0)))

  grads, from_unseen = jax.jit(functools.partial(pullbacks, lean))(*args)
  assert_close(grads, pullbacks(plain, *args)[0])
  assert_close(from_unseen, jax.tree.map(jnp.zeros_like, args))


def test_residual_beside_weights_on_empty_sequences_and_a_bad_flag():
  q = jnp.asarray(normal(70, (1, 5, 2, 4), np.float32))
  kv = jnp.asarray(normal(71, (1, 6, 2, 4), np.float32))
  out, weights, lse = da.distance_attention(q, kv, kv, return_weights=True, return_residual=True)
  # The weights are exp(logits - lse), with the l1 logits at the default lam = 1 written out (sqrt(D) = 2).
  logits = -jnp.sum(jnp.abs(q.transpose(0, 2, 1, 3)[..., :, None, :] - kv.transpose(0, 2, 1, 3)[..., None, :, :]),
                    axis=-1) / 2.0
  assert_close(weights, jnp.exp(logits - lse.transpose(0, 2, 1)[..., None]), rtol=1e-6)
  assert out.shape == (1, 5, 2, 4)
  # No key: every row's normaliser is 0 (lse -inf, output 0); no query: empty arrays of the documented shapes.
  out, lse = da.distance_attention(q, kv[:, :0], kv[:, :0], return_residual=True)
  assert bool(jnp.all(jnp.isneginf(lse))) and lse.shape == (1, 5, 2) and not bool(jnp.any(out))
  assert da.distance_attention(q[:, :0], kv, kv, return_residual=True)[1].shape == (1, 0, 2)
  with pytest.raises(TypeError, match="return_residual must be a Python bool; got 'yes'"):
    da.distance_attention(q, kv, kv, return_residual="yes")


# ------------------------------------------------------------------------------------------------------------
# vmap, remat, eval_shape; the ring and the fused kernel; memory.


@pytest.mark.usefixtures("x64")
def test_vmap_over_lam_and_a_per_example_mask():
  # Three examples, each with its own lam and mask, mapped over by vmap around jvp: the tangent map and the
  # forward run batched (the mask becomes a batched operand of the tile loops).
  args, kwargs, _ = attention_case(80, "positional")
  lams = jnp.asarray(np.linspace(0.5, 1.5, 3 * H).reshape(3, H))
  rng = np.random.default_rng(80)
  t = args[0].shape[1]
  masks = rng.uniform(size=(3, B, H, t, t)) > 0.3
  tangents = random_tangents(81, args)

  def lean(lam, mask):
    return jax.jvp(lambda *a: attend(BLOCKS, "lp", dict(kwargs, mask=mask), *a[:3], lam, *a[4:]), args, tangents)

  outs, d_outs = jax.jit(jax.vmap(lean))(lams, jnp.asarray(masks))
  for i in range(3):
    allowed = dense_allowed(t, t, mask=masks[i], is_causal=True, window=(5, 2), q_lengths=np.array([t, t - 5]))
    plain = lambda *a: plain_attention(*a[:3], lams[i], *a[4:], metric="lp", allowed=allowed)[0]  # noqa: E731
    want, d_want = jax.jvp(plain, args, tangents)
    assert_close((outs[i], d_outs[i]), (want, d_want))


@pytest.mark.usefixtures("x64")
def test_checkpoint_and_eval_shape():
  # jax.checkpoint recomputes the forward in the backward pass and leaves every derivative as it was.
  args, kwargs, allowed = attention_case(90, "dense")
  lean = jax.checkpoint(lambda *a: scalar_loss(attend(BLOCKS, USER, kwargs, *a)))
  plain = lambda *a: scalar_loss(plain_attention(*a, metric=USER, allowed=allowed)[0])  # noqa: E731
  grads = jax.jit(jax.grad(lean, argnums=tuple(range(5))))(*args)
  assert_close(grads, jax.grad(plain, argnums=tuple(range(5)))(*args))
  # eval_shape traces forward mode without running it: shapes and dtypes of (out, lse) and their tangents.
  fwd = lambda *a: jax.jvp(lambda *a: attend(BLOCKS, "lp", kwargs, *a, return_residual=True), a, a)  # noqa: E731
  (out, lse), (d_out, d_lse) = jax.eval_shape(fwd, *args)
  t = args[0].shape[1]
  assert out.shape == d_out.shape == (B, t, H, D) and lse.shape == d_lse.shape == (B, t, H)
  assert {out.dtype, lse.dtype, d_out.dtype, d_lse.dtype} == {jnp.dtype(jnp.float64)}


@pytest.mark.usefixtures("x64")
def test_ring_forward_mode_on_two_devices():
  # The ring splits the sequence over 2 of the 8 simulated devices (zig-zag: 4 chunks); a per-key bias travels
  # with its keys, the key lengths and segment ids mask per position, and the tangents go round with the keys.
  from jax.sharding import AxisType
  mesh = jax.make_mesh((1, 2), ("data", "seq"), axis_types=(AxisType.Auto,) * 2, devices=jax.devices()[:2])
  args, _, _ = attention_case(100, "dense")
  t, s = args[0].shape[1], args[1].shape[1]
  bias = jnp.asarray(normal(101, (B, 1, 1, s), scale=0.5))
  args = args[:4] + (bias,) + args[5:]
  rng = np.random.default_rng(100)
  q_ids, kv_ids = np.sort(rng.integers(0, 2, (B, t)), axis=1), np.sort(rng.integers(0, 2, (B, s)), axis=1)
  kv_lengths = np.array([s - 3, s])
  kwargs = dict(is_causal=True, q_segment_ids=jnp.asarray(q_ids), kv_segment_ids=jnp.asarray(kv_ids),
                key_value_seq_lengths=jnp.asarray(kv_lengths), return_residual=True)
  allowed = dense_allowed(t, s, is_causal=True, q_ids=q_ids, kv_ids=kv_ids, kv_lengths=kv_lengths)
  tangents = random_tangents(102, args)
  ring = da.kernels.Ring(mesh=mesh)
  (out, lse), (d_out, d_lse) = jax.jit(lambda *a: jax.jvp(lambda *a: attend(ring, "lp", kwargs, *a), a, tangents))(
      *args)
  (want, want_lse), (d_want, d_want_lse) = jax.jvp(
      lambda *a: plain_attention(*a, metric="lp", allowed=allowed), args, tangents)
  seen = jnp.isfinite(want_lse)
  assert_close((out, d_out, jnp.where(seen, lse, 0.0), d_lse),
               (want, d_want, jnp.where(seen, want_lse, 0.0), jnp.where(seen, d_want_lse, 0.0)))


def test_pallas_forward_mode_in_interpret_mode(x64):
  # The fused kernel (float32 only) through Pallas' interpreter, its tangent from the tile core's loop: against
  # the float64 oracle at 2e-5 of the largest entry, float32 rounding of a few hundred terms (measured gaps
  # below 2e-7).
  del x64
  args, kwargs, allowed = attention_case(110, "dense")
  args32 = tuple(a.astype(jnp.float32) for a in args)
  tangents = random_tangents(111, args)
  pallas = da.kernels.Pallas(block_q=16, block_k=16, interpret=True)
  out, d_out = jax.jit(lambda *a: jax.jvp(lambda *a: attend(pallas, "cosine", kwargs, *a), a,
                                          tuple(t.astype(jnp.float32) for t in tangents)))(*args32)
  want, d_want = jax.jvp(lambda *a: plain_attention(*a, metric="cosine", allowed=allowed)[0], args, tangents)
  assert_close((out, d_out), (want, d_want), rtol=2e-5)


@pytest.mark.slow  # eval_shape of the same product stays in make test-fast
def test_pallas_hessian_vector_product_in_interpret_mode(x64):
  # Forward over reverse through the fused kernel in every input (the traced p and the bias included), with a
  # mask, segment ids, lengths and grouped heads: the gradient is the Triton backward, its derivative in the
  # residuals the tile core's XLA backward (a pallas_call has no forward-mode rule). Against the float64 oracle
  # at 1e-4 of the largest entry: float32 second derivatives through lp's |t|^p (measured gaps below 3e-6).
  del x64
  args, kwargs, allowed = attention_case(120, "dense")
  tangents = random_tangents(121, args)
  pallas = da.kernels.Pallas(block_q=16, block_k=16, interpret=True)

  def hvp(f, args, tangents):
    grad = jax.grad(lambda *a: scalar_loss(f(*a)), argnums=tuple(range(len(args))))
    return jax.jvp(grad, args, tangents)[1]

  to32 = lambda xs: tuple(x.astype(jnp.float32) for x in xs)  # noqa: E731
  got = jax.jit(lambda *a: hvp(lambda *b: attend(pallas, "lp", kwargs, *b), a, to32(tangents)))(*to32(args))
  want = hvp(lambda *b: plain_attention(*b, metric="lp", allowed=allowed)[0], args, tangents)
  assert_close(got, want, rtol=1e-4)


@pytest.mark.parametrize("metric", ["l1", "cosine"])
def test_forward_mode_memory_grows_linearly(metric):
  # jit(jvp) of the blockwise kernel at N and 4N: a materialised [N, N] step would grow 16x; the tile loops hold
  # [block_q, block_k] tiles and [N]-sized rows, so the temporaries grow about 2.3x (measured: 0.31 -> 0.71 MB).
  def temp(n):
    shape = jax.ShapeDtypeStruct((1, n, 2, 16), jnp.float32)
    f = lambda q, k, v: da.distance_attention(q, k, v, metric=metric, is_causal=True,  # noqa: E731
                                              implementation=Blockwise(64, 64), return_residual=True)
    fwd = lambda q, k, v: jax.jvp(f, (q, k, v), (q, k, v))  # noqa: E731
    return jax.jit(fwd).lower(shape, shape, shape).compile().memory_analysis().temp_size_in_bytes

  small, large = temp(256), temp(1024)
  assert large < 4 * small, (small, large)


@pytest.mark.usefixtures("x64")
@pytest.mark.parametrize("impl, metric, policy", [
    pytest.param(BLOCKS, "lp", "nothing_saveable", marks=pytest.mark.slow),
    ("reference", "l1", "dots_with_no_batch_dims_saveable")])
def test_checkpoint_with_a_remat_policy(impl, metric, policy):
  # A remat policy decides which of the kernel's intermediates the backward pass keeps and which it recomputes;
  # either way the gradient in every input (a traced p included) and, through the transposed tangent map, the
  # Hessian-vector product (jvp of that gradient) stay the oracle's.
  args, kwargs, allowed = attention_case(120, "dense")
  lean = jax.checkpoint(lambda *a: scalar_loss(attend(impl, metric, kwargs, *a)),
                        policy=getattr(jax.checkpoint_policies, policy))
  plain = lambda *a: scalar_loss(plain_attention(*a, metric=metric, allowed=allowed)[0])  # noqa: E731
  argnums = tuple(range(6)) if metric == "lp" else tuple(range(5))
  tangents = random_tangents(121, args)

  def grad_and_hvp(f):
    grad = jax.grad(f, argnums=argnums)
    return jax.jvp(grad, args, tangents)

  assert_close(jax.jit(lambda: grad_and_hvp(lean))(), grad_and_hvp(plain))


@pytest.mark.usefixtures("x64")
def test_vmap_of_the_gradient_over_lam_and_a_per_example_mask_reference_kernel():
  # Reverse mode under vmap in the materialised kernel (the blockwise one is mapped around jvp above): each
  # example's lam and mask, its gradient in q, k, v and lam against the oracle's for that example alone.
  args, kwargs, _ = attention_case(130, "positional")
  lams = jnp.asarray(np.linspace(0.5, 1.5, 2 * H).reshape(2, H))
  t = args[0].shape[1]
  masks = np.random.default_rng(130).uniform(size=(2, B, H, t, t)) > 0.3
  argnums = (0, 1, 2, 3)

  def lean(lam, mask):
    loss = lambda *a: scalar_loss(attend("reference", "l1", dict(kwargs, mask=mask), *a))  # noqa: E731
    return jax.grad(loss, argnums=argnums)(*args[:3], lam, *args[4:])

  grads = jax.jit(jax.vmap(lean))(lams, jnp.asarray(masks))
  for i in range(2):
    allowed = dense_allowed(t, t, mask=masks[i], is_causal=True, window=(5, 2), q_lengths=np.array([t, t - 5]))
    plain = lambda *a: scalar_loss(plain_attention(*a, metric="l1", allowed=allowed)[0])  # noqa: E731
    assert_close(jax.tree.map(lambda g: g[i], grads), jax.grad(plain, argnums=argnums)(*args[:3], lams[i],
                                                                                        *args[4:]))


def every_kernel():
  """One instance of each registered kernel that runs on a CPU: the ring over 2 of the simulated devices, the
  fused kernel through Pallas' interpreter."""
  from jax.sharding import AxisType
  mesh = jax.make_mesh((1, 2), ("data", "seq"), axis_types=(AxisType.Auto,) * 2, devices=jax.devices()[:2])
  return {"reference": "reference", "blockwise": BLOCKS, "ring": da.kernels.Ring(mesh=mesh),
          "pallas": da.kernels.Pallas(block_q=16, block_k=16, interpret=True), "routed": "routed"}


def shapes_of_transformations(impl, transforms, residual=True):
  """``jax.eval_shape`` of each named transformation of cosine attention through ``impl`` (traced, never compiled
  or run), beside the shapes each must have: jvp (tangents in q, k, v and lam), the gradient, the Hessian-vector
  product (jvp of the gradient) and vmap over a batch of three lam."""
  t, f32 = 32, jnp.float32
  q = jax.ShapeDtypeStruct((B, t, H, D), f32)
  kv = jax.ShapeDtypeStruct((B, t, K, D), f32)
  lam = jax.ShapeDtypeStruct((H,), f32)
  f = functools.partial(da.distance_attention, metric="cosine", is_causal=True, implementation=impl,
                        return_residual=residual)
  attend = lambda q, k, v, lam: f(q, k, v, lam=lam)  # noqa: E731
  grad = jax.grad(lambda *a: jnp.sum(jax.tree.leaves(attend(*a))[0] ** 2), argnums=(0, 1, 2, 3))
  out = ((jax.ShapeDtypeStruct((B, t, H, D), f32), jax.ShapeDtypeStruct((B, t, H), f32)) if residual
         else jax.ShapeDtypeStruct((B, t, H, D), f32))
  programs = {"jvp": (lambda *a: jax.jvp(attend, a, a), (out, out)),
              "grad": (grad, (q, kv, kv, lam)),
              "hvp": (lambda *a: jax.jvp(grad, a, a)[1], (q, kv, kv, lam)),
              "vmap": (lambda q, k, v, lam: jax.vmap(lambda l: attend(q, k, v, l))(jnp.stack([lam] * 3)),
                       jax.tree.map(lambda s: jax.ShapeDtypeStruct((3,) + s.shape, s.dtype), out))}
  return {name: (jax.eval_shape(programs[name][0], q, kv, kv, lam), programs[name][1]) for name in transforms}


@pytest.mark.parametrize("name", ["reference", "blockwise", "ring", "pallas", "routed"])
def test_eval_shape_of_every_transformation_through_every_kernel(name):
  # The routed kernel (jax.nn's attention) declines the residual, so it returns the output alone.
  kernels = every_kernel()
  assert set(kernels) == set(da.kernels.available())
  transforms = ("jvp", "grad", "hvp", "vmap")
  for transform, (got, want) in shapes_of_transformations(kernels[name], transforms, name != "routed").items():
    assert got == want, transform
