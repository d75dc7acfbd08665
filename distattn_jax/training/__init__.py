"""Training: config schema and checks, the optax pipeline with its lambda group, pure steps, checkpoints,
metric writers, the loop, and where it runs (meshes, pmap, several processes: ``distributed``).
``experiments/`` holds only thin absl mains over these.

Needs the ``train`` extra (``pip install 'distattn_jax[train]'``); without it this import is an ImportError
that says so."""

from distattn_jax import extras

extras.require("distattn_jax.training", "train")

# pylint: disable=wrong-import-position
from distattn_jax.training.checkpoint import CheckpointError, Checkpoints, NoReadableCheckpoint
from distattn_jax.training.config import (ConfigChangedError, check_resume, default_config, fingerprint,
                                         load_config_file, parse_arg, validate)
from distattn_jax.training.distributed import Placement, pmap_train_step
from distattn_jax.training.distributed import initialize as initialize_distributed
from distattn_jax.training.loop import (NonFiniteError, NonFiniteLossError, build, hide_orbax_info_logs, load_data,
                                       throughput, train_and_evaluate)
from distattn_jax.training.optim import learning_rate_schedule, make_optimizer, param_labels
from distattn_jax.training.runs import analyze_run, restore, sample_text
from distattn_jax.training.steps import TrainState, create_train_state, eval_step, lambda_values, train_step
from distattn_jax.training.writers import MetricWriter, read_jsonl

__all__ = ["CheckpointError", "Checkpoints", "ConfigChangedError", "MetricWriter", "NonFiniteError",
           "NonFiniteLossError", "NoReadableCheckpoint", "Placement", "TrainState", "analyze_run", "build",
           "check_resume", "create_train_state", "default_config", "eval_step", "fingerprint",
           "hide_orbax_info_logs", "initialize_distributed", "lambda_values", "learning_rate_schedule", "load_data",
           "make_optimizer", "param_labels", "parse_arg", "pmap_train_step", "read_jsonl", "restore", "sample_text",
           "throughput", "train_and_evaluate", "train_step", "validate"]
