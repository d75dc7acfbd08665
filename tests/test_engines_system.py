"""Marketing and business engines (numbers recomputed from their inputs), TruthGPTCompleteSystem and the demo."""

import json
import pathlib

import numpy as np
import pytest
import scripts

from distattn_jax import engines
from distattn_jax.engines import business, marketing

ROOT = pathlib.Path(__file__).resolve().parents[1]
CELLS = """# made-up test inputs
channel,segment,half_saturation,max_response,shape,value,adstock
search,a,100,10,1.0,5,0.5
social,a,200,30,2.0,5,0.0
search,b,150,20,1.5,2,0.5
"""


def test_geometric_adstock_steady_state_is_the_rescaled_half_saturation():
  # A constant spend x has adstocked level x / (1 - decay) at steady state, so Hill(x / (1 - d); K) equals
  # Hill(x; K (1 - d)), the transform the adstock stage applies.
  decay, x = 0.6, 40.0
  level = marketing.geometric_adstock(np.full(200, x), decay)[-1]
  assert abs(level - x / (1 - decay)) < 1e-9
  k, s = 100.0, 1.7
  assert abs(level ** s / (level ** s + k ** s) - x ** s / (x ** s + (k * (1 - decay)) ** s)) < 1e-12


def test_marketing_reports_roi_from_the_curves_and_the_best_variant():
  config = marketing.default_config()
  config.load.cells = CELLS
  config.load.variants = "segment,variant,lift,cost\na,plain,1.0,0\na,great,2.0,1\na,costly,2.0,1e9\n"
  config.allocate.budget = 300.0
  report = marketing.run(config)
  a = report.results["allocation"]
  spend = np.array([c["spend"] for c in a["cells"]])
  # Recompute the revenue in numpy from the CSV's numbers and the adstock-rescaled half saturation.
  k = np.array([100 * 0.5, 200.0, 150 * 0.5])
  r, s, v = np.array([10.0, 30.0, 20.0]), np.array([1.0, 2.0, 1.5]), np.array([5.0, 5.0, 2.0])
  revenue = float(np.sum(v * r * spend ** s / (spend ** s + k ** s)))
  assert abs(a["expected_revenue"] - revenue) < 1e-9 * revenue
  assert abs(a["roi"] - (revenue - spend.sum()) / spend.sum()) < 1e-12 and spend.sum() <= 300.0 + 1e-6
  assert report.results["content"]["a"]["best_variant"] == "great" and report.passed
  assert report.notes == ("made-up test inputs",)


def test_business_totals_follow_from_the_inputs():
  report = business.run(business.default_config())
  a = report.results["allocation"]
  rows = [p for p in a["processes"]]
  assert abs(sum(p["investment"] for p in rows) - a["investment"]) < 1e-6 and a["investment"] <= 300000 + 1e-6
  lines = [l for l in (ROOT / "configs/engines/business_example.csv").read_text().splitlines()
           if l and not l.startswith("#")]
  header = lines[0].split(",")
  table = {h: np.array([float(l.split(",")[i]) for l in lines[1:]]) for i, h in enumerate(header) if i}
  assert all(p["investment"] <= c + 1e-6 for p, c in zip(rows, table["capacity"]))
  units = sum(p["automated_units_per_period"] for p in rows)
  assert abs(a["automation_share"] - units / table["volume"].sum()) < 1e-12
  assert abs(a["operating_cost_per_period_before"] - float(np.sum(table["volume"] * table["manual_cost"]))) < 1e-6
  assert report.passed and any("MADE-UP EXAMPLE" in n for n in report.notes)


def test_bad_engine_inputs_fail_before_work():
  config = business.default_config()
  config.allocate.budget = -5.0
  with pytest.raises(ValueError, match="budget=-5.0 must be >= 0"):
    business.run(config)
  config = marketing.default_config()
  config.load.cells = CELLS.replace("100,10,1.0", "100,10,0.0")
  with pytest.raises(ValueError, match="shape=.* must be > 0"):
    marketing.run(config)
  config.stages = "load,allocat"
  with pytest.raises(ValueError, match="'allocat' not registered .* registered stages: adstock, allocate"):
    marketing.run(config)


