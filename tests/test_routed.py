"""The routed kernel (gram metrics on ``jax.nn.dot_product_attention``) against float64 oracles, on a CPU.

``implementation="xla"`` runs the same augmented q and k that cuDNN gets on a GPU, so the algebra (lam folded
into q, the ``|k|^2`` columns, the centring, the normalisation, the query-only terms restored in the lse) and the
way every masking argument reaches ``jax.nn`` are checked here; cuDNN's own numerics are experiments/gpu_report.py's.

The oracle is the reference kernel in float64 (itself checked against scipy's cdist in test_kernels.py) for the
output and the gradients of q, k, v, lam (and the bias where given), and tests/oracle.py (numpy, no library
code) for one output. Tolerances: the routed kernel computes in float32 and ``jax.nn`` sums in another order than
the oracle, over at most 24 keys and 8 features, with logits of at most ~10: a few float32 ulps of the largest
entry; 5e-5 of it leaves an order of magnitude (the measured gaps are below 2e-6). bfloat16: the self-check's own
bound, 5e-2 of the largest entry (experiments/selfcheck.py; the routed kernel's docstring gives the measured
figures).
"""

import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import distattn_jax as da
from distattn_jax import attention as attention_module
from distattn_jax import kernels
from distattn_jax.kernels import routed
from distattn_jax.metrics import record

import oracle

ROUTED = kernels.Routed(implementation="xla")
F32_TOL = 5e-5
BF16_TOL = 5e-2
GRAM = ("dot", "cosine", "sqeuclidean")


def _inputs(seed, *, batch=2, q_len=12, kv_len=10, heads=4, kv_heads=2, dim=8):
  rng = np.random.default_rng(seed)
  q = rng.standard_normal((batch, q_len, heads, dim))
  # An offset on the keys: the sqeuclidean centring must be exact, and cosine sees vectors off the origin.
  k = rng.standard_normal((batch, kv_len, kv_heads, dim)) + 0.7
  v = rng.standard_normal((batch, kv_len, kv_heads, dim - 2))  # v_dim != head_dim: the padding of v
  lam = np.linspace(0.6, 1.4, heads)
  cot = rng.standard_normal((batch, q_len, heads, dim - 2))
  return q, k, v, lam, cot


# Every masking form jax.nn receives, three compiles per metric: a dense mask and a bias with GQA (every case has
# 4 query heads over 2 kv heads); causal with query and key lengths, one of them 0 (rows that see no key); segment
# ids (padding id 0 hides queries and keys) with a window open on both sides.
MASKING = {
    "mask+bias+gqa": lambda rng, b, t, s, h: dict(
        mask=rng.random((b, 1, t, s)) > 0.3, bias=0.5 * rng.standard_normal((b, h, t, s))),
    "causal+lengths": lambda rng, b, t, s, h: dict(
        is_causal=True, query_seq_lengths=np.array([t, t - 5], np.int32),
        key_value_seq_lengths=np.array([s - 3, 0], np.int32)),
    "segments+window": lambda rng, b, t, s, h: dict(
        q_segment_ids=np.sort(rng.integers(0, 3, (b, t)), axis=-1).astype(np.int32),
        kv_segment_ids=np.sort(rng.integers(0, 3, (b, s)), axis=-1).astype(np.int32), local_window_size=(3, 1)),
}


def _grads(impl, metric, dtype, q, k, v, lam, cot, args):
  bias = args.get("bias")
  rest = {n: a for n, a in args.items() if n != "bias"}

  def loss(q, k, v, lam, bias):
    out = da.distance_attention(q, k, v, bias=bias, lam=lam, metric=metric, implementation=impl, **rest)
    return jnp.sum(out.astype(cot.dtype) * cot), out

  argnums = (0, 1, 2, 3) + ((4,) if bias is not None else ())
  cast = lambda a: None if a is None else jnp.asarray(a, dtype)  # noqa: E731
  (_, out), grads = jax.jit(jax.value_and_grad(loss, argnums, has_aux=True))(
      cast(q), cast(k), cast(v), jnp.asarray(lam, jnp.float32 if dtype != jnp.float64 else dtype), cast(bias))
  return [np.asarray(a, np.float64) for a in (out,) + tuple(grads)]


def _oracle(metric, q, k, v, lam, cot, args):
  """The float64 reference kernel on the same (already rounded) inputs."""
  with jax.enable_x64(True):
    cot64 = jnp.asarray(cot, jnp.float64)
    return _grads("reference", metric, jnp.float64, q, k, v, lam, cot64, args)


