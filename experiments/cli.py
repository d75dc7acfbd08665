"""Flags for the mains in experiments/: every command-line mistake is a short usage error, never a traceback.

``run(main)`` stands in for ``absl.app.run(main)``. Before absl parses the flags, each ``--config.<path>=value``
override is checked against the config it changes (the file ``--config`` names, or the flag's default): a path
with an unknown key names the key, suggests the closest (difflib) and lists the valid keys at its level; a
value absl cannot read as the field's type, a value given to a group of fields, a config file that does not
exist and a ``get_config`` that refuses its argument are refused the same way, and so is any other error of
absl's flag parsing (an unknown flag, a required one missing) and a positional argument. ``validate``
(``training.validate``) then checks the values the run would use, so ``--config.train.steps=-1`` stops here too,
and an ``app.UsageError`` the main raises about a flag is reported alike. Each mistake prints one paragraph on
stderr and exits with status 2 (``EXIT_USAGE``).

``run(main, run_config=True)`` (generate.py, analyze.py) reads a run's own config: without ``--config``, the
resolved config the trainer saved as ``<workdir>/config.json`` is used (``--config.*`` flags still override
it), so sampling repeats no training flag. A ``--config`` given as well, or a ``--config.model.*`` flag, must
agree with it on the model (``model.*``: what the checkpoint's weights were trained as), unless
``--config.train.allow_config_change=True`` asks to load the weights into another model on purpose.

A main whose ``--config`` has a default file defines it with :func:`define_config_file`, which loads it when the
flags are parsed: ml_collections would load it, and apply its overrides, when the main is imported.

This file is also the config file of a run folder: ``get_config(workdir)`` is what ``run_config`` uses when
``--config`` is absent, so ``--config=experiments/cli.py:runs/lm_tiny_l1`` equals no ``--config``.
"""

from __future__ import annotations

import difflib
import importlib.util
import json
import os
import pathlib
import re
import sys
from typing import Any, Callable, Sequence

import ml_collections
from absl import app, flags
from ml_collections import config_flags

EXIT_USAGE = 2
RUN_CONFIG = "config.json"  # the resolved config training.train_and_evaluate writes into the workdir
# Resume controls rather than part of what the run computed: a config read back from a run has them off.
RESUME_FIELDS = ("allow_config_change", "allow_steps_change")
_TYPE_NAMES = {int: "an int", float: "a float", bool: "a bool (true or false)", str: "a string"}
_PARSERS = {int: flags.IntegerParser(), float: flags.FloatParser(), bool: flags.BooleanParser()}


_DEFAULT_CONFIGS: dict[tuple[int, str], str] = {}  # (id of the FlagValues, flag name) -> default config file


class UsageError(Exception):
  """A mistake on the command line; :func:`parse_flags` prints it and exits with status 2."""


def define_config_file(name: str, default: str, help_string: str, flag_values: flags.FlagValues = flags.FLAGS,
                       **kwargs) -> flags.FlagHolder:
  """``config_flags.DEFINE_config_file`` with a default file that :func:`parse_flags` loads. (ml_collections loads a
  default and applies its overrides as the flag is defined, when the main is imported: a mistake there would be
  a traceback before any parsing.)"""
  _DEFAULT_CONFIGS[(id(flag_values), name)] = default
  holder = config_flags.DEFINE_config_file(name, None, f"{help_string} Default: {default}", flag_values=flag_values,
                                           **kwargs)
  caller = sys._getframe(1).f_globals.get("__name__")  # pylint: disable=protected-access
  # Listed with the main's own flags (--helpshort), as if the main had defined it.
  flag_values.register_flag_by_module(sys.argv[0] if caller == "__main__" else caller, flag_values[name])
  return holder


def run(main: Callable[[list[str]], Any], *, validate: Callable[[ml_collections.ConfigDict], Any] | None = None,
        run_config: bool = False, config_flag: str = "config") -> None:
  """``absl.app.run(main)`` with :func:`parse_flags` as its flags parser; an ``app.UsageError`` that ``main``
  raises is the same kind of usage error (absl would print the whole docstring and exit with status 1)."""
  app.run(usage_errors(main), flags_parser=lambda argv: parse_flags(
      argv, validate=validate, run_config=run_config, config_flag=config_flag))


