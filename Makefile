PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
HOST ?= 127.0.0.1
PORT ?= 5000
# make server: the team's MLflow server (a PostgreSQL store, artifacts served from a folder).
DB ?=
ARTIFACTS ?= $(CURDIR)/mlflow-artifacts
WORKERS ?= 4
# make dashboard: Optuna's dashboard on a study's storage (a journal file or a database URL).
STORAGE ?=
DASHBOARD_PORT ?= 8080
DOCS_PORT ?= 8000

# A database URL as make prints it: its password as *** (make echoes recipes; experiments.core.secrets
# does the same for everything the project records).
redacted = $(shell printf '%s' '$(1)' | sed -E 's#(://[^:/@]*:)[^/]*@#\1***@#')

.DEFAULT_GOAL := help
.PHONY: help install train test test-jax test-fast lint format docs docs-build ui server serve dashboard compare \
	benchmark runs clean clean-records

help: ## List the targets
	@grep -E '^[a-zA-Z_-]+:.*?## ' $(MAKEFILE_LIST) | awk 'BEGIN {FS = ":.*?## "}; {printf "  %-14s %s\n", $$1, $$2}'

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --upgrade pip

install: $(BIN)/python ## Create .venv and install the package with the dev, docs, offline, jax, scale and onnx extras
	$(BIN)/pip install -e ".[dev,docs,offline,jax,scale,onnx]"

train: ## Run the offline quickstart (digits on a pretrained VGG16); ARGS="..." adds overrides
	$(BIN)/python -m experiments.train experiment=quickstart $(ARGS)

test: ## Run the whole test suite, slow end-to-end tests included; ARGS="..." passes pytest options
	$(BIN)/python -m pytest $(ARGS)

test-jax: ## Run the core tests and the quickstart on the JAX backend
	KERAS_BACKEND=jax $(BIN)/python -m pytest -m backends $(ARGS)

test-fast: ## Run the tests without the slow end-to-end ones
	$(BIN)/python -m pytest -m "not slow"

lint: ## Lint and check formatting with ruff; check the import contracts with import-linter
	$(BIN)/ruff check src tests
	$(BIN)/ruff format --check src tests
	$(BIN)/lint-imports

format: ## Fix lint and formatting with ruff
	$(BIN)/ruff check --fix src tests
	$(BIN)/ruff format src tests

docs: ## Serve the documentation site on 127.0.0.1:8000 (DOCS_PORT=), rebuilt as pages change
	NO_MKDOCS_2_WARNING=1 $(BIN)/mkdocs serve --dev-addr $(HOST):$(DOCS_PORT)

docs-build: ## Build the documentation site into site/, strictly: a broken link or a missing page fails
	NO_MKDOCS_2_WARNING=1 $(BIN)/mkdocs build --strict --site-dir site

ui: ## The MLflow UI on the project's store, bound to 127.0.0.1; prints each experiment's link
	$(BIN)/python -m experiments.ui --host $(HOST) --port $(PORT)

serve: PORT = 5001
serve: ## Serve a model over HTTP on 127.0.0.1: MODEL=models:/NAME@ALIAS (or runs:/ID/model) [PORT=5001 HOST=]
	@test -n "$(MODEL)" || { echo "error: set MODEL to the model to serve, e.g. make serve MODEL=models:/digits-classifier@champion" >&2; exit 2; }
	$(BIN)/python -m experiments.serve "$(MODEL)" --host $(HOST) --port $(PORT)

server: ## The team's MLflow server: DB=postgresql://USER:PASSWORD@DBHOST/mlflow [ARTIFACTS=dir HOST= PORT=]
	@test -n "$(DB)" || { echo "error: set DB to the server's PostgreSQL database, e.g. make server DB=postgresql://mlflow:PASSWORD@localhost:5432/mlflow (README, Scaling out)" >&2; exit 2; }
	@mkdir -p "$(ARTIFACTS)"
	@echo "MLflow server: http://$(HOST):$(PORT) (store $(call redacted,$(DB)), artifacts in $(ARTIFACTS))"
	@$(BIN)/mlflow server --backend-store-uri "$(DB)" --serve-artifacts \
		--artifacts-destination "$(ARTIFACTS)" --host $(HOST) --port $(PORT) --workers $(WORKERS)

dashboard: ## Optuna's dashboard on a study: STORAGE=multirun/<study>/optuna.journal or a database URL
	@test -n "$(STORAGE)" || { echo "error: set STORAGE to a study's journal file or database URL, e.g. make dashboard STORAGE=multirun/<study>/optuna.journal (the sweep's log names it)" >&2; exit 2; }
	@echo "Optuna dashboard: http://$(HOST):$(DASHBOARD_PORT) (study storage $(call redacted,$(STORAGE)))"
	@$(BIN)/optuna-dashboard "$(patsubst journal:%,%,$(STORAGE))" --host $(HOST) --port $(DASHBOARD_PORT)

compare: ## Print and save the comparison table of an experiment: EXP=flowers
	$(BIN)/python -m experiments.compare $(EXP)

benchmark: ## Memory and time of a 20-trial quickstart sweep in one process; ARGS="..." adds options
	$(BIN)/python -m experiments.benchmark $(ARGS)

runs: ## List unfinished runs and the commands that resume them
	$(BIN)/python -m experiments.runs

clean: ## Remove outputs and caches (rebuilt on demand); keeps runs, studies and checkpoints
	rm -rf outputs cache reports site .pytest_cache

clean-records: ## Delete every record: the MLflow store, Optuna studies, checkpoints and the outbox
	rm -rf mlruns multirun checkpoints outbox
