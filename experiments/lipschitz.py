r"""Lipschitz constants of one self-attention head: Kim, Papamakarios and Mnih, "The Lipschitz Constant of
Self-Attention" (ICML 2021, arXiv 2006.04710), reproduced and extended to every metric, with the sequence-length
law of Castin, Ablin and Peyre, "How Smooth Is Attention?" (ICML 2024).

  .venv/bin/python experiments/lipschitz.py --studies=bounds --out=runs/lipschitz   # the first table, 2 minutes
  .venv/bin/python experiments/lipschitz.py --studies=scale,length,castin --steps=200 --out=runs/lipschitz
  .venv/bin/python experiments/lipschitz.py --studies=length --kim_restarts=0 --head_lengths= --steps=200 \
      --out=runs/lipschitz_kim                           # Kim's head from the cluster start only
  .venv/bin/python experiments/lipschitz.py --quick --out=/tmp/lipschitz   # every study at toy sizes, 22 s

The second command (docs/research.md's tables) took about 14 minutes on two shared CPU cores, most of it in the
length study's Jacobians of Kim's head at N = 128.

A head maps ``X [N, D]`` to ``distance_attention(X W^Q, X W^K, V, metric=m, lam=1)`` (logits
``-distance(q_i, k_j) / sqrt(D)``, or ``q_i . k_j / sqrt(D)`` for dot), weights drawn ``N(0, 1/D)`` from
``--seed``. Heads are named ``<metric>`` (separate ``W^Q``, ``W^K``, ``V = X W^V``), ``<metric>_tied``
(``W^K = W^Q``) and ``kim_l2``: Kim et al.'s L2 attention, sqeuclidean logits with ``W^K = W^Q`` and the value
``V = X A W^V``, ``A = W^Q W^Q^T / sqrt(D/H)`` (``H = 1``), the function their theorem 3.2 bounds.

Studies (``--studies``), each a markdown table ``<out>/<study>.md`` headed by the command, the machine and the
wall time, and a plot ``<out>/<study>.png``:

* ``bounds``: :func:`distattn_jax.analysis.lipschitz_lower_bound` (Adam on ``X`` from ``X ~ N(0, 1)``) per head
  and N, the first table of docs/research.md.
* ``scale``: the growth of the Jacobian's spectral norm as the inputs grow. ``construction``: the norm at
  ``c X0``, where ``X0 ~ N(0, 1)`` with its first row set to zero (the input of Kim et al.'s proof of theorem
  3.1: that query's row of logits stays 0 and its weights uniform at every scale). ``sphere``: the largest norm
  Adam finds on the sphere ``||X||_F = c ||X0||_F``. The slope of ``log norm`` against ``log c`` over the upper
  half of the scales is the growth law: 0 for a Lipschitz head, 2 for dot product. ``kim_l2`` is compared with
  its theorem 3.2 bound.
* ``length``: the optimised lower bound against N, fitted by ``a g(N) + b`` for ``g`` = ``log N - log log N``
  (Kim et al.'s asymptotic law), ``W0((N-1)/e)`` (their bound's own factor), ``log N`` and ``sqrt(N)``. Kim's head
  at ``D = 1`` (``W^Q = W^V = 1``, their tightness experiment) up to ``--kim_lengths``, then every head at
  ``--features``.
* ``castin``: the Jacobian norm at random bounded inputs (rows uniform on the sphere of radius ``sqrt(D)``,
  never optimised) of random heads against N, its exponent fitted on log-log beside Castin et al.'s
  ``sqrt(N)`` (exponent 0.5) upper bound on bounded inputs.
* ``trained`` (not run by default): the same law for trained layers. The first attention layer (4 heads, width
  64, with its trained lam, ``p`` and projections) of each classifier the robustness study saved
  (``--trained_dir``, ``<task>__<metric>__<seed>.msgpack``), beside the same layer at initialisation, at
  ``X ~ N(0, 1)`` and at tokens drawn from the trained model's own inputs to that layer, against N. It needs
  those parameters, which are git-ignored: make them first with (about 15 minutes on two cores)
  ``nice -n 10 .venv/bin/python experiments/robustness.py --config=configs/robustness.py:suite=cpu
  --results_dir=results/robustness --plot=docs/robustness_cpu.png``, then
  ``.venv/bin/python experiments/lipschitz.py --studies=trained --out=runs/lipschitz_trained``.
"""

from __future__ import annotations

import functools
import math
import pathlib
import shlex
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax
from absl import app, flags, logging

import distattn_jax as da

METRICS = ("dot", "l1", "l2", "lp", "chebyshev", "cosine", "sqeuclidean")
ALL_HEADS = tuple(f"{m}{t}" for m in METRICS for t in ("", "_tied")) + ("kim_l2",)
STUDIES = ("bounds", "scale", "length", "castin", "trained")
DEFAULT_STUDIES = STUDIES[:4]  # "trained" needs the robustness study's saved parameters
ROBUSTNESS_COMMAND = ("nice -n 10 .venv/bin/python experiments/robustness.py --config=configs/robustness.py:suite=cpu "
                      "--results_dir=results/robustness --plot=docs/robustness_cpu.png")
P = 3.0  # the order of lp

flags.DEFINE_list("studies", list(DEFAULT_STUDIES), f"Which of {STUDIES} to run.")
flags.DEFINE_list("lengths", ["2", "4", "8", "16"], "bounds: sequence lengths N.")
flags.DEFINE_list("heads", ["dot", "dot_tied", "l2_tied", "sqeuclidean_tied"],
                  f"bounds: heads; any of {ALL_HEADS}.")
