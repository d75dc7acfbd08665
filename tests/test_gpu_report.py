"""experiments/gpu_report.py's dry run: every part runs end to end on a CPU and writes its JSON and page.

The numbers of a dry run mean nothing (tiny shapes, XLA for cuDNN); what is asserted is the plumbing a GPU run
relies on: each part's cells are in the JSON, the correctness cells compare the routed kernel with the reference
(and pass, at selfcheck's bfloat16 bound), and the page has each part's table. The fused kernel is left out
(``--kernels=routed``): interpreted, it would take minutes here, and tests/test_pallas.py covers it. About 20 s
with a cold compilation cache on 2 busy cores, 4 s with a warm one.
"""

import json

import pytest

import gpu_report  # experiments/gpu_report.py


def test_dry_run_writes_every_part(tmp_path):
  out = tmp_path / "report.json"
  code = gpu_report.main(["--dry_run", "--skip_tests", "--kernels=routed", "--metrics=dot", f"--out={out}"])
  assert code == 0
  doc = json.loads(out.read_text())
  assert doc["dry_run"] and doc["tests"]["status"] == "skipped"
  cells = {(c["kernel"], c["metric"], c["causal"]): c for c in doc["correctness"]}
  assert set(cells) == {("routed", "dot", False), ("routed", "dot", True)}
  for cell in cells.values():  # the routed kernel returns no lse (jax.nn's carries no gradient): not compared
    assert cell["status"] == "measured" and cell["passed"] and set(cell["errors"]) == {
        "out", "dq", "dk", "dv", "dlam"}
  timed = {(c["implementation"], c["metric"], c["head_dim"]) for c in doc["speed"]
           if all("seconds" in c[phase] for phase in ("forward", "forward_backward"))}
  assert timed == {(name, metric, dim) for dim in (16,)
                   for name, metric in (("cudnn", "dot (jax.nn)"), ("routed", "dot"), ("blockwise", "dot"))}
  memory = {c["implementation"]: c for c in doc["memory"]}
  assert set(memory) == {"cudnn", "routed", "blockwise", "reference"}
  assert all(c["status"] == "compiled" and c["footprint_bytes"] >= c["temp_bytes"] > 0 for c in doc["memory"])
  page = (tmp_path / "report.md").read_text()
  for heading in ("## A. Correctness", "## B. Speed", "## C. Memory", "DRY RUN"):
    assert heading in page


@pytest.mark.slow  # a second dry run; test_dry_run_writes_every_part covers the program in make test-fast
def test_dry_run_tile_sweep(tmp_path):
  # Part D times the fused kernel (interpreted here) over its tile candidates, the default first.
  out = tmp_path / "report.json"
  code = gpu_report.main(["--dry_run", "--parts=D", "--kernels=pallas", "--metrics=dot", f"--out={out}"])
  assert code == 0
  cells = json.loads(out.read_text())["tiles"]
  assert [c["default"] for c in cells] == [True, False]
  assert all(c["status"] == "measured" and c["forward_backward"]["seconds"] > 0 for c in cells)
  assert cells[1]["tiles"] == {"block_q": 32, "block_k": 16, "block_d": 16, "num_warps": 2, "num_stages": 3}
  assert "## D. Tiles" in (tmp_path / "report.md").read_text()

