r"""Checks every registered attention kernel against the reference kernel on this machine's backend.

Run it on your accelerator before trusting a kernel there:

  python experiments/selfcheck.py                       # every kernel, metric, dtype, mask, causal, GQA case
  python experiments/selfcheck.py --metrics=l1,dot --dtypes=float32

For each implementation x metric x dtype it runs every combination of {no mask, a random mask with a fully
masked row} x {causal, not} x {multi-head, grouped-query} on odd lengths (37 queries, 29 keys), comparing the
output and the gradients for query, key, value and lam with the reference kernel. It prints a table and the
success rate, and exits with status 1 if any case fails.
"""

from __future__ import annotations

import itertools
import sys

import jax
import jax.numpy as jnp
import numpy as np
from absl import app, flags

import distattn_jax as da

FLAGS = flags.FLAGS
flags.DEFINE_list("implementations", None, "Kernels to check (default: every registered one but the reference).")
flags.DEFINE_list("metrics", list(da.metrics.available()), "Metrics to check.")
flags.DEFINE_list("dtypes", ["float32", "bfloat16"], "Input dtypes to check.")
flags.DEFINE_integer("q_len", 37, "Query length (odd on purpose: no block size divides it).")
flags.DEFINE_integer("kv_len", 29, "Key length.")

# Errors are measured relative to the largest entry of the reference result. float32 allows for reduced-precision
# matmuls on accelerators (TF32: 2^-11); bfloat16 for rounding the weights and outputs (2^-8) a few times.
TOLERANCE = {"float32": 2e-3, "bfloat16": 5e-2}


def _inputs(dtype, num_heads: int, num_kv: int, masked: bool, seed: int = 0):
  rng = np.random.default_rng(seed)
  t, s, d = FLAGS.q_len, FLAGS.kv_len, 16
  q = rng.standard_normal((2, t, num_heads, d))
  k = rng.standard_normal((2, s, num_kv, d))
  v = rng.standard_normal((2, s, num_kv, d))
  cotangent = rng.standard_normal((2, t, num_heads, d))
  mask = None
  if masked:
    mask = rng.random((2, 1, t, s)) > 0.3
    mask[:, :, t // 2] = False
  cast = lambda a: jnp.asarray(a, dtype)
  return cast(q), cast(k), cast(v), jnp.asarray(cotangent, jnp.float32), mask


def _run(impl, metric, q, k, v, cotangent, mask, causal):
  lam = jnp.linspace(0.5, 1.5, q.shape[-2])

  def loss(q, k, v, lam):
    out = da.distance_attention(q, k, v, mask=mask, lam=lam, metric=metric, p=3.0, is_causal=causal,
                                implementation=impl)
    return jnp.sum(out.astype(jnp.float32) * cotangent), out

  (_, out), grads = jax.jit(jax.value_and_grad(loss, argnums=(0, 1, 2, 3), has_aux=True))(q, k, v, lam)
  return [np.asarray(a, np.float32) for a in (out,) + grads]


def _relative_error(got, want) -> float:
  scale = max(1.0, float(np.max(np.abs(want))))
  return float(np.max(np.abs(got - want))) / scale if want.size else 0.0


def check(impl: str, metric: str, dtype: str) -> dict:
  """Every mask x causal x GQA case for one implementation, metric and dtype."""
  failures, fwd_err, grad_err, cases = [], 0.0, 0.0, 0
  for masked, causal, (heads, kv_heads) in itertools.product((False, True), (False, True), ((4, 4), (4, 2))):
    cases += 1
    q, k, v, cotangent, mask = _inputs(jnp.dtype(dtype), heads, kv_heads, masked)
    try:
      want = _run("reference", metric, q, k, v, cotangent, mask, causal)
      got = _run(impl, metric, q, k, v, cotangent, mask, causal)
      errors = [_relative_error(g, w) for g, w in zip(got, want)]
      finite = all(np.all(np.isfinite(g)) for g in got)
    except Exception as e:  # a crash is a failure of this case, reported, not a crash of the check
      failures.append(f"mask={masked} causal={causal} heads={heads}/{kv_heads}: {type(e).__name__}: {e}")
      continue
    fwd_err, grad_err = max(fwd_err, errors[0]), max(grad_err, *errors[1:])
    if not finite or max(errors) > TOLERANCE[dtype]:
      failures.append(f"mask={masked} causal={causal} heads={heads}/{kv_heads}: errors {errors}, finite={finite}")
  return {"implementation": impl, "metric": metric, "dtype": dtype, "cases": cases, "passed": cases - len(failures),
          "forward_error": fwd_err, "gradient_error": grad_err, "failures": failures}


def main(argv) -> int:
  del argv
  impls = FLAGS.implementations or [name for name in da.kernels.available() if name != "reference"]
  device = jax.devices()[0]
  print(f"selfcheck on {jax.default_backend()} ({device.device_kind}); implementations: {', '.join(impls)}; "
        f"tolerances (relative to the reference's largest entry): {TOLERANCE}")
  header = f"{'implementation':<14} {'metric':<12} {'dtype':<9} {'passed':>8} {'fwd err':>9} {'grad err':>9}"
  print(header + "\n" + "-" * len(header))
  results = []
  for impl, metric, dtype in itertools.product(impls, FLAGS.metrics, FLAGS.dtypes):
    r = check(impl, metric, dtype)
    results.append(r)
    print(f"{impl:<14} {metric:<12} {dtype:<9} {r['passed']:>4}/{r['cases']:<3} {r['forward_error']:9.1e} "
          f"{r['gradient_error']:9.1e}", flush=True)
    for failure in r["failures"]:
      print(f"    FAILED {failure}")
  passed = sum(r["passed"] for r in results)
  total = sum(r["cases"] for r in results)
  print(f"\n{passed}/{total} cases passed ({100.0 * passed / max(total, 1):.1f}%)")
  return 0 if passed == total else 1


if __name__ == "__main__":
  app.run(lambda argv: sys.exit(main(argv)))
