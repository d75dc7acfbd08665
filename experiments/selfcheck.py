r"""Checks every registered attention kernel against a float64 oracle on this machine's backend.

Run it on your accelerator before trusting a kernel there:

  python experiments/selfcheck.py                       # every kernel, metric and dtype, every case below
  python experiments/selfcheck.py --metrics=l1,dot --dtypes=float32
  python experiments/selfcheck.py --q_len=70 --kv_len=45 --block=16   # a quick run on small shapes

The oracle shares no code with the kernels: it materialises every ``q_i - k_j`` difference in float64, applies
the distance's textbook formula (for a user-registered distance, its own per-coordinate function), builds one
dense mask from every masking argument, and differentiates with plain autodiff. The kernels get the same inputs
(rounded to the dtype under test first) at ``--q_len x --kv_len`` with ``--block``-wide tiles, so by default
(1000 x 777, 128-wide tiles) no tile size divides either length and every kernel loops over several tiles in
both directions.

Each metric (the registered ones plus a Huber distance this program registers, as a user would) runs these
cases, forward, the gradients of query, key, value, lam and (where the case has one) bias, and forward mode: the
``jax.jvp`` of the output with random tangents in all of them at once, against the oracle's own jvp (plain
autodiff of its formula; ``--noforward_mode`` leaves it out: it adds two compilations per case, a third
more CPU time at ``--q_len=70 --kv_len=45``):

  gqa+bias        4 query heads over 2 key/value heads, a full ``[B, H, T, S]`` bias
  causal+bias     causal, a bias broadcast over batch and heads (``[1, 1, T, S]``)
  segments        packed sequences: segment ids with padding (id 0), a per-key bias (``[B, 1, 1, S]``)
  lengths+mask    query and key lengths, a random mask with a fully masked query row
  window          a causal sliding window of 64 keys

A case a kernel declines (its ``unsupported`` answer: the "routed" kernel takes gram metrics only) is left out
of its count. It prints a table (the largest error of the output, of any gradient and of the output's tangent,
each relative to the oracle's largest entry) and the success rate, and exits with status 1 if any case fails.
"""

from __future__ import annotations

import itertools
import math
import sys
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np
from absl import app, flags

import distattn_jax as da

FLAGS = flags.FLAGS
flags.DEFINE_list("implementations", None, "Kernels to check (default: every registered one but the reference, "
                  "and 'pallas' only on a GPU).")
flags.DEFINE_list("metrics", None, "Metrics to check (default: every registered one plus the Huber example).")
flags.DEFINE_list("dtypes", ["float32", "bfloat16"], "Input dtypes to check.")
flags.DEFINE_list("cases", None, "Cases to run (default: all).")
flags.DEFINE_integer("q_len", 1000, "Query length (no tile size divides the default).")
flags.DEFINE_integer("kv_len", 777, "Key length.")
flags.DEFINE_integer("block", 128, "Tile size of the blockwise kernel, both directions.")
flags.DEFINE_integer("head_dim", 16, "Features per head.")
flags.DEFINE_bool("forward_mode", True, "Also check jax.jvp of the output against the oracle's jvp.")

# Errors are measured relative to the largest entry of the oracle's result. float32: the distances are exact
# (gram forms run at HIGHEST precision) but weights @ value may use the backend's default float32 matmul
# (TF32 on recent GPUs: 2^-11 per product), so 2e-3 leaves room for that and for float32 accumulation over
# ~800 keys. bfloat16: outputs and the weights fed to the value matmul are rounded to 8 bits (2^-8) a few times.
# The output's tangent is held to the same bounds: a sum of the same products, with tangents rounded to the dtype
# like the inputs (measured on a CPU at 70 x 45: below 5e-7 in float32, 8e-3 in bfloat16). float16
# (--dtypes=float16) has 11 bits, 2^-11 per rounding, so 2e-2 leaves more than bfloat16's margin.
TOLERANCE = {"float32": 2e-3, "bfloat16": 5e-2, "float16": 2e-2}
LP_ORDER = 3.0
HUBER = "huber"

CASES = ("gqa+bias", "causal+bias", "segments", "lengths+mask", "window")


def huber_phi(t):
  """Huber loss of a coordinate difference with threshold 1: quadratic near 0, linear beyond."""
  a = jnp.abs(t)
  return jnp.where(a <= 1.0, 0.5 * t * t, a - 0.5)


