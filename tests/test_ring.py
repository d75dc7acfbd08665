"""Ring attention against the reference kernel (the materialised oracle, itself checked against scipy in
test_attention.py): outputs and the gradients of q, k, v, lam (and a learned p, a bias) for every metric, a
user's included, causal and not, grouped-query, segment ids, sequence lengths, key biases and masks, on 2, 4 and 8
of the 8 simulated
devices, with lengths the layout divides and lengths it pads, the batch split over ``data`` at the same time;
its per-device memory; its use in the modules; its errors."""

import chex
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import AxisType, NamedSharding, PartitionSpec as P

import distattn_jax as da
from conftest import kernel_sweep_metrics, normal
from distattn_jax import attention as attention_module
from distattn_jax.kernels import Ring
from distattn_jax.metrics import record

USER_METRIC = "ring_test_huber"


@pytest.fixture(scope="module", autouse=True)
def user_metric():
  huber = lambda t: jnp.where(jnp.abs(t) <= 1.0, 0.5 * t * t, jnp.abs(t) - 0.5)
  da.metrics.register(da.metrics.Metric(USER_METRIC, da.metrics.Elementwise(phi=huber), translation_invariant=True))
  yield
  record._REGISTRY.pop(USER_METRIC)  # leave the process's registry as the other test files expect it


def make_mesh(seq: int, data: int = 1, axis_type=AxisType.Auto):
  return jax.make_mesh((data, seq), ("data", "seq"), axis_types=(axis_type,) * 2,
                       devices=jax.devices()[:data * seq])


def outputs_and_grads(impl, q, k, v, cotangent, *, metric, p=None, bias=None, **kw):
  """The output and the gradients of <out, cotangent> w.r.t. q, k, v, lam (and p, bias when given), jitted."""
  lam = jnp.linspace(0.5, 1.5, q.shape[-2])
  args = (q, k, v, lam, bias) + (() if p is None else (jnp.float32(p),))

  def loss(q, k, v, lam, bias, *p):
    out = da.distance_attention(q, k, v, bias, lam=lam, metric=metric, implementation=impl,
                                **(dict(p=p[0]) if p else {}), **kw)
    return jnp.sum(out * cotangent), out

  argnums = tuple(i for i, a in enumerate(args) if a is not None)
  (_, out), grads = jax.jit(jax.value_and_grad(loss, argnums=argnums, has_aux=True))(*args)
  return (out,) + grads


def assert_relative_close(got, want, rtol):
  # Relative to each array's largest entry: both kernels run in float32 and sum in different orders (the ring
  # merges per-device partial softmaxes), so entries near 0 carry absolute rounding of the array's scale.
  assert len(got) == len(want)
  for g, w in zip(got, want):
    g, w = np.asarray(g, np.float32), np.asarray(w, np.float32)
    np.testing.assert_allclose(g, w, rtol=rtol, atol=rtol * max(1.0, float(np.max(np.abs(w)))))


def case(seed, t, s, batch=2, h=4, kv=2, d=8, dv=5):
  return (normal(seed, (batch, t, h, d), np.float32), normal(seed + 1, (batch, s, kv, d), np.float32),
          normal(seed + 2, (batch, s, kv, dv), np.float32), normal(seed + 3, (batch, t, h, dv), np.float32))


# float32 against float32 with a different summation order: observed differences are below 2e-6 of each
# array's scale; 1e-4 leaves room for the elementwise metrics' longer reductions without hiding a wrong block
# (a missing or doubled key block moves entries by whole percents).
RTOL = 1e-4


@pytest.mark.parametrize("metric", [m if m == "l1" else pytest.param(m, marks=pytest.mark.slow)  # fast: l1
                                    for m in kernel_sweep_metrics() + (USER_METRIC,)])
def test_every_metric_matches_reference_with_batch_over_data(metric):
  # data=2 x seq=4: the batch is split over data while the sequence goes round the ring; 12 positions over
  # 2 x 4 zig-zag chunks pads inside; GQA (4 query heads on 2 kv heads); causal for half of the metrics.
  index = (kernel_sweep_metrics() + (USER_METRIC,)).index(metric)
  q, k, v, cot = case(10 + index, t=12, s=12)
  p = 3.0 if metric == "lp" else None  # lp's p traced, so its gradient is checked too
  causal = index % 2 == 0
  want = outputs_and_grads("reference", q, k, v, cot, metric=metric, p=p, is_causal=causal)
  with jax.set_mesh(make_mesh(seq=4, data=2)):
    got = outputs_and_grads("ring", q, k, v, cot, metric=metric, p=p, is_causal=causal)
  assert_relative_close(got, want, RTOL)