flags.DEFINE_list("study_heads", list(ALL_HEADS), "scale, length, castin: the heads studied (default all).")
flags.DEFINE_integer("features", 4, "D, the input and head width.")
flags.DEFINE_integer("steps", 100, "Adam steps per optimised bound (bounds, scale, length).")
flags.DEFINE_float("learning_rate", 0.05, "Adam's step on X.")
flags.DEFINE_integer("seed", 0, "Seed of the weights and the inputs.")
flags.DEFINE_list("scales", ["0.25", "0.5", "1", "2", "4", "8", "16", "32", "64"], "scale: the factors c.")
flags.DEFINE_integer("scale_length", 8, "scale: N.")
flags.DEFINE_list("kim_lengths", ["2", "4", "8", "16", "32", "64", "128"], "length: N for kim_l2, D = 1.")
flags.DEFINE_integer("kim_restarts", 2, "length: random starts per N for kim_l2 (the largest bound is kept).")
flags.DEFINE_list("head_lengths", ["2", "4", "8", "16", "32"], "length: N for every head at --features.")
flags.DEFINE_list("castin_lengths", ["2", "4", "8", "16", "32", "64", "128", "256", "512"], "castin: N.")
flags.DEFINE_integer("castin_seeds", 2, "castin: random heads and inputs per N (the mean is reported).")
flags.DEFINE_integer("castin_iterations", 150, "castin: power iterations per norm (0: the exact norm).")
flags.DEFINE_string("trained_dir", "results/robustness/robustness_cpu.cells",
                    "trained: the robustness study's saved classifiers (<task>__<metric>__<seed>.msgpack); made by "
                    f"`{ROBUSTNESS_COMMAND}`.")
flags.DEFINE_list("trained_tasks", ["mnist1d", "fashion_mnist"], "trained: the tasks whose classifiers are measured.")
flags.DEFINE_list("trained_metrics", ["dot", "l1", "l2", "cosine", "sqeuclidean", "lp", "chebyshev"],
                  "trained: the metrics (every seed found in --trained_dir is used).")
flags.DEFINE_list("trained_lengths", ["8", "16", "32", "64", "128", "256"], "trained: N.")
flags.DEFINE_bool("quick", False, "Every study at toy sizes and four heads (dot, l2_tied, l1, kim_l2; about 22 s, "
                  "mostly compilation): overrides the size and head flags.")
flags.DEFINE_string("out", None, "Output folder for <study>.md and <study>.png (default: print only).")

FLAGS = flags.FLAGS


# Heads and the theorem.

def head_weights(features: int, seed: int) -> tuple[jax.Array, jax.Array, jax.Array]:
  """``(W^Q, W^K, W^V)``, each ``[D, D]`` with entries ``N(0, 1/D)``."""
  return tuple(jax.random.normal(k, (features, features)) / np.sqrt(features)
               for k in jax.random.split(jax.random.key(seed), 3))


def head_params(name: str, weights) -> tuple[str, tuple[jax.Array, jax.Array, jax.Array]]:
  """``(metric, (W^Q, W^K, W^V'))`` of the head ``name`` built from ``weights = (W^Q, W^K, W^V)``: the key
  projection is ``W^Q`` for a tied head, and ``kim_l2``'s value projection is ``A W^V``."""
  if name not in ALL_HEADS:
    raise ValueError(f"head must be one of {ALL_HEADS}; got {name!r}")
  w_q, w_k, w_v = weights
  if name == "kim_l2":  # Kim et al.'s value: X A W^V with A = W^Q W^Q^T / sqrt(D/H), H = 1.
    return "sqeuclidean", (w_q, w_q, w_q @ w_q.T / np.sqrt(w_q.shape[0]) @ w_v)
  return name.removesuffix("_tied"), (w_q, w_q if name.endswith("_tied") else w_k, w_v)


def attend(metric: str, params, x: jax.Array, length=None) -> jax.Array:
  """One head, ``X [N, D] -> [N, D]``, at lam = 1 (a pure function of the projections: a tied and an untied
  head of one metric share their compilations). With ``length`` (traced), only the first ``length`` tokens
  exist: the others are masked as queries (output 0) and as keys, so the Jacobian is that of the ``length``-token
  head padded with zeros, with the same norm, and one compilation serves every length."""
  q, k, v = ((x @ w)[:, None, :] for w in params)
  mask = None
  if length is not None:
    real = jnp.arange(x.shape[0]) < length
    mask = (real[:, None] & real[None, :])[None]
  return da.distance_attention(q, k, v, mask=mask, metric=metric, lam=1.0,
                               **({"p": P} if metric == "lp" else {}))[:, 0, :]


def head_fn(name: str, features: int, seed: int, weights=None):
  """The map ``X [N, D] -> [N, D]`` of the head ``name`` (see the module docstring)."""
  metric, params = head_params(name, head_weights(features, seed) if weights is None else weights)
  return lambda x: attend(metric, params, x)


def lambert_w0(z: float) -> float:
  """The principal branch of Lambert's W at ``z >= 0`` (``w e^w = z``), by Newton's method."""
  w = math.log1p(z)
  for _ in range(100):
    step = (w * math.exp(w) - z) / (math.exp(w) * (w + 1))
    w -= step
    if abs(step) < 1e-15 * max(1.0, abs(w)):
      break
  return w


def phi_inverse(y: float) -> float:
  """The inverse of ``phi(x) = x exp(x + 1)`` on ``x > 0``: ``W0(y / e)``."""
  return lambert_w0(y / math.e)


def kim_theorem_bound(n: int, features: int, w_q, w_v, heads: int = 1) -> float:
  """Kim et al.'s theorem 3.2 bound on ``Lip_2`` of one L2-MHA head with ``W^O = I``:
  ``sqrt(N) / sqrt(D/H) * (4 phi^{-1}(N - 1) + 1) * ||W^Q||_2^2 ||W^V||_2``."""
  sq = float(np.linalg.norm(np.asarray(w_q, np.float64), 2))
  sv = float(np.linalg.norm(np.asarray(w_v, np.float64), 2))
  return math.sqrt(n) / math.sqrt(features / heads) * (4 * phi_inverse(n - 1) + 1) * sq ** 2 * sv


