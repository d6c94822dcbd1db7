# `make run`: install what is needed and serve on http://127.0.0.1:$(PORT) (embedded SQLite + filesystem broker).
# `make test`: install what is needed and run the whole test suite.
SHELL := /bin/bash
PORT ?= 8000
VENV = $(shell scripts/bootstrap.sh)

.PHONY: run test migrate bench-quantize

run:
	@venv="$(VENV)"; PATH="$$venv/bin:$$PATH" PORT=$(PORT) scripts/serve.sh

test:
	@venv="$(VENV)"; PATH="$$venv/bin:$$PATH" python -m pytest $(PYTEST_ARGS)

migrate:
	@venv="$(VENV)"; PATH="$$venv/bin:$$PATH" alembic upgrade head
