"""The run configuration: every field a run can change, its default, and the checks that run before compiling.

``default_config()`` is the schema: a config file (``configs/*.py``) starts from it and overrides values, and
:func:`validate` rejects any key the schema does not have (listing the valid ones), values of the wrong type and
values out of range, naming the field. The model's own checks live in :class:`TruthGPTConfig`.
"""

from __future__ import annotations

import ast
import hashlib
import importlib.util
import json
import pathlib
import types
from typing import Any

import ml_collections
from ml_collections import config_dict

from distattn_jax.models import TruthGPTConfig


def default_config() -> ml_collections.ConfigDict:
  """Every field with its default; ``None`` defaults are typed placeholders, so they can be set from flags."""
  c = ml_collections.ConfigDict()
  c.seed = 0  # parameter init, data order and dropout all derive from it

  c.model = ml_collections.ConfigDict(dict(
      vocab_size=256, width=128, depth=2, num_heads=4, num_kv_heads=config_dict.placeholder(int), mlp_dim=512,
      max_len=256, positions="learned", rotary_base=10000.0, metric="l1",
      lambda_init=config_dict.placeholder(float),  # None: da.initializers.default_lambda for the metric
      learnable_lambda=True, p=2.0, learnable_p=False, implementation="auto", dropout_rate=0.0,
      attention_dropout_rate=0.0, dtype="float32"))  # dtype: compute dtype; parameters stay float32

  c.data = ml_collections.ConfigDict(dict(
      path="",  # "" = the Python standard library's source; else a text file or a folder of them
      seq_len=128, batch_size=16, val_fraction=0.05))

  c.optim = ml_collections.ConfigDict(dict(
      learning_rate=3e-3, warmup_steps=100, end_learning_rate_fraction=0.1, weight_decay=0.1, b1=0.9, b2=0.95,
      eps=1e-8, clip_norm=1.0,  # global-norm clipping of the non-lambda gradients; 0 = off
      grad_accum_steps=1,  # microbatches per optimizer step; data.batch_size is the whole step's batch
      lambda_learning_rate=1e-2))  # peak lr of the log_lambda / log_p / log_metric_weights group (same shape, no decay)

  c.train = ml_collections.ConfigDict(dict(
      steps=2000, log_every=50, eval_every=500, eval_batches=8, checkpoint_every=500, keep_checkpoints=3,
      # Resuming from a checkpoint whose fingerprint (see `fingerprint`) differs from this config is an error
      # unless these say otherwise: any changed field but train.steps, and train.steps (the schedule's length).
      allow_config_change=False, allow_steps_change=False))

  # prompt + length stay within data.seq_len: learned positions past the training context are untrained.
  c.sample = ml_collections.ConfigDict(dict(prompt="def ", length=124, temperature=0.8, top_k=0, seed=0))
  c.analysis = ml_collections.ConfigDict(dict(batch_size=4))  # validation sequences analysed by analyze.py

  # Device mesh (training/distributed.py): axis sizes, -1 = the devices the other axes leave. All 1 (the default)
  # trains on one device without a mesh; any other setting spans every device, so the product must equal
  # jax.device_count(). Batches split over data x fsdp; parameters and optimizer state are replicated, or with
  # fsdp > 1 split over fsdp along their largest divisible axis; seq > 1 splits the length over the ring kernel.
  c.mesh = ml_collections.ConfigDict(dict(data=1, fsdp=1, seq=1))
  # Multi-host: jax.distributed.initialize with these before anything touches a device. All None (and no
  # JAX_COORDINATOR_ADDRESS in the environment) = one process; None fields are read by JAX from the
  # environment or a detected cluster. initialization_timeout (s): how long to wait for the coordinator and the
  # other processes before failing.
  c.distributed = ml_collections.ConfigDict(dict(
      coordinator_address=config_dict.placeholder(str), num_processes=config_dict.placeholder(int),
      process_id=config_dict.placeholder(int), initialization_timeout=120))
  return c


