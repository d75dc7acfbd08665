"""The robustness study (distattn_jax.training.robustness, experiments/robustness.py): its report's verdicts on
a hand-made results document, and the --quick program end to end (slow): the measurements against independent
recomputations from the saved parameters, the attacks' radius, the files and a resumed run that trains nothing."""

import json

import chex
import numpy as np
import pytest
import scripts
from flax import serialization

from distattn_jax.data import tasks
from distattn_jax.training import cells, robustness
from distattn_jax.training.ablation import report as ablation_report

QUICK = "configs/robustness.py:suite=quick"


def load_config(spec):
  import importlib.util  # pylint: disable=import-outside-toplevel
  path, arg = spec.split(":", 1)
  module_spec = importlib.util.spec_from_file_location("robustness_config", scripts.ROOT / path)
  module = importlib.util.module_from_spec(module_spec)
  module_spec.loader.exec_module(module)
  return module.get_config(arg)


def fake_doc(values):
  """A results document of two tasks' worth of records: ``values[metric]`` is a list (one per seed) of
  ``(clean, noise, fgsm, pgd, lipschitz)``."""
  config = load_config(QUICK)
  config.eval.noise, config.eval.epsilons = "0.5", "0.1"
  records = []
  for metric, seeds in values.items():
    for seed, (clean, noise, fgsm, pgd, lip) in enumerate(seeds):
      records.append({"task": "mnist1d", "metric": metric, "seed": seed, "clean": clean, "noise": {"0.5": noise},
                      "fgsm": {"0.1": fgsm}, "pgd": {"0.1": pgd}, "lipschitz": {"max": lip, "mean": lip}})
  return {"grid": robustness.definition(config), "records": records, "runs": [{"wall_s": 60.0}],
          "machine": {"processor": "cpu", "cpu_count": 2, "backend": "cpu"}}


def test_verdicts_follow_the_seed_spread():
  doc = fake_doc({
      "dot": [(0.80, 0.70, 0.50, 0.40, 10.0), (0.82, 0.72, 0.52, 0.42, 11.0), (0.81, 0.71, 0.51, 0.41, 12.0)],
      # pgd far below dot's, beyond both spreads; everything else within them
      "l1": [(0.80, 0.70, 0.50, 0.10, 10.5), (0.82, 0.72, 0.52, 0.12, 11.5), (0.81, 0.71, 0.51, 0.11, 11.0)],
      "l2": [(0.81, 0.71, 0.51, 0.41, 11.0), (0.80, 0.70, 0.50, 0.40, 10.0), (0.82, 0.72, 0.52, 0.42, 12.0)],
  })
  s = robustness.summary(doc)
  chex.assert_trees_all_close(s[("mnist1d", "l1", "drop PGD 0.1")][0], 0.70, atol=1e-9)
  lines = robustness.verdicts(doc, "mnist1d")
  l1 = next(line for line in lines if "**l1**" in line)
  l2 = next(line for line in lines if "**l2**" in line)
  assert "more than the seed spread in 2 of" in l1 and "accuracy PGD 0.1 11.00 vs 41.00 (lower by 30.00" in l1
  assert "drop PGD 0.1 70.00 vs 40.00 (higher" in l1
  assert "within the seed spread of dot in all 9 quantities" in l2
  md = robustness.report(doc)
  assert "| l1 | 81.0 +- 1.0 | 71.0 +- 1.0 | 51.0 +- 1.0 | 11.0 +- 1.0 | 11 +- 0.5 | 11 +- 0.5 |" in md
  assert "wall time of the runs that wrote them 1.0 min" in md


def test_one_seed_draws_no_verdict():
  doc = fake_doc({"dot": [(0.8, 0.7, 0.5, 0.4, 10.0)], "l1": [(0.2, 0.1, 0.0, 0.0, 99.0)]})
  assert robustness.verdicts(doc, "mnist1d") == [f"- **l1**: {ablation_report.NO_SPREAD}."]


def test_definition_checks_names_and_leaves_out_what_merged_runs_change():
  config = load_config(QUICK)
  d = robustness.definition(config)
  assert not {"tasks", "metrics", "seeds", "cache_dir"} & set(d) and d["eval"]["pgd_steps"] == 2
  config.metrics = "dot,nope"
  with pytest.raises(ValueError, match="unknown metric 'nope'"):
    robustness.definition(config)
  config.metrics, config.tasks = "dot", "text"
  with pytest.raises(ValueError, match="not a classification task"):
    robustness.definition(config)


