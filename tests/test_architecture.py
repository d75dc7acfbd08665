"""The package's architecture, read from its source with ``ast`` (nothing is imported or compiled).

Over every module of ``distattn_jax``:

* no module uses another module's private names: neither ``from distattn_jax.x import _name`` nor
  ``x._name`` where ``x`` is bound to an imported module of the package (its own ``_names`` and any
  ``__dunder__`` are fine);
* the import graph has no cycle. Its nodes are the modules, a package's ``__init__`` being the package's node;
  every ``import`` and ``from ... import`` statement, at module level or inside a function, is an edge to the
  module it names: ``import a.b.c`` and ``from a.b import c`` (``c`` a submodule) to ``a.b.c``, ``from a.b import
  name`` to ``a.b``. Never to the parent packages Python initialises on the way: every module of the package
  implies the root's ``__init__``, which imports the subpackages, so such edges would put every module on a cycle
  through ``distattn_jax/__init__.py`` and tell nothing. ``import distattn_jax as da`` is an edge to the root,
  whose names the module then uses;
* lower layers never import higher ones, in the order of DESIGN.md's layer list (``LAYERS`` below);
* a module over ``LONG_MODULE_LINES`` lines says why in its docstring. The rule checked: its docstring contains
  the words "long because" (any case; line breaks read as spaces), as in a sentence "The module is long because
  ..."; "as long as" or a line count alone does not count.

Each checker is also run on small synthetic sources that break its rule, so none of them passes vacuously.
"""

from __future__ import annotations

import ast
import dataclasses
import pathlib
import re

import pytest

PACKAGE = "distattn_jax"
PACKAGE_DIR = pathlib.Path(__file__).resolve().parents[1] / PACKAGE
LONG_MODULE_LINES = 400
LONG_REASON = re.compile(r"\blong because\b", re.IGNORECASE)

# DESIGN.md's layers, top to bottom; a module may import its own layer and those below it. ``distattn_jax`` is
# the root package's __init__ (the public surface over nnx, layers, attention, kernels and metrics).
# module_helpers is the module of shared pure helpers under nnx.py and layers.py. autodiff, compat, extras and
# monitoring are not in DESIGN.md's list: support modules that import nothing of the package, at the bottom.
LAYERS = (
    ("engines",),
    ("training",),
    ("data",),
    ("models",),
    (PACKAGE,),
    ("nnx",),
    ("layers",),
    ("module_helpers",),
    ("attention",),
    ("analysis",),
    ("kernels",),
    ("initializers",),
    ("metrics",),
    ("autodiff", "compat", "extras", "monitoring"),
)


@dataclasses.dataclass(frozen=True)
class Import:
  """One import statement's edge: ``importer`` needs ``target``; ``names`` are those bound from a ``from``."""

  importer: str
  target: str
  names: tuple[str, ...]
  line: int


def is_private(name: str) -> bool:
  return name.startswith("_") and not (name.startswith("__") and name.endswith("__"))


def read_package(package_dir: pathlib.Path = PACKAGE_DIR) -> dict[str, str]:
  """``{module name: source}`` for every ``.py`` file under ``package_dir``; ``a/b/__init__.py`` is ``a.b``."""
  sources = {}
  for path in sorted(package_dir.rglob("*.py")):
    parts = path.relative_to(package_dir.parent).with_suffix("").parts
    if parts[-1] == "__init__":
      parts = parts[:-1]
    sources[".".join(parts)] = path.read_text(encoding="utf-8")
  return sources


def is_package(module: str, sources: dict[str, str]) -> bool:
  return any(other.startswith(module + ".") for other in sources)


def _resolve_relative(module: str, level: int, name: str | None, sources: dict[str, str]) -> str:
  """The absolute name of ``from <level dots><name> import ...`` written in ``module``."""
  base = module.split(".") if is_package(module, sources) else module.split(".")[:-1]
  base = base[:len(base) - (level - 1)]
  return ".".join(base + ([name] if name else []))


def imports_of(module: str, sources: dict[str, str]) -> list[Import]:
  """Every import of a package module in ``module``'s source, at any depth (functions included)."""
  found = []
  for node in ast.walk(ast.parse(sources[module])):
    if isinstance(node, ast.Import):
      for alias in node.names:
        if alias.name == PACKAGE or alias.name.startswith(PACKAGE + "."):
          found.append(Import(module, alias.name, (), node.lineno))
    elif isinstance(node, ast.ImportFrom):
      source = _resolve_relative(module, node.level, node.module, sources) if node.level else node.module
      if source != PACKAGE and not source.startswith(PACKAGE + "."):
        continue
      names = []
      for alias in node.names:
        if f"{source}.{alias.name}" in sources:  # a submodule: an edge of its own
          found.append(Import(module, f"{source}.{alias.name}", (), node.lineno))
        else:
          names.append(alias.name)
      if names:
        found.append(Import(module, source, tuple(names), node.lineno))
  return found