def usage_errors(main: Callable[[list[str]], Any]) -> Callable[[list[str]], Any]:
  """``main`` with its ``app.UsageError`` (a bad flag value it found) printed as :func:`parse_flags` prints one."""

  def wrapped(argv: list[str]) -> Any:
    try:
      return main(argv)
    except app.UsageError as e:
      _exit(str(e), argv[0] if argv else None)

  return wrapped


def _exit(message: str, argv0: str | None) -> None:
  program = os.path.basename(argv0) if argv0 else "program"
  sys.stderr.write(f"{program}: error: {message}\n(run {program} --helpshort for its flags)\n")
  sys.exit(EXIT_USAGE)


def parse_flags(argv: Sequence[str], *, validate: Callable[[ml_collections.ConfigDict], Any] | None = None,
                run_config: bool = False, config_flag: str = "config",
                flag_values: flags.FlagValues = flags.FLAGS) -> list[str]:
  """Parses ``argv`` into ``flag_values``; returns ``[program]`` (positional arguments are a mistake). A mistake
  prints ``<program>: error: <what>`` on stderr and exits with status 2."""
  argv = list(argv)
  try:
    return _parse(argv, validate, run_config, config_flag, flag_values)
  except UsageError as e:
    _exit(str(e), argv[0] if argv else None)


def _parse(argv, validate, run_config, name, flag_values) -> list[str]:
  spec = config_spec(argv, name)
  saved, workdir = None, None
  if run_config:
    workdir = flag_value(argv, "workdir")
    if not workdir:
      raise UsageError("--workdir, the run's folder (its checkpoints/ and config.json), is required")
    if not (pathlib.Path(workdir) / "checkpoints").is_dir():
      raise UsageError(f"no checkpoints in {os.path.join(workdir, 'checkpoints')}: --workdir must be a trained run's "
                       f"folder (experiments/train.py --config=... --workdir={workdir} trains one)")
    if (pathlib.Path(workdir) / RUN_CONFIG).exists():
      saved = read_run_config(workdir)
    elif spec is None:
      raise UsageError(f"--config is not given and {os.path.join(workdir, RUN_CONFIG)}, the run's saved config, does "
                       "not exist; name the config the run was trained with, e.g. --config=configs/lm.py:size=tiny")
    if spec is None:
      argv.insert(1, f"--{name}={pathlib.Path(__file__).resolve()}:{workdir}")
  elif spec is None and (id(flag_values), name) in _DEFAULT_CONFIGS:
    spec = _DEFAULT_CONFIGS[(id(flag_values), name)]
    argv.insert(1, f"--{name}={spec}")
  base = saved if spec is None and saved is not None else (
      load_config_file(spec, name) if spec is not None else _default(flag_values, name))
  overrides = check_overrides(argv, base, name)

  saved_argv, sys.argv = sys.argv, argv  # ml_collections reads the overrides from sys.argv
  try:
    rest = flag_values(argv)
  except flags.Error as e:
    raise UsageError(_message(e)) from None
  except (AttributeError, KeyError, TypeError, ValueError, OSError) as e:  # raised inside ml_collections
    raise UsageError(f"the --{name} flags could not be applied: {_message(e)}") from None
  finally:
    sys.argv = saved_argv
  if len(rest) > 1:
    raise UsageError(f"unexpected arguments: {' '.join(rest[1:])} (every setting is a --flag)")
  config = flag_values[name].value
  if saved is not None:
    model_flags = [f for f in overrides if f.split("=", 1)[0].lstrip("-").startswith(f"{name}.model.")]
    who = f"--{name}" if spec is not None else ", ".join(f.split("=", 1)[0] for f in model_flags)
    check_same_model(saved, config, workdir, who)
  if validate is not None:
    try:
      validate(config)
    except (ValueError, TypeError) as e:
      raise UsageError(_message(e)) from None
  return rest[:1]


def config_spec(argv: Sequence[str], name: str = "config") -> str | None:
  """The value of the last ``--<name>=spec`` (or ``--<name> spec``) in ``argv``, or None."""
  return flag_value(argv, name)


def flag_value(argv: Sequence[str], name: str) -> str | None:
  """The value the last ``--name=value`` or ``--name value`` in ``argv`` gives (before a ``--``), or None."""
  value = None
  for i, arg in enumerate(argv[1:], 1):
    if arg == "--":
      break
    match = re.fullmatch(rf"--?{re.escape(name)}(=(.*))?", arg, re.S)
    if match:
      value = match.group(2) if match.group(1) else (argv[i + 1] if i + 1 < len(argv) else None)
  return value


