"""The package as a user installs it. A wheel built from this checkout, installed with only its core dependencies
into a fresh virtual environment and used from a folder outside the checkout: the Linen drop-in and the NNX
module compute what Flax computes, the subpackages that need an extra say which, and the engines find their
example inputs in the installed copy. Also, without a wheel: what each extra guards and where the data lives.

The wheels for the fresh environment come from a wheelhouse in the user's cache folder
(``~/.cache/distattn_jax/wheelhouse``, so a fresh clone reuses it), filled once by ``pip download`` (PyPI or
the machine's configured index) at the versions of requirements.lock; every install after that is
``--no-index``, so a warm run needs no network.
"""

import hashlib
import importlib.util
import os
import pathlib
import re
import shutil
import subprocess
import sys
import tempfile
import time
import venv
import zipfile

import pytest

from distattn_jax import extras

ROOT = pathlib.Path(__file__).resolve().parents[1]
WHEELHOUSE = pathlib.Path(os.environ.get("XDG_CACHE_HOME") or pathlib.Path.home() / ".cache") / "distattn_jax" / "wheelhouse"
LOCK = ROOT / "requirements.lock"
CORE = ("jax", "jaxlib", "flax", "optax", "chex", "numpy")
# What the wheel and the [engines] extra need beyond the core set (setuptools builds the wheel).
WHEELHOUSE_REQUIREMENTS = ("setuptools>=68", *CORE, "absl-py", "ml-collections", "orbax-checkpoint", "tensorboardX",
                           "tqdm", "matplotlib", "scipy")
EXAMPLE_INPUTS = ["business_example.csv", "marketing_example.csv", "marketing_variants_example.csv"]


def _run(args, *, cwd=None, env=None, timeout=600) -> subprocess.CompletedProcess:
  result = subprocess.run([str(a) for a in args], cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)
  assert result.returncode == 0, f"{' '.join(map(str, args))} failed:\n{result.stdout[-4000:]}\n{result.stderr[-4000:]}"
  return result


def _pip(python, *args, **kw) -> subprocess.CompletedProcess:
  return _run([python, "-m", "pip", "--disable-pip-version-check", "--no-input", *args], **kw)


def _wheelhouse() -> pathlib.Path:
  """The wheelhouse holding every wheel the fresh environment and the build need, at the lock's versions."""
  stamp = WHEELHOUSE / "STAMP"
  key = hashlib.sha256((LOCK.read_text() + "\n".join(WHEELHOUSE_REQUIREMENTS)).encode()).hexdigest()
  if not (stamp.exists() and stamp.read_text() == key):
    WHEELHOUSE.mkdir(parents=True, exist_ok=True)
    _pip(sys.executable, "download", "--quiet", "--dest", WHEELHOUSE, "--constraint", LOCK,
         *WHEELHOUSE_REQUIREMENTS, timeout=900)
    stamp.write_text(key)
  return WHEELHOUSE


def _isolated_env() -> dict[str, str]:
  """The environment without anything that points Python at this checkout or at another installation."""
  drop = ("PYTHONPATH", "PYTHONHOME", "PYTHONSTARTUP", "PYTHONUSERBASE", "VIRTUAL_ENV", "PIP_REQUIRE_VIRTUALENV")
  return {k: v for k, v in os.environ.items() if k not in drop and not k.startswith("JAX_")}


