# The two commands a newcomer needs: `make run` and `make test`.
PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
export FLASK_APP := webapp

.PHONY: run test lint install install-dev install-llm audit clean

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip

install: $(BIN)/python
	$(BIN)/pip install --quiet -r requirements.txt

install-dev: $(BIN)/python
	$(BIN)/pip install --quiet -r requirements-dev.txt

# The bundled tiny model (llama-cpp-python builds from source: a few minutes, once).
# llama.cpp for a portable x86-64 (AVX2/FMA), not -march=native: a native build on a CPU with AMX
# died with "Illegal instruction" here, and pip caches the wheel it builds for every later venv.
LLM_CMAKE_ARGS ?= -DGGML_NATIVE=OFF
install-llm: $(BIN)/python
	CMAKE_ARGS="$(LLM_CMAKE_ARGS)" $(BIN)/pip install --quiet -r requirements-llm.txt

.env:
	@echo "SECRET_KEY=$$($(BIN)/python -c 'import secrets; print(secrets.token_hex(32))')" > .env
	@echo "created .env with a random SECRET_KEY"

# Serve on http://localhost:8000: upgrade the database, pick an LLM, start gunicorn.
run: install .env
	$(BIN)/flask db upgrade
	$(BIN)/python -m webapp.launch

# The linter and the import contracts first (seconds), then the whole suite.
lint: install-dev
	$(BIN)/ruff check .
	$(BIN)/lint-imports

test: install-dev install-llm lint
	$(BIN)/python -m pytest $(PYTEST_ARGS)

# Known vulnerabilities in the pinned runtime requirements and everything they pull in (advisories
# from PyPI's JSON API; AUDIT_ARGS="--vulnerability-service osv" for OSV). --strict: a package it
# could not look up fails the audit instead of passing as "no known vulnerabilities". Not part of
# `make test` or CI: it needs more than the package index, and its answer changes as advisories are
# published. pip-audit lives in a venv of its own so it never changes the app's.
AUDIT_VENV ?= .venv-audit
audit:
	@test -x $(AUDIT_VENV)/bin/pip-audit || { $(PYTHON) -m venv $(AUDIT_VENV) && \
		$(AUDIT_VENV)/bin/pip install --quiet pip-audit==2.10.1; }
	$(AUDIT_VENV)/bin/pip-audit --strict -r requirements.txt $(AUDIT_ARGS)

clean:
	rm -rf $(VENV) $(AUDIT_VENV) instance .pytest_cache