def _default(flag_values: flags.FlagValues, name: str) -> ml_collections.ConfigDict | None:
  return flag_values[name].value if name in flag_values else None


def load_config_file(spec: str, name: str = "config") -> ml_collections.ConfigDict:
  """``get_config(arg)`` of the file ``spec`` names (``path`` or ``path:arg``), as ml_collections loads it; a
  missing file, a file without ``get_config`` or one that refuses ``arg`` is a :class:`UsageError`."""
  path, *arg = spec.split(":", 1)
  flag = f"--{name}={spec}"
  if not os.path.isfile(path):
    folder = pathlib.Path(path).parent
    present = sorted(p.name for p in folder.glob("*.py")) if folder.is_dir() else []
    close = difflib.get_close_matches(pathlib.Path(path).name, present, n=1)
    hint = f" (did you mean {str(folder / close[0])!r}?)" if close else ""
    listed = f"; config files in {str(folder)!r}: {', '.join(present)}" if present else ""
    raise UsageError(f"{flag}: no config file {path!r}{hint}{listed}")
  try:
    module_spec = importlib.util.spec_from_file_location(f"{name}_config_check", path)
    module = importlib.util.module_from_spec(module_spec)
    module_spec.loader.exec_module(module)
  except Exception as e:  # pylint: disable=broad-except  (a user's file: any error it raises is reported)
    raise UsageError(f"{flag}: loading {path!r} failed: {type(e).__name__}: {e}") from None
  if not callable(getattr(module, "get_config", None)):
    raise UsageError(f"{flag}: {path!r} defines no get_config(); a config file's get_config(arg) returns the config")
  try:
    config = module.get_config(*arg)
  except (ValueError, TypeError, KeyError) as e:
    raise UsageError(f"{flag}: {_message(e)}") from None
  if not isinstance(config, ml_collections.ConfigDict):
    raise UsageError(f"{flag}: get_config() returned {type(config).__name__}, not a ConfigDict")
  return config


def check_overrides(argv: Sequence[str], config: ml_collections.ConfigDict | None, name: str = "config"
                    ) -> list[str]:
  """Checks each ``--<name>.<path>[=value]`` in ``argv`` against ``config``: every key of ``path`` exists and the
  value reads as the field's type (as absl will read it). Returns the override arguments; a mistake is a
  :class:`UsageError` naming the flag, and for an unknown key the valid keys at its level."""
  found = []
  for i, arg in enumerate(argv[1:], 1):
    if arg == "--":
      break
    match = re.fullmatch(rf"--?(no)?{re.escape(name)}\.([^=]*)(=(.*))?", arg, re.S)
    if not match:
      continue
    negated, path, has_value, value = match.group(1), match.group(2), match.group(3), match.group(4)
    flag = arg
    found.append(arg)
    if config is None:
      raise UsageError(f"{flag}: there is no --{name} to override; name the config file with --{name}=...")
    node, parent = config, name
    keys = path.split(".")
    for depth, key in enumerate(keys):
      if not isinstance(node, ml_collections.ConfigDict):
        raise UsageError(f"{flag}: {parent} is a field, not a group of fields, so it has no key {key!r}; set it "
                         f"with --{parent}=VALUE")
      if key not in node:
        valid = sorted(node.keys())
        close = difflib.get_close_matches(key, valid, n=3)
        hint = f" (did you mean {' or '.join(repr(c) for c in close)}?)" if close else ""
        raise UsageError(f"{flag}: {parent} has no key {key!r}{hint}; valid keys in {parent}: {', '.join(valid)}")
      if depth < len(keys) - 1:
        node, parent = node[key], f"{parent}.{key}"
    key = keys[-1]
    field = f"{parent}.{key}"
    if isinstance(node[key], ml_collections.ConfigDict):
      inner = sorted(node[key].keys())
      raise UsageError(f"{flag}: {field} is a group of fields, not a value; set one of them, e.g. "
                       f"--{field}.{inner[0] if inner else 'KEY'}=VALUE; valid keys in {field}: {', '.join(inner)}")
    kind = node.get_type(key)
    if kind not in _PARSERS:
      continue  # strings take anything; other types are left to ml_collections' parsers
    if negated or not has_value:
      if kind is bool:
        continue
      if negated:
        raise UsageError(f"{flag}: --no{name}.{path} sets a bool, but {field} takes {_TYPE_NAMES[kind]}")
      value = argv[i + 1] if i + 1 < len(argv) else None
      if value is None:
        raise UsageError(f"{flag}: {field} needs a value, {_TYPE_NAMES[kind]}: --{field}=VALUE")
      flag = f"{flag} {value}"
    try:
      _PARSERS[kind].parse(value)
    except (ValueError, TypeError):
      raise UsageError(f"{flag}: {field} takes {_TYPE_NAMES[kind]} (here it is {node[key]!r}); {value!r} is not "
                       "one") from None
  return found