# Fields that do not change what training computes: how often it logs, evaluates and saves, what it samples
# and analyses afterwards, the resume overrides themselves, and where it runs (the mesh and the processes: a run
# resumes on another mesh and computes the same steps, up to the order of float32 sums). Every other field is
# fingerprinted, so a field added to the schema later counts as a change of the computation until it is listed
# here.
NOT_FINGERPRINTED = ("train.log_every", "train.eval_every", "train.eval_batches", "train.checkpoint_every",
                     "train.keep_checkpoints", "train.allow_config_change", "train.allow_steps_change", "sample.",
                     "analysis.", "mesh.", "distributed.")


class ConfigChangedError(ValueError):
  """Resuming a checkpoint with a config whose fingerprinted fields differ from the ones it was trained with."""


def fingerprint(config: ml_collections.ConfigDict) -> dict[str, Any]:
  """``{"fields": {"model.metric": "l1", ...}, "sha256": ...}``: the fields that change the computation
  (model, optimizer, schedule length ``train.steps``, data, seed), as JSON values, and their hash."""
  fields = {k: v for k, v in flatten(config).items() if not k.startswith(NOT_FINGERPRINTED)}
  fields = json.loads(json.dumps(fields, sort_keys=True))
  digest = hashlib.sha256(json.dumps(fields, sort_keys=True).encode()).hexdigest()
  return {"fields": fields, "sha256": digest}


def fingerprint_changes(saved: dict[str, Any], current: dict[str, Any], prefixes: tuple[str, ...] = ("",)
                        ) -> list[tuple[str, Any, Any]]:
  """``[(field, saved value, current value)]`` for the fields (under ``prefixes``) that differ between two
  fingerprints' ``fields``; a field one of them lacks shows as ``"<absent>"``."""
  names = sorted(k for k in set(saved) | set(current) if k.startswith(prefixes))
  return [(k, saved.get(k, "<absent>"), current.get(k, "<absent>")) for k in names
          if saved.get(k, "<absent>") != current.get(k, "<absent>")]


def check_resume(saved: dict[str, Any] | None, config: ml_collections.ConfigDict, where: str,
                 prefixes: tuple[str, ...] = ("",)) -> list[tuple[str, Any, Any]]:
  """Compares the fingerprint saved with checkpoint ``where`` against ``config``'s, over the fields under
  ``prefixes``; returns the changes it accepts (``train.allow_config_change``, ``train.allow_steps_change``) and
  raises :class:`ConfigChangedError` listing the others with their old and new values."""
  allow_config, allow_steps = config.train.allow_config_change, config.train.allow_steps_change
  if saved is None:
    if allow_config:
      return []
    raise ConfigChangedError(
        f"checkpoint {where} has no config fingerprint, so nothing shows it was trained with this config; "
        "resume with train.allow_config_change=True (--config.train.allow_config_change=True) if it was, or "
        "train in another workdir")
  changes = fingerprint_changes(saved["fields"], fingerprint(config)["fields"], prefixes)
  others = [c for c in changes if c[0] != "train.steps"]
  if others and not allow_config:
    listed = "; ".join(f"{name}: {old!r} -> {new!r}" for name, old, new in others)
    raise ConfigChangedError(
        f"checkpoint {where} was trained with a different config ({listed}); resume with "
        "train.allow_config_change=True (--config.train.allow_config_change=True) to continue from it with the "
        "new values, or train in another workdir (its config.json holds the old ones)")
  if len(others) < len(changes) and not allow_steps:
    _, old, new = next(c for c in changes if c[0] == "train.steps")
    raise ConfigChangedError(
        f"checkpoint {where} was trained with train.steps={old}, which sets the length of the learning-rate "
        f"schedule; this run asks for train.steps={new}. Resume with train.allow_steps_change=True "
        "(--config.train.allow_steps_change=True) to continue on the schedule of the new length (the learning "
        "rate follows it from the checkpoint's step on, so it jumps there), or train in another workdir")
  return changes


def flatten(config: ml_collections.ConfigDict, prefix: str = "") -> dict[str, Any]:
  """``{"model.metric": "l1", ...}``: every leaf field under its dotted name."""
  flat = {}
  for key, value in config.items():
    if isinstance(value, ml_collections.ConfigDict):
      flat.update(flatten(value, f"{prefix}{key}."))
    else:
      flat[prefix + key] = value
  return flat


