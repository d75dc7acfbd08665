"""Importing every module of the package raises no DeprecationWarning about jax: nothing uses an API that a
later jax (pyproject allows 0.10 to 0.12) removes.

A fresh interpreter, so the filters see each module's first import. Two kinds of warning count: those raised
inside jax or jaxlib, and those attributed to a distattn_jax module whose message names jax (a deprecated jax
attribute warns at the caller's line, e.g. ``jax.core.X`` used in a distattn_jax module).
"""

import os
import subprocess
import sys

FILTERS = r'''
import warnings
warnings.filterwarnings("error", category=DeprecationWarning, module=r"jax(lib)?(\.|$)")
warnings.filterwarnings("error", message=r"(?s).*jax", category=DeprecationWarning, module=r"distattn_jax(\.|$)")
'''

IMPORT_ALL = FILTERS + r'''
import importlib
import pkgutil

import distattn_jax

names = sorted(m.name for m in pkgutil.walk_packages(distattn_jax.__path__, "distattn_jax."))
for name in names:
  importlib.import_module(name)
print(len(names), "modules:", " ".join(names))
'''

# What the filters make an error: a deprecation raised inside jax, or one naming jax attributed to a package
# module; not one of another library's, nor the package's own about something else. Then a real one where this
# jax still has it: jax.experimental.pallas.dot (deprecated in 0.10, gone in 0.12) read from a package module.
PROBE = FILTERS + r'''
import warnings

def warn(module, message):
  try:
    exec(f"warnings.warn({message!r}, DeprecationWarning)", {"__name__": module, "warnings": warnings})
  except DeprecationWarning:
    return "error"
  return "no error"

print(warn("jax._src.probe", "x is deprecated"), warn("jaxlib.probe", "x is deprecated"),
      warn("distattn_jax.probe", "jax.x is deprecated"), warn("distattn_jax.probe", "x is deprecated"),
      warn("numpy.probe", "jax.x is deprecated"))
import jax.experimental.pallas as pl
try:
  exec("pl.dot", {"__name__": "distattn_jax.probe", "pl": pl})
except DeprecationWarning as e:
  print("caught:", e)
except AttributeError:
  print("pallas.dot is gone from this jax")
else:
  print("not caught")
'''


def _python(code: str) -> subprocess.CompletedProcess:
  env = {k: v for k, v in os.environ.items() if k != "PYTHONWARNINGS"}
  return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=600)


def test_importing_every_module_raises_no_jax_deprecation_warning():
  result = _python(IMPORT_ALL)
  assert result.returncode == 0, result.stderr[-6000:]
  count, _, names = result.stdout.strip().partition(" modules: ")
  # Every layer of the package was imported, the subpackages with extras included.
  for name in ("distattn_jax.kernels.pallas_gpu", "distattn_jax.kernels.ring", "distattn_jax.nnx",
               "distattn_jax.training.distributed", "distattn_jax.engines.system", "distattn_jax.data.tasks",
               "distattn_jax.models.truthgpt"):
    assert name in names.split(), (name, names)
  assert int(count) == len(names.split()) >= 40


def test_the_filters_turn_a_jax_deprecation_in_package_code_into_an_error():
  result = _python(PROBE)
  assert result.returncode == 0, result.stderr[-6000:]
  synthetic, real = result.stdout.strip().split("\n")
  assert synthetic == "error error error no error no error"
  assert real.startswith("caught: ") or real == "pallas.dot is gone from this jax", real