@pytest.mark.slow
def test_quick_program_measures_what_it_says_and_resumes(tmp_path):
  out = tmp_path / "quick"
  first = scripts.run_script("robustness.py", "--quick", f"--results_dir={out}")
  assert first.returncode == 0, first.stderr[-3000:]
  suite = "robustness_quick"
  doc = json.loads((out / f"{suite}.json").read_text())
  md = (out / f"{suite}.md").read_text()
  assert (out / f"{suite}.png").stat().st_size > 10_000
  assert [(r["metric"], r["seed"]) for r in doc["records"]] == [("dot", 0), ("l2", 0)]
  assert doc["runs"][-1]["trained"] == 2 and "| dot |" in md and "| l2 |" in md

  config = load_config(QUICK)
  e = config.eval
  data = tasks.load("mnist1d")
  batches = robustness.eval_batches(data, e)
  budget = robustness.train_budget(config)
  for record in doc["records"]:
    cell = ("mnist1d", record["metric"], record["seed"])
    params = serialization.msgpack_restore(robustness.params_path(out / f"{suite}.cells", cell).read_bytes())
    model = cells.model_for("mnist1d", data, record["metric"], "learned", budget)
    # Clean accuracy, recomputed from the logits without the study's functions, is the record's and noise 0's.
    hits, count = 0.0, 0.0
    for b in batches:
      logits = model.apply({"params": params}, b["inputs"], b["lengths"])
      hits += float(np.sum((np.argmax(np.asarray(logits), -1) == b["labels"]) * b["weights"]))
      count += float(np.sum(b["weights"]))
    assert count == e.examples
    assert record["clean"] == hits / count == record["noise"]["0"]
    f = robustness.functions(model)
    for eps in (0.03, 0.1):
      key = robustness.level_key(eps)
      assert record["fgsm"][key] <= record["clean"] and record["pgd"][key] <= record["clean"]
      fgsm_hits, pgd_hits = [], []
      for b in batches:
        x = np.asarray(b["inputs"])
        clean = np.asarray(f["correct"](params, b, x))
        adv = np.asarray(f["fgsm"](params, b, eps))
        last, robust = f["pgd"](params, b, eps, e.pgd_step_factor * eps / e.pgd_steps, e.pgd_steps)
        for z in (adv, np.asarray(last)):  # inside the L-inf ball, measured on the perturbed inputs
          assert np.max(np.abs(z - x)) <= eps + 1e-6
        assert np.max(np.abs(adv - x)) >= eps - 1e-6  # FGSM moves to the ball's corner
        adv_correct = np.asarray(f["correct"](params, b, adv))
        fgsm_hits.append(clean & adv_correct)
        pgd_hits.append(np.asarray(robust))
        assert not np.any(np.asarray(robust) & ~clean)
      assert robustness.accuracy(fgsm_hits, batches) == record["fgsm"][key]
      assert robustness.accuracy(pgd_hits, batches) == record["pgd"][key]
    # jacobian_norm of the stacked points is the largest of the per-point norms (the Jacobian is block diagonal).
    lip = record["lipschitz"]
    chex.assert_trees_all_close(lip["max"], max(lip["points"]), rtol=1e-4)
    assert len(lip["points"]) == e.lipschitz_points and lip["mean"] <= lip["max"] * (1 + 1e-6)

  cell_dir = out / f"{suite}.cells"
  mtimes = {p.name: p.stat().st_mtime_ns for p in cell_dir.glob("*.msgpack")}
  clean_first = [r["clean"] for r in doc["records"]]
  second = scripts.run_script("robustness.py", "--quick", f"--results_dir={out}")
  assert second.returncode == 0, second.stderr[-3000:]
  assert "2 of 2 cells done, 0 to run" in second.stdout
  assert json.loads((out / f"{suite}.json").read_text())["records"] == doc["records"]
  # Records gone but parameters kept: measured again from the saved parameters, never trained again.
  doc["records"] = []
  (out / f"{suite}.json").write_text(json.dumps(doc))
  third = scripts.run_script("robustness.py", "--quick", f"--results_dir={out}")
  assert third.returncode == 0, third.stderr[-3000:]
  again = json.loads((out / f"{suite}.json").read_text())
  assert again["runs"][-1]["trained"] == 0 and third.stdout.count("saved parameters") == 2
  assert {p.name: p.stat().st_mtime_ns for p in cell_dir.glob("*.msgpack")} == mtimes
  assert [r["clean"] for r in again["records"]] == clean_first