def read_run_config(workdir: str | os.PathLike) -> ml_collections.ConfigDict:
  """The config a run was trained with: ``<workdir>/config.json`` over ``training.default_config()``, with the
  resume controls (``train.allow_*``) off. A file that does not fit the schema is a :class:`UsageError`."""
  from distattn_jax import training  # pylint: disable=import-outside-toplevel
  path = pathlib.Path(workdir) / RUN_CONFIG
  try:
    saved = json.loads(path.read_text())
  except (OSError, ValueError) as e:
    raise UsageError(f"{path}: the run's saved config cannot be read ({e}); name its config with --config") from None
  config = training.default_config()

  def assign(node: ml_collections.ConfigDict, values: dict[str, Any], prefix: str) -> None:
    for key, value in values.items():
      if key not in node:
        raise UsageError(f"{path}: key {prefix + key!r} is not in this version's config (valid keys in "
                         f"{'config.' + prefix[:-1] if prefix else 'config'}: {', '.join(sorted(node.keys()))}); "
                         "name the run's config with --config")
      if isinstance(node[key], ml_collections.ConfigDict) and isinstance(value, dict):
        assign(node[key], value, f"{prefix}{key}.")
        continue
      try:
        node[key] = value
      except (TypeError, ValueError) as e:
        raise UsageError(f"{path}: {prefix + key}={value!r} does not fit this version's config ({_message(e)}); "
                         "name the run's config with --config") from None

  if not isinstance(saved, dict):
    raise UsageError(f"{path}: the run's saved config is not a JSON object; name its config with --config")
  assign(config, saved, "")
  for key in RESUME_FIELDS:
    config.train[key] = False
  return config


def get_config(workdir: str) -> ml_collections.ConfigDict:
  """The config file of a run folder: :func:`read_run_config` of ``workdir``."""
  return read_run_config(workdir)


def check_same_model(saved: ml_collections.ConfigDict, config: ml_collections.ConfigDict, workdir: str,
                     who: str) -> None:
  """A :class:`UsageError` when ``config`` describes another model (``model.*``) than the run in ``workdir`` was
  trained as, saying what the checkpoint holds and what ``who`` asks for; ``train.allow_config_change`` lets the
  weights load into the other model on purpose."""
  from distattn_jax import training  # pylint: disable=import-outside-toplevel
  if config.train.allow_config_change:
    return
  old, new = (training.fingerprint(c)["fields"] for c in (saved, config))
  changed = sorted(k for k in set(old) | set(new) if k.startswith("model.") and old.get(k) != new.get(k))
  if not changed:
    return

  def show(fields):
    return ", ".join(f"{k[len('model.'):]}={fields.get(k)}" for k in changed)

  raise UsageError(f"the checkpoint in {workdir} was trained with {show(old)} but {who or '--config'} asks for "
                   f"{show(new)}; drop {who or '--config'} to use the run's own config "
                   f"({os.path.join(workdir, RUN_CONFIG)}), or set --config.train.allow_config_change=True to load "
                   "its weights into the model asked for anyway")


def _message(error: BaseException) -> str:
  """An exception's own message: a KeyError's key without repr quotes, and of a message that carries a traceback
  (ml_collections adds one to the errors of config files) its last line."""
  if isinstance(error, KeyError) and error.args:
    text = str(error.args[0])
  else:
    text = str(error)
  if "Traceback (most recent call last)" in text:
    text = [line for line in text.splitlines() if line.strip()][-1].strip()
  return text
