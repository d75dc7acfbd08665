"""Attention statistics against closed forms, the sown weights against distance_attention, lam history, plots;
Jacobian norms and Lipschitz lower bounds against numpy's SVD, row sums and closed forms."""

import os
import subprocess
import sys

import chex
import jax
import jax.numpy as jnp
import matplotlib.image
import numpy as np
import pytest

import distattn_jax as da
from distattn_jax import analysis
from distattn_jax.models import TruthGPT, TruthGPTConfig

import scripts  # tests/scripts.py

T = 6


def uniform_causal(t=T):
  return np.tril(np.ones((t, t))) / np.arange(1, t + 1)[:, None]


def test_closed_forms_for_uniform_self_and_first_token_attention():
  rows = np.arange(T)
  weights = np.stack([uniform_causal(), np.eye(T), np.eye(T)[[0] * T]])[None]  # heads: uniform, self, first
  stats = analysis.attention_statistics(jnp.asarray(weights))
  # Uniform causal row i: entropy ln(i + 1), max 1 / (i + 1), mean distance sum_{j<=i} (i - j) / (i + 1) = i / 2.
  np.testing.assert_allclose(stats["entropy"], [np.mean(np.log(rows + 1)), 0.0, 0.0], atol=1e-6)
  np.testing.assert_allclose(stats["max_weight"], [np.mean(1 / (rows + 1)), 1.0, 1.0], rtol=1e-6)
  np.testing.assert_allclose(stats["mean_distance"], [np.mean(rows / 2), 0.0, np.mean(rows)], rtol=1e-6)


def test_statistics_average_over_the_batch_and_place_queries_last_when_shorter_than_keys():
  # Two queries at key positions 4 and 5 of 6, each attending to key 0: distances 4 and 5.
  weights = np.zeros((2, 1, 2, 6))
  weights[0, 0, :, 0] = 1.0
  weights[1, 0, :, :] = 1 / 6  # uniform over all six keys: entropy ln 6
  stats = analysis.attention_statistics(jnp.asarray(weights))
  uniform_distance = np.mean([np.mean(np.abs(i - np.arange(6))) for i in (4, 5)])
  np.testing.assert_allclose(stats["mean_distance"], [(4.5 + uniform_distance) / 2], rtol=1e-6)
  np.testing.assert_allclose(stats["entropy"], [np.log(6) / 2], rtol=1e-6)


def small_model(metric="l1", **fields):
  config = TruthGPTConfig(width=16, depth=2, num_heads=2, mlp_dim=32, max_len=16, metric=metric, **fields)
  tokens = jnp.asarray(np.random.default_rng(0).integers(0, 256, (2, 8)), jnp.int32)
  model = TruthGPT(config)
  return model, model.init(jax.random.key(0), tokens)["params"], tokens


@pytest.mark.slow
def test_sown_weights_are_the_first_layers_distance_attention_weights():
  model, params, tokens = small_model("l2")
  weights = analysis.attention_weights(model, params, tokens)
  assert len(weights) == 2 and weights[0].shape == (2, 2, 8, 8)
  _, state = model.apply({"params": params}, tokens, capture_intermediates=True, mutable=["intermediates"])
  y = state["intermediates"]["trunk"]["block_0"]["ln_attention"]["__call__"][0]
  p = params["trunk"]["block_0"]["attention"]
  project = lambda w: jnp.einsum("blf,fhd->blhd", y, w["kernel"]) + w["bias"][None, None]
  _, want = da.distance_attention(project(p["query"]), project(p["key"]), project(p["value"]), metric="l2",
                                  lam=jnp.exp(p["log_lambda"]), is_causal=True, return_weights=True)
  chex.assert_trees_all_close(weights[0], want, rtol=1e-5, atol=1e-6)


