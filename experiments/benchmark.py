r"""Speed and memory of distance attention, measured beside a dot-product baseline in the same process.

``--mode=attention`` (default): for every metric x implementation x sequence length, forward and forward+backward
wall time (median of repeats after a warm-up call, each ending in block_until_ready) and the compiled temporary
memory of both (``jax.jit(f).lower(...).compile().memory_analysis().temp_size_in_bytes``), each beside
``jax.nn.dot_product_attention`` at the same shape. Writes JSON, a markdown table of ratios, and with ``--plot``
a PNG of time and memory against N. A cell whose compiled temporaries exceed ``--max_temp_gib`` is compiled (so
its memory is reported) but not run.

  python experiments/benchmark.py --lengths=512,1024,2048 --out=runs/benchmark/attention.json
  python experiments/benchmark.py --metrics=l1,dot --implementations=blockwise --lengths=16384 --repeats=1
  python experiments/benchmark.py --metrics=l1 --implementations=blockwise:256x256,blockwise:512x256 --lengths=2048

On a GPU ``--implementations`` defaults to reference, blockwise and the fused ``pallas`` kernel, and
``--baseline_implementation=cudnn`` measures against cuDNN's flash attention (bfloat16 or float16 only);
``experiments/gpu_report.sh`` runs the GPU report.

``--mode=train``: training tokens/s of ``--config``'s TruthGPT for each metric beside ``metric=dot``
(``distattn_jax.training.throughput``: compilation and warm-up excluded, timed to block_until_ready). Each of
``--repeats`` rounds times every metric once, so drifts of a shared machine hit all alike; the median round is
the headline and the best round is printed beside it.

  python experiments/benchmark.py --mode=train --config=configs/lm.py:size=tiny --out=runs/benchmark/train.json

``--mode=transforms``: what forward mode costs, per metric x implementation x N, each against the same kernel's
own forward and forward+backward: the time of ``jax.jit`` of ``jax.jvp`` (tangents in q, k and v) divided by the
forward's and by the forward+backward's, and of the Hessian-vector product (forward over reverse: ``jax.jvp`` of
the q, k, v gradient) divided by the forward+backward's; with the compiled temporaries of all four. With
``--max_temp_gib=0`` every cell is compiled for its memory and none is run.

  python experiments/benchmark.py --mode=transforms --implementations=blockwise --lengths=2048 --repeats=3
  python experiments/benchmark.py --mode=transforms --implementations=blockwise --lengths=8192 --max_temp_gib=0

``--mode=scaling``: on ``--devices`` simulated CPU devices (the mode sets ``jax_num_cpu_devices`` itself, before
JAX starts its backend); ``--scaling_parts`` picks any of three measurements. (a) ``ring_memory``
(:func:`ring_memory_table`): the compiled temporaries per device of one attention forward+backward with
``implementation="ring"`` over a ``seq`` mesh of all devices, beside the unsharded blockwise kernel on one device at
the same total length. (b) ``longest_trainable`` (:func:`longest_trainable_sequence`): doubling the sequence
length of ``--config``'s TruthGPT (batch 1, learned positions sized to the length) until one jitted
``train_step`` (value_and_grad + the optax update) needs more than ``--budget_mib`` of temporaries per device,
for blockwise on 1 device and for ring on the ``seq`` mesh. (a) and (b) are compiled, never run: the figures are
``memory_analysis()`` of the compiled programs, per device and deterministic. (c) ``data_parallel``
(:func:`data_parallel_step_time`): the train-step time of ``--config``'s TruthGPT on a ``data=--devices`` mesh
beside one device at the same per-device batch (``--per_device_batch``) and at the same global batch, rounds
interleaved as in ``--mode=train``, medians reported; simulated CPU devices share the machine's cores, so this
bounds the mesh's overhead, it is not a speed-up. Writes the JSON and ``--scaling_doc`` (docs/scaling_cpu.md).

  python experiments/benchmark.py --mode=scaling --causal --config=configs/lm.py:size=tiny --train_steps=10 \
      --out=runs/benchmark/scaling.json
"""

from __future__ import annotations

import functools
import json
import pathlib
import statistics
import sys
import time
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np
from absl import app, flags, logging

import distattn_jax as da
from distattn_jax import monitoring, training
from distattn_jax.models.truthgpt import TruthGPT
from distattn_jax.training import loop
from distattn_jax.training.host import machine

import cli  # experiments/cli.py, beside this file

FLAGS = flags.FLAGS
flags.DEFINE_enum("mode", "attention", ["attention", "transforms", "train", "scaling"],
                  "Attention kernels, their forward mode (jvp, hvp), training throughput, or scaling over "
                  "simulated devices.")
cli.define_config_file("config", "configs/lm.py:size=tiny", "--mode=train: the model and batch to time.",
                       lock_config=True)
