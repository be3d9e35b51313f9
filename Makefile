# Every target creates the virtual environment it needs; only python3 and make are assumed.
PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed

.PHONY: demo test bench check clean

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -e '.[dev]'
	touch $(STAMP)

## demo: run the example FastAPI app under opentelemetry-instrument and show its audit trail
demo: $(STAMP)
	$(PY) scripts/demo.py

## test: the whole test suite, then mypy --strict and ruff
test: $(STAMP)
	$(PY) -m pytest -q
	$(PY) -m mypy
	$(PY) -m ruff check src tests benchmarks examples scripts

## bench: the benchmarks; results are printed as ratios against a baseline measured in the same run
bench: $(STAMP)
	$(PY) benchmarks/run.py

check: $(STAMP)
	$(PY) -m mypy
	$(PY) -m ruff check src tests benchmarks examples scripts

clean:
	rm -rf $(VENV) build dist src/*.egg-info .pytest_cache .mypy_cache .ruff_cache
