"""The robustness study: classifiers trained per metric and seed at an ablation suite's budget, then measured on
clean, noisy and adversarially perturbed test inputs, with a local Lipschitz estimate per model.

  # MNIST-1D and Fashion-MNIST at the CPU suite's budget, 7 metrics x 3 seeds (see docs/research.md)
  .venv/bin/python experiments/robustness.py --config=configs/robustness.py:suite=cpu
  # seconds: one task, two metrics, one seed, a tiny model (what tests/test_robustness.py runs)
  .venv/bin/python experiments/robustness.py --quick

Arguments: ``suite`` (``cpu`` or ``quick``). The training budget is the ablation suite's of the same name
(configs/ablate.py); every other field is the robustness evaluation. Metrics join a finished study by rerunning
with them alone, e.g. ``--config.metrics=weighted_l1,weighted_l2``: cells already in the results are kept and the
report covers every metric in the file. Noise levels and epsilons are in the units of the model's input features
(MNIST-1D's steps and Fashion-MNIST's standardised patch pixels: both have standard deviation about 1).
"""

import pathlib

import ml_collections

from distattn_jax import training
from distattn_jax.training import ablation

SUITES = {
    "cpu": dict(tasks="mnist1d,fashion_mnist", seeds=3, examples=500, noise="0.1,0.3,1.0",
                epsilons="0.01,0.03,0.1", pgd_steps=5, lipschitz_points=8),
    "quick": dict(tasks="mnist1d", seeds=1, examples=64, noise="0,0.3", epsilons="0.03,0.1", pgd_steps=2,
                  lipschitz_points=2),
}
QUICK_BUDGET = dict(steps=20, batch_size=16, warmup_steps=2, eval_every=10, width=16, depth=1, num_heads=2,
                    mlp_dim=32, eval_batch_size=32, curve_eval_examples=64, eval_examples=64)


def _ablate():
  return training.load_config_file(pathlib.Path(__file__).with_name("ablate.py"))


def get_config(arg=None):
  suite = training.parse_arg(arg, suite="cpu")["suite"]
  if suite not in SUITES:
    raise ValueError(f"config argument suite={suite!r} is not a suite; valid suites: {', '.join(SUITES)}")
  s = SUITES[suite]
  base = _ablate().get_config("suite=cpu")
  c = ml_collections.ConfigDict()
  c.suite = f"robustness_{suite}"  # names the results files
  c.tasks = s["tasks"]
  c.metrics = ",".join(ablation.SHIPPED_METRICS) if suite != "quick" else "dot,l2"
  c.lambda_mode = "learned"
  c.seeds = s["seeds"]
  c.register = ""  # a Python file that registers user metrics (da.metrics.register) before the study runs
  c.p = base.p
  c.pooling = base.pooling
  c.budget = base.budget
  if suite == "quick":
    c.budget.update(QUICK_BUDGET)
  c.budget.eval_examples = s["examples"]  # the trainer's own final score, on the examples measured here
  c.eval = ml_collections.ConfigDict(dict(
      examples=s["examples"],  # the first test examples every measurement uses
      batch_size=min(250, s["examples"]),
      noise=s["noise"],  # standard deviations of the Gaussian noise added to every input feature
      noise_seed=0,
      epsilons=s["epsilons"],  # L-inf radii of FGSM and PGD
      pgd_steps=s["pgd_steps"],
      pgd_step_factor=2.5,  # PGD's step is pgd_step_factor * epsilon / pgd_steps (Madry et al.'s choice)
      lipschitz_points=s["lipschitz_points"]))  # test points of the Jacobian norm
  c.cache_dir = ""  # generated and converted data; "" = $DISTATTN_DATA_DIR or ~/.cache/distattn_jax
  return c
