"""The config files: every variant validates, arguments are checked, and each docstring's command is runnable."""

import importlib.util
import pathlib
import re

import pytest

import distattn_jax as da
from distattn_jax import training

CONFIGS = pathlib.Path(__file__).resolve().parents[1] / "configs"


def load(name):
  spec = importlib.util.spec_from_file_location(f"config_{name}", CONFIGS / f"{name}.py")
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module


lm, base = load("lm"), load("base")


@pytest.mark.parametrize("size", sorted(lm.SIZES))
@pytest.mark.parametrize("metric", da.metrics.available())
def test_every_size_and_metric_validates(size, metric):
  config = lm.get_config(f"metric={metric},size={size}")
  model = training.validate(config)
  preset = lm.SIZES[size]
  assert (model.metric, model.width, model.depth) == (metric, preset["width"], preset["depth"])
  assert (config.data.seq_len, config.train.steps) == (preset["seq_len"], preset["steps"])
  assert config.train.checkpoint_every % config.train.log_every == 0


def test_lm_arguments_override_steps_and_positions_and_reject_unknown_keys_and_sizes():
  config = lm.get_config("metric=cosine,positions=rotary,steps=40")
  assert (config.model.metric, config.model.positions, config.train.steps) == ("cosine", "rotary", 40)
  with pytest.raises(ValueError, match=r"'width=64' is not key=value with a known key; valid keys: metric, "
                                       r"positions, size, steps"):
    lm.get_config("width=64")
  with pytest.raises(ValueError, match=r"size='huge' is not a preset; valid sizes: tiny, small, base"):
    lm.get_config("size=huge")


def test_base_takes_any_dotted_field_and_nothing_else():
  config = base.get_config("model.metric=l2,train.steps=7,model.lambda_init=0.5")
  assert (config.model.metric, config.train.steps, config.model.lambda_init) == ("l2", 7, 0.5)
  assert base.get_config(None).to_dict() == training.default_config().to_dict()
  with pytest.raises(ValueError, match=r"'model.metrik=l2' is not key=value with a known key; valid keys: .*"
                                       r"model.metric"):
    base.get_config("model.metrik=l2")


@pytest.mark.parametrize("module", [lm, base])
def test_each_docstring_holds_the_command_that_runs_it(module):
  command = re.search(r"experiments/train\.py --config=(configs/\w+\.py):(\S+)", module.__doc__)
  assert command, module.__doc__
  path, arg = command.groups()
  assert pathlib.Path(path).name == pathlib.Path(module.__file__).name
  training.validate(module.get_config(arg))


def test_the_make_run_job_is_the_lm_docstrings_command():
  makefile = (CONFIGS.parent / "Makefile").read_text()
  assert "LM_CONFIG := configs/lm.py:metric=l1,size=tiny" in makefile
  assert "--config=configs/lm.py:metric=l1,size=tiny --workdir=runs/lm_tiny_l1" in lm.__doc__
