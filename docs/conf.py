"""Sphinx configuration of the documentation site: MyST pages, the API reference from the docstrings.

Build it with `make docs` (installs the `[docs]` extra, then runs sphinx-build with -W -n) or directly:

    .venv/bin/sphinx-build -W --keep-going -n -b html docs docs/_build/html

The build is offline: no intersphinx inventories, the bundled alabaster theme. References to other projects
(jax, flax, numpy, ...) are therefore not links, and are listed in ``nitpick_ignore_regex`` below; a broken
reference to anything in this package fails the build.
"""

from __future__ import annotations

import ast
import functools
import importlib
import inspect
import pkgutil
import re
import sys
from pathlib import Path

from docutils import nodes
from docutils.statemachine import StringList
from sphinx.pycode import ModuleAnalyzer
from sphinx.util.docutils import SphinxDirective

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # document this checkout, installed or not

import distattn_jax  # noqa: E402

project = "distattn_jax"
author = "distattn_jax authors"
copyright = "distattn_jax authors"  # noqa: A001
version = release = distattn_jax.__version__

extensions = ["myst_parser", "sphinx.ext.autodoc", "sphinx.ext.napoleon"]
source_suffix = {".md": "markdown"}
myst_heading_anchors = 3
# gpu_report/ holds the raw JSON and logs experiments/gpu_report.sh writes beside docs/gpu_report.md.
exclude_patterns = ["_build", "gpu_report/**"]
html_theme = "alabaster"
html_theme_options = {"page_width": "1200px", "sidebar_width": "260px"}
html_title = f"distattn_jax {release}"

nitpicky = True
# No intersphinx (the build runs offline), so names of other projects resolve to nothing; they stay text.
nitpick_ignore_regex = [
    ("py:.*", r"(jax|jnp|jaxlib|flax|nn|nnx|optax|chex|np|numpy|ml_collections|orbax|scipy|matplotlib"
              r"|tensorboardX|absl|collections|platform|typing|types|pathlib|os|enum|dataclasses|concurrent|threading)"
              r"(\..*)?"),
    ("py:class", r"(int|float|str|bool|bytes|dict|list|tuple|set|object|type|callable|None|Any|Callable"
                 r"|Union\[flax.*|Sequence|Mapping|Iterable|Iterator|Path|Array|ArrayTree|PRNGKey|Shape|Dtype|DTypeLike"
                 r"|PyTree"
                 r"|rnglib\..*|ConfigDict|Rngs|Module|Mesh|Sharding|NamedSharding)"),
]

autodoc_member_order = "bysource"
autodoc_typehints = "signature"
napoleon_google_docstring = True
napoleon_numpy_docstring = False
napoleon_use_ivar = True  # an Attributes: section is a field list, not a second description of each field

# ------------------------------------------------------------------------------------------------------------
# The API reference. One page per package (docs/api/*.md, each a single `{api-page}` directive); the directive
# lists the package's public names (its __all__) under the names users import, then one section per module the
# page covers, with the public names that no package exports. Every object is documented once, where users find
# it; a new module shows up without editing the pages.

API_PAGES = ("distattn_jax", "distattn_jax.metrics", "distattn_jax.kernels", "distattn_jax.initializers",
             "distattn_jax.nnx", "distattn_jax.analysis", "distattn_jax.models", "distattn_jax.training",
             "distattn_jax.data", "distattn_jax.engines")


@functools.cache
def _modules() -> tuple[str, ...]:
  names = ["distattn_jax"]
  for info in pkgutil.walk_packages(distattn_jax.__path__, "distattn_jax."):
    if not any(part.startswith("_") for part in info.name.split(".")):
      names.append(info.name)
  for name in names:
    importlib.import_module(name)
  return tuple(sorted(names))


def _page_of(module: str) -> str:
  return max((p for p in API_PAGES if module == p or module.startswith(p + ".")), key=len)


def _constants(module_name: str) -> list[str]:
  """UPPER_CASE names a module assigns at its top level (its documented constants)."""
  source = inspect.getsource(sys.modules[module_name])
  names = []
  for node in ast.parse(source).body:
    targets = node.targets if isinstance(node, ast.Assign) else [node.target] if isinstance(node, ast.AnnAssign) else []
    names += [t.id for t in targets if isinstance(t, ast.Name) and t.id.isupper() and not t.id.startswith("_")]
  return names


def _public_names(module_name: str) -> list[str]:
  """Names a module offers: its __all__, or else the functions, classes and constants it defines."""
  module = sys.modules[module_name]
  if hasattr(module, "__all__"):
    return [n for n in module.__all__ if not inspect.ismodule(getattr(module, n))]
  return [n for n, obj in vars(module).items()
          if not n.startswith("_") and (inspect.isclass(obj) or inspect.isfunction(obj))
          and getattr(obj, "__module__", None) == module_name] + _constants(module_name)