@pytest.mark.parametrize("devices,layout,causal,t,s,axis_type,positions,operands", [
    # divides evenly; a per-key bias shared by the batch (its gradient summed over the batch)
    pytest.param(2, "zigzag", False, 16, 16, AxisType.Auto, "ids", "key bias", marks=pytest.mark.slow),
    # cross-attention, padded, the causal mask cutting chunk pairs off the diagonal
    (4, "contiguous", True, 10, 14, AxisType.Explicit, "lengths", None),
    # every device, padded, causal; a key padding mask and a per-head bias (constant over keys)
    pytest.param(8, "zigzag", True, 21, 21, AxisType.Explicit, "both", "key mask, head bias", marks=pytest.mark.slow),
])
def test_device_counts_layouts_and_positions(devices, layout, causal, t, s, axis_type, positions, operands):
  q, k, v, cot = case(devices, t=t, s=s)
  rng = np.random.default_rng(devices)
  kw = {}
  if operands == "key bias":
    kw["bias"] = normal(devices, (1, 4, 1, s), np.float32)
  if operands == "key mask, head bias":
    kw["mask"] = rng.random((2, 1, 1, s)) > 0.3
    kw["bias"] = normal(devices, (2, 4, 1, 1), np.float32)
  if positions in ("ids", "both"):
    # Packed sequences: ids in runs, so some chunk pairs see nothing of each other.
    kw["q_segment_ids"] = np.sort(rng.integers(0, 3, (2, t)), axis=1).astype(np.int32)
    kw["kv_segment_ids"] = np.sort(rng.integers(0, 3, (2, s)), axis=1).astype(np.int32)
  if positions in ("lengths", "both"):
    kw["query_seq_lengths"] = np.array([t, t - 3], np.int32)
    kw["key_value_seq_lengths"] = np.array([s - 5, s], np.int32)
  want = outputs_and_grads("reference", q, k, v, cot, metric="l2", is_causal=causal, **kw)
  with jax.set_mesh(make_mesh(seq=devices, axis_type=axis_type)):
    got = outputs_and_grads(Ring(layout=layout), q, k, v, cot, metric="l2", is_causal=causal, **kw)
  assert_relative_close(got, want, RTOL)


def test_mesh_passed_to_the_kernel_needs_no_context():
  q, k, v, cot = case(40, t=9, s=9, batch=1)
  want = outputs_and_grads("reference", q, k, v, cot, metric="dot", is_causal=True)
  got = outputs_and_grads(Ring(mesh=make_mesh(seq=4)), q, k, v, cot, metric="dot", is_causal=True)
  assert_relative_close(got, want, RTOL)


@pytest.mark.slow
@pytest.mark.parametrize("shape", [(4,), (2, 4)])
def test_kernel_mesh_from_plain_make_mesh(shape):
  # jax.make_mesh gives Explicit axes by default. Ring(mesh=...) takes it as it comes: plain arrays eagerly,
  # under jit and under grad; explicitly sharded arrays (sharded along any axis) eagerly and under jit; and the
  # registered "ring" inside jax.set_mesh, with one array as query, key and value (their three cotangents meet).
  mesh = jax.make_mesh(shape, ("data", "seq")[-len(shape):], devices=jax.devices()[:int(np.prod(shape))])
  assert all(t == AxisType.Explicit for t in mesh.axis_types)
  x = normal(41, (2, 12, 4, 8), np.float32)
  self_attention = lambda impl: lambda x: da.distance_attention(x, x, x, metric="l1", implementation=impl)
  want_out = self_attention("reference")(x)
  want_grad = jax.grad(lambda x: jnp.sum(self_attention("reference")(x) ** 2))(x)
  ring = self_attention(Ring(mesh=mesh))
  got = [ring(x), jax.jit(ring)(x)]
  for spec in (P(None, "seq"), P(None, None, "seq")):
    sharded = jax.device_put(x, NamedSharding(mesh, spec))
    got += [ring(sharded), jax.jit(ring)(sharded)]
  assert_relative_close(got, [want_out] * len(got), RTOL)
  grads = [jax.grad(lambda x: jnp.sum(ring(x) ** 2))(x)]
  with jax.set_mesh(mesh):
    grads.append(jax.jit(jax.grad(lambda x: jnp.sum(self_attention("ring")(x) ** 2)))(x))
    grads.append(jax.grad(lambda x: jnp.sum(self_attention(Ring(mesh=mesh))(x) ** 2))(x))
  assert_relative_close(grads, [want_grad] * len(grads), RTOL)