def _assert_close(got, want, tol, what):
  names = ("out", "dq", "dk", "dv", "dlam", "dbias")
  for name, g, w in zip(names, got, want):
    scale = max(1.0, float(np.max(np.abs(w))))
    err = float(np.max(np.abs(g - w))) / scale
    assert np.all(np.isfinite(g)), f"{what}: {name} is not finite"
    assert err <= tol, f"{what}: {name} error {err:.2e} > {tol:g} of its largest entry"


# make test-fast runs one metric with one masking form (sqeuclidean, segments+window); make test all of them.
@pytest.mark.parametrize("form", [f if f == "segments+window" else pytest.param(f, marks=pytest.mark.slow)
                                  for f in MASKING])
@pytest.mark.parametrize("metric", [m if m == "sqeuclidean" else pytest.param(m, marks=pytest.mark.slow)
                                    for m in GRAM])
def test_matches_float64_reference_with_every_mask(metric, form):
  q, k, v, lam, cot = _inputs(0)
  args = MASKING[form](np.random.default_rng(1), q.shape[0], q.shape[1], k.shape[1], q.shape[2])
  got = _grads(ROUTED, metric, jnp.float32, q, k, v, lam, cot.astype(np.float32), args)
  _assert_close(got, _oracle(metric, q, k, v, lam, cot, args), F32_TOL, f"{metric}/{form}")


def test_output_matches_numpy_oracle():
  q, k, v, lam, _ = _inputs(2, batch=1, heads=2, kv_heads=1)
  for metric in GRAM:
    got = da.distance_attention(jnp.asarray(q, jnp.float32), jnp.asarray(k, jnp.float32),
                                jnp.asarray(v, jnp.float32), lam=jnp.asarray(lam, jnp.float32), metric=metric,
                                is_causal=True, implementation=ROUTED)
    want, _ = oracle.attention(q, k, v, metric=metric, lam=lam, is_causal=True)
    np.testing.assert_allclose(np.asarray(got, np.float64), want, atol=F32_TOL * max(1.0, np.abs(want).max()))


@pytest.mark.slow
def test_lse_restores_the_dropped_terms_and_marks_empty_rows():
  # The softmax drops the query-only terms (|q|^2 of sqeuclidean, cosine's constant 1); the lse must not.
  q, k, v, lam, _ = _inputs(3)
  segments = kernels.Segments(q_lengths=jnp.array([12, 4], jnp.int32), kv_lengths=jnp.array([10, 0], jnp.int32))
  for metric in GRAM:
    call = dict(lam=jnp.asarray(lam, jnp.float32), bias=None, mask=None, segments=segments, local_window=None,
                metric=metric, p=2.0, is_causal=False, dropout=None, precision=None, return_weights=False)
    arrays = [jnp.asarray(a, jnp.float32) for a in (q, k, v)]
    got, want = (jax.jit(lambda *a, kern=kern: kern(*a, **call).lse)(*arrays)
                 for kern in (ROUTED, kernels.get("reference")))
    assert bool(jnp.all(jnp.isneginf(got) == jnp.isneginf(want))) and bool(jnp.all(jnp.isneginf(got[1])))
    finite = jnp.isfinite(want)
    assert float(jnp.max(jnp.where(finite, jnp.abs(got - want), 0.0))) <= 1e-5 * float(jnp.max(jnp.abs(
        jnp.where(finite, want, 0.0))))


@pytest.mark.slow
def test_bfloat16_within_the_selfcheck_bound():
  q, k, v, lam, cot = _inputs(4)
  args = MASKING["causal+lengths"](None, 2, 12, 10, 4)
  rounded = [np.asarray(jnp.asarray(a, jnp.bfloat16).astype(jnp.float32), np.float64) for a in (q, k, v)]
  got = _grads(ROUTED, "sqeuclidean", jnp.bfloat16, *rounded, lam, cot.astype(np.float32), args)
  _assert_close(got, _oracle("sqeuclidean", *rounded, lam, cot, args), BF16_TOL, "sqeuclidean/bfloat16")


def _half_sqeuclidean(xy, xx, yy):
  return 0.5 * jnp.maximum(xx + yy - 2.0 * xy, 0.0)


