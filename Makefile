# Manufacturing Copilot — `make run` starts the whole mesh and runs a real diagnosis; `make test` tests it.
SHELL := /bin/bash
PYTHON ?= python3.11
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
PROTOS := $(wildcard protos/copilot/v1/*.proto protos/copilot/agents/v1/*.proto protos/buf/validate/*.proto protos/google/*/*.proto)
GENERATED := src/copilot/v1/__init__.py
INTEROP := tests/interop/node_modules/.package-lock.json
# checkov, the Kubernetes policy gate of tests/deploy/test_policy.py, in its own virtualenv (its dependencies are
# not the project's)
POLICY := .venv-policy/.installed
CHECKOV_VERSION := 3.3.30
# pip takes the CPU build of torch from /opt/wheels where the machine has it (see README).
PIP_LOCAL := $(if $(wildcard /opt/wheels),--find-links /opt/wheels,)
# llama-cpp-python (the `local` generator) compiles from source. Not for the build machine's own CPU
# (-march=native): built that way on one of these VMs, it died there with "Illegal instruction" (the virtual
# CPU advertises more than it runs). For any x86-64 CPU with AVX2 instead, and never from pip's wheel cache
# (which keys the wheel by version, not by these flags).
LLAMA_CMAKE_ARGS ?= -DGGML_NATIVE=OFF -DGGML_AVX=ON -DGGML_AVX2=ON -DGGML_FMA=ON -DGGML_F16C=ON

.PHONY: help install servers protos run up test check lint format breaking bench images release pods pods-down clean \
	monitoring prometheus

# The modules held to a docstring rule (ruff D, pep257): the ones mypy checks strictly (pyproject.toml). Every public
# module and class says what it is; a function may let its name and types speak (D102/D103/D105/D107), a summary may
# run over two lines with the closing quotes on its last (D205/D209), describe rather than command (D401), and code
# names keep their case (D403).
DOCSTRING_MODULES := src/copilot services/orchestrator/workflow.py services/orchestrator/decisions.py \
	services/orchestrator/recorder.py services/orchestrator/history.py $(addprefix services/rag/,core.py citations.py \
	generators.py corpus.py store.py evaluation.py onnx_embedder.py embedders.py identifiers.py language.py) \
	$(addprefix services/vision/,core.py patchcore.py references.py cache.py)
DOCSTRING_IGNORE := D102,D103,D105,D107,D205,D209,D401,D403

help: ## This list
	@grep -E '^[a-z-]+:.*## ' $(MAKEFILE_LIST) | sed -E 's/^([a-z-]+):.*## (.*)/  make \1\t\2/' | expand -t 22

install: $(STAMP) $(GENERATED) $(INTEROP) $(POLICY) servers ## Virtualenvs, generated code, the test servers (first use)

$(POLICY):
	test -x .venv-policy/bin/python || $(PYTHON) -m venv .venv-policy
	.venv-policy/bin/pip install --quiet --upgrade pip
	.venv-policy/bin/pip install --quiet checkov==$(CHECKOV_VERSION)
	touch $@

# redis-server, prometheus (+ promtool) and prometheus-alertmanager from Debian packages, as root where apt is
# there; elsewhere the tests that need them skip and say why.
servers:
	@bash scripts/install-servers.sh

# The Node.js client of the interop test (tests/interop), where npm is installed; without it that test skips.
$(INTEROP): tests/interop/package.json tests/interop/package-lock.json
	@if command -v npm >/dev/null; then \
		npm ci --prefix tests/interop --no-audit --no-fund --loglevel=error; \
	else \
		echo "npm not found: the Node.js interop test will be skipped"; \
	fi

$(STAMP): pyproject.toml constraints.txt
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet $(PIP_LOCAL) -c constraints.txt torch==2.13.0
	CMAKE_ARGS="$(LLAMA_CMAKE_ARGS)" $(BIN)/pip install --quiet --no-cache-dir -c constraints.txt llama-cpp-python
	$(BIN)/pip install --quiet $(PIP_LOCAL) -c constraints.txt -e '.[dev]'
	touch $@

# Stubs are generated, never edited, and regenerated whenever a .proto changes.
$(GENERATED): $(PROTOS) scripts/gen_protos.py $(STAMP)
	$(BIN)/python scripts/gen_protos.py

protos: $(GENERATED)

run: install ## Start the whole mesh on embedded defaults and run one real diagnosis
	$(BIN)/copilot up --demo

up: install ## Start the mesh and leave it serving (Ctrl-C stops it)
	$(BIN)/copilot up

# Protos (buf), Python lint and formatting (ruff), types (mypy: strict on the shared runtime and agent cores).
lint: install ## buf lint, ruff (code, docstrings, format), mypy
	$(BIN)/buf lint
	$(BIN)/ruff check .
	$(BIN)/ruff check --select D --ignore $(DOCSTRING_IGNORE) $(DOCSTRING_MODULES)
	$(BIN)/ruff format --check .
	$(BIN)/mypy

# Format the code and sort the imports (what `make lint` checks).
format: install ## ruff format + import order and other safe fixes
	$(BIN)/ruff check --fix --select I,UP,RUF022 .
	$(BIN)/ruff format .

# Compare the protos with main's (run on a branch before merging).
breaking: install ## buf breaking against main
	$(BIN)/buf breaking --against '.git#branch=main'

# The full suite CI runs: lint, then every test (real processes, the fault suite, the containers).
test: install lint ## Lint, then every test (what CI runs)
	$(BIN)/pytest

# The fast loop while editing: lint, then the unit and contract tests that load no model weights.
check: install lint ## Lint, then the unit and contract tests without model weights (< 1 min)
	$(BIN)/pytest -m "not models" tests/unit tests/contract

bench: install ## Benchmarks: print tables, write JSON (copilot bench --help)
	$(BIN)/copilot bench

# The SRE signals generated from deploy/monitoring/slos.yaml (rules, promtool tests, dashboard, k8s component).
monitoring: install ## Render the Prometheus rules, tests and dashboard from deploy/monitoring/slos.yaml
	$(BIN)/copilot monitoring render

# Prometheus over the local mesh (`make up` in another terminal) with those rules; prints its URL.
prometheus: install ## Prometheus over the local mesh with those rules
	$(BIN)/copilot monitoring prometheus

# The four service images and redis with Podman (base from debootstrap where nothing can be pulled; see README).
images: ## Build the four service images (and redis) with Podman
	scripts/images.sh

# Push those images to REGISTRY (and mirror the collector and Jaeger) and pin the prod overlay on the pushed
# digests: `make release REGISTRY=registry.copilot.internal`, then review and commit deploy/k8s/overlays/prod.
release: ## Push the images to REGISTRY= and pin the prod overlay on their digests
	@test -n "$(REGISTRY)" || { echo "usage: make release REGISTRY=<registry host[:port]>"; exit 2; }
	scripts/release-images.sh $(REGISTRY)

# The dev overlay as Podman pods from those images, left running: orchestrator on 127.0.0.1:50051, knowledge on
# 127.0.0.1:50053 (the local mesh's ports: it refuses to start while `make run` / `copilot up` holds them).
pods: install images ## The dev overlay as Podman pods (stop `make run` first)
	$(BIN)/python -m tests.containers.podman up

pods-down: install ## Remove those pods
	$(BIN)/python -m tests.containers.podman down

clean: ## Remove generated code and local data
	rm -rf .copilot-data .venv-policy src/copilot/v1 src/buf/validate/*_pb2*.py src/buf/validate/*.pyi .pytest_cache
