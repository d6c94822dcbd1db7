# `make run`: install what is needed and serve on http://127.0.0.1:$(PORT) (embedded SQLite + filesystem broker).
# `make test`: install what is needed and run the whole test suite.
SHELL := /bin/bash
PORT ?= 8000
VENV = $(shell scripts/bootstrap.sh)

.PHONY: run test migrate bench-peers bench-quality bench-service bench-load bench-quantize

run:
	@venv="$(VENV)"; PATH="$$venv/bin:$$PATH" PORT=$(PORT) scripts/serve.sh

test:
	@venv="$(VENV)"; PATH="$$venv/bin:$$PATH" python -m pytest $(PYTEST_ARGS)

migrate:
	@venv="$(VENV)"; PATH="$$venv/bin:$$PATH" alembic upgrade head

# Benchmark suites (docs/benchmarks.md holds measured results). Each prints markdown tables of ratios
# measured side by side in one run; BENCH_ARGS passes options (e.g. BENCH_ARGS=--quick).
bench-peers:
	@venv="$(VENV)"; PATH="$$venv/bin:$$PATH" python bench/engine_vs_peers.py $(BENCH_ARGS)

bench-quality:
	@venv="$(VENV)"; PATH="$$venv/bin:$$PATH" python bench/quality_digits.py $(BENCH_ARGS)

bench-service:
	@venv="$(VENV)"; PATH="$$venv/bin:$$PATH" python bench/service_overhead.py $(BENCH_ARGS)

bench-load:
	@venv="$(VENV)"; PATH="$$venv/bin:$$PATH" python bench/api_load.py $(BENCH_ARGS)

bench-quantize:
	@venv="$(VENV)"; PATH="$$venv/bin:$$PATH" python bench/quantize_speed.py $(BENCH_ARGS)
