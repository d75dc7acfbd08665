"""The command-line programs, run as a user runs them (in a subprocess, with small settings)."""

import json
import statistics

import pytest
import scripts

ROOT = scripts.ROOT


run = scripts.run_script


SMALL_SELFCHECK = ("--q_len=70", "--kv_len=45", "--block=16")


@pytest.mark.slow
def test_selfcheck_passes_and_lists_every_implementation():
  # Small shapes that still span several 16-wide tiles with lengths no tile divides; one dtype and two metrics
  # (a shipped one and the user-registered Huber distance) keep this under a minute.
  proc = run("selfcheck.py", "--metrics=l1,huber", "--dtypes=bfloat16", *SMALL_SELFCHECK)
  assert proc.returncode == 0, proc.stdout + proc.stderr
  assert "implementations: blockwise;" in proc.stdout  # every registered kernel but the reference and ring
  rows = [line.split() for line in proc.stdout.splitlines() if line.startswith("blockwise ")]
  assert [(r[1], r[2], r[3]) for r in rows] == [("l1", "bfloat16", "5/5"), ("huber", "bfloat16", "5/5")]
  assert "10/10 cases passed (100.0%)" in proc.stdout


def test_selfcheck_fails_on_a_wrong_kernel(tmp_path):
  # A kernel that is 1% off must be caught: register it in a wrapper script and expect exit status 1.
  script = tmp_path / "broken_selfcheck.py"
  script.write_text(
      "import sys\n"
      f"sys.path.insert(0, {str(ROOT / 'experiments')!r})\n"
      "import distattn_jax as da\n"
      "reference = da.kernels.get('reference')\n"
      "class Broken(type(reference)):\n"
      "  def __call__(self, *args, **kwargs):\n"
      "    result = super().__call__(*args, **kwargs)\n"
      "    return result._replace(out=result.out * 1.01)\n"
      "da.kernels.register('broken', Broken())\n"
      "import selfcheck\n"
      "from absl import app\n"
      "app.run(lambda argv: sys.exit(selfcheck.main(argv)))\n")
  # One case is enough to catch it (the passing run above covers every case); each case costs two compiles.
  proc = run(script, "--implementations=broken", "--metrics=dot", "--dtypes=float32", "--cases=causal+bias",
             *SMALL_SELFCHECK)
  assert proc.returncode == 1, proc.stdout + proc.stderr
  assert "0/1 cases passed (0.0%)" in proc.stdout and "FAILED causal+bias:" in proc.stdout


@pytest.mark.slow
def test_benchmark_writes_ratios_measured_against_the_baseline(tmp_path):
  out = tmp_path / "bench.json"
  # One metric (the metric is not the subject: every cell is timed the same way), both kinds of implementation
  # spec (a name, a name with tiles) and two lengths, so each ratio must use its own length's baseline.
  proc = run("benchmark.py", "--metrics=l1", "--implementations=reference,blockwise:32x64", "--lengths=64,128",
             "--heads=2", "--head_dim=8", "--repeats=2", f"--out={out}")
  assert proc.returncode == 0, proc.stdout + proc.stderr
  report = json.loads(out.read_text())
  rows = report["rows"]
  assert len(rows) == 2 * (1 + 1 * 2)  # per length: the baseline plus 1 metric x 2 implementations
  for row in rows:
    for phase in ("forward", "forward_backward"):
      cell = row[phase]
      assert len(cell["times"]) == 2 and cell["seconds"] == statistics.median(cell["times"]) > 0
      assert cell["temp_bytes"] is not None
      if row["metric"] != "jax.nn.dot_product_attention":
        base = next(r for r in rows if r["n"] == row["n"] and r["implementation"] == "-")[phase]
        assert abs(cell["time_ratio"] - cell["seconds"] / base["seconds"]) < 1e-12
  table = out.with_suffix(".md").read_text()
  assert "| 128 | l1 | blockwise:32x64 |" in table and "jax.nn.dot_product_attention" in table


@pytest.mark.slow
def test_benchmark_train_mode_reports_tokens_per_second_beside_dot(tmp_path):
  out = tmp_path / "train.json"
  proc = run("benchmark.py", "--mode=train", "--config=configs/lm.py:size=tiny", "--config.model.depth=1",
             "--config.data.batch_size=4", "--metrics=l1", "--repeats=2", "--train_steps=2", "--warmup_steps=1",
             f"--out={out}")
  assert proc.returncode == 0, proc.stdout + proc.stderr
  report = json.loads(out.read_text())
  rows = {row["metric"]: row for row in report["rows"]}
  assert set(rows) == {"l1", "dot"} and report["settings"]["depth"] == 1
  for row in rows.values():
    assert len(row["runs"]) == 2 and row["tokens_per_second"] == statistics.median(row["runs"]) > 0
    assert abs(row["ratio_to_dot"] - row["tokens_per_second"] / rows["dot"]["tokens_per_second"]) < 1e-12
  assert "| l1 |" in out.with_suffix(".md").read_text()