def _module_bindings(module: str, sources: dict[str, str]) -> dict[str, str]:
  """Local names bound to package modules by ``module``'s imports (``import a.b`` binds ``a``)."""
  bound = {}
  for node in ast.walk(ast.parse(sources[module])):
    if isinstance(node, ast.Import):
      for alias in node.names:
        if alias.name == PACKAGE or alias.name.startswith(PACKAGE + "."):
          if alias.asname:
            bound[alias.asname] = alias.name
          else:
            bound[alias.name.split(".")[0]] = alias.name.split(".")[0]
    elif isinstance(node, ast.ImportFrom):
      source = _resolve_relative(module, node.level, node.module, sources) if node.level else node.module
      for alias in node.names:
        if f"{source}.{alias.name}" in sources:
          bound[alias.asname or alias.name] = f"{source}.{alias.name}"
  return bound


def private_uses(module: str, sources: dict[str, str]) -> list[str]:
  """``module``'s uses of other modules' private names, as ``"module:line: what"``."""
  found = []
  for entry in imports_of(module, sources):
    for name in entry.names:
      if entry.target != module and is_private(name):
        found.append(f"{module}:{entry.line}: from {entry.target} import {name}")
  bound = _module_bindings(module, sources)

  def module_of(node: ast.expr) -> str | None:
    """The package module an expression such as ``da.kernels.common`` names, if it names one."""
    if isinstance(node, ast.Name):
      return bound.get(node.id)
    if isinstance(node, ast.Attribute):
      base = module_of(node.value)
      if base is not None and f"{base}.{node.attr}" in sources:
        return f"{base}.{node.attr}"
    return None

  for node in ast.walk(ast.parse(sources[module])):
    if isinstance(node, ast.Attribute) and is_private(node.attr):
      owner = module_of(node.value)
      if owner is not None and owner != module:
        found.append(f"{module}:{node.lineno}: {owner}.{node.attr}")
  return found


def import_graph(sources: dict[str, str]) -> dict[str, set[str]]:
  """``{module: modules it imports}`` over the modules in ``sources`` (self-imports dropped)."""
  graph = {module: set() for module in sources}
  for module in sources:
    for entry in imports_of(module, sources):
      if entry.target in sources and entry.target != module:
        graph[module].add(entry.target)
  return graph


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
  """One cycle ``[a, b, ..., a]`` of ``graph``, or None (depth-first search, modules in sorted order)."""
  done, on_path, path = set(), set(), []

  def visit(node: str) -> list[str] | None:
    on_path.add(node)
    path.append(node)
    for succ in sorted(graph.get(node, ())):
      if succ in on_path:
        return path[path.index(succ):] + [succ]
      if succ not in done:
        cycle = visit(succ)
        if cycle:
          return cycle
    on_path.discard(node)
    path.pop()
    done.add(node)
    return None

  for node in sorted(graph):
    if node not in done:
      cycle = visit(node)
      if cycle:
        return cycle
  return None


def layer_of(module: str) -> int:
  """The index in ``LAYERS`` (0 = top) of a package module; a ValueError for one the table does not place."""
  top = module.split(".")[1] if "." in module else module
  for rank, names in enumerate(LAYERS):
    if top in names:
      return rank
  raise ValueError(f"{module} is in no layer of LAYERS; place it there as DESIGN.md's layer list says")


def layering_violations(sources: dict[str, str]) -> list[str]:
  """Imports of a higher layer by a lower one, as ``"module:line: imports target (layer -> layer)"``."""
  found = []
  for module in sources:
    for entry in imports_of(module, sources):
      if layer_of(entry.target) < layer_of(module):
        found.append(f"{module}:{entry.line}: imports {entry.target} ({LAYERS[layer_of(module)][0]} may not "
                     f"import {LAYERS[layer_of(entry.target)][0]})")
  return found


def unexplained_long_modules(sources: dict[str, str]) -> list[str]:
  """Modules over ``LONG_MODULE_LINES`` lines whose docstring has no sentence saying why they are long."""
  found = []
  for module, source in sources.items():
    lines = len(source.splitlines())
    docstring = " ".join((ast.get_docstring(ast.parse(source)) or "").split())
    if lines > LONG_MODULE_LINES and not LONG_REASON.search(docstring):
      found.append(f"{module} ({lines} lines)")
  return found


# --- the package ------------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def sources() -> dict[str, str]:
  found = read_package()
  assert len(found) > 40 and f"{PACKAGE}.attention" in found, sorted(found)  # the walk found the package
  return found


def test_no_module_uses_another_modules_private_names(sources):
  found = [use for module in sorted(sources) for use in private_uses(module, sources)]
  assert not found, "private names used across modules:\n" + "\n".join(found)


def test_the_import_graph_has_no_cycle(sources):
  graph = import_graph(sources)
  assert sum(map(len, graph.values())) > 100  # the edges were found
  cycle = find_cycle(graph)
  assert cycle is None, "import cycle: " + " -> ".join(cycle)