# Measurements, each jitted once per metric and shape, with the weights and inputs as arguments.

def spectral_norm(fn, x) -> jax.Array:
  """``||J_fn(x)||_2`` from the materialised Jacobian (differentiable in ``x``)."""
  return jnp.linalg.norm(jax.jacfwd(fn)(x).reshape(x.size, x.size), 2)


@functools.partial(jax.jit, static_argnums=0)
def norms_at(metric, params, xs, length=None):
  """``||J(x)||_2`` for each ``x`` of ``xs [B, N, D]`` (``length``: see :func:`attend`)."""
  return jax.vmap(lambda x: spectral_norm(functools.partial(attend, metric, params, length=length), x))(xs)


@functools.partial(jax.jit, static_argnums=(0, 3))
def ascent(metric, params, x0s, steps, learning_rate, length=None):
  """Adam uphill on ``||J(x)||_2`` from each ``x0`` of ``x0s [B, N, D]``, unconstrained, as
  :func:`distattn_jax.analysis.lipschitz_lower_bound` (here jitted whole and batched over starts); returns the
  largest norm seen per start. ``length``: see :func:`attend` (the padded rows get zero gradients and stay)."""
  optimizer = optax.adam(learning_rate)
  fn = functools.partial(attend, metric, params, length=length)
  grad = jax.value_and_grad(lambda x: spectral_norm(fn, x))

  def one(x0):
    def step(carry, _):
      x, state, best = carry
      value, g = grad(x)
      updates, state = optimizer.update(-g, state, x)
      return (optax.apply_updates(x, updates), state, jnp.maximum(best, value)), None

    (x, _, best), _ = jax.lax.scan(step, (x0, optimizer.init(x0), jnp.zeros(())), None, length=steps)
    return jnp.maximum(best, spectral_norm(fn, x))

  return jax.vmap(one)(x0s)


@functools.partial(jax.jit, static_argnums=(0, 4))
def sphere_path(metric, params, x0, radii, steps, learning_rate):
  """For each radius ``r`` of ``radii`` in turn: the largest ``||J(x)||_2`` Adam finds on the sphere
  ``||x||_F = r`` (the iterate is ``r z / ||z||_F``), starting from the best point of the previous radius
  (``x0`` for the first), so a configuration that grows with the scale is carried up the radii rather than
  searched for afresh where the softmax has saturated and gradients vanish."""
  optimizer = optax.adam(learning_rate)
  fn = functools.partial(attend, metric, params)
  grad = jax.value_and_grad(lambda z, r: spectral_norm(fn, r * z / jnp.linalg.norm(z)))

  def radius(z0, r):
    def step(carry, _):
      z, state, best, best_z = carry
      value, g = grad(z, r)
      better = value > best
      best, best_z = jnp.where(better, value, best), jnp.where(better, z, best_z)
      updates, state = optimizer.update(-g, state, z)
      return (optax.apply_updates(z, updates), state, best, best_z), None

    (z, _, best, best_z), _ = jax.lax.scan(step, (z0, optimizer.init(z0), -jnp.ones(()), z0), None, length=steps)
    last = spectral_norm(fn, r * z / jnp.linalg.norm(z))
    best, best_z = jnp.where(last > best, last, best), jnp.where(last > best, z, best_z)
    return best_z / jnp.linalg.norm(best_z), best

  _, values = jax.lax.scan(radius, x0 / jnp.linalg.norm(x0), radii)
  return values


@functools.partial(jax.jit, static_argnums=(0, 3))
def power_norms(metric, params, xs, iterations):
  """``||J(x)||_2`` for each head ``params`` (leading axis B) at ``xs [B, N, D]``, by ``iterations`` of power
  iteration on ``J^T J`` (jvp and its transpose, as :func:`distattn_jax.analysis.jacobian_norm`'s
  ``"power_iteration"``); a lower estimate that converges to the norm."""

  def one(p, x):
    _, jvp = jax.linearize(functools.partial(attend, metric, p), x)
    vjp = jax.linear_transpose(jvp, x)

    def body(_, v):
      w = vjp(jvp(v))[0]
      return w / jnp.maximum(jnp.linalg.norm(w), 1e-30)

    v0 = jnp.ones_like(x) / np.sqrt(x.size)
    return jnp.linalg.norm(jvp(jax.lax.fori_loop(0, iterations, body, v0)))

  return jax.vmap(one)(params, xs)


def fit(x, y, g) -> tuple[float, float, float]:
  """Least squares ``y ~ a g(x) + b``: ``(a, b, rms residual)``."""
  gx = np.asarray([g(v) for v in x], np.float64)
  design = np.stack([gx, np.ones_like(gx)], axis=1)
  (a, b), *_ = np.linalg.lstsq(design, np.asarray(y, np.float64), rcond=None)
  return float(a), float(b), float(np.sqrt(np.mean((design @ [a, b] - y) ** 2)))


def slope(x, y) -> float:
  """The log-log slope of ``y`` against ``x`` (least squares)."""
  return fit(np.log(x), np.log(y), lambda v: v)[0]


LENGTH_LAWS = {
    "log N - log log N": lambda n: math.log(n) - math.log(math.log(n)),
    "W0((N-1)/e)": lambda n: phi_inverse(n - 1),
    "log N": math.log,
    "sqrt(N)": math.sqrt,
}


# Studies: each returns (markdown body, plot function or None).

