"""Lower bounds on the Lipschitz constant of one self-attention head, after Kim, Papamakarios and Mnih, "The
Lipschitz Constant of Self-Attention" (ICML 2021), section 5.1: dot product against distance logits with the
query projection shared by the keys (``W^Q = W^K``, Kim et al.'s L2 attention).

  .venv/bin/python experiments/lipschitz.py --out=runs/lipschitz.md

The head maps ``X [N, D]`` to ``distance_attention(X W^Q, X W^K, X W^V, metric=m, lam=1)``, weights drawn
``N(0, 1/D)`` from ``--seed``. For each head and sequence length the markdown table gives the largest spectral
norm of the Jacobian that ``distattn_jax.analysis.lipschitz_lower_bound`` finds by Adam on ``X`` from
``X ~ N(0, 1)``: a lower bound on the head's Lipschitz constant. Kim et al. prove dot-product self-attention has
none (theorem 3.1) and L2 attention with ``W^Q = W^K`` has one (theorem 3.2). At the defaults it takes about
two minutes on two shared CPU cores.
"""

import pathlib

import jax
import numpy as np
from absl import app, flags

import distattn_jax as da

flags.DEFINE_list("lengths", ["2", "4", "8", "16"], "Sequence lengths N for the ascent table.")
flags.DEFINE_list("heads", ["dot", "dot_tied", "l2_tied", "sqeuclidean_tied"],
                  "<metric> (separate W^Q, W^K) or <metric>_tied (W^K = W^Q).")
flags.DEFINE_integer("features", 4, "D, the input and head width.")
flags.DEFINE_integer("steps", 100, "Gradient-ascent steps per bound.")
flags.DEFINE_float("learning_rate", 0.05, "Adam's step on X.")
flags.DEFINE_integer("seed", 0, "Seed of the weights and the starting inputs.")
flags.DEFINE_string("out", None, "Markdown output path (default: print only).")

FLAGS = flags.FLAGS


def head_fn(name: str, features: int, seed: int):
  """The map ``X [N, D] -> [N, D]`` of one attention head named ``<metric>`` or ``<metric>_tied``."""
  metric, tied = name.removesuffix("_tied"), name.endswith("_tied")
  w_q, w_k, w_v = (jax.random.normal(k, (features, features)) / np.sqrt(features)
                   for k in jax.random.split(jax.random.key(seed), 3))
  w_k = w_q if tied else w_k

  def fn(x):
    q, k, v = ((x @ w)[:, None, :] for w in (w_q, w_k, w_v))
    return da.distance_attention(q, k, v, metric=metric, lam=1.0)[:, 0, :]

  return fn


def main(argv) -> None:
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments {argv[1:]}: every input is a flag")
  lengths = [int(n) for n in FLAGS.lengths]
  d = FLAGS.features
  inputs = {n: jax.random.normal(jax.random.key(FLAGS.seed + n), (n, d)) for n in lengths}
  lines = [f"Lower bound on the Lipschitz constant (ord=2) by {FLAGS.steps} Adam steps "
           f"(learning rate {FLAGS.learning_rate}) on X [N, {d}] from X ~ N(0, 1):", "",
           "| head | " + " | ".join(f"N={n}" for n in lengths) + " |", "|---|" + "---|" * len(lengths)]
  for name in FLAGS.heads:
    fn = head_fn(name, d, FLAGS.seed)
    bounds = [da.analysis.lipschitz_lower_bound(fn, inputs[n], steps=FLAGS.steps,
                                                learning_rate=FLAGS.learning_rate).value for n in lengths]
    lines.append(f"| {name} | " + " | ".join(f"{float(b):.3g}" for b in bounds) + " |")
  table = "\n".join(lines) + "\n"
  print(table)
  if FLAGS.out:
    path = pathlib.Path(FLAGS.out)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(table)


if __name__ == "__main__":
  app.run(main)
