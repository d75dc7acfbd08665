"""The tour that `make tour` prints: it runs, and the numbers it reports are consistent with each other."""

import re

import numpy as np
import pytest

import distattn_jax as da
import examples  # experiments/ is on pytest's pythonpath (pyproject.toml)


def check_metric_sections(out: str) -> None:
  for name in ("l1", "l2", "sqeuclidean", "lp (p=3)", "cosine", "chebyshev", "weighted_l1 (w=0.25..2)", "weighted_l2 (w=0.25..2)",
               "dot (similarity)"):
    assert re.search(rf"^  {re.escape(name)}\s+-?\d", out, re.M), name
  # Section 2 prints attention distributions, one per metric: each row's weights sum to 1 (to the printed 3
  # decimals).
  rows = re.findall(r"weights ((?:\d\.\d{3}\s*){4})", out)
  assert len(rows) == len(da.metrics.DistanceType)
  assert all(abs(sum(map(float, r.split())) - 1) < 3e-3 for r in rows)


def test_the_tours_metric_sections_print_every_metric_and_distributions_that_sum_to_one(capsys):
  # Sections 1 and 2 alone, for make test-fast; the whole tour below runs them again in make test.
  examples.tour_metrics()
  check_metric_sections(capsys.readouterr().out)


@pytest.mark.slow
def test_tour_prints_every_metric_and_a_lambda_step_that_lowers_the_loss(capsys):
  examples.main([])
  out = capsys.readouterr().out
  check_metric_sections(out)
  before, after = map(float, re.search(r"loss: ([\d.]+) -> ([\d.]+)", out).groups())
  assert after < before
  # Section 5 registers Huber: its value on a hand-computed pair, then training with it lowers the loss.
  assert "huber(x_0, x_j) = [0.0000, 2.6250]" in out
  before, after = map(float, re.search(r"metric='huber': loss ([\d.]+) -> ([\d.]+)", out).groups())
  assert after < before - 0.1
  # Section 6: the NNX model keeps nnx.MultiHeadAttention's parameters, adds log_lambda at the l1 default for
  # head_dim 8, and training with the trainer's lambda group lowers the loss and moves every head's lam.
  assert "added: ['log_lambda']" in out
  before, after = map(float, re.search(r"nnx loss ([\d.]+) -> ([\d.]+)", out).groups())
  assert after < before - 1.0
  lam0, lam = (np.asarray(v.split(", "), float) for v in re.search(r"nnx lam: \[(.*)\] -> \[(.*)\]", out).groups())
  np.testing.assert_allclose(lam0, da.initializers.default_lambda("l1", 8, 2.0), atol=5e-5)  # printed to 4 places
  assert np.all(np.abs(lam / lam0 - 1) > 0.1)