def register_huber() -> None:
  """Registers the Huber distance the way a user would (once per process)."""
  if HUBER not in da.metrics.available():
    da.metrics.register(da.metrics.Metric(HUBER, da.metrics.Elementwise(huber_phi, reduce="sum"),
                                          translation_invariant=True))


# ------------------------------------------------------------------------------------------------------------
# The float64 oracle.


def oracle_distance(metric: str, q: jax.Array, k: jax.Array) -> jax.Array:
  """``[..., T, D]``, ``[..., S, D]`` -> the signed score ``[..., T, S]`` (``-distance``, ``+q.k`` for dot)."""
  if metric == "dot":
    return jnp.einsum("...td,...sd->...ts", q, k)
  if metric == "cosine":
    qn = q / jnp.linalg.norm(q, axis=-1, keepdims=True)
    kn = k / jnp.linalg.norm(k, axis=-1, keepdims=True)
    return -(1.0 - jnp.einsum("...td,...sd->...ts", qn, kn))
  t = q[..., :, None, :] - k[..., None, :, :]
  # |t| as t * sign(t): the same value, and autodiff then gives the documented sign(0) = 0 (jnp.abs's own
  # derivative at 0 is 1), which matters in bfloat16, where equal coordinates are common.
  abs_t = t * jax.lax.stop_gradient(jnp.sign(t))
  if metric == "l1":
    d = jnp.sum(abs_t, axis=-1)
  elif metric == "l2":
    d = jnp.sqrt(jnp.sum(t * t, axis=-1))
  elif metric == "sqeuclidean":
    d = jnp.sum(t * t, axis=-1)
  elif metric == "lp":
    d = jnp.sum(abs_t ** LP_ORDER, axis=-1) ** (1.0 / LP_ORDER)
  elif metric == "chebyshev":
    d = jnp.max(abs_t, axis=-1)  # ties share the gradient equally
  else:
    d = _registered_elementwise(metric, t)
  return -d


def _registered_elementwise(metric: str, t: jax.Array) -> jax.Array:
  """A user-registered distance from its own definition, ``root(reduce_d phi(t_d))``, on the materialised
  differences: the definition the kernels' loops and custom gradients must reproduce."""
  record = da.metrics.get(metric)
  form = record.form
  if record.parametric or not isinstance(form, da.metrics.Elementwise):
    raise ValueError(f"the oracle has no formula for metric {metric!r} (only non-parametric elementwise records)")
  values = form.phi(t)
  d = jnp.sum(values, axis=-1) if form.reduce == "sum" else jnp.max(values, axis=-1)
  return d if form.root is None else form.root(d)


