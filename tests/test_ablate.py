"""The ablation grid end to end on a shrunk quick suite (a subprocess, as a user runs it): the files it writes
against their own records, resumption, stale cells, a killed runner, and the errors for bad grids."""

import ast
import dataclasses
import json
import math
import os
import pathlib
import re
import shlex
import subprocess
import sys
import time

import ml_collections
import numpy as np
import pytest

from distattn_jax import initializers
from distattn_jax.data import tasks
from distattn_jax.training import ablation, host
from scripts import ROOT, run_script

GRID = [f"--config={ROOT / 'configs' / 'ablate.py'}:suite=quick", "--config.suite=tiny", "--config.tasks=mnist1d",
        "--config.metrics=dot,l1", "--config.lambda_modes=learned,fixed", "--config.seeds=2",
        "--config.budget.steps=6", "--config.budget.eval_every=3", "--config.budget.warmup_steps=2",
        "--config.budget.width=16", "--config.budget.depth=1", "--config.budget.num_heads=2",
        "--config.budget.mlp_dim=32", "--config.budget.eval_examples=200",
        "--config.budget.curve_eval_examples=100"]


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
  """One generated MNIST-1D for the module's runs (a fresh folder, so no installed copy is read)."""
  return tmp_path_factory.mktemp("data")


def _ablate(*args: str, cwd: pathlib.Path, **popen) -> subprocess.Popen:
  """experiments/ablate.py as a user starts it, from ``cwd``."""
  env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))}
  return subprocess.Popen([sys.executable, str(ROOT / "experiments" / "ablate.py"), *args], cwd=cwd, env=env,
                          **popen)


