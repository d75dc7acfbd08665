"""The README and the documentation site stay true: every Python snippet runs as pasted, every signature they
show is the code's, and the site builds without a warning or a broken reference.

A ```python block runs in a fresh namespace, in one subprocess per page (8 simulated CPU devices, a temporary
working directory). Two markers on a block's first line change that: ``# signature`` (not run; each call in it is
compared with ``inspect.signature``) and ``# docs: needs-gpu`` / ``# docs: needs-multihost`` (not run here).
"""

from __future__ import annotations

import ast
import importlib
import inspect
import json
import os
import pathlib
import re
import subprocess
import sys
import textwrap

import flax.linen as nn
import jax.numpy as jnp
import pytest

import distattn_jax as da

ROOT = pathlib.Path(__file__).resolve().parents[1]
DOCS = ROOT / "docs"
SKIP_MARKERS = ("# docs: needs-gpu", "# docs: needs-multihost")
SIGNATURE_MARKER = "# signature"


def pages() -> list[pathlib.Path]:
  found = [ROOT / "README.md"] + sorted(p for p in DOCS.rglob("*.md") if "_build" not in p.parts
                                         and "gpu_report" not in p.parts)
  return [p for p in found if p.exists()]


_FENCE = re.compile(r"^(?P<indent>[ \t]*)(?P<fence>`{3,}|~{3,})[ \t]*(?P<info>[^\n`]*)$")


def python_blocks(path: pathlib.Path) -> list[tuple[int, str]]:
  """(line number, code) of every ```python block of a Markdown file, dedented as a reader would paste it."""
  blocks, lines, i = [], path.read_text().splitlines(), 0
  while i < len(lines):
    opening = _FENCE.match(lines[i])
    if not opening:
      i += 1
      continue
    fence, info, start = opening["fence"], opening["info"].strip(), i + 1
    i += 1
    while i < len(lines) and not re.match(rf"^[ \t]*{re.escape(fence[0])}{{{len(fence)},}}[ \t]*$", lines[i]):
      i += 1
    if info.split()[:1] == ["python"]:
      blocks.append((start, textwrap.dedent("\n".join(lines[start:i])) + "\n"))
    i += 1
  return blocks


def kind(code: str) -> str:
  first = code.lstrip().splitlines()[0].strip() if code.strip() else ""
  if first == SIGNATURE_MARKER:
    return "signature"
  if first.startswith(SKIP_MARKERS):
    return "skip"
  return "run"


def relative(path: pathlib.Path) -> str:
  return str(path.relative_to(ROOT))


# ------------------------------------------------------------------------------------------------------------
# Every snippet runs.

_RUNNER = r"""
import json, sys, traceback
blocks = json.load(sys.stdin)
for where, code in blocks:
  try:
    exec(compile(code, where, "exec"), {"__name__": "__main__"})
  except BaseException:
    print(f"\n=== {where} failed:\n" + traceback.format_exc(), file=sys.stderr)
    sys.exit(1)
  print(f"ok {where}", flush=True)
"""

PAGES_WITH_CODE = [p for p in pages() if any(kind(code) == "run" for _, code in python_blocks(p))]