def load_config_file(path: str | pathlib.Path) -> types.ModuleType:
  """A config file as a module (config files are loaded by path, not imported): for a config that builds on
  another's ``get_config``, e.g. ``load_config_file(pathlib.Path(__file__).with_name("ablate.py"))``."""
  path = pathlib.Path(path)
  spec = importlib.util.spec_from_file_location(f"config_{path.stem}", path)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module


def parse_arg(arg: str | None, **defaults: Any) -> dict[str, Any]:
  """Parses a config file's argument, ``"metric=l1,size=tiny"``, into the keys of ``defaults``.

  Values take the type of their default (ints, floats, bools and strings); a ``None`` default takes a Python
  literal (``1.5``, ``None``) or else the string.
  An unknown key is a ValueError listing the valid ones.
  """
  values = dict(defaults)
  for item in filter(None, (arg or "").split(",")):
    key, sep, text = item.partition("=")
    key = key.strip()
    if not sep or key not in defaults:
      raise ValueError(f"config argument {item!r} is not key=value with a known key; valid keys: "
                       f"{', '.join(sorted(defaults))}")
    default = defaults[key]
    text = text.strip()
    if isinstance(default, bool):
      if text.lower() not in ("true", "false", "1", "0"):
        raise ValueError(f"config argument {key}={text!r} must be true or false")
      values[key] = text.lower() in ("true", "1")
    elif isinstance(default, (int, float)):
      try:
        values[key] = type(default)(ast.literal_eval(text))
      except (ValueError, SyntaxError):
        raise ValueError(f"config argument {key}={text!r} must be a {type(default).__name__}") from None
    elif default is None:
      try:
        values[key] = ast.literal_eval(text)
      except (ValueError, SyntaxError):
        values[key] = text
    else:
      values[key] = text
  return values


def _check_keys(config: ml_collections.ConfigDict, schema: ml_collections.ConfigDict, prefix: str) -> None:
  for key in config.keys():
    name = prefix + key
    if key not in schema:
      raise ValueError(f"unknown config key {name!r}; valid keys{' in ' + prefix[:-1] if prefix else ''}: "
                       f"{', '.join(sorted(schema.keys()))}")
    value, default = config[key], schema[key]
    if isinstance(default, ml_collections.ConfigDict):
      if not isinstance(value, ml_collections.ConfigDict):
        raise ValueError(f"config.{name} must be a group of fields ({', '.join(sorted(default.keys()))})")
      _check_keys(value, default, name + ".")
      continue
    expected = schema.get_type(key)  # a placeholder's declared type for None defaults
    ok = (isinstance(value, expected) or (expected is float and isinstance(value, int))) and (
        isinstance(value, bool) == (expected is bool))
    if not (ok or (value is None and default is None)):
      raise ValueError(f"config.{name}={value!r} must be a {expected.__name__}")
  missing = sorted(set(schema.keys()) - set(config.keys()))
  if missing:
    raise ValueError(f"config{'.' + prefix[:-1] if prefix else ''} is missing {', '.join(missing)}")