@pytest.mark.slow
def test_grid_writes_json_table_plots_resumes_and_refuses_to_mix(tmp_path, monkeypatch, data_dir):
  monkeypatch.setenv("DISTATTN_DATA_DIR", str(data_dir))
  # A plain run writes to a run folder of its own, never to the committed results/.
  first = _ablate(*GRID, "--workers=2", cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
  stdout, stderr = first.communicate(timeout=600)
  assert first.returncode == 0, stderr[-3000:]
  out = tmp_path / "runs" / "ablate" / "tiny"
  assert "0 cells done, 8 to run" in stdout + stderr and not (tmp_path / "results").exists()
  doc = json.loads((out / "tiny.json").read_text())
  records = doc["records"]
  keys = {(r["task"], r["metric"], r["lambda_mode"], r["seed"]) for r in records}
  assert keys == {("mnist1d", m, mode, s) for m in ("dot", "l1") for mode in ("learned", "fixed") for s in (0, 1)}
  for r in records:
    assert r["finite"] and 0.0 <= r["final"] <= 1.0 and r["eval_examples"] == 200
    assert r["steps_done"] == 6 and r["curve"]["step"] == [3, 6] and r["steps_per_s"] > 0
    assert len(r["final_lambda"]) == 1 and len(r["final_lambda"][0]) == 2  # [layer][head]
    # Entropy of a softmax row over the 40 steps lies in [0, ln 40].
    assert len(r["attention_entropy"]) == 1 and 0.0 <= r["attention_entropy"][0] <= math.log(40) + 1e-6
    if r["lambda_mode"] == "fixed":  # fixed lam is the calibrated default, untouched by training
      want = initializers.default_lambda(r["metric"], 8, 3.0)
      np.testing.assert_allclose(r["final_lambda"][0], [want] * 2, rtol=1e-6)
      assert all(np.allclose(l, r["final_lambda"]) for l in r["curve"]["lambda"])
    else:
      assert not np.allclose(r["curve"]["lambda"][0], r["final_lambda"], rtol=0, atol=0)
  # The table: mean +- std of each cell group recomputed from the records, the best per row in bold.
  md = (out / "tiny.md").read_text()
  for mode in ("learned", "fixed"):
    stats = {}
    for m in ("dot", "l1"):
      v = [r["final"] * 100 for r in records if r["metric"] == m and r["lambda_mode"] == mode]
      stats[m] = f"{np.mean(v):.2f} +- {np.std(v, ddof=1):.2f}"
    best = max(stats, key=lambda m: float(stats[m].split()[0]))
    row = next(line for line in md.splitlines() if line.startswith(f"| mnist1d | {mode} |"))
    cells = [c.strip() for c in row.strip("|").split("|")][2:]
    assert cells == [f"**{stats[m]}**" if m == best else stats[m] for m in ("dot", "l1")]
  assert "exceed" in md and "Non-finite cells: none." in md
  # The verdict: the winning cell group against the other metric's better lam mode, by the sum of the two stds.
  groups = {(m, mode): [r["final"] * 100 for r in records if r["metric"] == m and r["lambda_mode"] == mode]
            for m in ("dot", "l1") for mode in ("learned", "fixed")}
  stats = {k: (np.mean(v), np.std(v, ddof=1)) for k, v in groups.items()}
  winner = max(stats, key=lambda k: stats[k][0])
  loser = max((k for k in stats if k[0] != winner[0]), key=lambda k: stats[k][0])
  separated = stats[winner][0] - stats[loser][0] > stats[winner][1] + stats[loser][1]
  verdict = next(line for line in md.splitlines() if line.startswith("- **mnist1d**:") and "wins" in line)
  assert verdict.startswith(f"- **mnist1d**: {winner[0]} ({winner[1]} lam) wins with {stats[winner][0]:.2f}")
  assert verdict.endswith(f"{loser[0]} ({loser[1]} lam, {stats[loser][0]:.2f})." if separated else ": none.")
  apart = [m for m in ("dot", "l1") if abs(stats[(m, "learned")][0] - stats[(m, "fixed")][0])
           > stats[(m, "learned")][1] + stats[(m, "fixed")][1]]
  assert f"differences beyond the seed spread in {len(apart)} of 2 pairs" in md
  # The input-blind baselines, recomputed from the 200 scored test labels.
  labels = tasks.load("mnist1d", cache_dir=data_dir).test.labels[:200]
  majority = np.bincount(labels).max() / 200
  worst = min(records, key=lambda r: r["final"])
  line = next(line for line in md.splitlines() if line.startswith("- **mnist1d**: 10 classes"))
  assert f"uniform 10.00%, majority class {100 * majority:.2f}%" in line
  assert f"weakest cell mnist1d/{worst['metric']}/{worst['lambda_mode']}/{worst['seed']} " in line
  assert ("does not beat" in line) == (worst["final"] <= max(majority, 0.1))
  assert len(doc["runs"]) == 1 and doc["runs"][0]["cells"] == 8 and doc["runs"][0]["wall_s"] > 0
  for name in ("curves", "bars", "lambda", "entropy"):
    png = (out / f"tiny_{name}.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 5000

  # A rerun trains nothing and keeps the record of the run that trained; so does one whose JSON was lost (the
  # per-cell files remain).
  again = run_script("ablate.py", *GRID, f"--results_dir={out}")
  assert again.returncode == 0, again.stderr[-3000:]
  assert json.loads((out / "tiny.json").read_text())["runs"] == doc["runs"]
  (out / "tiny.json").unlink()
  again = run_script("ablate.py", *GRID, f"--results_dir={out}")
  assert again.returncode == 0, again.stderr[-3000:]
  assert "8 cells done, 0 to run" in again.stdout + again.stderr
  rerun = json.loads((out / "tiny.json").read_text())
  assert rerun["records"] == records and "runs" not in rerun  # the lost file's run record went with it

  # Cells saved by another grid are never merged: with the results file deleted, a grid that differs in its
  # budget (here the examples in the final score) retrains the cell it shares with the saved ones.
  saved = json.loads((out / "tiny.cells" / "mnist1d__dot__learned__0.json").read_text())
  (out / "tiny.json").unlink()
  other = run_script("ablate.py", *GRID, f"--results_dir={out}", "--config.metrics=dot",
                     "--config.lambda_modes=learned", "--config.seeds=1", "--config.budget.eval_examples=100")
  assert other.returncode == 0, other.stderr[-3000:]
  assert "0 cells done, 1 to run" in other.stdout + other.stderr
  (record,) = json.loads((out / "tiny.json").read_text())["records"]
  assert record["eval_examples"] == 100 and record["fingerprint"] != saved["fingerprint"]

  # Another grid definition under the same suite name is refused, naming the fields and the one command that
  # starts over.
  mixed = run_script("ablate.py", *GRID, f"--results_dir={out}")
  assert mixed.returncode != 0
  assert "refusing to mix" in mixed.stderr and "seeds: 1 (file) vs 2 (this run)" in mixed.stderr
  assert "budget.eval_examples: 100 (file) vs 200 (this run)" in mixed.stderr
  command = re.search(r"rm -rf \S+ \S+", mixed.stderr).group(0)
  subprocess.run(shlex.split(command), check=True)
  assert not (out / "tiny.json").exists() and not (out / "tiny.cells").exists()


def _config(**overrides):
  c = ml_collections.ConfigDict(dict(suite="x", tasks="mnist1d", metrics="dot", lambda_modes="learned", seeds=3,
                                     p=3.0, pooling="mean", register="", budget={}, workers=1, cache_dir=""))
  c.update(overrides)
  return c


def test_bad_grids_name_the_valid_choices(tmp_path):
  with pytest.raises(ValueError, match="unknown task 'imagenet'; valid tasks: text, listops_full"):
    ablation.definition(_config(tasks="mnist1d,imagenet"))
  with pytest.raises(ValueError, match=r"unknown metric 'hamming'.*l1, l2.*dot"):
    ablation.definition(_config(metrics="dot,hamming"))
  with pytest.raises(ValueError, match="unknown lambda mode 'frozen'; valid: learned, fixed"):
    ablation.definition(_config(lambda_modes="frozen"))
  with pytest.raises(ValueError, match="seeds=0 must be a positive int"):
    ablation.definition(_config(seeds=0))


def test_a_registered_metric_joins_the_grid_by_name(tmp_path):
  from distattn_jax.metrics import record
  script = tmp_path / "my_metrics.py"
  script.write_text("import jax.numpy as jnp\nimport distattn_jax as da\n"
                    "da.metrics.register(da.metrics.Metric('ablate_test_sq', da.metrics.Elementwise("
                    "phi=jnp.square), translation_invariant=True))\n")
  try:
    ablation.register_metrics(str(script))
    d = ablation.definition(_config(metrics="dot,ablate_test_sq", register=str(script)))
    assert d["metrics"] == ["dot", "ablate_test_sq"] and d["register"] == str(script)
  finally:
    record._REGISTRY.pop("ablate_test_sq", None)


def test_suite_configs_check_their_arguments():
  import importlib.util
  import pathlib
  root = pathlib.Path(__file__).resolve().parents[1] / "configs"
  modules = {}
  for name in ("ablate", "task"):
    spec = importlib.util.spec_from_file_location(f"config_{name}", root / f"{name}.py")
    modules[name] = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(modules[name])
  with pytest.raises(ValueError, match="suite='huge' is not a suite; valid suites: quick, cpu, long, full"):
    modules["ablate"].get_config("suite=huge")
  for suite in ("quick", "cpu", "long", "full"):
    d = ablation.definition(modules["ablate"].get_config(f"suite={suite}"))
    assert d["metrics"] == list(ablation.SHIPPED_METRICS) and d["seeds"] >= 3
    assert d["lambda_modes"] == ["learned", "fixed"]
  one = ablation.definition(modules["task"].get_config("task=gunpoint,metric=cosine,lam=fixed,size=quick"))
  assert (one["tasks"], one["metrics"], one["lambda_modes"], one["suite"]) == (
      ["gunpoint"], ["cosine"], ["fixed"], "gunpoint_cosine_fixed_quick")


def _children(pid: int) -> dict[int, str]:
  """``{pid: command line}`` of the live (not zombie) child processes of ``pid`` (Linux /proc)."""
  out = {}
  for entry in pathlib.Path("/proc").iterdir():
    if entry.name.isdigit():
      try:
        state, ppid = (entry / "stat").read_text().rsplit(")", 1)[1].split()[:2]
        if int(ppid) == pid and state != "Z":
          out[int(entry.name)] = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode()
      except (OSError, ValueError):
        pass  # it ended while being read
  return out


def _alive(pid: int) -> bool:
  try:
    return pathlib.Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
  except OSError:
    return False


@pytest.mark.slow
@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="finds the workers in /proc")
def test_workers_end_with_a_killed_runner_and_a_live_runner_holds_its_suite(tmp_path, monkeypatch, data_dir):
  monkeypatch.setenv("DISTATTN_DATA_DIR", str(data_dir))
  out = tmp_path / "results"
  # Groups long enough that a worker left behind would still be training when the test looks.
  runner = _ablate(*GRID, "--config.budget.steps=100000", "--config.budget.eval_every=100000",
                   f"--results_dir={out}", "--workers=2", cwd=ROOT, stdout=subprocess.DEVNULL,
                   stderr=subprocess.DEVNULL)
  workers: dict[int, str] = {}
  try:
    deadline = time.monotonic() + 300
    while len(workers) < 2:  # the two workers, once they have imported JAX (their watch starts right after)
      assert runner.poll() is None and time.monotonic() < deadline, "the runner never started its workers"
      time.sleep(0.2)
      workers = {pid: cmd for pid, cmd in _children(runner.pid).items() if "spawn_main" in cmd
                 and any("jaxlib" in line for line in pathlib.Path(f"/proc/{pid}/maps").read_text().splitlines())}
    # A second runner on the same folder is refused while the first lives.
    with pytest.raises(ablation.RunnerBusyError, match=f"pid {runner.pid}"):
      ablation.run_grid(_config(suite="tiny"), out)
    time.sleep(1)
    children = _children(runner.pid)  # the workers and multiprocessing's resource tracker
    runner.kill()
    runner.wait()
    killed = time.monotonic()
    while any(_alive(pid) for pid in children) and time.monotonic() < killed + 10:
      time.sleep(0.1)
    left = [pid for pid in children if _alive(pid)]
    assert not left, f"processes of the killed runner still alive 10 s later: {left}"
    with ablation.results_lock(out, "tiny"):  # the dead runner's lock went with it
      pass
  finally:
    runner.kill()
    for pid in workers:
      try:
        os.kill(pid, 9)
      except ProcessLookupError:
        pass


def test_one_seed_gives_no_spread_and_no_verdict():
  def record(metric, mode, final):
    return {"task": "mnist1d", "metric": metric, "lambda_mode": mode, "seed": 0, "score_name": "accuracy",
            "final": final, "finite": True, "wall_s": 1.0, "final_lambda": [[1.0]],
            "curve": {"step": [1, 2], "eval": [0.1, final], "train_loss": [2.0, 1.0], "lambda": [[[1.0]]] * 2}}
  doc = {"grid": {"suite": "s", "seeds": 1, "tasks": ["mnist1d"], "metrics": ["dot", "l1"], "p": 3.0,
                  "lambda_modes": ["learned", "fixed"],
                  "budget": {"steps": 2, "batch_size": 8, "width": 8, "depth": 1, "num_heads": 1, "eval_every": 1}},
         "records": [record("dot", "learned", 0.5), record("dot", "fixed", 0.4), record("l1", "learned", 0.6),
                     record("l1", "fixed", 0.3)]}
  md = ablation.table(doc)
  verdict = next(line for line in md.splitlines() if line.startswith("- **mnist1d**:"))
  assert verdict.startswith("- **mnist1d**: l1 (learned lam) leads with 60.00; best other metric dot (learned lam) "
                            "50.00; margin 10.00; fewer than two seeds per cell, so no seed spread can be measured")
  assert "exceed" not in md and "differences beyond" not in md and "Metrics it beats" not in md
  assert "Learned against fixed lam, same metric: fewer than two seeds per cell" in md


def test_cell_fingerprints_cover_budget_data_and_registered_metrics(data_dir):
  cell, budget = ("mnist1d", "l1", "learned", 0), {"steps": 6, "p": 3.0, "pooling": "mean"}
  base = ablation.cell_fingerprint(cell, budget, "data", None)
  assert base == ablation.cell_fingerprint(cell, dict(budget), "data", None)
  assert len({base, ablation.cell_fingerprint(("mnist1d", "l1", "learned", 1), budget, "data", None),
              ablation.cell_fingerprint(cell, dict(budget, steps=7), "data", None),
              ablation.cell_fingerprint(cell, dict(budget, pooling="cls"), "data", None),
              ablation.cell_fingerprint(cell, budget, "other data", None),
              ablation.cell_fingerprint(cell, budget, "data", "metrics file")}) == 6
  data = tasks.load("mnist1d", cache_dir=data_dir)  # the data's hash follows its content
  assert ablation.data_fingerprint(data) == ablation.data_fingerprint(tasks.load("mnist1d", cache_dir=data_dir))
  other = dataclasses.replace(data, test=dataclasses.replace(data.test, labels=(data.test.labels + 1) % 10))
  assert ablation.data_fingerprint(other) != ablation.data_fingerprint(data)


def test_one_machine_description_for_benchmarks_and_ablations():
  m = host.machine()
  assert ablation.machine is host.machine
  assert {"processor", "cpu_count", "backend", "device", "jax", "python"} <= set(m) and m["processor"]
  tree = ast.parse((ROOT / "experiments" / "benchmark.py").read_text())
  assert not any(isinstance(n, ast.FunctionDef) and n.name == "machine" for n in tree.body)
  assert any(isinstance(n, ast.ImportFrom) and n.module == "distattn_jax.training.host"
             and [a.name for a in n.names] == ["machine"] for n in tree.body)


def test_ablation_modules_use_each_others_public_names_only():
  folder = ROOT / "distattn_jax" / "training" / "ablation"
  modules = {p.stem for p in folder.glob("*.py")} - {"__init__"}
  assert {"grid", "store", "runner", "report", "plots"} <= modules
  for path in folder.glob("*.py"):
    tree = ast.parse(path.read_text())
    for node in ast.walk(tree):
      if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("distattn_jax"):
        assert not [a.name for a in node.names if a.name.startswith("_")], (path.name, node.module)
      if (isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name) and node.value.id in modules
          and node.attr.startswith("_")):
        raise AssertionError(f"{path.name} uses {node.value.id}.{node.attr}")