@pytest.mark.slow
def test_per_layer_report_holds_bounded_statistics_lambda_and_p():
  model, params, tokens = small_model("lp", p=3.0, learnable_p=True)
  layers = analysis.analyze_attention_patterns(model, params, tokens)
  rows = np.arange(8)
  for i, layer in enumerate(layers):
    assert layer["layer"] == i
    # Causal rows over i + 1 keys: entropy in [0, ln(i + 1)], max weight in [1 / (i + 1), 1], distance in [0, i].
    assert all(0 <= e <= np.mean(np.log(rows + 1)) + 1e-6 for e in layer["entropy"])
    assert all(np.mean(1 / (rows + 1)) - 1e-6 <= m <= 1 for m in layer["max_weight"])
    assert all(0 <= d <= np.mean(rows) for d in layer["mean_distance"])
    attention = params["trunk"][f"block_{i}"]["attention"]
    np.testing.assert_allclose(layer["lambda"], np.exp(attention["log_lambda"]), rtol=1e-6)
    np.testing.assert_allclose(layer["p"], 3.0, rtol=1e-6)


def test_lambda_history_collects_each_heads_values_from_train_records():
  records = [{"step": 0, "split": "eval", "bits_per_byte": 8.0},
             {"step": 5, "split": "train", "block_0/attention/lambda": [1.0, 2.0], "block_0/attention/p": 3.0},
             {"step": 10, "split": "train", "block_0/attention/lambda": [1.5, 2.5], "block_0/attention/p": 2.5}]
  history = analysis.lambda_history(records)
  steps, values = history["block_0/attention/lambda"]
  assert steps == [5, 10]
  np.testing.assert_array_equal(values, [[1.0, 2.0], [1.5, 2.5]])
  np.testing.assert_array_equal(history["block_0/attention/p"][1], [[3.0], [2.5]])