flags.DEFINE_integer("train_steps", 20, "--mode=train: timed steps per measurement.")
flags.DEFINE_integer("warmup_steps", 3, "--mode=train: untimed steps before each measurement.")
flags.DEFINE_integer("per_device_batch", 4, "--mode=scaling: data parallel rows per device.")
flags.DEFINE_list("metrics", list(da.metrics.available()), "Metrics to measure.")
flags.DEFINE_list("implementations", ["reference", "blockwise"],
                  "Kernel names to measure (on a GPU 'pallas' is added unless the flag is given); blockwise:BQxBK "
                  "or pallas:BQxBK fixes a kernel's tiles, e.g. blockwise:512x256.")
flags.DEFINE_enum("baseline_implementation", None, ["xla", "cudnn"],
                  "The implementation= of the jax.nn.dot_product_attention baseline (default: jax's choice).")
flags.DEFINE_list("lengths", ["512", "1024", "2048", "4096"], "Sequence lengths N (queries = keys = N).")
flags.DEFINE_integer("batch", 1, "Batch size.")
flags.DEFINE_integer("heads", 8, "Attention heads.")
flags.DEFINE_integer("head_dim", 64, "Features per head.")
flags.DEFINE_enum("dtype", "float32", ["float32", "bfloat16"], "Input dtype.")
flags.DEFINE_float("p", 3.0, "The order of metric lp.")
flags.DEFINE_bool("causal", False, "Causal masking.")
flags.DEFINE_integer("repeats", 5, "Timed calls per cell (median reported); --mode=train: rounds.")
flags.DEFINE_float("max_seconds_per_cell", 60.0, "Stop repeating a cell once its timed calls took this long.")
flags.DEFINE_float("max_temp_gib", 8.0, "Do not run a cell whose compiled temporaries exceed this (GiB).")
flags.DEFINE_string("out", None, "JSON output path (default runs/benchmark/<mode>.json); the markdown table goes "
                    "beside it.")
flags.DEFINE_integer("devices", 8, "--mode=scaling: simulated CPU devices (jax_num_cpu_devices): the ring's seq "
                     "axis and the data-parallel mesh.")
SCALING_PARTS = ("ring_memory", "longest_trainable", "data_parallel")
flags.DEFINE_list("scaling_parts", list(SCALING_PARTS), "--mode=scaling: which measurements to make.")
flags.DEFINE_list("scaling_lengths", ["4096", "16384", "65536", "262144"], "--mode=scaling: total lengths of the ring table.")
flags.DEFINE_list("scaling_metrics", ["dot", "l1", "lp"], "--mode=scaling: metrics of the ring table.")
flags.DEFINE_float("budget_mib", 256.0, "--mode=scaling: compiled temporaries per device a train step may use.")
flags.DEFINE_integer("min_train_length", 1024, "--mode=scaling: the first length of the doubling search.")
flags.DEFINE_integer("max_train_length", 1 << 20, "--mode=scaling: stop the doubling search here.")
flags.DEFINE_string("scaling_doc", "docs/scaling_cpu.md", "--mode=scaling: where the markdown report goes.")
flags.DEFINE_bool("plot", False, "Also write a PNG of time and memory against N beside the JSON.")

BASELINE = "jax.nn.dot_product_attention"


def inputs(n: int, dtype) -> tuple[jax.Array, ...]:
  shape = (FLAGS.batch, n, FLAGS.heads, FLAGS.head_dim)
  keys = jax.random.split(jax.random.key(0), 4)
  return tuple(jax.random.normal(key, shape, dtype) for key in keys)


def forward_and_backward(attend: Callable) -> tuple[Callable, Callable]:
  """``attend(q, k, v)`` and the gradient of ``sum(attend(q, k, v) * cotangent)`` for q, k and v."""
  def fwd(q, k, v, cotangent):
    del cotangent
    return attend(q, k, v)

  def loss(q, k, v, cotangent):
    return jnp.sum(attend(q, k, v).astype(jnp.float32) * cotangent.astype(jnp.float32))

  return fwd, jax.grad(loss, argnums=(0, 1, 2))


def measure(fn: Callable, args: tuple, repeats: int) -> dict[str, Any]:
  """Compiles ``fn``, reports its temporary memory, and times it unless that memory is over the limit."""
  compiled, stats = monitoring.compile_with_stats(jax.jit(fn), *args)
  temp = int(stats["temp_bytes"]) if "temp_bytes" in stats else None
  row: dict[str, Any] = {"compile_s": stats["compile_seconds"], "temp_bytes": temp, "seconds": None, "times": []}
  if temp is not None and temp > FLAGS.max_temp_gib * 2**30:
    row["skipped"] = f"temporaries {temp / 2**30:.1f} GiB > --max_temp_gib={FLAGS.max_temp_gib}"
    return row
  jax.block_until_ready(compiled(*args))  # warm-up
  times: list[float] = []
  while len(times) < repeats and sum(times) < FLAGS.max_seconds_per_cell:
    start = time.perf_counter()
    jax.block_until_ready(compiled(*args))
    times.append(time.perf_counter() - start)
  row["times"] = times
  row["seconds"] = statistics.median(times)
  return row


