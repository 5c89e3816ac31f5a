# One entry point for a fresh machine with only Python 3.11: each target builds .venv itself.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
TORCH_SPEC ?= torch==2.13.0

.PHONY: setup test demo bench-quality

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -c "import torch" 2>/dev/null || $(PY) -m pip install -q "$(TORCH_SPEC)"
	$(PY) -m pip install -q -e ".[test]"
	touch $@

setup: $(VENV)/.installed

test: setup
	$(PY) -m pytest -q -ra tests

demo: setup
	$(VENV)/bin/semid demo

bench-quality: setup
	$(PY) -m pip install -q -e ".[bench]"
	$(PY) scripts/bench_quality.py