def _config(engines_arg):
  # configs/ is a folder of files, not a package: load the file as ml_collections' config flags do.
  import importlib.util
  spec = importlib.util.spec_from_file_location("ecosystem_config", ROOT / "configs/engines/ecosystem.py")
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module.get_config(f"size=test,engines={engines_arg}")


@pytest.mark.slow
def test_forward_with_optimization_levels_match_basic_and_respect_the_mask():
  system = engines.TruthGPTCompleteSystem(_config("business"))
  ids = np.random.default_rng(0).integers(0, 64, (2, 16))
  mask = np.ones((2, 16), int)
  mask[1, 10:] = 0
  basic = np.asarray(system.forward_with_optimization(ids, mask, "basic"))
  scale = basic[mask.astype(bool)].std()
  for level, tol in (("advanced", engines.neural.FLOAT32_TOLERANCE), ("full", engines.neural.BF16_TOLERANCE)):
    out = np.asarray(system.forward_with_optimization(ids, mask, level))
    assert np.max(np.abs(out - basic)) / scale <= tol, level
  assert np.all(basic[1, 10:] == 0)
  # Causal model: right padding does not change the real tokens' logits (oracle: the unpadded row alone).
  alone = np.asarray(system.forward_with_optimization(ids[1:, :10], None, "basic"))
  np.testing.assert_allclose(basic[1, :10], alone[0], atol=1e-5, rtol=1e-5)
  stats = system.get_performance_stats()
  assert stats["forward"]["basic"]["calls"] == 2 and stats["parameters"] > 0
  reports = system.run_engines()
  assert list(reports) == ["business"] and reports["business"].passed
  with pytest.raises(ValueError, match="right padding"):
    system.forward_with_optimization(ids, 1 - mask, "basic")
  with pytest.raises(ValueError, match="optimization_level='turbo'"):
    system.forward_with_optimization(ids, None, "turbo")


def test_token_ids_outside_the_vocabulary_are_an_error_naming_the_id_and_the_range():
  system = engines.TruthGPTCompleteSystem(_config("business"))
  vocab = system.model_config.vocab_size
  ids = np.zeros((2, 8), np.int32)
  for bad in (vocab, vocab + 100, -1):
    ids[1, 5] = bad
    with pytest.raises(ValueError, match=rf"input_ids\[1, 5\]={bad} is outside the vocabulary \(1 of 16 ids are\); "
                       rf"allowed: 0 to {vocab - 1} \(model.vocab_size={vocab}\)"):
      system.forward_with_optimization(ids)
  ids[1, 5] = vocab - 1
  assert system.forward_with_optimization(ids).shape == (2, 8, vocab)  # the largest id is in range


@pytest.mark.slow
def test_demo_runs_end_to_end_and_writes_the_report(tmp_path):
  out = tmp_path / "eco.json"
  proc = scripts.run_script("ecosystem_demo.py",
                         "--config=configs/engines/ecosystem.py:size=test,engines=neural+marketing",
                         "--config.neural.compare=basic", "--config.neural.calibrate=false",
                         "--config.neural.repeats=1", "--forward_repeats=2", "--config.marketing.stages=load,allocate",
                         f"--out={out}")
  assert proc.returncode == 0, proc.stdout + proc.stderr
  report = json.loads(out.read_text())
  assert set(report["engines"]) == {"neural", "marketing"}
  levels = report["engines"]["neural"]["results"]["levels"]
  assert set(levels) == {"basic"} and levels["basic"]["forward_seconds"] > 0
  assert all(c["passed"] for e in report["engines"].values() for c in e["verification"])
  assert "MADE-UP EXAMPLE" in proc.stdout and "checks passed" in proc.stdout
  assert "... neural.level.basic" in proc.stderr and "... marketing.allocate" in proc.stderr  # progress
  assert report["performance"]["forward"]["basic"]["calls"] == 2 and "forward_with_optimization(basic)" in proc.stdout