def run_attention() -> dict[str, Any]:
  dtype = jnp.dtype(FLAGS.dtype)
  rows = []
  for n in map(int, FLAGS.lengths):
    args = inputs(n, dtype)
    cases = [(BASELINE, "-", functools.partial(jax.nn.dot_product_attention, is_causal=FLAGS.causal,
                                               implementation=FLAGS.baseline_implementation))]
    for metric in FLAGS.metrics:
      for impl in implementations():
        cases.append((metric, impl, functools.partial(da.distance_attention, metric=metric, p=FLAGS.p,
                                                      is_causal=FLAGS.causal, implementation=kernel_for(impl))))
    baseline: dict[str, Any] = {}
    for metric, impl, attend in cases:
      fwd, fwdbwd = forward_and_backward(attend)
      row = {"n": n, "metric": metric, "implementation": impl}
      for name, fn in (("forward", fwd), ("forward_backward", fwdbwd)):
        result = measure(fn, args, FLAGS.repeats)
        row[name] = result
        if metric == BASELINE:
          baseline[name] = result
        else:
          base = baseline[name]
          row[name]["time_ratio"] = (result["seconds"] / base["seconds"]
                                     if result["seconds"] and base["seconds"] else None)
          row[name]["memory_ratio"] = (result["temp_bytes"] / base["temp_bytes"]
                                       if result["temp_bytes"] and base["temp_bytes"] else None)
      logging.info("N=%d %s/%s fwd %s fwd+bwd %s", n, metric, impl, _fmt_s(row["forward"]["seconds"]),
                   _fmt_s(row["forward_backward"]["seconds"]))
      print(f"N={n:<6} {metric:<12} {impl:<10} fwd {_fmt_s(row['forward']['seconds']):>9} "
            f"fwd+bwd {_fmt_s(row['forward_backward']['seconds']):>9}  "
            f"temp {_fmt_bytes(row['forward_backward']['temp_bytes']):>10}", flush=True)
      rows.append(row)
  return {"machine": machine(), "mode": "attention",
          "settings": {"batch": FLAGS.batch, "heads": FLAGS.heads, "head_dim": FLAGS.head_dim,
                       "dtype": FLAGS.dtype, "p": FLAGS.p, "causal": FLAGS.causal, "repeats": FLAGS.repeats,
                       "baseline_implementation": FLAGS.baseline_implementation},
          "rows": rows}


def implementations() -> list[str]:
  """--implementations, with the fused "pallas" kernel added on a GPU when the flag was not given."""
  impls = list(FLAGS.implementations)
  if not FLAGS["implementations"].present and jax.default_backend() == "gpu" and "pallas" not in impls:
    impls.append("pallas")
  return impls


def kernel_for(spec: str):
  """A registered name, or ``blockwise:BQxBK`` / ``pallas:BQxBK`` for a kernel with fixed tile sizes."""
  name, _, tiles = spec.partition(":")
  if not tiles:
    return spec
  kinds = {"blockwise": da.kernels.Blockwise, "pallas": da.kernels.Pallas}
  if name not in kinds:
    raise app.UsageError(f"--implementations={spec}: only blockwise and pallas take tile sizes (NAME:BQxBK)")
  try:
    block_q, block_k = (int(n) for n in tiles.split("x"))
    return kinds[name](block_q, block_k)
  except ValueError as e:
    raise app.UsageError(f"--implementations={spec}: tiles must be BQxBK, e.g. {name}:128x64 ({e})") from None


def _fmt_s(seconds) -> str:
  return "-" if seconds is None else f"{seconds * 1e3:.1f} ms"


def _fmt_bytes(n) -> str:
  return "-" if n is None else f"{n / 2**20:.1f} MiB"


def _fmt_ratio(x) -> str:
  return "-" if x is None else f"{x:.2f}x"


def markdown(report: dict[str, Any]) -> str:
  m, s = report["machine"], report["settings"]
  baseline = BASELINE + (f"(implementation={s['baseline_implementation']!r})"
                         if s.get("baseline_implementation") else "")
  lines = [f"Machine: {m['processor']}, {m['cpu_count']} CPUs, {m['backend']} ({m['device']}), jax {m['jax']}. "
           f"batch {s['batch']}, {s['heads']} heads, head_dim {s['head_dim']}, {s['dtype']}, causal={s['causal']}, "
           f"lp p={s['p']:g}; median of up to {s['repeats']} calls after a warm-up.",
           "",
           f"Time and compiled temporary memory relative to `{baseline}` at the same N (lower is better).",
           "",
           "| N | metric | implementation | fwd | fwd+bwd | fwd time ratio | fwd+bwd time ratio | fwd+bwd temp | "
           "fwd+bwd memory ratio |",
           "|---|---|---|---|---|---|---|---|---|"]
  for row in report["rows"]:
    f, fb = row["forward"], row["forward_backward"]
    lines.append(f"| {row['n']} | {row['metric']} | {row['implementation']} | {_fmt_s(f['seconds'])} | "
                 f"{_fmt_s(fb['seconds'])} | {_fmt_ratio(f.get('time_ratio'))} | {_fmt_ratio(fb.get('time_ratio'))} | "
                 f"{_fmt_bytes(fb['temp_bytes'])} | {_fmt_ratio(fb.get('memory_ratio'))} |")
  return "\n".join(lines) + "\n"