@pytest.mark.slow
def test_benchmark_scaling_mode_reports_ring_memory_longest_sequences_and_data_parallel_times(tmp_path):
  # On 8 simulated devices (the mode sets them itself). Compile-only parts: the ring's per-device temporaries are
  # below the unsharded blockwise kernel's, and its doubling search reaches further under the same budget (256
  # fits both, 512 only the ring: two probes each). The timed part at its smallest: one round of one step.
  out, doc = tmp_path / "scaling.json", tmp_path / "scaling.md"
  proc = run("benchmark.py", "--mode=scaling", "--causal", "--scaling_lengths=2048", "--scaling_metrics=dot",
             "--heads=2", "--head_dim=16", "--config=configs/lm.py:size=tiny", "--config.model.depth=1",
             "--min_train_length=256", "--max_train_length=512", "--budget_mib=8", "--per_device_batch=1",
             "--train_steps=1", "--warmup_steps=0", "--repeats=1", f"--out={out}", f"--scaling_doc={doc}")
  assert proc.returncode == 0, proc.stdout + proc.stderr
  report = json.loads(out.read_text())
  [row] = report["ring_memory"]
  assert row["ring_8"]["temp_bytes"] < row["blockwise_1"]["temp_bytes"]
  assert row["temp_ratio"] == row["ring_8"]["temp_bytes"] / row["blockwise_1"]["temp_bytes"]
  longest = {r["implementation"]: r for r in report["longest_trainable"]}
  for r in longest.values():  # the longest length is the last probe within the budget
    fitting = [p["length"] for p in r["probes"] if p["temp_bytes"] <= 8 * 2**20]
    assert r["longest_length"] == (max(fitting) if fitting else None)
  assert longest["ring"]["longest_length"] > longest["blockwise"]["longest_length"]
  dp = report["data_parallel"]
  assert (dp["devices"], dp["per_device_batch"], dp["global_batch"]) == (8, 1, 8)
  t = dp["median_step_seconds"]
  for name, runs in dp["runs"].items():
    assert len(runs) == 1 and t[name] == statistics.median(runs) > 0
  assert dp["ratio_same_per_device_batch"] == t["mesh"] / t["one_device_same_per_device_batch"]
  assert dp["ratio_per_unit_of_work"] == t["mesh"] / (8 * t["one_device_same_per_device_batch"])
  assert dp["ratio_same_global_batch"] == t["mesh"] / t["one_device_same_global_batch"]
  text = doc.read_text()
  assert "--mode=scaling" in text and "| 2048 | dot |" in text and "| mesh data=8 | 8 (1 per device) |" in text


@pytest.mark.slow
def test_benchmark_transforms_mode_reports_jvp_and_hvp_against_the_kernels_own_passes(tmp_path):
  # The smallest cell: one metric, one length, blockwise tiles so it loops over tiles. Each ratio must be the
  # quotient of the medians (and temporaries) this run measured, not a figure from elsewhere.
  out = tmp_path / "transforms.json"
  proc = run("benchmark.py", "--mode=transforms", "--metrics=l1", "--implementations=blockwise:32x32",
             "--lengths=64", "--heads=2", "--head_dim=8", "--repeats=2", f"--out={out}")
  assert proc.returncode == 0, proc.stdout + proc.stderr
  report = json.loads(out.read_text())
  [row] = report["rows"]
  assert (report["mode"], row["n"], row["metric"], row["implementation"]) == ("transforms", 64, "l1",
                                                                               "blockwise:32x32")
  for phase in ("forward", "forward_backward", "jvp", "hvp"):
    cell = row[phase]
    assert len(cell["times"]) == 2 and cell["seconds"] == statistics.median(cell["times"]) > 0
    assert cell["temp_bytes"] is not None
  f, fb, jvp, hvp = (row[p]["seconds"] for p in ("forward", "forward_backward", "jvp", "hvp"))
  r = row["ratios"]
  assert (r["jvp_to_forward"], r["jvp_to_forward_backward"], r["hvp_to_forward_backward"]) == (jvp / f, jvp / fb,
                                                                                              hvp / fb)
  assert r["jvp_temp_to_forward_backward_temp"] == row["jvp"]["temp_bytes"] / row["forward_backward"]["temp_bytes"]
  assert f"| 64 | l1 | blockwise:32x32 | {f * 1e3:.1f} ms |" in out.with_suffix(".md").read_text()
