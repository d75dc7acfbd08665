# `make run` and `make test` work on a machine with only python3: each builds .venv on first use from the pinned
# requirements.lock, installs the package into it, then does its job.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

# The main job: train TruthGPT (l1 attention, tiny) on the standard library's source, then sample from it.
# A second `make run` resumes from the run's newest checkpoint; delete $(RUN_DIR) to train from scratch.
LM_CONFIG := configs/lm.py:metric=l1,size=tiny
RUN_DIR := runs/lm_tiny_l1

.PHONY: run tour test test-fast docs clean

$(STAMP): requirements.lock pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --disable-pip-version-check -r requirements.lock
	# The lock pins the core dependencies and those of every extra (train, engines, tasks, test, docs), so this
	# and aeon below amount to pip install -e '.[test,docs]' at the locked versions.
	$(PY) -m pip install --quiet --disable-pip-version-check --no-deps -e .
	# The UCR series of the time-series task are files in aeon's wheel; only the files are read, so aeon comes
	# without its dependencies (which would pin numpy back). `pip install -e .[tasks]` installs it whole.
	$(PY) -m pip install --quiet --disable-pip-version-check --no-deps aeon==1.6.0
	touch $(STAMP)

run: $(STAMP)
	$(PY) experiments/train.py --config=$(LM_CONFIG) --workdir=$(RUN_DIR)
	$(PY) experiments/generate.py --config=$(LM_CONFIG) --workdir=$(RUN_DIR)

tour: $(STAMP)
	$(PY) experiments/examples.py

# Tests are compile-bound and XLA compiles on one thread, so one pytest worker per core (pytest-xdist); compiled
# programs persist in ~/.cache/distattn_jax (tests/conftest.py), so a rerun, from this clone or a fresh one,
# compiles only what changed.
test: $(STAMP)
	$(PY) -m pytest -q -n auto tests

# The inner loop: every test module, less the tests marked slow (end-to-end programs, the wheel in a fresh
# environment, long sweeps); `make test` runs those too.
test-fast: $(STAMP)
	$(PY) -m pytest -q -n auto -m "not slow" tests

# The documentation site (Sphinx, MyST pages, the API reference from the docstrings) into docs/_build/html. Any
# warning or broken reference fails the build, as it fails tests/test_docs.py.
docs: $(STAMP)
	$(PY) -m sphinx -W --keep-going -n -q -b html -d docs/_build/doctrees docs docs/_build/html

clean:
	rm -rf $(VENV) build *.egg-info docs/_build