def plot(report: dict[str, Any], path: pathlib.Path) -> None:
  import matplotlib
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt

  fig, (ax_time, ax_mem) = plt.subplots(1, 2, figsize=(13, 5))
  series: dict[tuple[str, str], list[tuple[int, float | None, int | None]]] = {}
  for row in report["rows"]:
    fb = row["forward_backward"]
    series.setdefault((row["metric"], row["implementation"]), []).append((row["n"], fb["seconds"], fb["temp_bytes"]))
  colors = {name: plt.get_cmap("tab10")(i) for i, name in enumerate(da.metrics.available())}
  for (metric, impl), points in series.items():
    label = metric if impl == "-" else f"{metric} ({impl})"
    if impl == "-":
      style = dict(linewidth=3, color="black")
    else:  # one colour per metric; solid for the blockwise kernel, dotted for the others
      style = dict(color=colors.get(metric), linestyle="-" if impl.startswith("blockwise") else ":")
    timed = [(n, t) for n, t, _ in points if t is not None]
    if timed:
      ax_time.plot(*zip(*timed), marker="o", label=label, **style)
    sized = [(n, b / 2**20) for n, _, b in points if b is not None]
    if sized:
      ax_mem.plot(*zip(*sized), marker="o", label=label, **style)
  for ax, ylabel in ((ax_time, "forward+backward seconds"), (ax_mem, "compiled temporaries (MiB)")):
    ax.set_xscale("log", base=2)
    ax.set_yscale("log")
    ax.set_xlabel("sequence length N")
    ax.set_ylabel(ylabel)
    ax.grid(True, which="both", alpha=0.3)
  ax_mem.legend(fontsize=7, ncol=2)
  m = report["machine"]
  fig.suptitle(f"distance attention vs {BASELINE} ({m['processor']}, {m['cpu_count']} CPUs, {m['backend']})")
  fig.tight_layout()
  fig.savefig(path, dpi=110)


# ------------------------------------------------------------------------------------------------------------
# --mode=transforms

TRANSFORMS = ("forward", "forward_backward", "jvp", "hvp")


def transforms(attend: Callable) -> dict[str, Callable]:
  """The four programs of one cell, each a function of ``(q, k, v, cotangent)``: the forward, the q, k, v
  gradient of ``sum(out * cotangent)``, the jvp with tangents in q, k and v, and the jvp of that gradient (a
  Hessian-vector product). ``cotangent`` doubles as every tangent: the values do not change the work."""
  fwd, grad = forward_and_backward(attend)

  def jvp(q, k, v, cotangent):
    return jax.jvp(attend, (q, k, v), (cotangent,) * 3)

  def hvp(q, k, v, cotangent):
    return jax.jvp(lambda q, k, v: grad(q, k, v, cotangent), (q, k, v), (cotangent,) * 3)

  return {"forward": fwd, "forward_backward": grad, "jvp": jvp, "hvp": hvp}


def _ratio(a: dict[str, Any], b: dict[str, Any], field: str) -> float | None:
  return a[field] / b[field] if a[field] and b[field] else None


def run_transforms() -> dict[str, Any]:
  """``{"rows": [{"n", "metric", "implementation", <each of TRANSFORMS>: measure()'s cell, "ratios"}]}``; the
  ratios divide medians (and temporaries) of the same kernel measured one after the other."""
  dtype = jnp.dtype(FLAGS.dtype)
  rows = []
  for n in map(int, FLAGS.lengths):
    args = inputs(n, dtype)
    for metric in FLAGS.metrics:
      for impl in implementations():
        attend = functools.partial(da.distance_attention, metric=metric, p=FLAGS.p, is_causal=FLAGS.causal,
                                   implementation=kernel_for(impl))
        row: dict[str, Any] = {"n": n, "metric": metric, "implementation": impl}
        for name, fn in transforms(attend).items():
          row[name] = measure(fn, args, FLAGS.repeats)
        f, fb, jvp, hvp = (row[name] for name in TRANSFORMS)
        row["ratios"] = {"jvp_to_forward": _ratio(jvp, f, "seconds"),
                         "jvp_to_forward_backward": _ratio(jvp, fb, "seconds"),
                         "hvp_to_forward_backward": _ratio(hvp, fb, "seconds"),
                         "jvp_temp_to_forward_backward_temp": _ratio(jvp, fb, "temp_bytes")}
        print(f"N={n:<6} {metric:<12} {impl:<10} " + " ".join(
            f"{name} {_fmt_s(row[name]['seconds']):>9} ({_fmt_bytes(row[name]['temp_bytes'])})"
            for name in TRANSFORMS), flush=True)
        rows.append(row)
  return {"machine": machine(), "mode": "transforms",
          "command": " ".join(["python experiments/benchmark.py"] + sys.argv[1:]),
          "settings": {"batch": FLAGS.batch, "heads": FLAGS.heads, "head_dim": FLAGS.head_dim,
                       "dtype": FLAGS.dtype, "p": FLAGS.p, "causal": FLAGS.causal, "repeats": FLAGS.repeats,
                       "max_temp_gib": FLAGS.max_temp_gib},
          "rows": rows}