def validate(config: ml_collections.ConfigDict) -> TruthGPTConfig:
  """Checks every field of a run's config; returns the model's config. Raises ValueError naming the field."""
  _check_keys(config, default_config(), "")
  model = TruthGPTConfig(**config.model.to_dict())

  def require(ok: bool, field: str, rule: str):
    if not ok:
      group, key = field.split(".")
      raise ValueError(f"config.{field}={config[group][key]!r} is invalid: {rule}")

  d, o, t, s = config.data, config.optim, config.train, config.sample
  require(d.seq_len >= 1, "data.seq_len", "must be >= 1")
  require(d.seq_len <= model.max_len, "data.seq_len", f"must be <= model.max_len={model.max_len}")
  require(d.batch_size >= 1, "data.batch_size", "must be >= 1")
  require(0 < d.val_fraction < 1, "data.val_fraction", "must be in (0, 1)")
  require(o.learning_rate >= 0, "optim.learning_rate", "must be >= 0")
  require(o.lambda_learning_rate >= 0, "optim.lambda_learning_rate", "must be >= 0")
  require(o.warmup_steps >= 0, "optim.warmup_steps", "must be >= 0")
  require(0 <= o.end_learning_rate_fraction <= 1, "optim.end_learning_rate_fraction", "must be in [0, 1]")
  require(o.weight_decay >= 0, "optim.weight_decay", "must be >= 0")
  require(0 <= o.b1 < 1, "optim.b1", "must be in [0, 1)")
  require(0 <= o.b2 < 1, "optim.b2", "must be in [0, 1)")
  require(o.eps > 0, "optim.eps", "must be > 0")
  require(o.clip_norm >= 0, "optim.clip_norm", "must be >= 0 (0 = no clipping)")
  require(o.grad_accum_steps >= 1, "optim.grad_accum_steps", "must be >= 1")
  require(d.batch_size % o.grad_accum_steps == 0, "optim.grad_accum_steps",
          f"must divide data.batch_size={d.batch_size}")
  require(t.steps >= 0, "train.steps", "must be >= 0")
  for field in ("log_every", "eval_every", "eval_batches", "checkpoint_every", "keep_checkpoints"):
    require(t[field] >= 1, f"train.{field}", "must be >= 1")
  # Resumed runs restart at a checkpoint; logging intervals aligned to it make their records identical.
  require(t.checkpoint_every % t.log_every == 0, "train.checkpoint_every",
          f"must be a multiple of train.log_every={t.log_every}")
  require(len(s.prompt) >= 1, "sample.prompt", "must not be empty")
  require(s.length >= 1, "sample.length", "must be >= 1")
  require(s.temperature >= 0, "sample.temperature", "must be >= 0 (0 = greedy)")
  require(0 <= s.top_k <= model.vocab_size, "sample.top_k", f"must be in [0, {model.vocab_size}] (0 = all)")
  # Learned positions past the training context were never trained: samples that reach them turn to noise.
  require(len(s.prompt.encode()) + s.length <= d.seq_len or model.positions == "rotary", "sample.length",
          f"prompt bytes + length must be <= data.seq_len={d.seq_len}, the context the learned positions were "
          "trained on")
  require(config.analysis.batch_size >= 1, "analysis.batch_size", "must be >= 1")
  check_placement(config)
  return model


def check_placement(config: ml_collections.ConfigDict) -> None:
  """The mesh and process fields that can be checked without devices (``distributed.Placement.create`` checks
  the sizes against the device count, and the batch and length against the sizes)."""
  m, p = config.mesh, config.distributed
  for axis in ("data", "fsdp", "seq"):
    if m[axis] != -1 and m[axis] < 1:
      raise ValueError(f"config.mesh.{axis}={m[axis]} is invalid: must be a positive int, or -1 for the devices "
                       "the other axes leave")
  free = [axis for axis in ("data", "fsdp", "seq") if m[axis] == -1]
  if len(free) > 1:
    raise ValueError(f"config.mesh has {len(free)} axes set to -1 ({', '.join(free)}); at most one may take the "
                     "remaining devices")
  if p.num_processes is not None and p.num_processes < 1:
    raise ValueError(f"config.distributed.num_processes={p.num_processes} is invalid: must be >= 1")
  if p.process_id is not None and not (0 <= p.process_id < (p.num_processes or 1 << 62)):
    allowed = f"[0, {p.num_processes})" if p.num_processes else "[0, num_processes)"
    raise ValueError(f"config.distributed.process_id={p.process_id} is invalid: must be in {allowed}, "
                     f"num_processes={p.num_processes}")
  address = p.coordinator_address
  if address is not None and (":" not in address or not address.rpartition(":")[2].isdigit()):
    raise ValueError(f"config.distributed.coordinator_address={address!r} is invalid: must be host:port, e.g. "
                     "localhost:12345 (process 0 listens there)")
  if p.initialization_timeout < 1:
    raise ValueError(f"config.distributed.initialization_timeout={p.initialization_timeout} is invalid: must be "
                     ">= 1 (seconds)")