@functools.cache
def _homes() -> dict[object, tuple[str, str]]:
  """id(object) -> (module, name) where it is documented: the deepest package whose __all__ exports it, else
  the module that defines it."""
  home: dict[object, tuple[str, str]] = {}
  rank: dict[object, tuple[int, int]] = {}
  for module_name in _modules():
    module = sys.modules[module_name]
    for name in _public_names(module_name):
      obj = getattr(module, name)
      key = _home_key(module_name, name)
      r = (1 if hasattr(module, "__path__") and hasattr(module, "__all__") else 0, module_name.count("."))
      if key not in rank or r > rank[key]:
        home[key], rank[key] = (module_name, name), r
  return home


def _home_key(module_name: str, name: str):
  """Objects are known by identity; a plain value (a number, a string) is shared, so it is known by its name."""
  obj = getattr(sys.modules[module_name], name)
  return (module_name, name) if isinstance(obj, (int, float, str, bytes, bool, tuple, type(None))) else id(obj)


def _member_directives(module_name: str, name: str) -> list[str]:
  obj = getattr(sys.modules[module_name], name)
  full = f"{module_name}.{name}"
  if inspect.isclass(obj):
    return [f".. autoclass:: {full}", "   :members:", "   :undoc-members:", ""]
  if inspect.isfunction(obj) or (callable(obj) and obj.__doc__ != type(obj).__doc__):
    return [f".. autofunction:: {full}", ""]
  # A constant or a record (an instance): its value, and the comment (#:) above it if there is one.
  lines = [f".. py:data:: {name}", f"   :module: {module_name}"]
  if type(obj).__module__.startswith("distattn_jax"):
    lines += [f"   :type: {type(obj).__module__}.{type(obj).__qualname__}", ""]
    lines += [f"   An instance of :class:`~{type(obj).__module__}.{type(obj).__qualname__}`."]
  else:
    value = repr(obj)
    lines += [f"   :value: {value}" if len(value) <= 80 else f"   :type: {type(obj).__name__}", ""]
  try:
    doc = ModuleAnalyzer.for_module(module_name).find_attr_docs().get(("", name))
  except Exception:  # noqa: BLE001 - no source, no comment
    doc = None
  lines += [f"   {line}" for line in doc or []]
  return lines + [""]


class ApiPage(SphinxDirective):
  """``{api-page} distattn_jax.metrics``: the reference of one package and the modules under it, title
  included (a page holds nothing else)."""

  required_arguments = 1

  def run(self) -> list[nodes.Node]:
    page = self.arguments[0]
    top = None
    for module_name in [m for m in _modules() if _page_of(m) == page]:
      lines = [f".. automodule:: {module_name}", ""]
      for name in _public_names(module_name):
        if _homes().get(_home_key(module_name, name)) == (module_name, name):
          lines += _member_directives(module_name, name)
      section = nodes.section()
      section += nodes.title("", "", nodes.literal(module_name, module_name))
      section["names"].append(module_name)
      self.state.document.note_implicit_target(section, section)
      parsed = nodes.container()  # eval-rst: autodoc writes reStructuredText
      self.state.nested_parse(StringList(["```{eval-rst}", *lines, "```"], source=f"<api-page {module_name}>"),
                              self.content_offset, parsed)
      section += parsed.children
      if top is None:
        top = section
      else:
        top += section
    return [top]


# ------------------------------------------------------------------------------------------------------------
# Docstrings are written for readers of the source; a few habits of theirs need help to be reStructuredText.

_HEADER = re.compile(r"^(\s*)\S[^:]*:$")  # "Attributes beyond Flax's:", "Checks:"
_FIELD = re.compile(r"^(\s*)([A-Za-z_][\w.]*): (.*)$")  # "metric: a name in ..."


_RELATIVE_ROLE = re.compile(r"(:(?:py:)?(?:mod|func|class|data|obj|meth|attr|exc|const):`~?(?:[^`<]*<)?)"
                            r"\.(?!\.)([\w.]+)(>?`)")
_LITERAL_THEN_LETTER = re.compile(r"(``[^`]+``)(?=\w)")
_LITERAL_OR_ROLE = re.compile(r"(``.*?``|`[^`]*`)")


def _escape_bars(line: str) -> str:
  """``|x|`` is a norm in these docstrings, never a substitution: escaped outside literals and roles."""
  if line.lstrip().startswith((":type", ":rtype", "..")):
    return line
  parts = _LITERAL_OR_ROLE.split(line)  # odd indices: the literals and roles, kept as they are
  return "".join(part if i % 2 else part.replace("|", "\\|") for i, part in enumerate(parts))