def transforms_markdown(report: dict[str, Any]) -> str:
  m, s = report["machine"], report["settings"]
  lines = [f"Machine: {m['processor']}, {m['cpu_count']} CPUs, {m['backend']} ({m['device']}), jax {m['jax']}. "
           f"batch {s['batch']}, {s['heads']} heads, head_dim {s['head_dim']}, {s['dtype']}, causal={s['causal']}, "
           f"lp p={s['p']:g}; median of up to {s['repeats']} calls after a warm-up; tangents in q, k and v.",
           "",
           "jvp and hvp (jvp of the q, k, v gradient) against the same kernel's forward and forward+backward; "
           "temp: compiled temporaries (a cell over --max_temp_gib is compiled, not run).",
           "",
           "| N | metric | implementation | fwd | fwd+bwd | jvp | hvp | jvp / fwd | jvp / fwd+bwd | hvp / fwd+bwd | "
           "fwd+bwd temp | jvp temp | hvp temp |",
           "|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
  for row in report["rows"]:
    r = row["ratios"]
    lines.append(f"| {row['n']} | {row['metric']} | {row['implementation']} | "
                 + " | ".join(_fmt_s(row[name]["seconds"]) for name in TRANSFORMS) + " | "
                 + " | ".join(_fmt_ratio(r[name]) for name in ("jvp_to_forward", "jvp_to_forward_backward",
                                                                 "hvp_to_forward_backward")) + " | "
                 + " | ".join(_fmt_bytes(row[name]["temp_bytes"]) for name in ("forward_backward", "jvp", "hvp"))
                 + " |")
  return "\n".join(lines) + "\n"


def run_train() -> dict[str, Any]:
  """``{"rows": [{"metric", "tokens_per_second" (median), "ratio_to_dot" (of medians), "best_...", "runs"}]}``."""
  config = FLAGS.config
  metrics = list(dict.fromkeys([da.metrics.canonical_name(m) for m in FLAGS.metrics] + ["dot"]))
  runs: dict[str, list[float]] = {m: [] for m in metrics}
  for _ in range(FLAGS.repeats):
    for metric in metrics:
      variant = config.copy_and_resolve_references()
      variant.model.metric = metric
      runs[metric].append(training.throughput(variant, FLAGS.train_steps, FLAGS.warmup_steps))
  dot_median, dot_best = statistics.median(runs["dot"]), max(runs["dot"])
  rows = [{"metric": m, "tokens_per_second": statistics.median(r), "ratio_to_dot": statistics.median(r) / dot_median,
           "best_tokens_per_second": max(r), "best_ratio_to_dot": max(r) / dot_best, "runs": r}
          for m, r in runs.items()]
  m = config.model
  return {"machine": machine(), "mode": "train",
          "settings": {"width": m.width, "depth": m.depth, "heads": m.num_heads, "batch": config.data.batch_size,
                       "seq_len": config.data.seq_len, "implementation": m.implementation,
                       "rounds": FLAGS.repeats, "steps": FLAGS.train_steps},
          "config": json.loads(config.to_json_best_effort()), "rows": rows}


def train_markdown(report: dict[str, Any]) -> str:
  m, s = report["machine"], report["settings"]
  lines = [f"Machine: {m['processor']}, {m['cpu_count']} CPUs, {m['backend']} ({m['device']}), jax {m['jax']}. "
           f"TruthGPT width {s['width']}, depth {s['depth']}, {s['heads']} heads, batch {s['batch']} x "
           f"{s['seq_len']} tokens, implementation {s['implementation']}; median (best) of {s['rounds']} rounds x "
           f"{s['steps']} steps.", "",
           "| metric | training tokens/s | of dot | best round | best of dot |", "|---|---|---|---|---|"]
  for row in report["rows"]:
    lines.append(f"| {row['metric']} | {row['tokens_per_second']:,.0f} | {row['ratio_to_dot']:.1%} | "
                 f"{row['best_tokens_per_second']:,.0f} | {row['best_ratio_to_dot']:.1%} |")
  return "\n".join(lines) + "\n"


# ------------------------------------------------------------------------------------------------------------
# --mode=scaling


def _seq_mesh(devices: int):
  from jax.sharding import AxisType
  return jax.make_mesh((devices,), ("seq",), axis_types=(AxisType.Auto,), devices=jax.devices()[:devices])


def _memory(compiled) -> dict[str, int]:
  m = compiled.memory_analysis()
  return {"temp_bytes": int(m.temp_size_in_bytes), "argument_bytes": int(m.argument_size_in_bytes),
          "output_bytes": int(m.output_size_in_bytes)}


def ring_memory_table(lengths: list[int], metric_names: list[str], devices: int) -> list[dict[str, Any]]:
  """Per-device compiled memory of one attention forward+backward: ``"ring"`` on a ``devices``-way ``seq``
  mesh (inputs sharded over it) beside ``"blockwise"`` on one device, at the same total length."""
  from jax.sharding import NamedSharding, PartitionSpec as P
  rows = []
  for n in lengths:
    for metric in metric_names:
      row: dict[str, Any] = {"n": n, "metric": metric, "devices": devices, "causal": FLAGS.causal}
      for name, impl, size in (("blockwise_1", "blockwise", 1), (f"ring_{devices}", "ring", devices)):
        mesh = _seq_mesh(size)
        spec = jax.ShapeDtypeStruct((FLAGS.batch, n, FLAGS.heads, FLAGS.head_dim), jnp.dtype(FLAGS.dtype),
                                    sharding=NamedSharding(mesh, P(None, "seq")))
        _, grad = forward_and_backward(functools.partial(
            da.distance_attention, metric=metric, p=FLAGS.p, is_causal=FLAGS.causal, implementation=impl))
        with jax.set_mesh(mesh):
          start = time.perf_counter()
          row[name] = _memory(jax.jit(grad).lower(spec, spec, spec, spec).compile())
          row[name]["compile_s"] = time.perf_counter() - start
      row["temp_ratio"] = row[f"ring_{devices}"]["temp_bytes"] / row["blockwise_1"]["temp_bytes"]
      total = lambda r: r["temp_bytes"] + r["argument_bytes"] + r["output_bytes"]
      row["total_ratio"] = total(row[f"ring_{devices}"]) / total(row["blockwise_1"])
      print(f"N={n:<7} {metric:<6} blockwise/1 temp {_fmt_bytes(row['blockwise_1']['temp_bytes']):>11}  "
            f"ring/{devices} temp {_fmt_bytes(row[f'ring_{devices}']['temp_bytes']):>11}  "
            f"ratio {row['temp_ratio']:.3f} (with arguments and outputs {row['total_ratio']:.3f})", flush=True)
      rows.append(row)
  return rows


def _train_step_temp(config, length: int, implementation: str, devices: int) -> int:
  """Compiled temporaries per device of one ``train_step`` of ``config``'s TruthGPT at ``length`` tokens."""
  variant = config.copy_and_resolve_references()
  variant.data.seq_len = variant.model.max_len = length
  variant.data.batch_size = 1
  variant.model.implementation = implementation
  variant.model.attention_dropout_rate = 0.0  # the ring kernel has no dropout
  model = TruthGPT(training.validate(variant))
  tx = training.make_optimizer(variant.optim, variant.train.steps)
  with jax.set_mesh(_seq_mesh(devices)):
    # Shapes only: the parameters do not depend on the length of the tokens init sees (max_len sets them).
    state = jax.eval_shape(lambda: training.create_train_state(model, tx, variant.seed, 8))
    windows = jax.ShapeDtypeStruct((1, length + 1), jnp.int32)
    key = jax.eval_shape(lambda: jax.random.key(0))
    step = functools.partial(training.train_step, grad_accum=1)
    return _memory(jax.jit(step).lower(state, windows, key).compile())["temp_bytes"]


def longest_trainable_sequence(config, budget_bytes: int, devices: int) -> list[dict[str, Any]]:
  """For blockwise on 1 device and ring on ``devices``: the longest length of the doubling search from
  ``--min_train_length`` whose train step fits ``budget_bytes`` of temporaries per device, with every probe."""
  rows = []
  for implementation, size in (("blockwise", 1), ("ring", devices)):
    probes, length, longest = [], FLAGS.min_train_length, None
    while length <= FLAGS.max_train_length:
      temp = _train_step_temp(config, length, implementation, size)
      probes.append({"length": length, "temp_bytes": temp})
      print(f"{implementation}/{size}: length {length:<8} temp {_fmt_bytes(temp)}", flush=True)
      if temp > budget_bytes:
        break
      longest, length = length, 2 * length
    rows.append({"implementation": implementation, "devices": size, "longest_length": longest, "probes": probes})
  return rows


def _train_step_timer(config, batch_size: int, data: int, steps: int, warmup: int) -> Callable[[], float]:
  """A function timing ``steps`` of the trainer's own jitted train step (``batch_size`` rows, on a ``data``-way
  mesh, or one device for 1) after ``warmup`` untimed ones; it returns seconds per step."""
  variant = config.copy_and_resolve_references()
  variant.data.batch_size = batch_size
  variant.mesh.data, variant.mesh.fsdp, variant.mesh.seq = data, 1, 1
  placement = training.Placement.create(variant)
  _, state = loop.build(variant, placement)
  d = variant.data
  windows = np.random.default_rng(variant.seed).integers(0, variant.model.vocab_size, (batch_size, d.seq_len + 1),
                                                        dtype=np.int32)
  batch, key = placement.batch(windows, batch_size), placement.dropout_key(variant.seed)
  step, _ = loop.compile_train_step(variant, state, batch, key, placement)
  holder = {"state": state}
  for _ in range(warmup):
    holder["state"], _ = step(holder["state"], batch, key)
  jax.block_until_ready(holder["state"])

  def timed() -> float:
    start = time.perf_counter()
    for _ in range(steps):
      holder["state"], _ = step(holder["state"], batch, key)
    jax.block_until_ready(holder["state"])
    return (time.perf_counter() - start) / steps

  return timed


def data_parallel_step_time(config, devices: int, per_device_batch: int, steps: int, warmup: int,
                            rounds: int) -> dict[str, Any]:
  """Median seconds per train step of ``config``'s TruthGPT: ``mesh`` (data=``devices``, batch ``devices x
  per_device_batch``), ``one_device_same_per_device_batch`` (batch ``per_device_batch``) and
  ``one_device_same_global_batch``; each round times all three, so a drift of a shared machine hits them alike.
  ``ratio_same_per_device_batch`` is mesh / one device at the per-device batch: on simulated devices that share
  the cores the mesh does ``devices`` times the work, so ``ratio_per_unit_of_work`` divides it by ``devices``;
  ``ratio_same_global_batch`` is mesh / one device doing the same total work. The last two bound the mesh's
  overhead."""
  if jax.device_count() != devices:
    raise app.UsageError(f"--devices={devices} but JAX has {jax.device_count()} devices")
  global_batch = devices * per_device_batch
  timers = {"mesh": _train_step_timer(config, global_batch, devices, steps, warmup),
            "one_device_same_per_device_batch": _train_step_timer(config, per_device_batch, 1, steps, warmup),
            "one_device_same_global_batch": _train_step_timer(config, global_batch, 1, steps, warmup)}
  runs: dict[str, list[float]] = {name: [] for name in timers}
  for _ in range(rounds):
    for name, timer in timers.items():
      runs[name].append(timer())
  medians = {name: statistics.median(r) for name, r in runs.items()}
  return {"devices": devices, "per_device_batch": per_device_batch, "global_batch": global_batch,
          "seq_len": config.data.seq_len, "steps": steps, "rounds": rounds, "median_step_seconds": medians,
          "runs": runs, "ratio_same_per_device_batch": medians["mesh"] / medians["one_device_same_per_device_batch"],
          "ratio_per_unit_of_work": medians["mesh"] / (devices * medians["one_device_same_per_device_batch"]),
          "ratio_same_global_batch": medians["mesh"] / medians["one_device_same_global_batch"]}


def run_scaling() -> dict[str, Any]:
  devices = FLAGS.devices
  if len(jax.devices()) < devices:
    raise app.UsageError(f"--mode=scaling needs {devices} devices; JAX has {len(jax.devices())} (the backend "
                         "started before the mode could set jax_num_cpu_devices)")
  unknown = sorted(set(FLAGS.scaling_parts) - set(SCALING_PARTS))
  if unknown:
    raise app.UsageError(f"--scaling_parts: {', '.join(unknown)} unknown; valid: {', '.join(SCALING_PARTS)}")
  config = FLAGS.config
  m = config.model
  report = {"machine": machine(), "mode": "scaling",
            "command": " ".join(["python experiments/benchmark.py"] + sys.argv[1:]),
            "settings": {"devices": devices, "batch": FLAGS.batch, "heads": FLAGS.heads, "head_dim": FLAGS.head_dim,
                         "dtype": FLAGS.dtype, "p": FLAGS.p, "causal": FLAGS.causal, "budget_mib": FLAGS.budget_mib,
                         "rounds": FLAGS.repeats, "steps": FLAGS.train_steps, "seq_len": config.data.seq_len,
                         "model": {"width": m.width, "depth": m.depth, "heads": m.num_heads, "mlp_dim": m.mlp_dim,
                                   "metric": m.metric}}}
  if "ring_memory" in FLAGS.scaling_parts:
    report["ring_memory"] = ring_memory_table([int(n) for n in FLAGS.scaling_lengths], FLAGS.scaling_metrics,
                                              devices)
  if "longest_trainable" in FLAGS.scaling_parts:
    report["longest_trainable"] = longest_trainable_sequence(config, int(FLAGS.budget_mib * 2**20), devices)
  if "data_parallel" in FLAGS.scaling_parts:
    report["data_parallel"] = data_parallel_step_time(config, devices, FLAGS.per_device_batch, FLAGS.train_steps,
                                                      FLAGS.warmup_steps, FLAGS.repeats)
  return report


def scaling_markdown(report: dict[str, Any]) -> str:
  m, s = report["machine"], report["settings"]
  d = s["devices"]
  mm = s["model"]
  lines = [f"Machine: {m['processor']}, {m['cpu_count']} CPUs, {m['backend']} ({m['device']}), jax {m['jax']}; "
           f"{d} simulated CPU devices."]
  if "ring_memory" in report:
    lines += ["", "## Ring attention: memory per device", "",
              "Compiled, never run: `memory_analysis()` per device, deterministic. "
              f"One attention forward+backward, batch {s['batch']}, {s['heads']} heads, head_dim {s['head_dim']}, "
              f"{s['dtype']}, causal={s['causal']}: `implementation=\"ring\"` on a {d}-way `seq` mesh (inputs "
              f"sharded over it) against the blockwise kernel on one device at the same total length.", "",
              f"| N | metric | blockwise, 1 device: temp | ring, {d} devices: temp per device | temp ratio | "
              "ratio with arguments and outputs |", "|---|---|---|---|---|---|"]
    for row in report["ring_memory"]:
      lines.append(f"| {row['n']} | {row['metric']} | {_fmt_bytes(row['blockwise_1']['temp_bytes'])} | "
                   f"{_fmt_bytes(row[f'ring_{d}']['temp_bytes'])} | {row['temp_ratio']:.3f} | "
                   f"{row['total_ratio']:.3f} |")
  if "longest_trainable" in report:
    lines += ["", "## Longest trainable sequence", "",
              f"Longest sequence on which TruthGPT (width {mm['width']}, depth {mm['depth']}, {mm['heads']} heads, "
              f"mlp {mm['mlp_dim']}, metric {mm['metric']}, batch 1) compiles one `train_step` (value_and_grad and "
              f"the optax update) within {s['budget_mib']:g} MiB of temporaries per device, doubling the length "
              "(compiled, never run):", "",
              "| implementation | devices | longest length | probes (length: temp per device) |", "|---|---|---|---|"]
    for row in report["longest_trainable"]:
      probes = ", ".join(f"{p['length']}: {_fmt_bytes(p['temp_bytes'])}" for p in row["probes"])
      lines.append(f"| {row['implementation']} | {row['devices']} | {row['longest_length']} | {probes} |")
  if "data_parallel" in report:
    dp = report["data_parallel"]
    t = dp["median_step_seconds"]
    lines += ["", "## Data parallel: step time", "",
              f"The trainer's jitted train step, TruthGPT width {mm['width']}, depth {mm['depth']}, {mm['heads']} "
              f"heads, {s['seq_len']} tokens per row; median of {s['rounds']} interleaved rounds x {s['steps']} "
              "steps. Simulated devices share the machine's cores: at the same per-device batch the mesh does "
              f"{dp['devices']} times the work, so the per-unit-of-work and same-global-batch ratios bound the "
              "mesh's overhead.", "",
              "| train step | rows | median step time | mesh / this |", "|---|---|---|---|",
              f"| mesh data={dp['devices']} | {dp['global_batch']} ({dp['per_device_batch']} per device) | "
              f"{_fmt_s(t['mesh'])} | 1.00x |",
              f"| 1 device, same per-device batch | {dp['per_device_batch']} | "
              f"{_fmt_s(t['one_device_same_per_device_batch'])} | {_fmt_ratio(dp['ratio_same_per_device_batch'])} "
              f"({_fmt_ratio(dp['ratio_per_unit_of_work'])} per unit of work: / {dp['devices']}) |",
              f"| 1 device, same global batch | {dp['global_batch']} | {_fmt_s(t['one_device_same_global_batch'])} | "
              f"{_fmt_ratio(dp['ratio_same_global_batch'])} |"]
  return "\n".join(lines) + "\n"


def main(argv) -> None:
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {' '.join(argv[1:])}")
  if FLAGS.mode == "scaling":
    # Before anything asks JAX for its devices (the backend starts then, with this many CPU devices).
    jax.config.update("jax_num_cpu_devices", FLAGS.devices)
    report = run_scaling()
    out = pathlib.Path(FLAGS.out or "runs/benchmark/scaling.json")
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=1))
    table = scaling_markdown(report)
    doc = pathlib.Path(FLAGS.scaling_doc)
    doc.parent.mkdir(parents=True, exist_ok=True)
    doc.write_text(f"# Scaling out on simulated CPU devices\n\nWritten by `{report['command']}` "
                   "(see the docstring of experiments/benchmark.py).\n\n" + table)
    print("\n" + table)
    print(f"wrote {out} and {doc}")
    return
  report = {"train": run_train, "transforms": run_transforms}.get(FLAGS.mode, run_attention)()
  out = pathlib.Path(FLAGS.out or f"runs/benchmark/{FLAGS.mode}.json")
  out.parent.mkdir(parents=True, exist_ok=True)
  out.write_text(json.dumps(report, indent=1))
  table = {"train": train_markdown, "transforms": transforms_markdown}.get(FLAGS.mode, markdown)(report)
  out.with_suffix(".md").write_text(table)
  print("\n" + table)
  print(f"wrote {out} and {out.with_suffix('.md')}")
  if FLAGS.plot and FLAGS.mode == "attention":
    plot(report, out.with_suffix(".png"))
    print(f"wrote {out.with_suffix('.png')}")


if __name__ == "__main__":
  cli.run(main)
