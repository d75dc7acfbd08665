"""Runs the programs in experiments/ as a user runs them: a subprocess, from the repository root."""

import os
import pathlib
import subprocess
import sys

ROOT = pathlib.Path(__file__).resolve().parents[1]


def run_script(script: str | os.PathLike, *args: str, timeout: float = 600) -> subprocess.CompletedProcess:
  """``python <script> args...`` (a bare name is looked up in experiments/). A script's own folder, not the
  working directory, heads its sys.path, so PYTHONPATH points it at this checkout's package rather than
  whichever copy the environment has installed."""
  path = pathlib.Path(script)
  if not path.is_absolute():
    path = ROOT / "experiments" / path
  env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))}
  return subprocess.run([sys.executable, str(path), *args], cwd=ROOT, capture_output=True, text=True,
                        timeout=timeout, env=env)