def oracle_attention(metric, q, k, v, lam, bias, allowed):
  """``q [B, T, H, D]``, ``k, v [B, S, K, D]``, ``lam [H]``, ``bias`` broadcastable to ``[B, H, T, S]``,
  ``allowed`` bool ``[B, H, T, S]``; a row with nothing allowed gives 0 (distance_attention's convention)."""
  heads, kv_heads = q.shape[2], k.shape[2]
  k = jnp.repeat(k, heads // kv_heads, axis=2)
  v = jnp.repeat(v, heads // kv_heads, axis=2)
  scores = oracle_distance(metric, q.transpose(0, 2, 1, 3), k.transpose(0, 2, 1, 3))  # [B, H, T, S]
  logits = scores * (lam / math.sqrt(q.shape[-1]))[None, :, None, None] + bias
  logits = jnp.where(allowed, logits, 0.0)
  row_max = jax.lax.stop_gradient(jnp.max(jnp.where(allowed, logits, -jnp.inf), axis=-1, keepdims=True))
  e = jnp.where(allowed, jnp.exp(logits - jnp.where(jnp.isfinite(row_max), row_max, 0.0)), 0.0)
  denom = jnp.sum(e, axis=-1, keepdims=True)
  weights = e / jnp.where(denom > 0, denom, 1.0)
  return jnp.einsum("bhts,bshd->bthd", weights, v)


# ------------------------------------------------------------------------------------------------------------
# Cases: the inputs, the masking arguments and the dense mask they mean.


def case_inputs(case: str, seed: int = 0) -> dict[str, Any]:
  rng = np.random.default_rng(seed)
  b, t, s, d = 2, FLAGS.q_len, FLAGS.kv_len, FLAGS.head_dim
  heads, kv_heads = (4, 2) if case == "gqa+bias" else (2, 2)
  x = {"q": rng.standard_normal((b, t, heads, d)), "k": rng.standard_normal((b, s, kv_heads, d)),
       "v": rng.standard_normal((b, s, kv_heads, d)), "lam": np.linspace(0.5, 1.5, heads),
       "cotangent": rng.standard_normal((b, t, heads, d))}
  args: dict[str, Any] = {}
  allowed = np.ones((b, heads, t, s), bool)
  ti, sj = np.arange(t)[:, None], np.arange(s)[None, :]
  if case == "gqa+bias":
    x["bias"] = 0.5 * rng.standard_normal((b, heads, t, s))
  elif case == "causal+bias":
    x["bias"] = 0.5 * rng.standard_normal((1, 1, t, s))
    args["is_causal"] = True
    allowed &= ti >= sj
  elif case == "segments":
    x["bias"] = 0.5 * rng.standard_normal((b, 1, 1, s))
    q_ids = np.sort(rng.integers(0, 4, (b, t)), axis=-1).astype(np.int32)  # packed runs; 0 = padding
    kv_ids = np.sort(rng.integers(0, 4, (b, s)), axis=-1).astype(np.int32)
    args.update(q_segment_ids=q_ids, kv_segment_ids=kv_ids)
    allowed &= (q_ids[:, None, :, None] == kv_ids[:, None, None, :])
  elif case == "lengths+mask":
    q_lengths = np.array([t, t - t // 3], np.int32)
    kv_lengths = np.array([s - s // 4, s], np.int32)
    mask = rng.random((b, 1, t, s)) > 0.3
    mask[:, :, t // 2] = False
    args.update(mask=mask, query_seq_lengths=q_lengths, key_value_seq_lengths=kv_lengths)
    allowed &= mask
    allowed &= (ti[None, None] < q_lengths[:, None, None, None]) & (sj[None, None] < kv_lengths[:, None, None, None])
  elif case == "window":
    args.update(is_causal=True, local_window_size=(63, 0))
    allowed &= (ti >= sj) & (ti - 63 <= sj)
  else:
    raise ValueError(f"unknown case {case!r}; cases: {', '.join(CASES)}")
  return {"arrays": x, "args": args, "allowed": allowed, "heads": (heads, kv_heads)}


def _differentiated(arrays: dict[str, Any]) -> tuple[str, ...]:
  return ("q", "k", "v", "lam") + (("bias",) if "bias" in arrays else ())


def _oracle(metric: str, arrays: dict[str, np.ndarray], allowed: np.ndarray) -> list[np.ndarray]:
  names = _differentiated(arrays)
  with jax.enable_x64(True):
    def loss(*operands):
      x = dict(zip(names, operands))
      out = oracle_attention(metric, x["q"], x["k"], x["v"], x["lam"], x.get("bias", 0.0), jnp.asarray(allowed))
      return jnp.sum(out * arrays["cotangent"]), out

    f64 = [jnp.asarray(arrays[name], jnp.float64) for name in names]
    (_, out), grads = jax.jit(jax.value_and_grad(loss, argnums=tuple(range(len(names))), has_aux=True))(*f64)
    return [np.asarray(a) for a in (out,) + grads]


def _oracle_jvp(metric: str, arrays: dict[str, np.ndarray], tangents: dict[str, np.ndarray],
                allowed: np.ndarray) -> np.ndarray:
  """The oracle's output tangent for ``tangents`` in every differentiated input, by plain forward-mode autodiff."""
  names = _differentiated(arrays)
  with jax.enable_x64(True):
    def attend(*operands):
      x = dict(zip(names, operands))
      return oracle_attention(metric, x["q"], x["k"], x["v"], x["lam"], x.get("bias", 0.0), jnp.asarray(allowed))

    f64 = lambda source: tuple(jnp.asarray(source[name], jnp.float64) for name in names)  # noqa: E731
    return np.asarray(jax.jit(lambda *a: jax.jvp(attend, a, f64(tangents))[1])(*f64(arrays)))


def _kernel_jvp(impl: Any, metric: str, dtype, arrays: dict[str, np.ndarray], tangents: dict[str, np.ndarray],
                args: dict[str, Any]) -> np.ndarray:
  """The kernel's output tangent: ``jax.jvp`` through ``distance_attention`` (the kernel's own forward mode)."""
  names = _differentiated(arrays)
  p = LP_ORDER if metric == "lp" else 2.0

  def attend(*operands):
    x = dict(zip(names, operands))
    return da.distance_attention(x["q"], x["k"], x["v"], bias=x.get("bias"), lam=x["lam"], metric=metric, p=p,
                                 implementation=impl, **args)

  cast = lambda source: tuple(jnp.asarray(source[name], jnp.float32 if name == "lam" else dtype)  # noqa: E731
                              for name in names)
  return np.asarray(jax.jit(lambda *a: jax.jvp(attend, a, cast(tangents))[1])(*cast(arrays)), np.float32)


def _kernel(impl: Any, metric: str, dtype, arrays: dict[str, np.ndarray], args: dict[str, Any]) -> list[np.ndarray]:
  names = _differentiated(arrays)
  cotangent = jnp.asarray(arrays["cotangent"], jnp.float32)
  p = LP_ORDER if metric == "lp" else 2.0

  def loss(*operands):
    x = dict(zip(names, operands))
    out = da.distance_attention(x["q"], x["k"], x["v"], bias=x.get("bias"), lam=x["lam"], metric=metric, p=p,
                                implementation=impl, **args)
    return jnp.sum(out.astype(jnp.float32) * cotangent), out

  inputs = [jnp.asarray(arrays[name], jnp.float32 if name == "lam" else dtype) for name in names]
  (_, out), grads = jax.jit(jax.value_and_grad(loss, argnums=tuple(range(len(names))), has_aux=True))(*inputs)
  return [np.asarray(a, np.float32) for a in (out,) + grads]


def _relative_error(got: np.ndarray, want: np.ndarray) -> float:
  scale = max(1.0, float(np.max(np.abs(want)))) if want.size else 1.0
  return float(np.max(np.abs(got - want))) / scale if want.size else 0.0


def _implementation(name: str) -> Any:
  """The kernel to check, with ``--block``-wide tiles where the kernel takes tile sizes (the fused GPU kernel
  only takes powers of two from 16 up; other --block values leave it its own tiles). Without a GPU the fused
  kernel runs through Pallas' interpreter, which computes the same arithmetic (its accuracy, not its speed)."""
  if name == "blockwise":
    return da.kernels.Blockwise(block_q=FLAGS.block, block_k=FLAGS.block)
  if name == "pallas":
    block = FLAGS.block if FLAGS.block >= 16 and FLAGS.block & (FLAGS.block - 1) == 0 else None
    return da.kernels.Pallas(block_q=block, block_k=block, interpret=jax.default_backend() != "gpu")
  return name


def _declined(impl: Any, case: str, metric: str, dtype: str) -> bool:
  """Whether the kernel says it cannot run the case at all (its ``unsupported`` answer for the case's request:
  the routed kernel takes gram metrics only, cuDNN 16-bit inputs only)."""
  kernel = da.kernels.get(impl) if isinstance(impl, str) else impl
  ask = getattr(kernel, "unsupported", None)
  if ask is None:
    return False
  inputs = case_inputs(case)
  heads, kv_heads = inputs["heads"]
  args = inputs["args"]
  request = da.kernels.Request(
      batch=2, q_len=FLAGS.q_len, kv_len=FLAGS.kv_len, num_heads=heads, num_kv_heads=kv_heads, metric=metric,
      is_causal=bool(args.get("is_causal", False)),
      bias_shape=tuple(inputs["arrays"]["bias"].shape) if "bias" in inputs["arrays"] else None,
      mask_shape=tuple(args["mask"].shape) if "mask" in args else None,
      has_segments=any(name in args for name in ("q_segment_ids", "query_seq_lengths")),
      local_window=args.get("local_window_size"), dtype=dtype, head_dim=FLAGS.head_dim, v_dim=FLAGS.head_dim)
  return ask(request) is not None


def default_implementations() -> list[str]:
  """Every registered kernel but the reference; the fused "pallas" kernel and the "routed" one (jax.nn's
  attention, which tests/test_routed.py checks on a CPU) only where there is a GPU. "ring" needs a device mesh
  and declines every case's bias, mask or window; tests/test_ring.py checks it against the reference kernel on
  simulated devices."""
  on_gpu = jax.default_backend() == "gpu"
  return [name for name in da.kernels.available()
          if name not in ("reference", "ring") and (name not in ("pallas", "routed") or on_gpu)]


def check(impl: str, metric: str, dtype: str, cases=CASES) -> dict:
  """Every case for one implementation, metric and dtype, against the oracle on the same rounded inputs."""
  failures, fwd_err, grad_err, jvp_err = [], 0.0, 0.0, 0.0
  cases = [case for case in cases if not _declined(_implementation(impl), case, metric, dtype)]
  for case in cases:
    inputs = case_inputs(case)
    arrays = dict(inputs["arrays"])
    # Tangents from their own generator, so the primal inputs stay those of the forward and gradient checks.
    rng = np.random.default_rng(1)
    tangents = {name: rng.standard_normal(np.shape(arrays[name])) for name in _differentiated(arrays)}
    for x in (arrays, tangents):  # the oracle sees exactly the values the kernel sees
      for name in set(x) & {"q", "k", "v", "bias"}:
        x[name] = np.asarray(jnp.asarray(x[name], dtype).astype(jnp.float32), np.float64)
    try:
      want = _oracle(metric, arrays, inputs["allowed"])
      got = _kernel(_implementation(impl), metric, jnp.dtype(dtype), arrays, inputs["args"])
      errors = dict(zip(("out",) + tuple("d" + n for n in _differentiated(arrays)),
                        (_relative_error(g, w) for g, w in zip(got, want))))
      if FLAGS.forward_mode:
        got.append(_kernel_jvp(_implementation(impl), metric, jnp.dtype(dtype), arrays, tangents, inputs["args"]))
        errors["jvp out"] = _relative_error(got[-1], _oracle_jvp(metric, arrays, tangents, inputs["allowed"]))
      finite = all(np.all(np.isfinite(g)) for g in got)
    except Exception as e:  # a crash is a failure of this case, reported, not a crash of the check
      failures.append(f"{case}: {type(e).__name__}: {e}")
      continue
    fwd_err = max(fwd_err, errors["out"])
    grad_err = max(grad_err, *(e for n, e in errors.items() if n.startswith("d")))
    jvp_err = max(jvp_err, errors.get("jvp out", 0.0))
    worst = max(errors, key=errors.get)
    if not finite or errors[worst] > TOLERANCE[dtype]:
      failures.append(f"{case}: worst {worst} error {errors[worst]:.2e} > {TOLERANCE[dtype]:g} "
                      f"({', '.join(f'{n} {e:.1e}' for n, e in errors.items())}), finite={finite}")
  return {"implementation": impl, "metric": metric, "dtype": dtype, "cases": len(cases),
          "passed": len(cases) - len(failures), "forward_error": fwd_err, "gradient_error": grad_err,
          "jvp_error": jvp_err if FLAGS.forward_mode else None,
          "failures": failures}


def main(argv) -> int:
  del argv
  register_huber()
  impls = FLAGS.implementations or default_implementations()
  metric_names = FLAGS.metrics or list(da.metrics.available())
  cases = FLAGS.cases or list(CASES)
  unknown = sorted(set(cases) - set(CASES))
  if unknown:
    raise app.UsageError(f"--cases: unknown {', '.join(unknown)}; cases: {', '.join(CASES)}")
  device = jax.devices()[0]
  print(f"selfcheck on {jax.default_backend()} ({device.device_kind}); implementations: {', '.join(impls)}; "
        f"{FLAGS.q_len} queries x {FLAGS.kv_len} keys, tiles {FLAGS.block}, head_dim {FLAGS.head_dim}; "
        f"cases: {', '.join(cases)}; oracle: float64, materialised; tolerances (relative to the oracle's largest "
        f"entry): {TOLERANCE}")
  header = (f"{'implementation':<14} {'metric':<12} {'dtype':<9} {'passed':>8} {'fwd err':>9} {'grad err':>9} "
            f"{'jvp err':>9}")
  print(header + "\n" + "-" * len(header))
  results = []
  for impl, metric, dtype in itertools.product(impls, metric_names, FLAGS.dtypes):
    r = check(impl, metric, dtype, cases)
    results.append(r)
    print(f"{impl:<14} {metric:<12} {dtype:<9} {r['passed']:>4}/{r['cases']:<3} {r['forward_error']:9.1e} "
          f"{r['gradient_error']:9.1e} " + (f"{r['jvp_error']:9.1e}" if r["jvp_error"] is not None else f"{'-':>9}"),
          flush=True)
    for failure in r["failures"]:
      print(f"    FAILED {failure}")
  passed = sum(r["passed"] for r in results)
  total = sum(r["cases"] for r in results)
  print(f"\n{passed}/{total} cases passed ({100.0 * passed / max(total, 1):.1f}%)")
  return 0 if passed == total else 1


if __name__ == "__main__":
  app.run(lambda argv: sys.exit(main(argv)))