def study_bounds(cfg):
  lengths, d = cfg["lengths"], cfg["features"]
  inputs = {n: jax.random.normal(jax.random.key(cfg["seed"] + n), (n, d)) for n in lengths}
  lines = [f"Lower bound on the Lipschitz constant (ord=2) by {cfg['steps']} Adam steps (learning rate "
           f"{cfg['learning_rate']}) on X [N, {d}] from X ~ N(0, 1):", "",
           "| head | " + " | ".join(f"N={n}" for n in lengths) + " |", "|---|" + "---|" * len(lengths)]
  for name in cfg["heads"]:
    fn = head_fn(name, d, cfg["seed"])
    bounds = [da.analysis.lipschitz_lower_bound(fn, inputs[n], steps=cfg["steps"],
                                                learning_rate=cfg["learning_rate"]).value for n in lengths]
    lines.append(f"| {name} | " + " | ".join(f"{float(b):.3g}" for b in bounds) + " |")
  return "\n".join(lines), None


def study_scale(cfg):
  n, d, scales = cfg["scale_length"], cfg["features"], np.asarray(cfg["scales"])
  x0 = jax.random.normal(jax.random.key(cfg["seed"] + 1000), (n, d))
  x_kim = x0.at[0].set(0.0)
  upper = scales >= np.median(scales)
  w = head_weights(d, cfg["seed"])
  rows, curves = [], {}
  radii = jnp.asarray(scales * float(jnp.linalg.norm(x0)), jnp.float32)
  row_scale = jnp.ones((len(scales), n, 1)).at[:, 0, 0].set(1 / jnp.asarray(scales, jnp.float32))
  for name in cfg["study_heads"]:
    metric, params = head_params(name, w)
    construction = np.asarray(norms_at(metric, params, jnp.asarray(scales, jnp.float32)[:, None, None] * x_kim))
    shrink = np.asarray(norms_at(metric, params, x0[None] * row_scale))
    sphere = np.asarray(sphere_path(metric, params, x0, radii, cfg["steps"], cfg["learning_rate"]))
    curves[name] = (construction, sphere, shrink)
    logging.info("scale: %s done", name)
    rows.append((name, construction, sphere, slope(scales[upper], construction[upper]),
                 slope(scales[upper], sphere[upper]), shrink, slope(scales[upper], shrink[upper])))
  bound = kim_theorem_bound(n, d, w[0], w[2])
  kim = dict((r[0], r) for r in rows).get("kim_l2")
  lines = [f"Spectral norm of the Jacobian of one head (D = {d}, N = {n}, weights N(0, 1/D), seed {cfg['seed']}) "
           f"as the inputs grow by c in {', '.join(f'{c:g}' for c in scales)}. `construction`: at c X0, X0 ~ "
           "N(0, 1) with its first row zero (Kim et al.'s proof of theorem 3.1). `sphere`: the largest norm "
           f"{cfg['steps']} Adam steps find on the sphere ||X||_F = c ||X0||_F, each radius starting from the "
           "previous radius's best point. `shrink`: at X0 with its first row divided by c (one token shrinking "
           f"towards 0 while the others stay). Slopes: log-log least squares over c >= {np.median(scales):g}.", "",
           "| head | construction, c = " + f"{scales[0]:g} | c = {scales[-1]:g} | slope | sphere, c = "
           f"{scales[0]:g} | c = {scales[-1]:g} | slope | shrink, c = {scales[-1]:g} | slope |",
           "|---|---|---|---|---|---|---|---|---|"]
  for name, con, sph, s_con, s_sph, shr, s_shr in rows:
    lines.append(f"| {name} | {con[0]:.3g} | {con[-1]:.3g} | {s_con:.2f} | {sph[0]:.3g} | {sph[-1]:.3g} | "
                 f"{s_sph:.2f} | {shr[-1]:.3g} | {s_shr:.2f} |")
  kim_max = float(max(kim[1].max(), kim[2].max(), kim[5].max())) if kim else float("nan")
  lines += [] if not kim else ["", f"Kim et al.'s theorem 3.2 bound for `kim_l2` at these weights (N = {n}, D = {d}, H = 1): "
            f"{bound:.4g}; the largest norm found at any scale, {kim_max:.4g}, is {kim_max / bound:.3g} of it."]

  def plot(path):
    plt = _pyplot()
    fig, axes = plt.subplots(1, 3, figsize=(15, 4.4), sharey=True)
    for ax, idx, title in ((axes[0], 0, "construction: c X0, first row zero"),
                           (axes[1], 1, "sphere: Adam on ||X|| = c ||X0||"),
                           (axes[2], 2, "shrink: X0, first row / c")):
      for name, curve in curves.items():
        style = "-" if name.endswith("_tied") or name == "kim_l2" else "--"
        ax.loglog(scales, curve[idx], style, marker=".", label=name, lw=2.2 if name in ("dot", "kim_l2") else 1)
      ax.axhline(bound, color="k", lw=0.8, ls=":", label="theorem 3.2 bound (kim_l2)")
      ax.set_xlabel("input scale c")
      ax.set_title(title, fontsize=9)
    axes[0].set_ylabel("||J||_2")
    axes[2].legend(fontsize=6, ncol=2)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)

  return "\n".join(lines), plot, {"slopes": {r[0]: (r[3], r[4]) for r in rows}, "kim_bound": bound,
                                  "kim_max": kim_max}


def cluster_start(key, n, d):
  """``[n, d]``: one token at 0 and the other ``n - 1`` in a tight cluster (jitter 0.05) at distance
  ``r = sqrt(max(1, log(n - 1)))``, where the first token gives the cluster about half its weight: the
  configuration behind the ``log N`` growth of the bound."""
  r = math.sqrt(max(1.0, math.log(max(n - 1, 1))))
  x = r / math.sqrt(d) + 0.05 * jax.random.normal(key, (n, d))
  return x.at[0].set(0.0)