def test_the_pages_hold_snippets_and_few_are_skipped():
  blocks = [(p, line, code) for p in pages() for line, code in python_blocks(p)]
  runnable = [b for b in blocks if kind(b[2]) == "run"]
  skipped = [b for b in blocks if kind(b[2]) == "skip"]
  assert len(runnable) >= 20, [relative(p) for p, _, _ in blocks]
  assert len(skipped) <= max(2, len(runnable) // 10), [f"{relative(p)}:{line}" for p, line, _ in skipped]
  for path, line, code in blocks:  # a marker anywhere else is a typo of one that would run or skip a block
    for marker in (SIGNATURE_MARKER, *SKIP_MARKERS, "# docs:"):
      assert code.count(marker) == (1 if code.lstrip().startswith(marker) else 0), f"{relative(path)}:{line}"


# make test-fast runs the README's and the getting-started page's snippets (what a new user pastes first); the other
# pages each start an interpreter that compiles its own programs, so they run in make test.
_FAST_PAGES = {"README.md", "docs/getting-started.md"}


@pytest.mark.parametrize("page", [p if relative(p) in _FAST_PAGES else pytest.param(p, marks=pytest.mark.slow)
                                  for p in PAGES_WITH_CODE], ids=relative)
def test_every_python_snippet_runs_as_pasted(page, tmp_path):
  blocks = [(f"{relative(page)}:{line}", code) for line, code in python_blocks(page) if kind(code) == "run"]
  env = dict(os.environ, JAX_NUM_CPU_DEVICES="8", PYTHONPATH=os.pathsep.join(
      [str(ROOT), *filter(None, [os.environ.get("PYTHONPATH")])]), MPLBACKEND="Agg")
  result = subprocess.run([sys.executable, "-c", _RUNNER], input=json.dumps(blocks), cwd=tmp_path, env=env,
                          capture_output=True, text=True, timeout=600)
  assert result.returncode == 0, result.stderr[-6000:]
  done = [line[3:] for line in result.stdout.splitlines() if line.startswith("ok ")]
  assert done == [where for where, _ in blocks], result.stdout


# ------------------------------------------------------------------------------------------------------------
# Every signature shown is the code's.

_NAMESPACE = {"da": da, "distattn_jax": da, "jnp": jnp}


def shown_signatures() -> list[tuple[str, str, str]]:
  """(where, dotted name, parameter text) of every call in the pages' ``# signature`` blocks."""
  found = []
  for page in pages():
    for line, code in python_blocks(page):
      if kind(code) != "signature":
        continue
      for match in re.finditer(r"^([A-Za-z_][\w.]*)\(", code, re.M):
        depth, end = 0, match.end() - 1
        for end in range(match.end() - 1, len(code)):
          depth += {"(": 1, ")": -1}.get(code[end], 0)
          if depth == 0:
            break
        row = line + 1 + code[:match.start()].count("\n")
        found.append((f"{relative(page)}:{row}", match[1], code[match.end():end]))
  return found


def _resolve(dotted: str):
  head, *rest = dotted.split(".")
  obj = _NAMESPACE[head]
  for part in rest:  # a submodule not imported yet is imported, as `import distattn_jax.data.listops` would
    obj = getattr(obj, part) if hasattr(obj, part) else importlib.import_module(f"{obj.__name__}.{part}")
  return obj


def _shown_parameters(text: str) -> list[tuple[str, str, object]]:
  """(name, kind, default) of a parameter list as the docs write it; ``...`` as a default means "not shown"."""
  function = ast.parse(f"def f({text}): pass").body[0]
  args = function.args
  shown: list[tuple[str, str, object]] = []
  positional = args.posonlyargs + args.args
  defaults = [inspect.Parameter.empty] * (len(positional) - len(args.defaults)) + list(args.defaults)
  kinds = ["POSITIONAL_ONLY"] * len(args.posonlyargs) + ["POSITIONAL_OR_KEYWORD"] * len(args.args)
  shown += [(a.arg, k, d) for a, k, d in zip(positional, kinds, defaults)]
  if args.vararg:
    shown.append((args.vararg.arg, "VAR_POSITIONAL", inspect.Parameter.empty))
  shown += [(a.arg, "KEYWORD_ONLY", inspect.Parameter.empty if d is None else d)
            for a, d in zip(args.kwonlyargs, args.kw_defaults)]
  if args.kwarg:
    shown.append((args.kwarg.arg, "VAR_KEYWORD", inspect.Parameter.empty))
  return [(n, k, d if d is inspect.Parameter.empty else eval(compile(ast.Expression(d), "<default>", "eval"),
                                                                    dict(_NAMESPACE)))
          for n, k, d in shown]


SIGNATURES = shown_signatures()


def test_the_docs_show_the_signatures_of_the_public_api():
  names = {name for _, name, _ in SIGNATURES}
  for required in ("da.distance_attention", "da.make_attention_fn", "da.DistanceBasedAttention",
                   "da.nnx.DistanceBasedAttention", "da.kernels.Ring", "da.metrics.register"):
    assert required in names, sorted(names)


@pytest.mark.parametrize("where,name,text", SIGNATURES, ids=[f"{w}:{n}" for w, n, _ in SIGNATURES])
def test_every_signature_shown_matches_the_code(where, name, text):
  obj = _resolve(name)
  actual = list(inspect.signature(obj).parameters.values())
  if inspect.isclass(obj) and [p.kind.name for p in actual] == ["VAR_POSITIONAL", "VAR_KEYWORD"]:
    actual = list(inspect.signature(obj.__init__).parameters.values())[1:]  # an NNX module's metaclass call
  if inspect.isclass(obj) and issubclass(obj, nn.Module):
    actual = [p for p in actual if p.name not in ("parent", "name")]  # Flax adds these to every module
  shown = _shown_parameters(text)
  assert [n for n, _, _ in shown] == [p.name for p in actual], f"{where}: {name} parameters"
  for (n, k, default), parameter in zip(shown, actual):
    assert k == parameter.kind.name, f"{where}: {name}({n}) is {parameter.kind.name}, shown as {k}"
    if default is not Ellipsis:
      assert (default is parameter.default or default == parameter.default), \
          f"{where}: {name}({n}={parameter.default!r}), shown as {default!r}"


def test_a_wrong_signature_is_caught():
  text = "query, key, value, bias=None, mask=None, metric='l1'"  # keyword-only arguments shown as positional
  shown = _shown_parameters(text)
  actual = inspect.signature(da.distance_attention).parameters
  assert [n for n, _, _ in shown] != list(actual)
  assert shown[5][1] == "POSITIONAL_OR_KEYWORD" != actual["metric"].kind.name


# ------------------------------------------------------------------------------------------------------------
# The site builds.


@pytest.mark.slow  # a full Sphinx build, ~15 s; `make docs` is the inner loop for the site
def test_the_site_builds_without_warnings_or_broken_references(tmp_path):
  pytest.importorskip("sphinx", reason="the docs build needs the [docs] extra: pip install -e '.[docs]'")
  pytest.importorskip("myst_parser", reason="the docs build needs the [docs] extra: pip install -e '.[docs]'")
  result = subprocess.run(
      [sys.executable, "-m", "sphinx", "-W", "--keep-going", "-n", "-q", "-b", "html", "-d",
       str(tmp_path / "doctrees"), str(DOCS), str(tmp_path / "html")],
      cwd=ROOT, capture_output=True, text=True, timeout=600, env=dict(os.environ, PYTHONPATH=str(ROOT)))
  assert result.returncode == 0, result.stderr[-6000:]
  html = tmp_path / "html"
  api = (html / "api" / "distattn_jax.html").read_text()
  assert 'id="distattn_jax.distance_attention"' in api and 'id="distattn_jax.checked"' in api
  for page in ("getting-started", "attention", "kernels", "metrics", "flax", "training", "scale-out", "research",
               "benchmarks", "engines", "contributing", "changelog", "benchmark_cpu", "scaling_cpu"):
    assert (html / f"{page}.html").exists(), page
  research = (html / "research.html").read_text()
  assert "cpu_curves.png" in research and (html / "_images" / "cpu_curves.png").exists()
  assert "listops_cpu" in research  # the committed results table, included