def _docstring_to_rst(app, what, name, obj, options, lines):
  """Napoleon reads Args:/Returns:/Attributes:; other habits of the docstrings need help to be
  reStructuredText: a list right after its introducing line ("Checks:" then "* ..."); a free-form header over
  indented ``name: description`` entries, which becomes a field list; an indented block (a layout, shapes)
  right after a paragraph of several lines that ends with a colon, which becomes a block quote; a literal
  followed by a letter (a plural of a name in double backquotes), which gets the escaped space
  reStructuredText needs; a norm written with bars, which is not a substitution; and a relative reference (a
  leading dot, as in ".gram"), which names the module next to the documented one, as a relative import would."""
  module = name if what == "module" else getattr(obj, "__module__", None) or name.rpartition(".")[0]
  package = module if hasattr(sys.modules.get(module), "__path__") else module.rpartition(".")[0]

  def absolute(match):
    target = f"{package}.{match.group(2)}"
    return f"{match.group(1)}{target}{match.group(3)}" if _object_at(target) is not None else match.group(0)

  lines[:] = [_escape_bars(_LITERAL_THEN_LETTER.sub(r"\1\\ ", _RELATIVE_ROLE.sub(absolute, line)))
              for line in lines]
  i = 1
  while i < len(lines):
    if lines[i].lstrip().startswith(("* ", "- ")) and lines[i - 1].rstrip().endswith(":"):
      lines.insert(i, "")
    i += 1
  i = 0
  while i < len(lines) - 1:
    header, first = _HEADER.match(lines[i]), _FIELD.match(lines[i + 1])
    if not (header and first and len(first.group(1)) > len(header.group(1))):
      i += 1
      continue
    indent = first.group(1)
    lines.insert(i + 1, "")
    j = i + 2
    while j < len(lines) and (not lines[j].strip() or lines[j].startswith(indent)):
      field = _FIELD.match(lines[j])
      if field and field.group(1) == indent:
        lines[j] = f"{indent}:{field.group(2)}: {field.group(3)}"
      j += 1
    i = j
  i = 0
  while i < len(lines) - 1:
    line, following = lines[i], lines[i + 1]
    indent = len(following) - len(following.lstrip())
    # A one-line paragraph over an indented block is a definition list already; after a longer one the block
    # needs a blank line to be a block quote.
    if (i > 0 and lines[i - 1].strip() and line.strip() and not line[0].isspace()
        and not line.startswith((":", "..")) and line.endswith(":") and not line.endswith("::")
        and following.strip() and indent > 0 and not following.lstrip().startswith(("* ", "- ", ":"))):
      lines.insert(i + 1, "")
    i += 1


def _object_at(dotted: str):
  """The object a dotted name reaches by imports and attributes, or None."""
  parts = dotted.split(".")
  for cut in range(len(parts), 0, -1):
    module_name = ".".join(parts[:cut])
    if module_name in sys.modules or module_name.startswith("distattn_jax"):
      try:
        obj = importlib.import_module(module_name)
      except ImportError:
        continue
      for attr in parts[cut:]:
        obj = getattr(obj, attr, None)
        if obj is None:
          return None
      return obj
  return None


def _documented_name(dotted: str) -> str | None:
  """The name under which the object at ``dotted`` (a module, a documented object, or an attribute of one) is
  documented here."""
  parts = dotted.split(".")
  for cut in range(len(parts), 0, -1):
    obj = _object_at(".".join(parts[:cut]))
    if obj is None:
      continue
    if inspect.ismodule(obj):
      return ".".join([obj.__name__] + parts[cut:]) if obj.__name__ in _modules() else None
    home = _homes().get(id(obj)) or _homes().get((".".join(parts[:cut - 1]), parts[cut - 1]))
    if home:
      return ".".join([*home] + parts[cut:])
  return None


def _resolve_relative_reference(app, env, node, contnode):
  """Docstrings name their neighbours as Python code would (``steps.train_step`` in training/loop.py,
  ``default_blocks`` in kernels/blockwise.py, ``distattn_jax.attention.distance_attention``). Resolve such a name
  from the referring module outwards to the object it denotes, and link to where that object is documented."""
  if node.get("refdomain") != "py":
    return None
  target = node["reftarget"].lstrip(".~")
  # Look outwards from the object whose docstring holds the reference ("...: docstring of <name>"), then from the
  # module the page documents it in.
  owner = (node.source or "").rpartition("docstring of ")[2] if "docstring of " in (node.source or "") else ""
  scopes = []
  for here in (owner, node.get("py:module") or ""):
    scopes += [".".join(here.split(".")[:i]) for i in range(here.count(".") + 1, 0, -1)] if here else []
  domain = env.get_domain("py")
  for scope in dict.fromkeys(scopes + [""]):
    name = _documented_name(f"{scope}.{target}" if scope else target)
    if name and (name in domain.objects or name in domain.modules):
      return domain.resolve_xref(env, node["refdoc"], app.builder, "obj", name, node, contnode) or \
          domain.resolve_xref(env, node["refdoc"], app.builder, "mod", name, node, contnode)
  return None


def _list_the_gpu_report(app, docname, source):
  """experiments/gpu_report.sh writes docs/gpu_report.md once a GPU has run it; benchmarks.md then lists it with
  the other reports (a toctree entry for a missing page would fail the build)."""
  if docname == "benchmarks" and (Path(app.srcdir) / "gpu_report.md").exists():
    source[0] = source[0].replace("scaling_cpu\n```", "scaling_cpu\ngpu_report\n```", 1)


def setup(app):
  app.add_directive("api-page", ApiPage)
  app.connect("source-read", _list_the_gpu_report)
  app.connect("autodoc-process-docstring", _docstring_to_rst)
  app.connect("missing-reference", _resolve_relative_reference)
  return {"parallel_read_safe": True}