def _length_sweep(name, lengths, d, cfg, weights, restarts, cluster=False):
  """Per N, the largest bound of ``restarts`` unconstrained ascents from ``X ~ N(0, 1)`` (and, with
  ``cluster``, of one from :func:`cluster_start`): ``(values, from random starts, from the cluster start)``."""
  metric, params = head_params(name, weights)
  random_best, cluster_best = [], []
  for n in lengths:
    key = jax.random.key(cfg["seed"] + n)
    x0s = jax.random.normal(key, (restarts, n, d))
    if cluster:
      x0s = jnp.concatenate([x0s, cluster_start(jax.random.fold_in(key, 1), n, d)[None]])
    length = None
    if cfg.get("pad_lengths"):  # one compilation for every N: pad to the largest, mask the padding
      x0s, length = jnp.pad(x0s, ((0, 0), (0, max(lengths) - n), (0, 0))), jnp.asarray(n, jnp.int32)
    found = np.asarray(ascent(metric, params, x0s, cfg["steps"], cfg["learning_rate"], length))
    random_best.append(float(found[:restarts].max()) if restarts else float("nan"))
    cluster_best.append(float(found[restarts:].max()) if cluster else float("nan"))
    logging.info("length: %s N=%d D=%d: %s", name, n, d, found)
  random_best, cluster_best = np.asarray(random_best), np.asarray(cluster_best)
  return np.fmax(random_best, cluster_best), random_best, cluster_best


def _fit_table(lengths, values) -> list[str]:
  lines = ["| law g(N) | a | b | rms residual |", "|---|---|---|---|"]
  for law, g in LENGTH_LAWS.items():
    a, b, rms = fit(lengths, values, g)
    lines.append(f"| {law} | {a:.3g} | {b:.3g} | {rms:.3g} |")
  return lines


def study_length(cfg):
  kim_n, head_n, d = cfg["kim_lengths"], cfg["head_lengths"], cfg["features"]
  one = jnp.ones((1, 1))
  kim, kim_random, kim_cluster = _length_sweep("kim_l2", kim_n, 1, cfg, (one, one, one), cfg["kim_restarts"],
                                               cluster=True)
  kim_bounds = [kim_theorem_bound(n, 1, one, one) for n in kim_n]
  lines = [f"Kim et al.'s head at D = H = 1, W^Q = W^V = 1: lower bounds by {cfg['steps']} Adam steps (learning "
           f"rate {cfg['learning_rate']}), the largest of {cfg['kim_restarts']} starts from X ~ N(0, 1) and of one "
           "from a cluster start (one token at 0, the others near sqrt(log(N - 1))), against their theorem 3.2 "
           "bound sqrt(N) (4 W0((N-1)/e) + 1):", "",
           "| N | " + " | ".join(str(n) for n in kim_n) + " |", "|---|" + "---|" * len(kim_n),
           "| from random starts | " + " | ".join(f"{v:.3g}" for v in kim_random) + " |",
           "| from the cluster start | " + " | ".join(f"{v:.3g}" for v in kim_cluster) + " |",
           "| lower bound | " + " | ".join(f"{v:.3g}" for v in kim) + " |",
           "| theorem 3.2 | " + " | ".join(f"{v:.3g}" for v in kim_bounds) + " |",
           "| ratio | " + " | ".join(f"{v / b:.3f}" for v, b in zip(kim, kim_bounds)) + " |", "",
           "Fits of the lower bound, a g(N) + b, least squares over every N:", ""] + _fit_table(kim_n, kim)
  weights = head_weights(d, cfg["seed"])
  curves = {name: _length_sweep(name, head_n, d, cfg, weights, 1)[0] for name in cfg["study_heads"]} if head_n else {}
  lines += [] if not curves else [
      "", f"Every head at D = {d} (weights N(0, 1/D), seed {cfg['seed']}): the lower bound from one start per N, "
      f"{cfg['steps']} Adam steps; the best law by rms residual, and the log-log slope. For a head "
            "that is not Lipschitz (see the scale table) the ascent's value grows with the steps and its N "
            "trend says little.", "",
            "| head | " + " | ".join(f"N={n}" for n in head_n) + " | best law | its rms | log-log slope |",
            "|---|" + "---|" * (len(head_n) + 3)]
  for name, values in curves.items():
    fits = {law: fit(head_n, values, g) for law, g in LENGTH_LAWS.items()}
    law = min(fits, key=lambda k: fits[k][2])
    lines.append(f"| {name} | " + " | ".join(f"{v:.3g}" for v in values) +
                 f" | {law} | {fits[law][2]:.3g} | {slope(head_n, values):.2f} |")

  def plot(path):
    plt = _pyplot()
    fig, axes = plt.subplots(1, 2 if curves else 1, figsize=(11 if curves else 5.5, 4.2), squeeze=False)
    axes = axes[0]
    ax = axes[0]
    grid = np.geomspace(min(kim_n), max(kim_n), 100)
    ax.plot(kim_n, kim, "o", label="kim_l2 lower bound (D = 1)")
    for law in ("log N - log log N", "sqrt(N)", "log N"):
      a, b, _ = fit(kim_n, kim, LENGTH_LAWS[law])
      ax.plot(grid, [a * LENGTH_LAWS[law](n) + b for n in grid], lw=1, label=f"fit a {law} + b")
    ax.plot(kim_n, kim_bounds, "k:", label="theorem 3.2 bound")
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlabel("N")
    ax.set_ylabel("||J||_2")
    ax.legend(fontsize=7)
    if curves:
      ax = axes[1]
      for name, values in curves.items():
        ax.loglog(head_n, values, "-" if name.endswith("_tied") or name == "kim_l2" else "--", marker=".",
                  label=name)
      ax.set_xlabel("N")
      ax.set_title(f"every head, D = {d}", fontsize=9)
      ax.legend(fontsize=6, ncol=2)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)

  fits = {law: fit(kim_n, kim, g) for law, g in LENGTH_LAWS.items()}
  return "\n".join(lines), plot, {"kim": kim.tolist(), "kim_bounds": kim_bounds, "kim_fits": fits}


