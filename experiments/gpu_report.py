r"""The GPU report in one program: is each kernel right on this GPU, how fast is it, how much memory does it take.

  bash experiments/gpu_report.sh                        # the same as: python experiments/gpu_report.py
  python experiments/gpu_report.py --dry_run --out=/tmp/gpu_report   # any machine: tiny shapes, the plumbing only

It finishes within ``--budget_seconds`` (default 450 s, inside 8 minutes on one H100 with start-up): each part
has a deadline (A: half the budget, B: up to 88%, C: the rest) and a cell that would start past it is
recorded as skipped, with the reason, rather than run. The JSON (``--out``/report.json) is rewritten after every
cell, so a run cut short keeps everything it measured; ``docs/gpu_report.md`` (``--markdown``) is written at the
end. In order:

A. Correctness. The Pallas tests that need a GPU or lower for CUDA (``tests/test_pallas.py -k "gpu or cuda"``;
   skipped, and said so, where pytest is not installed). Then bfloat16 at T = 1000 queries, S = 1100 keys, batch
   2, 4 query heads over 2 key/value heads, causal and not, head_dim 64, 80 and 128, every registered metric
   (lp at p = 3), with one query row fully masked by a dense mask: the output, lse and the gradients of q, k, v
   and lam of the fused "pallas" kernel and of the routed kernel on cuDNN (gram metrics; it declines the
   others) against the reference kernel in float32 on the same bfloat16 values upcast. Errors are relative to
   the reference's largest entry; a cell passes at 5e-2, experiments/selfcheck.py's bfloat16 bound.
B. Speed: median of 5 calls after a warm-up, bfloat16, batch 1, 16 heads, N = 8192 queries and keys, not
   causal, forward and forward+backward (gradients of q, k, v and lam), at head_dim 64 for every metric and 128
   for dot and l1: cuDNN's own attention (``jax.nn.dot_product_attention(implementation="cudnn")``, the
   standard-attention baseline), the routed kernel (gram metrics), the fused kernel and the blockwise kernel.
   The report lists the blockwise/fused ratios in the form ``distattn_jax/kernels/evidence.py`` takes them.
C. Memory: a ``[1, 1, T, S]`` float32 bias at N = 4096 (batch 1, 16 heads, head_dim 64), forward+backward with
   the bias's gradient: the compiled program's temporaries and its whole footprint (arguments, outputs and
   temporaries) for cuDNN, the routed, fused, blockwise and reference kernels.
D. Tiles (only with ``--parts`` naming D; the default budget has no room for it): the fused kernel's
   forward+backward at part B's shape and head_dim 64 for dot and l1 over :data:`TILE_SWEEP`'s candidates
   (``Pallas(block_q=, block_k=, block_d=, num_warps=, num_stages=)``), the default first, so that
   ``distattn_jax/kernels/pallas_gpu/config.py``'s unmeasured ``DEFAULT_TILES`` can be replaced by the fastest.
   With D the deadlines are A 40%, B 70%, C 80% and D the rest of the budget.

With ``--dry_run`` the shapes shrink to a few dozen positions, the fused kernel runs through Pallas' interpreter
and XLA's attention stands in for cuDNN (in the baseline and the routed kernel), so it runs on a CPU: about 4
minutes on 2 busy cores for every metric with the interpreted fused kernel, 20 s with ``--kernels=routed
--metrics=dot``; its numbers show the program works, nothing more. It needs jax, numpy and the package (none of the
training extras: no ml_collections, no tensorboardX; argparse, not absl, reads its flags).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import pathlib
import statistics
import subprocess
import sys
import time
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np

import distattn_jax as da

ROOT = pathlib.Path(__file__).resolve().parents[1]
BF16_BOUND = 5e-2  # experiments/selfcheck.py's bfloat16 tolerance, relative to the oracle's largest entry
LP_ORDER = 3.0
GRAM = ("dot", "cosine", "sqeuclidean")
PALLAS_TESTS = 'pytest tests/test_pallas.py -k "gpu or cuda"'
DRY_NOTE = " (DRY RUN: tiny shapes, interpreted fused kernel, XLA for cuDNN; the numbers mean nothing)"


@dataclasses.dataclass(frozen=True)
class Sizes:
  """Every shape of the report; :data:`FULL` on a GPU, :data:`DRY` for ``--dry_run``."""

  q_len: int = 1000
  kv_len: int = 1100
  batch: int = 2
  heads: int = 4
  kv_heads: int = 2
  check_dims: tuple[int, ...] = (64, 80, 128)
  speed_n: int = 8192
  speed_heads: int = 16
  # head_dim -> the metrics timed at it (None: every metric)
  speed_dims: tuple[tuple[int, tuple[str, ...] | None], ...] = ((64, None), (128, ("dot", "l1")))
  repeats: int = 5
  memory_n: int = 4096
  memory_dim: int = 64


FULL = Sizes()
DRY = Sizes(q_len=40, kv_len=44, check_dims=(16,), speed_n=64, speed_heads=2,
            speed_dims=((16, None),), repeats=1, memory_n=64, memory_dim=16)


class Report:
  """The JSON document, rewritten after every cell."""

  def __init__(self, path: pathlib.Path, doc: dict[str, Any]):
    self.path, self.doc = path, doc
    self.save()

  def add(self, part: str, cell: dict[str, Any]) -> None:
    self.doc.setdefault(part, []).append(cell)
    self.save()

  def save(self) -> None:
    self.path.parent.mkdir(parents=True, exist_ok=True)
    tmp = self.path.with_suffix(".tmp")
    tmp.write_text(json.dumps(self.doc, indent=1, default=str))
    os.replace(tmp, self.path)  # a reader never sees half a file


# Part D's candidates per metric (None: the default tiles): around the defaults, one step each way in the tile,
# the warps and the pipeline depth.
TILE_SWEEP: dict[str, tuple[dict[str, int] | None, ...]] = {
    "dot": (None, dict(block_q=64, block_k=64), dict(block_q=128, block_k=128, num_warps=8),
            dict(block_q=128, block_k=64, num_stages=2), dict(block_q=128, block_k=64, num_stages=4),
            dict(block_q=64, block_k=32, num_warps=2)),
    "l1": (None, dict(block_q=32, block_k=32), dict(block_q=64, block_k=64, num_warps=8),
           dict(block_d=16), dict(block_d=4), dict(num_stages=1), dict(num_stages=3), dict(num_warps=8)),
}
DRY_TILE_SWEEP: dict[str, tuple[dict[str, int] | None, ...]] = {
    "dot": (None, dict(block_q=32, block_k=16, num_warps=2)), "l1": (None, dict(block_d=4, num_stages=2))}


def kernels_under_test(dry_run: bool, names: list[str]) -> dict[str, Any]:
  if dry_run:
    every = {"pallas": da.kernels.Pallas(block_q=16, block_k=16, interpret=True), "routed": da.kernels.Routed("xla")}
  else:
    every = {"pallas": da.kernels.get("pallas"), "routed": da.kernels.Routed("cudnn")}
  return {name: every[name] for name in names}


def _relative_error(got: np.ndarray, want: np.ndarray) -> float:
  scale = max(1.0, float(np.max(np.abs(want)))) if want.size else 1.0
  return float(np.max(np.abs(got - want))) / scale if want.size else 0.0


# ------------------------------------------------------------------------------------------------------------
# A. Correctness.


def run_pallas_tests(timeout: float) -> dict[str, Any]:
  try:
    import pytest  # noqa: F401  (only whether it is there)
  except ImportError:
    return {"status": "skipped", "reason": "pytest is not installed"}
  cmd = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "tests/test_pallas.py", "-k", "gpu or cuda"]
  start = time.perf_counter()
  try:
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=max(1.0, timeout))
  except subprocess.TimeoutExpired:
    return {"status": "timeout", "command": " ".join(cmd), "seconds": timeout}
  lines = (proc.stdout + proc.stderr).strip().splitlines()
  return {"status": "passed" if proc.returncode == 0 else "failed", "returncode": proc.returncode,
          "summary": lines[-1] if lines else "", "tail": lines[-20:], "command": PALLAS_TESTS,
          "seconds": round(time.perf_counter() - start, 1)}


def check_inputs(sizes: Sizes, dim: int, metric: str, seed: int = 0) -> dict[str, Any]:
  rng = np.random.default_rng(seed)
  b, t, s, h, kh = sizes.batch, sizes.q_len, sizes.kv_len, sizes.heads, sizes.kv_heads
  bf16 = lambda shape: jnp.asarray(rng.standard_normal(shape), jnp.bfloat16)  # noqa: E731
  mask = np.ones((1, 1, t, s), bool)
  mask[..., t // 3, :] = False  # one query row that sees no key: output 0, lse -inf, no gradient
  lam = np.float32(da.initializers.default_lambda(metric, dim, LP_ORDER)) * np.linspace(0.8, 1.2, h, dtype=np.float32)
  return {"q": bf16((b, t, h, dim)), "k": bf16((b, s, kh, dim)), "v": bf16((b, s, kh, dim)),
          "lam": jnp.asarray(lam), "mask": jnp.asarray(mask),
          "cotangent": jnp.asarray(rng.standard_normal((b, t, h, dim)), jnp.float32)}


def attention_grads(impl: Any, metric: str, x: dict[str, Any], causal: bool, dtype) -> list[np.ndarray]:
  """out, lse and the gradients of q, k, v and lam of ``sum(out * cotangent)``; lse is None for a kernel that
  declines to return it (the routed kernel: jax.nn's residual carries no gradient)."""
  residual = True
  try:
    jax.eval_shape(lambda q, k, v: da.distance_attention(q, k, v, mask=x["mask"], metric=metric, p=LP_ORDER,
                                                         is_causal=causal, implementation=impl,
                                                         return_residual=True),
                   *(jax.ShapeDtypeStruct(x[n].shape, dtype) for n in ("q", "k", "v")))
  except ValueError as error:
    if "log-sum-exp" not in str(error):
      raise
    residual = False

  def loss(q, k, v, lam):
    result = da.distance_attention(q, k, v, mask=x["mask"], lam=lam, metric=metric, p=LP_ORDER,
                                   is_causal=causal, implementation=impl, return_residual=residual)
    out, lse = result if residual else (result, None)
    return jnp.sum(out.astype(jnp.float32) * x["cotangent"]), (out, lse)

  cast = [x[n].astype(dtype) for n in ("q", "k", "v")]
  (_, (out, lse)), grads = jax.jit(jax.value_and_grad(loss, (0, 1, 2, 3), has_aux=True))(*cast, x["lam"])
  return [None if a is None else np.asarray(a, np.float32) for a in (out, lse) + tuple(grads)]


def compare(got: list[np.ndarray], want: list[np.ndarray]) -> dict[str, Any]:
  names = ("out", "lse", "dq", "dk", "dv", "dlam")
  errors, finite = {}, True
  for name, g, w in zip(names, got, want):
    if g is None:  # not returned by this kernel
      continue
    if name == "lse":  # rows that see no key are -inf in both; the rest compare as numbers
      empty = np.isneginf(w)
      finite &= bool(np.array_equal(np.isneginf(g), empty))
      g, w = np.where(empty, 0.0, g), np.where(empty, 0.0, w)
    finite &= bool(np.all(np.isfinite(g)))
    errors[name] = _relative_error(g, w)
  worst = max(errors.values())
  return {"errors": errors, "worst": worst, "finite": finite, "passed": finite and worst <= BF16_BOUND}


def part_a(report: Report, sizes: Sizes, kernels: dict[str, Any], metrics: list[str], deadline: float,
           run_tests: bool) -> None:
  if run_tests:
    report.doc["tests"] = run_pallas_tests(min(90.0, deadline - time.perf_counter()))
  else:
    report.doc["tests"] = {"status": "skipped", "reason": "--skip_tests"}
  report.save()
  for dim in sizes.check_dims:
    for causal in (False, True):
      for metric in metrics:
        base = {"metric": metric, "head_dim": dim, "causal": causal}
        if time.perf_counter() > deadline:
          for name in kernels:
            report.add("correctness", {**base, "kernel": name, "status": "skipped: time budget"})
          continue
        x = check_inputs(sizes, dim, metric)
        want = None  # the reference runs once per cell, and only if a kernel accepts it
        for name, kernel in kernels.items():
          cell = {**base, "kernel": name}
          start = time.perf_counter()
          try:
            got = attention_grads(kernel, metric, x, causal, jnp.bfloat16)
          except ValueError as e:  # a kernel that declines says why; that is a result, not a failure
            cell.update(status="declined", reason=str(e))
          except Exception as e:  # noqa: BLE001  (a crash is this cell's failure, reported, not the report's)
            cell.update(status="error", reason=f"{type(e).__name__}: {e}"[:500])
          else:
            if want is None:
              want = attention_grads("reference", metric, x, causal, jnp.float32)
            cell.update(status="measured", **compare(got, want))
          cell["seconds"] = round(time.perf_counter() - start, 2)
          report.add("correctness", cell)


# ------------------------------------------------------------------------------------------------------------
# B. Speed.


def median_seconds(fn: Callable, args: tuple, repeats: int) -> dict[str, Any]:
  jitted = jax.jit(fn)
  t0 = time.perf_counter()
  jax.block_until_ready(jitted(*args))  # compile and warm up
  compile_s = time.perf_counter() - t0
  times = []
  for _ in range(repeats):
    t0 = time.perf_counter()
    jax.block_until_ready(jitted(*args))
    times.append(time.perf_counter() - t0)
  return {"seconds": statistics.median(times), "times": times, "compile_and_warmup_seconds": compile_s}


def speed_functions(impl: Any, metric: str | None, dry_run: bool) -> tuple[Callable, Callable]:
  """Forward and forward+backward of one implementation; ``metric=None`` is the jax.nn baseline."""
  if metric is None:
    backend = "xla" if dry_run else "cudnn"

    def forward(q, k, v, lam):
      del lam
      return jax.nn.dot_product_attention(q, k, v, implementation=backend)
    argnums = (0, 1, 2)
  else:
    def forward(q, k, v, lam):
      return da.distance_attention(q, k, v, lam=lam, metric=metric, p=LP_ORDER, implementation=impl)
    argnums = (0, 1, 2, 3)

  def loss(*args):
    return jnp.sum(forward(*args).astype(jnp.float32))

  return forward, jax.grad(loss, argnums)


def part_b(report: Report, sizes: Sizes, kernels: dict[str, Any], metrics: list[str], deadline: float,
           dry_run: bool) -> None:
  n, h = sizes.speed_n, sizes.speed_heads
  for dim, only in sizes.speed_dims:
    rng = np.random.default_rng(dim)
    args = tuple(jnp.asarray(rng.standard_normal((1, n, h, dim)), jnp.bfloat16) for _ in range(3))
    args += (jnp.ones((h,), jnp.float32),)
    names = [m for m in metrics if only is None or m in only]
    cells = [("cudnn", None, None)]
    for metric in names:
      if metric in GRAM and "routed" in kernels:
        cells.append(("routed", kernels["routed"], metric))
      if "pallas" in kernels:
        cells.append(("pallas", kernels["pallas"], metric))
      cells.append(("blockwise", "blockwise", metric))
    for name, impl, metric in cells:
      cell = {"implementation": name, "metric": metric or "dot (jax.nn)", "head_dim": dim, "n": n, "heads": h}
      forward, forward_backward = speed_functions(impl, metric, dry_run)
      for phase, fn in (("forward", forward), ("forward_backward", forward_backward)):
        if time.perf_counter() > deadline:
          cell[phase] = {"status": "skipped: time budget"}
          continue
        try:
          cell[phase] = median_seconds(fn, args, sizes.repeats)
        except Exception as e:  # noqa: BLE001  (reported in the cell)
          cell[phase] = {"status": f"error: {type(e).__name__}: {e}"[:500]}
      report.add("speed", cell)


# ------------------------------------------------------------------------------------------------------------
# C. Memory.


def part_c(report: Report, sizes: Sizes, kernels: dict[str, Any], deadline: float, dry_run: bool) -> None:
  n, h, dim = sizes.memory_n, sizes.speed_heads, sizes.memory_dim
  shape = jax.ShapeDtypeStruct((1, n, h, dim), jnp.bfloat16)
  bias = jax.ShapeDtypeStruct((1, 1, n, n), jnp.float32)
  lam = jax.ShapeDtypeStruct((h,), jnp.float32)
  backend = "xla" if dry_run else "cudnn"
  cells = [("cudnn", None, "dot"), ("routed", kernels.get("routed"), "dot"), ("pallas", kernels.get("pallas"), "dot"),
           ("pallas", kernels.get("pallas"), "l1"), ("blockwise", "blockwise", "dot"), ("blockwise", "blockwise", "l1"),
           ("reference", "reference", "l1")]
  cells = [c for c in cells if c[0] not in ("routed", "pallas") or c[0] in kernels]
  for name, impl, metric in cells:
    cell = {"implementation": name, "metric": metric if impl is not None else "dot (jax.nn)", "n": n,
            "heads": h, "head_dim": dim, "bias": [1, 1, n, n]}
    if time.perf_counter() > deadline:
      report.add("memory", {**cell, "status": "skipped: time budget"})
      continue

    def loss(q, k, v, lam, b, impl=impl, metric=metric):
      if impl is None:  # cuDNN takes its bias in the inputs' dtype
        out = jax.nn.dot_product_attention(q, k, v, bias=b.astype(q.dtype), implementation=backend)
      else:
        out = da.distance_attention(q, k, v, bias=b, lam=lam, metric=metric, implementation=impl)
      return jnp.sum(out.astype(jnp.float32))

    try:
      stats = jax.jit(jax.grad(loss, (0, 1, 2, 4))).trace(shape, shape, shape, lam, bias).lower().compile(
          ).memory_analysis()
      temp = int(stats.temp_size_in_bytes)
      total = temp + int(stats.argument_size_in_bytes) + int(stats.output_size_in_bytes)
      cell.update(status="compiled", temp_bytes=temp, footprint_bytes=total)
    except Exception as e:  # noqa: BLE001  (reported in the cell)
      cell.update(status=f"error: {type(e).__name__}: {e}"[:500])
    report.add("memory", cell)


# ------------------------------------------------------------------------------------------------------------
# The markdown page.


def part_d(report: Report, sizes: Sizes, metrics: list[str], deadline: float, dry_run: bool) -> None:
  n, h, dim = sizes.speed_n, sizes.speed_heads, sizes.memory_dim
  rng = np.random.default_rng(dim)
  args = tuple(jnp.asarray(rng.standard_normal((1, n, h, dim)), jnp.bfloat16) for _ in range(3))
  args += (jnp.ones((h,), jnp.float32),)
  sweep = DRY_TILE_SWEEP if dry_run else TILE_SWEEP
  for metric in [m for m in metrics if m in sweep]:
    for candidate in sweep[metric]:
      settings = dict(candidate or {}, **({"block_q": 16, "block_k": 16} if dry_run and not candidate else {}))
      kernel = da.kernels.Pallas(interpret=dry_run, **settings)
      tiles = kernel.tiles(metric, LP_ORDER, dim, n, n, "bfloat16")
      # The forward's tiles; the backward programs' own (the same where a candidate sets them) beside them.
      cell = {"metric": metric, "head_dim": dim, "n": n, "heads": h, "default": candidate is None,
              "tiles": dataclasses.asdict(tiles),
              "backward_tiles": {role: dataclasses.asdict(kernel.tiles(metric, LP_ORDER, dim, n, n, "bfloat16", role))
                                 for role in ("dq", "dkv")}}
      if time.perf_counter() > deadline:
        report.add("tiles", {**cell, "status": "skipped: time budget"})
        continue
      try:
        cell["forward_backward"] = median_seconds(speed_functions(kernel, metric, dry_run)[1], args, sizes.repeats)
        cell["status"] = "measured"
      except Exception as e:  # noqa: BLE001  (reported in the cell)
        cell["status"] = f"error: {type(e).__name__}: {e}"[:500]
      report.add("tiles", cell)


def _ms(phase: dict | None) -> str:
  return f"{phase['seconds'] * 1e3:.2f}" if phase and "seconds" in phase else "-"


def evidence_entries(doc: dict[str, Any]) -> list[str]:
  """``PALLAS_OVER_BLOCKWISE`` entries (blockwise forward+backward time over the fused kernel's)."""
  gpu = da.kernels.evidence.gpu_class(doc["machine"]["device"])
  timed = {(c["implementation"], c["metric"], c["head_dim"]): c.get("forward_backward", {})
           for c in doc.get("speed", [])}
  lines = []
  for (name, metric, dim), fused in timed.items():
    blockwise = timed.get(("blockwise", metric, dim), {})
    if name == "pallas" and "seconds" in fused and "seconds" in blockwise:
      lines.append(f'    ("{gpu}", "{metric}", {dim}, "bfloat16"): {blockwise["seconds"] / fused["seconds"]:.2f},')
  return lines


def markdown(doc: dict[str, Any]) -> str:
  m, s = doc["machine"], doc["sizes"]
  lines = [f"# GPU report: {m['device']} ({m['backend']}), jax {m['jax']}", "",
           f"Written by `{doc['command']}` in {doc.get('seconds', 0):.0f} s"
           f"{DRY_NOTE if doc['dry_run'] else ''}. "
           "The JSON beside it has every cell.", "", "## A. Correctness", ""]
  tests = doc.get("tests", {})
  command = tests.get("command", PALLAS_TESTS)
  lines.append(f"Pallas GPU tests (`{command}`): {tests.get('status')}; "
               f"{tests.get('summary', tests.get('reason', ''))}")
  lines += ["", f"bfloat16, T = {s['q_len']}, S = {s['kv_len']}, batch {s['batch']}, {s['heads']} heads over "
            f"{s['kv_heads']} kv heads, one fully masked row; errors relative to the float32 reference's largest "
            f"entry, bound {BF16_BOUND:g}.", "",
            "| kernel | metric | head_dim | causal | out | lse | dq | dk | dv | dlam | verdict |",
            "|---|---|---|---|---|---|---|---|---|---|---|"]
  for c in doc.get("correctness", []):
    if c.get("status") == "measured":
      e = c["errors"]
      errs = " | ".join(f"{e[n]:.1e}" if n in e else "-" for n in ("out", "lse", "dq", "dk", "dv", "dlam"))
      verdict = "pass" if c["passed"] else f"FAIL (finite={c['finite']})"
    else:
      errs, verdict = " | ".join(["-"] * 6), c.get("status", "")
      if c.get("status") == "declined":
        verdict = "declined: " + c["reason"].split("cannot", 1)[-1].strip()[:60]
    lines.append(f"| {c['kernel']} | {c['metric']} | {c['head_dim']} | {c['causal']} | {errs} | {verdict} |")
  lines += ["", "## B. Speed", "", f"bfloat16, batch 1, {s['speed_heads']} heads, N = {s['speed_n']}, not causal; "
            f"median of {s['repeats']} after a warm-up; ms.", "",
            "| implementation | metric | head_dim | forward | forward+backward | fwd+bwd / cuDNN |",
            "|---|---|---|---|---|---|"]
  base = {c["head_dim"]: c.get("forward_backward", {}) for c in doc.get("speed", []) if c["implementation"] == "cudnn"}
  for c in doc.get("speed", []):
    fb, ref = c.get("forward_backward", {}), base.get(c["head_dim"], {})
    ratio = f"{fb['seconds'] / ref['seconds']:.2f}x" if "seconds" in fb and "seconds" in ref else "-"
    status = "" if "seconds" in fb else f" ({fb.get('status', '')[:60]})"
    lines.append(f"| {c['implementation']} | {c['metric']} | {c['head_dim']} | {_ms(c.get('forward'))} | "
                 f"{_ms(fb)}{status} | {ratio} |")
  entries = evidence_entries(doc)
  lines += ["", "Blockwise over fused forward+backward time, as `distattn_jax/kernels/evidence.py`'s "
            "`PALLAS_OVER_BLOCKWISE` takes it (> 1: the fused kernel was faster):", "", "```python"]
  lines += entries or ["    # no pair of fused and blockwise timings"]
  lines += ["```", "", "## C. Memory", "",
            f"Forward+backward with a [1, 1, {s['memory_n']}, {s['memory_n']}] float32 bias and its gradient, batch "
            f"1, {s['speed_heads']} heads, head_dim {s['memory_dim']}; compiled sizes, MiB.", "",
            "| implementation | metric | temporaries | footprint (arguments + outputs + temporaries) |",
            "|---|---|---|---|"]
  for c in doc.get("memory", []):
    mib = lambda key: f"{c[key] / 2**20:.1f}" if key in c else c.get("status", "-")[:60]  # noqa: E731
    lines.append(f"| {c['implementation']} | {c['metric']} | {mib('temp_bytes')} | {mib('footprint_bytes')} |")
  if doc.get("tiles"):
    lines += ["", "## D. Tiles", "", f"The fused kernel's forward+backward, bfloat16, batch 1, {s['speed_heads']} "
              f"heads, N = {s['speed_n']}, head_dim {s['memory_dim']}; ms (the default tiles marked *).", "",
              "| metric | block_q | block_k | block_d | num_warps | num_stages | forward+backward |",
              "|---|---|---|---|---|---|---|"]
    for c in doc["tiles"]:
      t = c["tiles"]
      time_ms = _ms(c.get("forward_backward")) if c.get("status") == "measured" else c.get("status", "")[:60]
      lines.append(f"| {c['metric']}{' *' if c['default'] else ''} | {t['block_q']} | {t['block_k']} | "
                   f"{t['block_d']} | {t['num_warps']} | {t['num_stages']} | {time_ms} |")
  timing = doc.get("part_seconds", {})
  lines += ["", "Time per part (s): " + ", ".join(f"{k} {v:.0f}" for k, v in timing.items())]
  return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
  parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  parser.add_argument("--out", default=str(ROOT / "docs" / "gpu_report" / "report.json"), help="the JSON")
  parser.add_argument("--markdown", default=None, help="the page (default: docs/gpu_report.md, or beside the "
                      "JSON with --dry_run)")
  parser.add_argument("--dry_run", action="store_true", help="tiny shapes, interpreted fused kernel, XLA for cuDNN")
  parser.add_argument("--budget_seconds", type=float, default=450.0)
  parser.add_argument("--metrics", default=None, help="comma-separated (default: every registered metric)")
  parser.add_argument("--parts", default="A,B,C", help="comma-separated, of A, B, C and D (the tile sweep)")
  parser.add_argument("--skip_tests", action="store_true", help="leave out part A's pytest run")
  parser.add_argument("--kernels", default="pallas,routed", help="the kernels under test, beside cuDNN, the "
                      "blockwise and the reference kernels (with --dry_run, routed alone skips the slow "
                      "interpreted fused kernel)")
  args = parser.parse_args(argv)

  if not args.dry_run and jax.default_backend() != "gpu":
    print(f"gpu_report needs a GPU (jax sees {jax.default_backend()}); --dry_run runs the plumbing anywhere")
    return 2
  t0 = time.perf_counter()
  sizes = DRY if args.dry_run else FULL
  metric_names = args.metrics.split(",") if args.metrics else list(da.metrics.available())
  out = pathlib.Path(args.out)
  page = pathlib.Path(args.markdown) if args.markdown else (
      out.with_suffix(".md") if args.dry_run else ROOT / "docs" / "gpu_report.md")
  device = jax.devices()[0]
  report = Report(out, {
      "command": "python experiments/gpu_report.py " + " ".join(argv if argv is not None else sys.argv[1:]),
      "dry_run": args.dry_run, "sizes": dataclasses.asdict(sizes), "metrics": metric_names,
      "machine": {"device": device.device_kind, "backend": jax.default_backend(), "jax": jax.__version__,
                  "python": sys.version.split()[0]}})
  kernels = kernels_under_test(args.dry_run, args.kernels.split(","))
  parts = args.parts.split(",")
  budget = args.budget_seconds
  shares = {"A": 0.4, "B": 0.7, "C": 0.8, "D": 1.0} if "D" in parts else {"A": 0.5, "B": 0.88, "C": 1.0}
  deadlines = {part: t0 + share * budget for part, share in shares.items()}
  report.doc["part_seconds"] = {}
  for part in ("A", "B", "C", "D"):
    if part not in parts:
      continue
    start = time.perf_counter()
    if part == "A":
      part_a(report, sizes, kernels, metric_names, deadlines["A"], not args.skip_tests)
    elif part == "B":
      part_b(report, sizes, kernels, metric_names, deadlines["B"], args.dry_run)
    elif part == "C":
      part_c(report, sizes, kernels, deadlines["C"], args.dry_run)
    else:
      part_d(report, sizes, metric_names, deadlines["D"], args.dry_run)
    report.doc["part_seconds"][part] = time.perf_counter() - start
    report.save()
  report.doc["seconds"] = time.perf_counter() - t0
  report.save()
  page.parent.mkdir(parents=True, exist_ok=True)
  page.write_text(markdown(report.doc))
  failed = [c for c in report.doc.get("correctness", []) if c.get("status") == "measured" and not c["passed"]]
  failed += [c for c in report.doc.get("correctness", []) if c.get("status") == "error"]
  tests_failed = report.doc.get("tests", {}).get("status") in ("failed", "timeout")
  print(f"wrote {out} and {page} in {report.doc['seconds']:.0f} s; correctness: {len(failed)} failing cells"
        f"{'; the Pallas GPU tests failed' if tests_failed else ''}")
  return 1 if failed or tests_failed else 0


if __name__ == "__main__":
  sys.exit(main())