@pytest.mark.slow
def test_plots_are_png_images_with_one_panel_per_statistic_or_head(tmp_path):
  model, params, tokens = small_model()
  layers = analysis.analyze_attention_patterns(model, params, tokens)
  analysis.plot_statistics(layers, tmp_path / "stats.png")
  analysis.plot_attention_maps(analysis.attention_weights(model, params, tokens[:1]), tmp_path / "maps.png")
  history = analysis.lambda_history([{"step": s, "split": "train", "block_0/attention/lambda": [1.0, s]}
                                     for s in (1, 2)])
  analysis.plot_lambda_history(history, tmp_path / "lambda.png")
  for name in ("stats.png", "maps.png", "lambda.png"):
    assert (tmp_path / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
  # statistics: 4 panels of 3.2 inches side by side at 100 dpi; maps: 2 heads by 2 layers of 2.2 inches.
  assert matplotlib.image.imread(tmp_path / "stats.png").shape[1] == 4 * 320
  assert matplotlib.image.imread(tmp_path / "maps.png").shape[:2] == (440, 440)


# Jacobian norms and Lipschitz lower bounds (Kim et al., 2021), against numpy's SVD and row sums.


def _linear(rows, cols, seed=0):
  a = (np.random.default_rng(seed).standard_normal((rows, cols)) / np.sqrt(cols)).astype(np.float32)
  return a, (lambda x: jnp.asarray(a) @ x), jnp.asarray(np.random.default_rng(seed + 1).standard_normal(cols),
                                                        jnp.float32)


def test_jacobian_norm_of_a_linear_map_is_its_largest_singular_value_and_largest_row_sum():
  for rows, cols in [(7, 5), (5, 9)]:  # both sides of the jacfwd / jacrev choice
    a, f, x = _linear(rows, cols)
    spectral = analysis.jacobian_norm(f, x)
    assert spectral.method == "exact" and spectral.iterations == 0
    np.testing.assert_allclose(spectral.value, np.linalg.svd(a.astype(np.float64), compute_uv=False)[0], rtol=1e-5)
    row_sum = np.abs(a.astype(np.float64)).sum(axis=1).max()
    np.testing.assert_allclose(analysis.jacobian_norm(f, x, ord=np.inf).value, row_sum, rtol=1e-6)
    # Row blocks of 2 rows (max_exact_entries below the Jacobian's size) give the same maximum.
    by_rows = analysis.jacobian_norm(f, x, ord="inf", max_exact_entries=2 * cols)
    np.testing.assert_allclose(by_rows.value, row_sum, rtol=1e-6)


def test_power_iteration_converges_to_the_largest_singular_value():
  a, f, x = _linear(48, 32)
  sigma = np.linalg.svd(a.astype(np.float64), compute_uv=False)
  result = analysis.jacobian_norm(f, x, method="power_iteration", iterations=1000, tol=1e-7)
  assert result.method == "power_iteration" and 1 < result.iterations < 1000  # stopped by tol, not the cap
  # Gap sigma_2 / sigma_1 here is about 0.9 (printed on failure); float32 rounding bounds the agreement.
  np.testing.assert_allclose(result.value, sigma[0], rtol=1e-4, err_msg=f"sigma_2/sigma_1 = {sigma[1] / sigma[0]}")
  # "auto" switches to power iteration above max_exact_entries.
  assert analysis.jacobian_norm(f, x, max_exact_entries=100).method == "power_iteration"


@pytest.mark.slow
def test_jacobian_norm_of_self_attention_agrees_between_exact_and_power_iteration():
  x = jnp.asarray(np.random.default_rng(3).standard_normal((5, 1, 4)), jnp.float32)  # [T, heads, D]

  def attend(x):
    return da.distance_attention(x, x, x, metric="l2", lam=1.0)

  exact = analysis.jacobian_norm(attend, x, method="exact")
  power = analysis.jacobian_norm(attend, x, method="power_iteration", iterations=1000, tol=1e-7)
  assert exact.method == "exact" and power.method == "power_iteration"
  np.testing.assert_allclose(power.value, exact.value, rtol=1e-4)


def test_jacobian_norm_rejects_bad_arguments():
  _, f, x = _linear(3, 2)
  for kwargs, match in [({"ord": 1}, "ord must be 2 or inf"), ({"method": "svd"}, "method must be one of"),
                        ({"ord": np.inf, "method": "power_iteration"}, r"\(ord=2\) only"),
                        ({"iterations": 0}, "iterations must be a positive int")]:
    with pytest.raises(ValueError, match=match):
      analysis.jacobian_norm(f, x, **kwargs)
  with pytest.raises(TypeError, match="floating-point"):
    analysis.jacobian_norm(f, jnp.arange(2))


def test_lipschitz_lower_bound_of_a_linear_map_is_its_norm():
  a, f, x = _linear(6, 4)
  bound = analysis.lipschitz_lower_bound(f, x, steps=3)
  np.testing.assert_allclose(bound.value, np.linalg.svd(a.astype(np.float64), compute_uv=False)[0], rtol=1e-5)
  assert bound.history.shape == (4,) and bound.x.shape == x.shape


@pytest.mark.parametrize("method", ["exact", "power_iteration"])
def test_lipschitz_lower_bound_of_tanh_climbs_towards_but_never_past_the_norm_of_a(method):
  # J(x) = diag(1 - tanh^2(Ax)) A, so ||J(x)||_2 <= ||A||_2 with equality at Ax = 0 (x = 0 for square A).
  a, _, x0 = _linear(12, 12, seed=4)
  norm_a = np.linalg.svd(a.astype(np.float64), compute_uv=False)[0]
  bound = analysis.lipschitz_lower_bound(lambda x: jnp.tanh(jnp.asarray(a) @ x), x0, steps=60,
                                         learning_rate=0.1, method=method)
  assert bound.method == method
  np.testing.assert_allclose(bound.initial_value, analysis.jacobian_norm(
      lambda x: jnp.tanh(jnp.asarray(a) @ x), x0).value, rtol=1e-4)
  assert bound.initial_value <= bound.value <= norm_a * (1 + 1e-5)
  # The ascent closes at least half of the gap between the start and the supremum.
  assert bound.value - bound.initial_value >= 0.5 * (norm_a - bound.initial_value), (bound.history, norm_a)
  np.testing.assert_allclose(analysis.jacobian_norm(lambda x: jnp.tanh(jnp.asarray(a) @ x), bound.x).value,
                             bound.value, rtol=1e-4)


@pytest.mark.slow
def test_lipschitz_program_writes_one_row_of_bounds_per_head(tmp_path):
  result = scripts.run_script("lipschitz.py", "--studies=bounds", "--lengths=2", "--heads=dot,sqeuclidean_tied",
                              "--steps=1", f"--out={tmp_path}", timeout=300)
  assert result.returncode == 0, result.stderr[-2000:]
  rows = _table_rows((tmp_path / "bounds.md").read_text())
  assert [r[0] for r in rows] == ["head", "dot", "sqeuclidean_tied"]
  assert rows[0][1:] == ["N=2"]
  assert all(float(c) > 0 for r in rows[1:] for c in r[1:])  # a spectral norm of a non-constant map


def _table_rows(text):
  return [[c.strip() for c in line.split("|")[1:-1]] for line in text.splitlines()
          if line.startswith("| ") and not line.startswith("|---")]


LIPSCHITZ_HEADS = ["dot", "l2_tied", "l1", "kim_l2"]  # --quick's: dot product, gram-form, elementwise, Kim's


@pytest.mark.slow
def test_lipschitz_quick_studies_reproduce_kim_et_al_at_toy_sizes(tmp_path):
  # About 22 s on two shared cores with a cold compilation cache, mostly compiling one ascent per metric (every
  # length padded to the largest), hence slow.
  result = scripts.run_script("lipschitz.py", "--quick", f"--out={tmp_path}", timeout=600)
  assert result.returncode == 0, result.stderr[-2000:]
  texts = {s: (tmp_path / f"{s}.md").read_text() for s in ("bounds", "scale", "length", "castin")}
  for text in texts.values():
    assert text.startswith("Command: `.venv/bin/python experiments/lipschitz.py --quick")
    assert "Machine: " in text and "CPUs" in text and "Wall time: " in text
  for study in ("scale", "length", "castin"):
    assert matplotlib.image.imread(tmp_path / f"{study}.png").ndim == 3
  assert not (tmp_path / "trained.md").exists()  # --quick never needs trained parameters
  bounds = {r[0]: r[1:] for r in _table_rows(texts["bounds"])}
  assert set(bounds) == {"head", "dot", "kim_l2"} and all(float(v) > 0 for v in bounds["dot"] + bounds["kim_l2"])
  scale = {r[0]: r[1:] for r in _table_rows(texts["scale"])}
  assert [h for h in scale if h != "head"] == LIPSCHITZ_HEADS
  # Kim et al.'s theorem 3.1: at c X0 with a zero row, dot-product attention's Jacobian grows like c^2.
  assert float(scale["dot"][2]) > 1.5
  # Kim's L2 head and the tied L2 head do not grow (Lipschitz), at the construction and on the sphere.
  for head in ("kim_l2", "l2_tied"):
    assert abs(float(scale[head][2])) < 0.3 and float(scale[head][5]) < 0.3, (head, scale[head])
  # Theorem 3.2: every norm found for Kim's head stays below the bound computed for its weights.
  line = next(l for l in texts["scale"].splitlines() if l.startswith("Kim et al.'s theorem 3.2 bound"))
  bound, found = (float(v.rstrip(";,")) for v in (line.split(": ")[1].split()[0], line.split("scale, ")[1].split()[0]))
  assert 0 < found < bound
  length = _table_rows(texts["length"])
  kim = {r[0]: [float(v) for v in r[1:]] for r in length if r[0] in ("lower bound", "theorem 3.2")}
  assert all(0 < lo < hi for lo, hi in zip(kim["lower bound"], kim["theorem 3.2"]))
  assert {r[0] for r in length} >= {"log N - log log N", "sqrt(N)", "log N"} | set(LIPSCHITZ_HEADS)
  castin = {r[0]: [float(v) for v in r[1:]] for r in _table_rows(texts["castin"])[1:]}
  assert set(castin) == set(LIPSCHITZ_HEADS) and all(v > 0 for r in castin.values() for v in r[:2])


def test_lipschitz_trained_study_names_the_parameters_it_needs_and_the_command_that_makes_them(tmp_path):
  result = scripts.run_script("lipschitz.py", "--studies=trained", f"--trained_dir={tmp_path}", timeout=300)
  assert result.returncode != 0
  assert f"--trained_dir={tmp_path}" in result.stderr and "mnist1d/dot" in result.stderr
  assert "experiments/robustness.py --config=configs/robustness.py:suite=cpu" in result.stderr


@pytest.mark.slow
def test_lipschitz_program_helpers_against_scipy_and_the_library_ascent():
  # The program's Lambert W against scipy's, its theorem 3.2 bound at D = 1 against the closed form, and its
  # jitted unconstrained ascent against da.analysis.lipschitz_lower_bound from the same start.
  code = """
import math, sys
sys.path.insert(0, "experiments")
import jax, jax.numpy as jnp, numpy as np, scipy.special
import distattn_jax as da
import lipschitz as L
for z in (0.0, 1e-3, 0.5, 1.0, math.e, 100.0, 1e6):
  assert abs(L.lambert_w0(z) - scipy.special.lambertw(z).real) < 1e-12 * max(1, abs(scipy.special.lambertw(z).real)), z
for n in (2, 3, 10, 256):
  w = L.phi_inverse(n - 1)
  assert abs(w * math.exp(w + 1) - (n - 1)) < 1e-9 * n
  one = np.ones((1, 1))
  assert abs(L.kim_theorem_bound(n, 1, one, one) - math.sqrt(n) * (4 * w + 1)) < 1e-9 * n
# Scaling W^Q by s scales Kim's head's Lipschitz constant by s^2 (f_s(X) = s f_1(s X)); the bound must too.
w_q, _, w_v = L.head_weights(3, 0)
assert abs(L.kim_theorem_bound(5, 3, 2 * w_q, w_v) / L.kim_theorem_bound(5, 3, w_q, w_v) - 4) < 1e-5
metric, params = L.head_params("l2_tied", L.head_weights(3, 1))
x0 = jax.random.normal(jax.random.key(2), (4, 3))
ours = float(L.ascent(metric, params, x0[None], 20, 0.05)[0])
lib = float(da.analysis.lipschitz_lower_bound(lambda x: L.attend(metric, params, x), x0, steps=20,
                                              learning_rate=0.05).value)
assert abs(ours - lib) < 1e-4 * lib, (ours, lib)
norm = float(da.analysis.jacobian_norm(lambda x: L.attend(metric, params, x), x0).value)
stacked = jax.tree.map(lambda a: a[None], params)
assert abs(float(L.power_norms(metric, stacked, x0[None], 300)[0]) - norm) < 1e-4 * norm
assert abs(float(L.norms_at(metric, params, x0[None])[0]) - norm) < 1e-5 * norm
# --quick's padded ascent (one compilation for every N): the masked padding changes nothing.
padded = L.ascent(metric, params, jnp.pad(x0[None], ((0, 0), (0, 3), (0, 0))), 20, 0.05, jnp.asarray(4, jnp.int32))
assert abs(float(padded[0]) - ours) < 1e-4 * ours, (float(padded[0]), ours)
# The trained study's layer norms against the library's on a layer at initialisation (lam, p, biases, output).
module = da.DistanceBasedAttention(num_heads=4, metric="lp", learnable_lambda=True, p=L.P)
x = jax.random.normal(jax.random.key(3), (5, 64))
layer = module.init(jax.random.key(4), x[None])["params"]
norm = float(da.analysis.jacobian_norm(lambda x: module.apply({"params": layer}, x[None])[0], x).value)
ours = float(L.layer_norms("lp", 4, jax.tree.map(lambda a: a[None], layer), x[None], 300)[0])
assert abs(ours - norm) < 1e-3 * norm, (ours, norm)
print("ok")
"""
  env = {**os.environ, "PYTHONPATH": str(scripts.ROOT)}
  proc = subprocess.run([sys.executable, "-c", code], cwd=scripts.ROOT, capture_output=True, text=True, env=env,
                        timeout=300)
  assert proc.returncode == 0 and proc.stdout.strip() == "ok", proc.stderr[-3000:]


def test_lipschitz_lower_bound_in_the_max_norm_by_row_blocks_stays_below_the_largest_row_of_a():
  # ||J(x)||_inf = max_i (1 - tanh^2(a_i x)) |a_i|_1 <= max_i |a_i|_1, with equality where the best row has a_i x = 0.
  a, _, x0 = _linear(6, 4, seed=5)
  fn = lambda x: jnp.tanh(jnp.asarray(a) @ x)
  bound = analysis.lipschitz_lower_bound(fn, x0, ord=np.inf, steps=20, learning_rate=0.1, max_exact_entries=8)
  exact = analysis.lipschitz_lower_bound(fn, x0, ord=np.inf, steps=20, learning_rate=0.1)
  assert bound.method == exact.method == "exact"
  np.testing.assert_allclose(bound.initial_value, exact.initial_value, rtol=1e-6)
  assert bound.initial_value <= bound.value <= np.abs(a.astype(np.float64)).sum(axis=1).max() * (1 + 1e-6)
  assert bound.value > bound.initial_value  # the ascent moved uphill