def bounded_inputs(key, n, d):
  """``[n, d]`` rows uniform on the sphere of radius ``sqrt(d)`` (a LayerNorm'd token's norm)."""
  x = jax.random.normal(key, (n, d))
  return x / jnp.linalg.norm(x, axis=-1, keepdims=True) * np.sqrt(d)


def castin_norms(metric, params, xs, iterations, pad_to=None):
  """``||J(x)||_2`` per head ``params`` (leading axis B) at ``xs [B, N, D]``: by :func:`power_norms`, or exactly
  from the materialised Jacobian when ``iterations`` is 0 (cheaper to compile at toy sizes; then ``pad_to``
  pads N with masked tokens, as :func:`attend`, so that every N shares one compilation)."""
  if iterations:
    return power_norms(metric, params, xs, iterations)
  length = None
  if pad_to:
    xs, length = jnp.pad(xs, ((0, 0), (0, pad_to - xs.shape[1]), (0, 0))), jnp.asarray(xs.shape[1], jnp.int32)
  return jax.vmap(lambda p, x: norms_at(metric, p, x[None], length)[0])(params, xs)


def study_castin(cfg):
  lengths, d, seeds = cfg["castin_lengths"], cfg["features"], cfg["castin_seeds"]
  means = {}
  weights = [head_weights(d, cfg["seed"] + 100 + s) for s in range(seeds)]
  for name in cfg["study_heads"]:
    per_seed = [head_params(name, w) for w in weights]
    metric = per_seed[0][0]
    params = jax.tree.map(lambda *a: jnp.stack(a), *[p for _, p in per_seed])
    means[name] = np.asarray([float(np.mean(castin_norms(metric, params, jnp.stack(
        [bounded_inputs(jax.random.key(cfg["seed"] + 10_000 * s + n), n, d) for s in range(seeds)]),
        cfg["castin_iterations"], max(lengths) if cfg.get("pad_lengths") else None))) for n in lengths])
    logging.info("castin: %s %s", name, means[name])
  half = np.asarray(lengths) >= np.median(lengths)
  lines = [f"Spectral norm of the Jacobian at random bounded inputs (rows uniform on the sphere of radius "
           f"sqrt(D), D = {d}), mean over {seeds} random heads and inputs (weights N(0, 1/D)), by " +
           (f"{cfg['castin_iterations']} power iterations; " if cfg["castin_iterations"] else "the exact norm; ") +
           f"exponents: log-log slope over every N and over N >= {np.median(lengths):g}. Castin et al.'s bound "
           "on bounded inputs grows as sqrt(N) (exponent 0.5).", "",
           "| head | " + " | ".join(f"N={n}" for n in lengths) + " | exponent | exponent, upper half |",
           "|---|" + "---|" * (len(lengths) + 2)]
  exps = {}
  for name, values in means.items():
    exps[name] = (slope(lengths, values), slope(np.asarray(lengths)[half], values[half]))
    lines.append(f"| {name} | " + " | ".join(f"{v:.3g}" for v in values) +
                 f" | {exps[name][0]:.2f} | {exps[name][1]:.2f} |")

  def plot(path):
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(6.5, 4.2))
    for name, values in means.items():
      ax.loglog(lengths, values, "-" if name.endswith("_tied") or name == "kim_l2" else "--", marker=".",
                label=name, lw=2.2 if name == "dot" else 1)
    ref = means.get("dot", next(iter(means.values())))[0] * np.sqrt(np.asarray(lengths) / lengths[0])
    ax.loglog(lengths, ref, "k:", label="sqrt(N) (Castin et al.)")
    ax.set_xlabel("N")
    ax.set_ylabel("||J||_2 at random bounded inputs")
    ax.legend(fontsize=6, ncol=2)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)

  return "\n".join(lines), plot, {"exponents": exps}


TRAINED_SETTINGS = dict(num_heads=4, width=64)  # the robustness study's (configs/ablate.py, suite cpu) encoder


@functools.partial(jax.jit, static_argnums=(0, 1, 4))
def layer_norms(metric, num_heads, params, xs, iterations):
  """``||J(x)||_2`` of one trained encoder's first attention layer (``DistanceBasedAttention``: projections with
  biases, its lam, ``p`` and metric weights where it has them, the output projection; ``[N, width] -> [N,
  width]``) for each layer ``params`` (leading axis B) at ``xs [B, N, width]``, by ``iterations`` of power
  iteration on ``J^T J`` (as :func:`distattn_jax.analysis.jacobian_norm`'s ``"power_iteration"``)."""
  module = da.DistanceBasedAttention(num_heads=num_heads, metric=metric, learnable_lambda=True, p=P)

  def one(p, x):
    _, jvp = jax.linearize(lambda x: module.apply({"params": p}, x[None])[0], x)
    vjp = jax.linear_transpose(jvp, x)

    def body(_, v):
      w = vjp(jvp(v))[0]
      return w / jnp.maximum(jnp.linalg.norm(w), 1e-30)

    v = jax.lax.fori_loop(0, iterations, body, jnp.ones_like(x) / np.sqrt(x.size))
    return jnp.linalg.norm(jvp(v))

  return jax.vmap(one)(params, xs)