CORE_CHECKS = r'''
import importlib.resources
import importlib.util
import pathlib
import sys

import numpy as np
import jax
import jax.numpy as jnp
import flax.linen as nn
from flax import nnx

import distattn_jax as da

# The installed copy, not the checkout.
where = pathlib.Path(da.__file__).resolve()
assert pathlib.Path(sys.prefix).resolve() in where.parents, where
assert pathlib.Path(ROOT) not in where.parents, where
print("imported", where)

# Core dependencies only: no extra's own modules, and the subpackages that need one say which.
for module in ("ml_collections", "tensorboardX", "matplotlib", "mnist1d", "aeon"):
  assert importlib.util.find_spec(module) is None, module
for subpackage, extra in (("training", "train"), ("engines", "engines")):
  try:
    __import__(f"distattn_jax.{subpackage}")
  except ImportError as e:
    assert f"pip install 'distattn_jax[{extra}]'" in str(e), str(e)
  else:
    raise AssertionError(f"distattn_jax.{subpackage} imported without its extra")
import distattn_jax.data.listops  # data needs no extra
expressions, values = distattn_jax.data.listops.generate(3, seed=0, min_length=10, max_length=40, max_depth=3)
assert len(expressions) == 3 and values.shape == (3,) and all(0 <= v <= 9 for v in values), (expressions, values)

# The engines' example inputs ship in the wheel.
examples = importlib.resources.files("distattn_jax") / "engines" / "examples"
assert sorted(p.name for p in examples.iterdir()) == EXAMPLE_INPUTS, list(examples.iterdir())

# The Linen drop-in with "dot" is Flax's attention, parameters and all.
x = jax.random.normal(jax.random.key(0), (2, 7, 16))
flax_mha = nn.MultiHeadDotProductAttention(num_heads=4, qkv_features=16)
drop_in = nn.MultiHeadDotProductAttention(num_heads=4, qkv_features=16, attention_fn=da.make_attention_fn("dot"))
params = flax_mha.init(jax.random.key(1), x)
np.testing.assert_allclose(drop_in.apply(params, x), flax_mha.apply(params, x), rtol=1e-5, atol=1e-5)

# l1 is the formula: softmax(-lam * |q - k|_1 / sqrt(d)) @ v, against numpy in float64.
q, k, v = (np.asarray(jax.random.normal(jax.random.key(i), (2, 5, 3, 8))) for i in (2, 3, 4))
out = np.asarray(da.distance_attention(q, k, v, metric="l1", lam=1.0))
logits = -np.abs(q[:, :, None].astype(np.float64) - k[:, None].astype(np.float64)).sum(-1) / np.sqrt(8)
w = np.exp(logits - logits.max(2, keepdims=True))
w /= w.sum(2, keepdims=True)  # [batch, T, S, heads]
np.testing.assert_allclose(out, np.einsum("btsh,bshd->bthd", w, v), rtol=1e-5, atol=1e-5)

# The NNX module with "dot" at lam = 1 is nnx.MultiHeadAttention with the same parameters; with l1 it is
# permutation-equivariant in its (unmasked) positions.
ours = da.nnx.DistanceBasedAttention(4, 16, metric="dot", lambda_init=1.0, decode=False, rngs=nnx.Rngs(0))
theirs = nnx.MultiHeadAttention(4, 16, decode=False, rngs=nnx.Rngs(0))
np.testing.assert_array_equal(ours.query.kernel[...], theirs.query.kernel[...])
np.testing.assert_allclose(ours(x), theirs(x), rtol=1e-5, atol=1e-5)
l1 = da.nnx.DistanceBasedAttention(4, 16, metric="l1", decode=False, rngs=nnx.Rngs(5))
perm = np.array([3, 0, 6, 1, 5, 2, 4])
y = np.asarray(l1(x))
assert np.all(np.isfinite(y))
np.testing.assert_allclose(np.asarray(l1(x[:, perm])), y[:, perm], rtol=1e-5, atol=1e-5)
print("core checks passed")
'''

ENGINES_CHECKS = r'''
import pathlib
from distattn_jax.engines import business, marketing

assert pathlib.Path(sys.prefix).resolve() in marketing.EXAMPLES.resolve().parents, marketing.EXAMPLES
report = marketing.run(marketing.default_config())  # the shipped example inputs, verified against scipy
assert report.passed and report.results["allocation"]["expected_revenue"] > 0, report
assert business.run(business.default_config()).passed
print("engines checks passed")
'''


@pytest.mark.slow
def test_a_wheel_installs_with_the_core_dependencies_and_works_outside_the_checkout():
  # A folder of its own rather than tmp_path: pytest prunes old basetemps, and another pytest session started
  # meanwhile may prune this one while the environment in it is still being used.
  folder = pathlib.Path(tempfile.mkdtemp(prefix="distattn_jax_wheel_"))
  try:
    _build_install_and_check(folder)
  finally:
    _remove_in_background(folder)