@pytest.mark.slow
def test_compiled_memory_per_device_shrinks_with_devices():
  # memory_analysis() of the compiled forward+backward is per device and deterministic. At this length the
  # sequence-sized arrays dominate the fixed tiles, so going from 2 to 8 ring devices must at least halve it.
  def temp_bytes(devices):
    mesh = make_mesh(seq=devices)
    shape = jax.ShapeDtypeStruct((1, 32768, 1, 64), jnp.float32, sharding=NamedSharding(mesh, P(None, "seq")))
    loss = lambda q, k, v: jnp.sum(da.distance_attention(q, k, v, metric="dot", is_causal=True,
                                                         implementation="ring"))
    with jax.set_mesh(mesh):
      return jax.jit(jax.grad(loss, (0, 1, 2))).lower(shape, shape, shape).compile().memory_analysis(
          ).temp_size_in_bytes

  assert temp_bytes(8) <= 0.5 * temp_bytes(2)


@pytest.mark.slow
def test_modules_take_ring_and_auto_never_picks_it():
  x = normal(50, (2, 12, 16), np.float32)
  module = lambda impl: da.DistanceBasedAttention(num_heads=4, metric="l1", implementation=impl)
  params = module("reference").init(jax.random.key(0), x)
  flax_fn = lambda impl: nn.MultiHeadDotProductAttention(
      num_heads=4, attention_fn=da.make_attention_fn("l1", implementation=impl))
  flax_params = flax_fn("reference").init(jax.random.key(1), x)
  want = (module("reference").apply(params, x), flax_fn("reference").apply(flax_params, x))
  with jax.set_mesh(make_mesh(seq=2)):
    got = (jax.jit(module("ring").apply)(params, x), jax.jit(flax_fn(Ring()).apply)(flax_params, x))
    huge = da.kernels.Request(batch=64, q_len=1 << 16, kv_len=1 << 16, num_heads=8, num_kv_heads=8, metric="l1")
    assert attention_module._select_kernel("auto", huge) is da.kernels.get("blockwise")
  chex.assert_trees_all_close(got, want, rtol=RTOL, atol=RTOL)


def test_errors():
  q, k, v, _ = case(60, t=8, s=8, batch=1)
  with pytest.raises(ValueError, match=r"needs a device mesh .*jax\.set_mesh"):
    da.distance_attention(q, k, v, implementation="ring")
  with pytest.raises(ValueError, match=r"axis_name 'model' is not an axis of the mesh; its axes are \('data', "
                                       r"'seq'\)"):
    Ring(mesh=make_mesh(seq=2), axis_name="model")
  with jax.set_mesh(make_mesh(seq=2)):
    with pytest.raises(ValueError, match="axis_name 'sequence' is not an axis of the mesh"):
      da.distance_attention(q, k, v, implementation=Ring(axis_name="sequence"))
    with pytest.raises(ValueError, match=r"cannot take a bias that varies over the queries: it must be broadcast "
                                         r"over them, of shape \[batch\|1, heads\|1, 1, kv_len\|1\].*got kernel "
                                         r"shape \(1, 1, 8, 8\)"):
      da.distance_attention(q, k, v, bias=np.zeros((8, 8), np.float32), implementation="ring")
    with pytest.raises(ValueError, match="cannot take a mask that varies over the queries"):
      da.distance_attention(q, k, v, mask=np.tril(np.ones((8, 8), bool)), implementation="ring")
    with pytest.raises(ValueError, match="cannot apply attention dropout"):
      da.distance_attention(q, k, v, dropout_rate=0.1, dropout_rng=jax.random.key(0), implementation="ring")
    with pytest.raises(ValueError, match="cannot evaluate local_window_size"):
      da.distance_attention(q, k, v, local_window_size=2, implementation="ring")
  with pytest.raises(ValueError, match="layout must be one of zigzag, contiguous; got 'striped'"):
    Ring(layout="striped")
  with pytest.raises(TypeError, match="mesh must be a jax.sharding.Mesh or None"):
    Ring(mesh="seq")
  with pytest.raises(ValueError, match="cannot also be a batch axis"):
    Ring(batch_axes=("seq",))