def _trained_cells(cell_dir: pathlib.Path, task: str, metric: str) -> list[pathlib.Path]:
  return sorted(cell_dir.glob(f"{task}__{metric}__*.msgpack"), key=lambda f: int(f.stem.rsplit("__", 1)[1]))


def _token_pool(task: str, metric: str, params, examples: int = 64) -> np.ndarray:
  """The inputs of the first attention layer of the trained classifier on its first ``examples`` test examples
  (``ln_attention`` of the embedded, position-added tokens), real positions only: ``[tokens, width]``."""
  from distattn_jax.data import tasks as tasks_lib  # pylint: disable=import-outside-toplevel
  from distattn_jax.training import cells  # pylint: disable=import-outside-toplevel
  data = tasks_lib.load(task)
  model = cells.model_for(task, data, metric, "learned", dict(
      width=TRAINED_SETTINGS["width"], depth=len([k for k in params["trunk"] if k.startswith("block_")]),
      num_heads=TRAINED_SETTINGS["num_heads"], mlp_dim=params["trunk"]["block_0"]["mlp"]["fc_in"]["kernel"].shape[1],
      p=P, pooling="cls" if "cls" in params else "mean"))
  batch = data.eval_batches(examples, limit=examples)[0]
  _, state = model.apply({"params": params}, batch["inputs"], batch["lengths"], capture_intermediates=True,
                         mutable=["intermediates"])
  y = np.asarray(state["intermediates"]["trunk"]["block_0"]["ln_attention"]["__call__"][0])
  real = np.arange(y.shape[1])[None, :] < batch["lengths"][:, None] + (1 if "cls" in params else 0)
  return y[real]


def study_trained(cfg):
  cell_dir, lengths = pathlib.Path(cfg["trained_dir"]), cfg["trained_lengths"]
  found = {(t, m): _trained_cells(cell_dir, t, m) for t in cfg["trained_tasks"] for m in cfg["trained_metrics"]}
  missing = [f"{t}/{m}" for (t, m), files in found.items() if not files]
  if missing:
    raise app.UsageError(
        f"--studies=trained needs the robustness study's trained classifiers in --trained_dir={cell_dir} "
        f"(<task>__<metric>__<seed>.msgpack); none for {', '.join(missing)}. Make them with `{ROBUSTNESS_COMMAND}` "
        "(about 15 minutes on two cores) or point --trained_dir at another <suite>.cells folder.")
  from flax import serialization  # pylint: disable=import-outside-toplevel
  heads, width, its = TRAINED_SETTINGS["num_heads"], TRAINED_SETTINGS["width"], cfg["castin_iterations"] or 100
  results, lams = {}, {}
  for (task, metric), files in found.items():
    models = [serialization.msgpack_restore(f.read_bytes()) for f in files]
    trained = [m["trunk"]["block_0"]["attention"] for m in models]
    module = da.DistanceBasedAttention(num_heads=heads, metric=metric, learnable_lambda=True, p=P)
    random = [module.init(jax.random.key(cfg["seed"] + s), jnp.ones((1, 4, width)))["params"]
              for s in range(len(trained))]
    lams[task, metric] = (float(np.mean([np.exp(t["log_lambda"]) for t in trained])),
                          float(np.mean([np.exp(r["log_lambda"]) for r in random])))
    stacked = jax.tree.map(lambda *a: jnp.stack([jnp.asarray(v, jnp.float32) for v in a]), *(trained + random))
    pools = [_token_pool(task, metric, m) for m in models]
    for kind in ("normal", "tokens"):
      per_n = []
      for n in lengths:
        rng = np.random.default_rng(cfg["seed"] + n)
        if kind == "normal":
          xs = [rng.standard_normal((n, width)) for _ in trained]
        else:  # n tokens drawn from the trained model's own pool (with replacement only past its size)
          xs = [pool[rng.choice(len(pool), n, replace=n > len(pool))] for pool in pools]
        xs = jnp.asarray(np.stack(xs + xs), jnp.float32)  # the random layers see the trained layers' inputs
        per_n.append(np.asarray(layer_norms(metric, heads, stacked, xs, its)))
      per_n = np.stack(per_n, axis=1)  # [2 * seeds, N]
      results[task, metric, kind] = (per_n[:len(trained)].mean(0), per_n[len(trained):].mean(0), len(trained))
      logging.info("trained: %s %s %s %s", task, metric, kind, per_n)
  half = np.asarray(lengths) >= np.median(lengths)
  lines = [f"Spectral norm of the Jacobian of the first attention layer of the robustness study's classifiers "
           f"(`{cell_dir}`; width {width}, {heads} heads; the layer with its projections, trained lam, p and "
           "metric weights, [N, width] -> [N, width], without the residual) against N, beside the same layer "
           f"at initialisation (seeds {cfg['seed']}..., the calibrated lam), mean over the seeds found, by {its} "
           "power iterations. Inputs: `normal`, X ~ N(0, 1) (the scale of a LayerNorm'd token); `tokens`, N "
           "tokens drawn from the first 64 test examples' inputs to that layer in the trained model (ln_attention "
           "of the embedded tokens plus positions; drawn with replacement past the pool's size), the same X "
           "for the trained and the random layer. Exponent: log-log slope over every N (and over N >= "
           f"{np.median(lengths):g}). lam: mean over heads and seeds.", ""]
  for task in cfg["trained_tasks"]:
    for kind in ("normal", "tokens"):
      lines += [f"{task}, {kind} inputs:", "",
                "| metric | seeds | lam trained (init) | trained " + " | ".join(f"N={n}" for n in lengths) +
                " | exponent (upper) | random " + " | ".join(f"N={n}" for n in lengths) + " | exponent (upper) |",
                "|---|---|---|" + "---|" * (2 * len(lengths) + 2)]
      for metric in cfg["trained_metrics"]:
        tr, rd, seeds = results[task, metric, kind]
        fmt = lambda v: " | ".join(f"{x:.3g}" for x in v)  # noqa: E731
        exps = [(slope(lengths, v), slope(np.asarray(lengths)[half], v[half])) for v in (tr, rd)]
        lines.append(f"| {metric} | {seeds} | {lams[task, metric][0]:.3g} ({lams[task, metric][1]:.3g}) | "
                     f"{fmt(tr)} | {exps[0][0]:.2f} ({exps[0][1]:.2f}) | {fmt(rd)} | "
                     f"{exps[1][0]:.2f} ({exps[1][1]:.2f}) |")
      lines.append("")

  def plot(path):
    plt = _pyplot()
    tasks = cfg["trained_tasks"]
    fig, axes = plt.subplots(len(tasks), 2, figsize=(11, 4 * len(tasks)), squeeze=False)
    for row, task in zip(axes, tasks):
      for ax, kind in zip(row, ("normal", "tokens")):
        for i, metric in enumerate(cfg["trained_metrics"]):
          tr, rd, _ = results[task, metric, kind]
          ax.loglog(lengths, tr, "-", marker=".", color=f"C{i}", label=f"{metric} trained")
          ax.loglog(lengths, rd, ":", color=f"C{i}", label=f"{metric} random")
        ax.set_title(f"{task}, {kind} inputs", fontsize=9)
        ax.set_xlabel("N")
        ax.set_ylabel("||J||_2, first attention layer")
    axes[0][1].legend(fontsize=6, ncol=2)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)

  return "\n".join(lines).rstrip(), plot, {"results": results, "lams": lams}


