# The two README commands: `make demo` and `make test`. Both set up .venv first (idempotent).
PY := .venv/bin/python
export OMP_NUM_THREADS ?= 2

.PHONY: setup test demo demo-docs demo-fused demo-fused-docs bench lint typecheck quality clean

setup:
	@bash scripts/setup.sh

# Two pytest-xdist workers (one intra-op thread each, tests/conftest.py), a whole test file per
# worker so module fixtures are built once; TEST_WORKERS=0 runs it in one process.
TEST_WORKERS ?= 2
test: setup
	$(PY) -m pytest -q $(if $(filter 0,$(TEST_WORKERS)),,-n $(TEST_WORKERS) --dist loadfile) tests

demo: setup
	$(PY) pipelines/demo.py

# The demo, then its table written into docs/demo (committed; the README quotes it).
demo-docs: setup
	$(PY) pipelines/demo.py --update-docs

# The fused camera + LiDAR teacher distilled into a LiDAR student on synthetic cameras (issue 17).
demo-fused: setup
	$(PY) pipelines/demo_fused.py

demo-fused-docs: setup
	$(PY) pipelines/demo_fused.py --update-docs

bench: setup
	$(PY) benchmarks/run_all.py

# The quality matrix (issue 18) in resumable pieces of under 2 h on 2 cores: each call runs the next
# unfinished piece (PIECE=all: every piece, ~18 h on the faster of the 2-core machines seen so far;
# PIECE=report: only the report), then rewrites docs/quality/report.md.
# `$(PY) pipelines/quality/run.py --plan` lists every run, its cost, what is done. QUALITY_ARGS go to
# both calls, e.g. QUALITY_ARGS="--cue-lidar-trace 0.1": the next experiment, in docs/quality-cue-trace-0.1/.
PIECE ?= next
QUALITY_ARGS ?=
quality: setup
	$(PY) pipelines/quality/run.py --plan $(QUALITY_ARGS)
	$(PY) pipelines/quality/run.py --piece $(PIECE) $(QUALITY_ARGS)

lint: setup
	$(PY) -m ruff check bevcache bevcache_cli.py tests pipelines benchmarks

typecheck: setup
	$(PY) -m mypy

clean:
	rm -rf work_dirs .pytest_cache
