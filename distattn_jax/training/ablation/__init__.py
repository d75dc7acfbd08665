"""The ablation grid: metrics x lambda modes x tasks x seeds at a fixed budget per cell, resumable, with a
results file, a markdown table and plots.

``run_grid(config, results_dir)`` expands the config into cells, skips the ones ``<results_dir>/<suite>.json``
already holds, trains the rest (in ``workers`` processes when > 1) and rewrites the JSON after every finished
cell through a temporary file and a rename, so a killed grid loses at most the cells that were running. A
results file written for a different grid definition (tasks, metrics, modes, seeds, budget) is refused with
the fields that differ; a saved cell is reused only when its fingerprint (task, metric, mode, seed, budget,
data, registered metrics) is the grid's. One runner at a time writes a suite's results, and its workers end
with it. The markdown table and the PNG plots are rewritten from the JSON at the end.

Modules: :mod:`.grid` (definition, cells, fingerprints), :mod:`.store` (files, lock), :mod:`.runner` (the
process pool), :mod:`.report` (markdown) and :mod:`.plots`.
"""

from distattn_jax.training.ablation.grid import (NOT_DEFINITION, SHIPPED_METRICS, baseline, cell_fingerprint, cell_key,
                                                 data_fingerprint, definition, grid_cells, register_metrics)
from distattn_jax.training.ablation.plots import plot
from distattn_jax.training.ablation.report import summary, table
from distattn_jax.training.ablation.runner import run_grid
from distattn_jax.training.ablation.store import (GridMismatchError, RunnerBusyError, load_results, results_lock,
                                                  start_over_command)
from distattn_jax.training.host import machine

__all__ = ["GridMismatchError", "NOT_DEFINITION", "RunnerBusyError", "SHIPPED_METRICS", "baseline",
           "cell_fingerprint", "cell_key", "data_fingerprint", "definition", "grid_cells", "load_results",
           "machine", "plot", "register_metrics", "results_lock", "run_grid", "start_over_command", "summary",
           "table"]
