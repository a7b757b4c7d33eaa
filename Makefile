# The two README commands: `make demo` and `make test`. Both set up .venv first (idempotent).
PY := .venv/bin/python
export OMP_NUM_THREADS ?= 2

.PHONY: setup test demo bench lint quality clean

setup:
	@bash scripts/setup.sh

test: setup
	$(PY) -m pytest -q tests

demo: setup
	$(PY) pipelines/demo.py

bench: setup
	$(PY) benchmarks/run_all.py

quality: setup
	$(PY) pipelines/quality/run.py

lint: setup
	$(PY) -m ruff check bevcache tests pipelines benchmarks

clean:
	rm -rf work_dirs .pytest_cache