@pytest.mark.slow
def test_user_gram_metrics_route_when_affine_and_are_declined_otherwise():
  affine = record.Metric("test_routed_half_sq", record.Gram(_half_sqeuclidean), translation_invariant=True)
  curved = record.Metric("test_routed_exp", record.Gram(lambda xy: jnp.exp(-xy), terms=((1, 1),)))
  squares = record.Metric("test_routed_squares", record.Gram(lambda a: a, terms=((2, 2),)))
  for metric in (affine, curved, squares):
    da.metrics.register(metric)
  try:
    assert routed.route(affine) == routed.Route(sign=-1.0, xy=-1.0, key_terms=((2, 0.5),), query_terms=((2, 0.5),),
                                                c0=0.0, center=True, normalize=False)
    q, k, v, lam, cot = _inputs(5)
    got = _grads(ROUTED, affine.name, jnp.float32, q, k, v, lam, cot.astype(np.float32), {"is_causal": True})
    _assert_close(got, _oracle(affine.name, q, k, v, lam, cot, {"is_causal": True}), F32_TOL, affine.name)
    for metric, why in ((curved, "is not affine in its grams"), (squares, "pair powers other than one x.y")):
      with pytest.raises(ValueError, match=f"'routed' cannot route metric '{metric.name}'.*{why}"):
        da.distance_attention(q, k, v, metric=metric.name, implementation="routed")
  finally:
    for metric in (affine, curved, squares):
      da.metrics.unregister(metric.name)


def _request(**kw):
  fields = dict(batch=1, q_len=8, kv_len=8, num_heads=2, num_kv_heads=1, metric="dot", dtype="bfloat16",
                head_dim=64, v_dim=64)
  return kernels.Request(**{**fields, **kw})


@pytest.mark.parametrize("kernel, kw, reason", [
    (ROUTED, dict(metric="l1"), "cannot route metric 'l1'.*elementwise"),
    (ROUTED, dict(return_weights=True), "cannot return attention weights"),
    (ROUTED, dict(dropout=kernels.Dropout(0.1, jax.random.PRNGKey(0))), "cannot apply attention dropout"),
    (ROUTED, dict(dtype="float64"), "cannot take float64 inputs.*softmax in float32"),
    (kernels.Routed("cudnn"), dict(dtype="float32"), "cannot take float32 inputs.*16-bit"),
    (kernels.Routed("cudnn"), dict(local_window=(4, 2)), "open to the right"),
    (kernels.Routed("cudnn"), dict(q_len=7, has_segments=True), "odd length"),
    (kernels.Routed("cudnn"), dict(metric="sqeuclidean", head_dim=254, v_dim=254), "head width of 264"),
])
def test_unsupported_gives_reasons(kernel, kw, reason):
  assert kernel.unsupported(_request(**kw)) is not None
  assert re.search(reason, kernel.unsupported(_request(**kw)))


def test_accepted_requests():
  assert ROUTED.unsupported(_request(metric="sqeuclidean", dtype="float32", local_window=(4, 2))) is None
  cudnn = kernels.Routed("cudnn")
  assert cudnn.unsupported(_request(metric="cosine", is_causal=True, local_window=(4, 2), has_segments=True)) is None
  # 64 features + 3 columns for |k|^2 = 67, padded to 72: within every GPU's limit.
  assert routed._width(64, 64, routed.route(da.metrics.get("sqeuclidean")), "bfloat16", 8) == 72
  with pytest.raises(ValueError, match="implementation must be one of"):
    kernels.Routed("splash")


def test_auto_on_cpu_never_routes():
  # The CPU policy is unchanged: the reference while its logits are small, else blockwise.
  assert attention_module._select_kernel("auto", _request(dtype="float32"), platform="cpu") is kernels.get(
      "reference")


@pytest.mark.parametrize("kind, expected", [
    ("NVIDIA H100 80GB HBM3", "H100"), ("NVIDIA H200", "H200"), ("NVIDIA A100-SXM4-80GB", "A100"),
    ("NVIDIA L4", "L4"), ("NVIDIA GH200 480GB", "GH200"), ("Some Accelerator", "Some Accelerator"),
])
def test_gpu_class_keys_the_evidence_by_model(kind, expected):
  assert kernels.evidence.gpu_class(kind) == expected


def test_a_differentiable_lse_is_declined_by_name():
  """jax.nn's residual is rounded to the input dtype and carries no gradient: a request for the log-sum-exp goes
  elsewhere under "auto" and is refused by name, rather than differentiating to a silent zero."""
  request = da.kernels.Request(batch=1, q_len=8, kv_len=8, num_heads=2, num_kv_heads=2, metric="dot",
                               dtype="float32", head_dim=8, v_dim=8)
  assert ROUTED.unsupported(request) is None
  assert (ROUTED.unsupported(request._replace(return_residual=True))
          == "cannot return a differentiable log-sum-exp (return_residual=True)")
  q = k = v = jnp.ones((1, 8, 2, 8), jnp.float32)
  with pytest.raises(ValueError, match=r"return a differentiable log-sum-exp"):
    da.distance_attention(q, k, v, metric="dot", implementation=ROUTED, return_residual=True)