def test_lower_layers_never_import_higher_ones(sources):
  found = layering_violations(sources)
  assert not found, "layering violations (DESIGN.md):\n" + "\n".join(found)


def test_every_long_module_says_why_it_is_long(sources):
  found = unexplained_long_modules(sources)
  assert not found, (f"modules over {LONG_MODULE_LINES} lines whose docstring has no sentence with 'long because':"
                     "\n" + "\n".join(found))


# --- the checkers on sources that break the rules ---------------------------------------------------------------

def synthetic(**modules: str) -> dict[str, str]:
  """Sources keyed by module name: ``kernels__base`` stands for ``distattn_jax.kernels.base``, ``root`` for
  ``distattn_jax``."""
  return {".".join([PACKAGE] + [p for p in name.split("__") if p != "root"]): source
          for name, source in modules.items()}


def test_private_names_across_modules_are_found():
  sources = synthetic(
      root="from distattn_jax import kernels\n",
      kernels="",
      kernels__base="def _hidden(): pass\ndef shown(): return _hidden()\n",  # its own: fine
      kernels__tiles="from distattn_jax.kernels.base import _hidden, shown\n",
      kernels__common="from ..kernels import base\nx = base._hidden\ny = base.__name__\n",
      layers=("import distattn_jax as da\nfrom distattn_jax.kernels import base as b\n"
              "def f():\n  return da.kernels.base._hidden, b._hidden, b.shown\n"),
  )
  assert private_uses("distattn_jax.kernels.base", sources) == []
  assert private_uses("distattn_jax.kernels.tiles", sources) == [
      "distattn_jax.kernels.tiles:1: from distattn_jax.kernels.base import _hidden"]
  assert private_uses("distattn_jax.kernels.common", sources) == [
      "distattn_jax.kernels.common:2: distattn_jax.kernels.base._hidden"]
  # da.kernels.base._hidden and b._hidden: one private name reached twice, through the root and through an alias.
  assert private_uses("distattn_jax.layers", sources) == ["distattn_jax.layers:4: distattn_jax.kernels.base._hidden"
                                                          ] * 2


def test_a_two_module_cycle_is_found_even_through_a_function_level_import():
  sources = synthetic(
      metrics="from distattn_jax.metrics import record\n",
      metrics__record="def f():\n  from distattn_jax import metrics\n  return metrics\n",
  )
  assert find_cycle(import_graph(sources)) == ["distattn_jax.metrics", "distattn_jax.metrics.record",
                                               "distattn_jax.metrics"]


def test_importing_a_sibling_package_through_the_root_is_no_cycle():
  # The root imports kernels and metrics; kernels.base imports metrics by its full name: an edge to metrics, not
  # to the root, so no cycle. A module that uses the root's names (import distattn_jax as da) does close one.
  sources = synthetic(
      root="from distattn_jax import kernels, metrics\n",
      kernels="from distattn_jax.kernels import base\n",
      kernels__base="import distattn_jax.metrics\nfrom distattn_jax import metrics as m\n",
      metrics="",
  )
  graph = import_graph(sources)
  assert graph["distattn_jax.kernels.base"] == {"distattn_jax.metrics"}
  assert find_cycle(graph) is None
  sources["distattn_jax.kernels.base"] += "import distattn_jax as da\n"
  assert find_cycle(import_graph(sources)) == ["distattn_jax", "distattn_jax.kernels", "distattn_jax.kernels.base",
                                               "distattn_jax"]


def test_an_import_of_a_higher_layer_is_found():
  sources = synthetic(
      kernels__base="from distattn_jax.models import truthgpt\nfrom distattn_jax import metrics\n",
      models__truthgpt="import distattn_jax as da\nfrom distattn_jax.training import steps\n",
      metrics="", training__steps="", root="",
  )
  assert sorted(layering_violations(sources)) == [
      "distattn_jax.kernels.base:1: imports distattn_jax.models.truthgpt (kernels may not import models)",
      "distattn_jax.models.truthgpt:2: imports distattn_jax.training.steps (models may not import training)"]
  with pytest.raises(ValueError, match="distattn_jax.plugins is in no layer"):
    layer_of("distattn_jax.plugins")


def test_a_long_module_without_its_reason_is_found():
  body = "x = 1\n" * LONG_MODULE_LINES
  sources = synthetic(
      short='"""Short."""\nx = 1\n',
      silent=f'"""Does many things."""\n{body}',
      explained=f'"""Does many things.\n\nThe module is\nlong because it must.\n"""\n{body}',
      as_long_as=f'"""Fine as long as it is short."""\n{body}',
  )
  assert unexplained_long_modules(sources) == [f"distattn_jax.silent ({LONG_MODULE_LINES + 1} lines)",
                                               f"distattn_jax.as_long_as ({LONG_MODULE_LINES + 1} lines)"]
