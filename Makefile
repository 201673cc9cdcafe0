# Two commands on a fresh machine: `make demo` and `make test`.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
# CPU wheel of torch first: an unpinned torch would pull a multi-GB CUDA build.
TORCH := torch==2.13.0

.PHONY: install demo test lint clean

install: $(STAMP)

$(STAMP): pyproject.toml requirements-shipped.txt
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet $(TORCH)
	$(PY) -m pip install --quiet -e ".[dev]"
	$(PY) -m pip install --quiet --no-deps -r requirements-shipped.txt
	touch $(STAMP)

demo: $(STAMP)
	$(PY) examples/demo.py --output_dir runs/demo

test: $(STAMP)
	$(PY) -m ruff check src tests examples benchmarks
	$(PY) benchmarks/figures.py
	$(PY) -m pytest -q -n 2 --dist loadgroup

lint: $(STAMP)
	$(PY) -m ruff check src tests examples benchmarks
	$(PY) -m ruff format --check src tests examples benchmarks

clean:
	rm -rf $(VENV) runs