def _pyplot():
  import matplotlib  # pylint: disable=import-outside-toplevel
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt  # pylint: disable=import-outside-toplevel
  return plt


STUDY_FNS = {"bounds": study_bounds, "scale": study_scale, "length": study_length, "castin": study_castin,
             "trained": study_trained}

# Four heads over four metrics (dot product, a tied gram-form distance, an elementwise one and Kim's head), two
# lengths per sweep: each metric and shape compiles once.
QUICK = {"lengths": [4], "heads": ["dot", "kim_l2"], "study_heads": ["dot", "l2_tied", "l1", "kim_l2"], "steps": 8,
         "scales": [1.0, 4.0, 16.0], "scale_length": 4, "kim_lengths": [2, 8], "kim_restarts": 1,
         "head_lengths": [2, 4], "castin_lengths": [2, 8], "castin_seeds": 1, "castin_iterations": 0, "features": 2, "pad_lengths": True}


def config_from_flags() -> dict:
  cfg = {"lengths": [int(n) for n in FLAGS.lengths], "heads": list(FLAGS.heads),
         "study_heads": list(FLAGS.study_heads), "features": FLAGS.features,
         "steps": FLAGS.steps, "learning_rate": FLAGS.learning_rate, "seed": FLAGS.seed,
         "scales": [float(c) for c in FLAGS.scales], "scale_length": FLAGS.scale_length,
         "kim_lengths": [int(n) for n in FLAGS.kim_lengths], "kim_restarts": FLAGS.kim_restarts,
         "head_lengths": [int(n) for n in FLAGS.head_lengths],
         "castin_lengths": [int(n) for n in FLAGS.castin_lengths], "castin_seeds": FLAGS.castin_seeds,
         "castin_iterations": FLAGS.castin_iterations, "trained_dir": FLAGS.trained_dir,
         "trained_tasks": list(FLAGS.trained_tasks), "trained_metrics": list(FLAGS.trained_metrics),
         "trained_lengths": [int(n) for n in FLAGS.trained_lengths]}
  if FLAGS.quick:
    cfg.update(QUICK)
  for flag in ("heads", "study_heads"):
    for name in cfg[flag]:
      if name not in ALL_HEADS:
        raise app.UsageError(f"--{flag}: {name!r} is not one of {ALL_HEADS}")
  return cfg


def machine_line() -> str:
  from distattn_jax.training import host  # pylint: disable=import-outside-toplevel
  m = host.machine()
  return (f"{m['processor']}, {m['cpu_count']} CPUs, {m['backend']} backend, jax {m['jax']}, python "
          f"{m['python']}, distattn_jax {m['distattn_jax']}")


def run_study(study: str, cfg: dict, out: pathlib.Path | None, command: str) -> dict:
  """Runs one study; writes ``<out>/<study>.md`` (and ``.png``) when ``out`` is set; returns its summary."""
  start = time.perf_counter()
  body, plot, *summary = STUDY_FNS[study](cfg)
  wall = time.perf_counter() - start
  text = (f"Command: `{command}`\n\nMachine: {machine_line()}\n\nWall time: {wall:.1f} s\n\n{body}\n")
  print(f"## {study}\n\n{text}")
  if out is not None:
    out.mkdir(parents=True, exist_ok=True)
    (out / f"{study}.md").write_text(text)
    if plot is not None:
      plot(out / f"{study}.png")
  return {"wall_s": wall, **(summary[0] if summary else {})}


def main(argv) -> None:
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments {argv[1:]}: every input is a flag")
  unknown = set(FLAGS.studies) - set(STUDIES)
  if unknown:
    raise app.UsageError(f"--studies: {sorted(unknown)} not among {STUDIES}")
  cfg = config_from_flags()
  out = pathlib.Path(FLAGS.out) if FLAGS.out else None
  command = " ".join([".venv/bin/python experiments/lipschitz.py"] + [shlex.quote(a) for a in sys.argv[1:]])
  for study in FLAGS.studies:
    run_study(study, cfg, out, command)


if __name__ == "__main__":
  app.run(main)
