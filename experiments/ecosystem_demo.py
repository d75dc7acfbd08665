"""Runs the complete system's engines and prints what each computed and verified; writes the report as JSON.

  .venv/bin/python experiments/ecosystem_demo.py --config=configs/engines/ecosystem.py --out=runs/ecosystem.json

A config with an ``engine`` field (``configs/engines/quantum.py`` ...) runs that engine alone. Exits with status
1 if any verification failed. All logic is in ``distattn_jax.engines``; this is the absl shell around it.
"""

import json
import pathlib
import sys

import numpy as np
from absl import app, flags

from distattn_jax import engines, monitoring

import cli  # experiments/cli.py, beside this file

cli.define_config_file("config", "configs/engines/ecosystem.py", "Engine or system config file.", lock_config=True)
flags.DEFINE_string("out", None, "Write the whole report here as JSON.")
flags.DEFINE_integer("forward_repeats", 3, "forward_with_optimization calls per level (system configs only).")


def progress(name: str, index: int, total: int) -> None:
  print(f"  ... {name} ({index + 1}/{total})", file=sys.stderr, flush=True)


def _mib(value) -> str:
  return "n/a" if value is None else f"{value / 2**20:.2f} MiB"


def print_report(report: engines.EngineReport) -> None:
  r = report.results
  print(f"\n== {report.engine} engine ({report.seconds:.1f} s; stages {', '.join(report.stages)})")
  for note in report.notes:
    print(f"   note: {note}")
  if report.engine == "neural":
    print(f"   parameters: {r['parameters']:,}; batch {r['batch'][0]} x {r['batch'][1]} tokens")
    print(f"   {'level':<10} {'stages':<28} {'forward':>10} {'fwd temp':>12} {'grad temp':>12} {'max dev':>9}")
    for level, row in r["levels"].items():
      dev = next(v for k, v in row.items() if k.startswith("max_deviation_from_"))
      print(f"   {level:<10} {','.join(row['stages']):<28} {row['forward_seconds'] * 1e3:>8.2f}ms "
            f"{_mib(row['forward_temp_bytes']):>12} {_mib(row['grad_temp_bytes']):>12} {dev:>9.2e}")
    if "calibration" in r:
      c = r["calibration"]
      before = np.concatenate([np.atleast_1d(v) for v in c["spread_before"].values()])
      after = np.concatenate([np.atleast_1d(v) for v in c["spread_after"].values()])
      print(f"   lambda calibration to logit spread {c['target_spread']}: spread per head {before.min():.3f}.."
            f"{before.max():.3f} -> {after.min():.4f}..{after.max():.4f}")
  if "qaoa" in r:
    q = r["qaoa"]
    print(f"   QAOA MaxCut ({q['graph']}, {q['num_edges']} edges): expected cut {q['expected_cut']:.4f}, max cut "
          f"{q['max_cut']:.0f}, ratio {q['approximation_ratio']:.4f}; best sampled cut {q['best_cut']:.0f} "
          f"({''.join(map(str, np.asarray(q['best_bitstring']).tolist()))})")
  if "vqe" in r:
    v = r["vqe"]
    print(f"   VQE {v['model']} chain, {v['num_qubits']} qubits: energy {v['energy']:.6f}, exact "
          f"{v['exact_energy']:.6f}, error {v['error']:.2e}")
  if "qnn" in r:
    q = r["qnn"]
    print(f"   variational classifier ({q['dataset']}): train accuracy {q['train_accuracy']:.3f}, held-out "
          f"{q['test_accuracy']:.3f} on {q['num_test']} points (p = {q['p_value']:.1e} against chance)")
  if report.engine == "marketing" and "allocation" in r:
    a = r["allocation"]
    print(f"   budget {a['budget']:,.0f}: spend {a['spend']:,.0f}, expected conversions {a['expected_conversions']:,.1f}, "
          f"revenue {a['expected_revenue']:,.0f}, ROI {a['roi']:.2f}")
    for segment, s in a["by_segment"].items():
      best = r.get("content", {}).get(segment, {}).get("best_variant", "-")
      print(f"     {segment:<12} spend {s['spend']:>10,.0f}  conversions {s['conversions']:>9,.1f}  revenue "
            f"{s['revenue']:>11,.0f}  best content: {best}")
  if report.engine == "business" and "allocation" in r:
    a = r["allocation"]
    print(f"   budget {a['budget']:,.0f}: invested {a['investment']:,.0f}; operating cost per period "
          f"{a['operating_cost_per_period_before']:,.0f} -> {a['operating_cost_per_period_after']:,.0f}; automated "
          f"throughput {a['automated_throughput_per_period']:,.0f} units/period; automation share "
          f"{a['automation_share']:.1%}; payback {a['payback_periods']:.2f} periods")
    for p in a["processes"]:
      print(f"     {p['process']:<16} invest {p['investment']:>10,.0f}  automated {p['automated_share']:.1%}"
            f"{'  (at capacity)' if p['at_capacity'] else ''}")
  for check in report.verification:
    print(f"   {check.line()}")


def main(argv) -> int:
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {' '.join(argv[1:])}")
  config = flags.FLAGS.config
  out: dict = {"config": config.to_dict()}
  if "engine" in config:
    runner = {"quantum": engines.quantum.run, "neural": engines.neural.run, "marketing": engines.marketing.run,
              "business": engines.business.run}[config.engine]
    reports = {config.engine: runner(config, progress=progress)}
  else:
    system = engines.TruthGPTCompleteSystem(config)
    print(f"TruthGPTCompleteSystem: {system.enabled and ', '.join(system.enabled) or 'no engines'} enabled; model "
          f"parameters {engines.neural.count_params(system.params):,}")
    reports = system.run_engines(progress=progress)
    if "neural" in system.enabled:
      n = config.neural
      tokens = np.random.default_rng(n.seed).integers(0, n.model.vocab_size, (n.batch_size, n.seq_len))
      for level in engines.pipeline.stage_names(n.compare):
        for _ in range(flags.FLAGS.forward_repeats):
          system.forward_with_optimization(tokens, None, level)
    out["performance"] = stats = system.get_performance_stats()
    for level, row in stats["forward"].items():
      after = row["mean_seconds_after_first"]
      print(f"forward_with_optimization({level}): first call {row['first_call_seconds'] * 1e3:.1f} ms (compiles), "
            f"then {'n/a' if after is None else f'{after * 1e3:.2f} ms'} per call")
  for report in reports.values():
    print_report(report)
  out["engines"] = {name: report.to_dict() for name, report in reports.items()}
  failed = [c.name for report in reports.values() for c in report.verification if not c.passed]
  checks = sum(len(report.verification) for report in reports.values())
  memory = monitoring.memory_stats()
  print(f"\nhost peak memory {memory['host_peak_rss_bytes'] / 2**20:,.0f} MiB; verification: "
        f"{checks - len(failed)}/{checks} checks passed" + (f"; FAILED: {', '.join(failed)}" if failed else ""))
  if flags.FLAGS.out:
    path = pathlib.Path(flags.FLAGS.out)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(engines.pipeline.to_builtin(out), indent=1))
    print(f"report: {path}")
  return 1 if failed else 0


if __name__ == "__main__":
  cli.run(lambda argv: sys.exit(main(argv)))
