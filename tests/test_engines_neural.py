"""The neural engine: presets compute the same function, stages compose in order, lam calibration hits its
target as measured from the model's own attention weights."""

import jax
import numpy as np
import pytest

from distattn_jax import engines
from distattn_jax.engines import neural
from distattn_jax.models import TruthGPT, TruthGPTConfig

CONFIG = TruthGPTConfig(vocab_size=64, width=32, depth=2, num_heads=2, mlp_dim=64, max_len=32)


@pytest.fixture(scope="module")
def setup():
  tokens = np.random.default_rng(0).integers(0, 64, (2, 32)).astype(np.int32)
  params = jax.jit(TruthGPT(CONFIG).init)(jax.random.key(0), tokens)["params"]  # eager init: ~10 s of dispatch
  return neural.base_setup(CONFIG, params, tokens)


@pytest.mark.slow
def test_stages_compose_in_order_and_the_presets_agree(setup):
  full = neural.build_level("full")
  assert full.names == ("kernel", "bf16", "remat", "jit")
  out = full(setup)
  assert out["model_config"].implementation == "blockwise" and out["model_config"].dtype == "bfloat16"
  assert len(out["wrappers"]) == 2 and out["wrappers"][1] is jax.jit and setup["wrappers"] == ()
  reference = np.asarray(TruthGPT(CONFIG).apply({"params": setup["params"]}, setup["tokens"]))
  scale = reference.std()
  # Oracle: the unoptimised model applied directly. float32 levels agree to round-off, bf16 within 10% of std.
  for level, tolerance in (("basic", neural.FLOAT32_TOLERANCE), ("advanced", neural.FLOAT32_TOLERANCE),
                           ("full", neural.BF16_TOLERANCE)):
    logits = np.asarray(neural.apply_fn(neural.build_level(level)(setup))(setup["params"], setup["tokens"]))
    assert np.max(np.abs(logits - reference)) / scale <= tolerance, level


@pytest.mark.slow
def test_compare_levels_reports_time_and_memory_side_by_side(setup):
  rows, checks = neural.compare_levels(setup, ("basic", "full"), repeats=2)
  assert set(rows) == {"basic", "full"} and rows["basic"]["max_deviation_from_basic"] == 0.0
  for row in rows.values():
    assert row["forward_seconds"] > 0 and row["forward_temp_bytes"] is not None and row["grad_temp_bytes"] > 0
  assert len(checks) == 1 and checks[0].passed and checks[0].value == rows["full"]["max_deviation_from_basic"]


def test_calibrate_lambda_reaches_the_target_spread(setup):
  out = engines.build({"engine": "neural", "stages": "calibrate_lambda",
                       "calibrate_lambda": {"target_spread": 2.0}})(setup)
  # Independent measurement: logits recomputed from the captured queries and keys of layer 0 with the
  # calibrated lam (l1 distance in numpy), their std over visible keys averaged over batch and queries.
  _, state = TruthGPT(CONFIG).apply({"params": out["params"]}, setup["tokens"], capture_intermediates=True,
                                    mutable=["intermediates"])
  attn = state["intermediates"]["trunk"]["block_0"]["attention"]
  q = np.asarray(attn["query"]["__call__"][0], np.float64)  # [batch, length, heads, head_dim]
  k = np.asarray(attn["key"]["__call__"][0], np.float64)
  lam = np.exp(np.asarray(out["params"]["trunk"]["block_0"]["attention"]["log_lambda"], np.float64))
  d = np.abs(q[:, :, None] - k[:, None, :]).sum(-1)  # [batch, q, k, heads]
  logits = -lam * d / np.sqrt(q.shape[-1])
  length = q.shape[1]
  spreads = [logits[:, i, : i + 1].std(axis=1).mean(axis=0) for i in range(1, length)]
  np.testing.assert_allclose(np.mean(spreads, axis=0), 2.0, rtol=0.02)
  assert setup["params"] is not out["params"]  # the input setup is untouched


def test_a_user_registered_stage_runs_in_a_level(setup):
  @engines.register("neural", "scale_logits")
  def scale_logits(factor: float = 2.0):
    def stage(s):
      return {**s, "wrappers": s["wrappers"] + (lambda f: (lambda p, t: factor * f(p, t)),)}
    return stage

  pipe = neural.build_level("mine", {"scale_logits": {"factor": 3.0}}, presets={"mine": "scale_logits,jit"})
  base = neural.apply_fn(setup)(setup["params"], setup["tokens"])
  np.testing.assert_allclose(neural.apply_fn(pipe(setup))(setup["params"], setup["tokens"]), 3.0 * base,
                             rtol=1e-5, atol=1e-5)
  with pytest.raises(ValueError, match="optimization_level='turbo' must be one of basic, advanced, full"):
    neural.build_level("turbo")
  with pytest.raises(ValueError, match="implementation='nope' must be 'auto' or one of"):
    engines.build({"engine": "neural", "stages": "kernel", "kernel": {"implementation": "nope"}})