def _remove_in_background(folder: pathlib.Path) -> None:
  # The environment is about a gigabyte of small files: shutil.rmtree takes longer than the checks themselves
  # on a busy two-core machine, so `rm -rf` deletes it while the suite goes on (rmtree where there is no rm).
  try:
    subprocess.Popen(["rm", "-rf", str(folder)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                     start_new_session=True)
  except OSError:
    shutil.rmtree(folder, ignore_errors=True)


def _build_install_and_check(tmp_path: pathlib.Path):
  times, last = [], time.perf_counter()

  def done(phase: str) -> None:
    nonlocal last
    now = time.perf_counter()
    times.append(f"{phase} {now - last:.1f} s")
    last = now

  wheelhouse = _wheelhouse()
  offline = ("--no-index", "--find-links", wheelhouse)
  # Built from a copy of what the wheel is made of, so the build leaves nothing in the checkout.
  source = tmp_path / "source"
  shutil.copytree(ROOT / "distattn_jax", source / "distattn_jax", ignore=shutil.ignore_patterns("__pycache__"))
  for name in ("pyproject.toml", "README.md"):
    shutil.copy(ROOT / name, source / name)
  _pip(sys.executable, "wheel", "--quiet", "--no-deps", *offline, "--wheel-dir", tmp_path / "dist", source,
       cwd=tmp_path)
  (wheel,) = (tmp_path / "dist").glob("distattn_jax-*.whl")
  done("wheel")
  with zipfile.ZipFile(wheel) as z:
    names = z.namelist()
    metadata = z.read(next(n for n in names if n.endswith(".dist-info/METADATA"))).decode()
  assert {f"distattn_jax/engines/examples/{f}" for f in EXAMPLE_INPUTS} <= set(names)
  assert not [n for n in names if n.split("/")[0] in ("tests", "experiments", "configs")]
  requires = [line.split(":", 1)[1].strip() for line in metadata.splitlines() if line.startswith("Requires-Dist:")]
  core = sorted(re.split(r"[<>=!~;\[ ]", r, maxsplit=1)[0] for r in requires if "extra ==" not in r)
  assert core == sorted(CORE), requires

  # The environment gets no pip of its own (ensurepip takes seconds): this interpreter's pip installs into it
  # (pip --python), offline, without compiling bytecode for files the checks mostly never import.
  env_dir = tmp_path / "venv"
  venv.EnvBuilder(with_pip=False, system_site_packages=False, clear=True).create(env_dir)
  python = env_dir / "bin" / "python"
  env = _isolated_env()
  install = ("--python", python, "install", "--quiet", "--no-compile", *offline, "--constraint", LOCK)
  _pip(sys.executable, *install, wheel, env=env)
  done("core install")
  outside = tmp_path / "elsewhere"
  outside.mkdir()
  preamble = f"ROOT = {str(ROOT)!r}\nEXAMPLE_INPUTS = {EXAMPLE_INPUTS!r}\n"
  (outside / "core_checks.py").write_text(preamble + CORE_CHECKS)
  result = _run([python, "-I", "core_checks.py"], cwd=outside, env=env)
  assert "core checks passed" in result.stdout
  done("core checks")

  # With the [engines] extra, the engines run on the example inputs the wheel carries.
  _pip(sys.executable, *install, f"{wheel}[engines]", env=env)
  done("engines install")
  (outside / "engines_checks.py").write_text("import sys\n" + ENGINES_CHECKS)
  result = _run([python, "-I", "engines_checks.py"], cwd=outside, env=env)
  assert "engines checks passed" in result.stdout
  done("engines checks")
  print("wheel built, installed and checked:", ", ".join(times))


@pytest.mark.parametrize("subpackage,extra", [("training", "train"), ("engines", "engines")])
def test_a_subpackage_without_its_extra_names_the_extra(subpackage, extra):
  # ml_collections hidden (a None in sys.modules makes its import fail, as if it were not installed).
  code = (f"import sys; sys.modules['ml_collections'] = None\n"
          f"try:\n  import distattn_jax.{subpackage}\nexcept ImportError as e:\n  print(e)\n"
          f"else:\n  raise SystemExit('imported')\n")
  result = _run([sys.executable, "-c", code], cwd=ROOT)
  message = result.stdout.strip()
  assert message.startswith(f"distattn_jax.{subpackage} needs the {extra!r} extra: ml_collections is not installed")
  assert f"pip install 'distattn_jax[{extra}]'" in message


def test_the_core_import_needs_no_extra():
  # In a fresh interpreter: importing the package (and its core modules) loads none of the extras' modules.
  code = ("import sys\nimport distattn_jax, distattn_jax.analysis, distattn_jax.models, distattn_jax.monitoring\n"
          "import distattn_jax.data.tasks\n"
          "extra = {'ml_collections', 'tensorboardX', 'tqdm', 'matplotlib', 'mnist1d', 'aeon'}\n"
          "print(sorted(extra & {m.split('.')[0] for m in sys.modules}))\n")
  assert _run([sys.executable, "-c", code], cwd=ROOT).stdout.strip() == "[]"


def test_every_extra_is_installed_here_and_nothing_is_missing():
  # This environment (the lock) has every extra, so the guards pass and the suite runs everything.
  assert {extra: extras.missing(extra) for extra in extras.MODULES} == {extra: [] for extra in extras.MODULES}
  with pytest.raises(ValueError, match="extra='gpu' is not one of"):
    extras.missing("gpu")


def test_the_engines_example_inputs_are_package_data():
  from distattn_jax.engines import marketing  # pylint: disable=import-outside-toplevel
  package = pathlib.Path(importlib.util.find_spec("distattn_jax").origin).parent
  assert marketing.EXAMPLES == package / "engines" / "examples"
  assert sorted(p.name for p in marketing.EXAMPLES.glob("*.csv")) == EXAMPLE_INPUTS


def test_the_version_is_pyproject_s_and_the_changelog_has_it():
  import tomllib  # pylint: disable=import-outside-toplevel
  import distattn_jax  # pylint: disable=import-outside-toplevel
  version = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["version"]
  assert distattn_jax.__version__ == version
  headings = [line for line in (ROOT / "CHANGELOG.md").read_text().splitlines() if line.startswith("## ")]
  assert headings and headings[0].startswith(f"## {version} "), headings[:3]
