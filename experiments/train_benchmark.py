"""Training throughput (tokens/s) of one config for several metrics, each beside metric=dot in one process.

  .venv/bin/python experiments/train_benchmark.py --config=configs/lm.py:size=tiny --metrics=l1,l2,cosine,dot \
      --steps=20 --rounds=3 --output=runs/train_benchmark.json

Each round measures every metric once (``distattn_jax.training.throughput``: compile and warm-up excluded,
timed to ``block_until_ready``), so slow drifts of a shared machine hit all metrics alike. The headline is the
best round of each metric (like ``timeit``: other processes only ever slow a measurement down) and its ratio to
dot's best; the median is printed beside it. The kernel is the config's ``model.implementation``.
"""

import json
import pathlib
import statistics
from typing import Any

import jax
from absl import app, flags, logging
from ml_collections import config_flags

import distattn_jax as da
from distattn_jax import training

config_flags.DEFINE_config_file("config", None, "The model and batch to time, e.g. configs/lm.py:size=tiny.",
                                lock_config=True)
flags.DEFINE_list("metrics", list(da.metrics.available()), "Metrics to time; dot is always added as the baseline.")
flags.DEFINE_integer("steps", 20, "Timed steps per measurement.")
flags.DEFINE_integer("warmup", 3, "Untimed steps before each measurement.")
flags.DEFINE_integer("rounds", 3, "Measurements per metric (interleaved); the median is reported.")
flags.DEFINE_string("output", None, "Optional JSON file for the results.")
flags.mark_flags_as_required(["config"])


def measure(config, metrics: list[str], steps: int, warmup: int, rounds: int) -> dict[str, dict[str, Any]]:
  """``{metric: {"tokens_per_second": best, "ratio_to_dot": best / dot's best, "median_tokens_per_second",
  "median_ratio_to_dot", "runs": [...]}}``."""
  metrics = list(dict.fromkeys([da.metrics.canonical_name(m) for m in metrics] + ["dot"]))
  runs = {m: [] for m in metrics}
  for _ in range(rounds):
    for metric in metrics:
      variant = config.copy_and_resolve_references()
      variant.model.metric = metric
      runs[metric].append(training.throughput(variant, steps, warmup))
  best, median = max(runs["dot"]), statistics.median(runs["dot"])
  return {m: {"tokens_per_second": max(r), "ratio_to_dot": max(r) / best,
              "median_tokens_per_second": statistics.median(r), "median_ratio_to_dot": statistics.median(r) / median,
              "runs": r} for m, r in runs.items()}


def main(argv) -> None:
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {' '.join(argv[1:])}")
  f = flags.FLAGS
  config = f.config
  results = measure(config, f.metrics, f.steps, f.warmup, f.rounds)
  m = config.model
  print(f"training tokens/s on {jax.default_backend()} ({jax.device_count()} device(s)): width {m.width}, depth "
        f"{m.depth}, heads {m.num_heads}, batch {config.data.batch_size} x {config.data.seq_len}, implementation "
        f"{m.implementation}; best (median) of {f.rounds} rounds x {f.steps} steps")
  for metric, r in results.items():
    print(f"  {metric:<12} {r['tokens_per_second']:>10,.0f} tokens/s  {r['ratio_to_dot']:6.1%} of dot   "
          f"(median {r['median_tokens_per_second']:,.0f}, {r['median_ratio_to_dot']:.1%})")
  if f.output:
    path = pathlib.Path(f.output)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps({"config": json.loads(config.to_json_best_effort()), "results": results}, indent=2))
    logging.info("wrote %s", path)


if __name__ == "__main__":
  app.run(main)
