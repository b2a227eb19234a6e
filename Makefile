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

.PHONY: install servers protos run up test check lint breaking bench images release pods pods-down clean monitoring prometheus

install: $(STAMP) $(GENERATED) $(INTEROP) $(POLICY) servers

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

run: install
	$(BIN)/copilot up --demo

up: install
	$(BIN)/copilot up

# Protos (buf), Python lint and formatting (ruff), types (mypy: strict on the shared runtime and agent cores).
lint: install
	$(BIN)/buf lint
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/mypy

# Compare the protos with main's (run on a branch before merging).
breaking: install
	$(BIN)/buf breaking --against '.git#branch=main'

# The full suite CI runs: lint, then every test (real processes, the fault suite, the containers).
test: install lint
	$(BIN)/pytest

# The fast loop while editing: lint, then the unit and contract tests that load no model weights.
check: install lint
	$(BIN)/pytest -m "not models" tests/unit tests/contract

bench: install
	$(BIN)/copilot bench

# The SRE signals generated from deploy/monitoring/slos.yaml (rules, promtool tests, dashboard, k8s component).
monitoring: install
	$(BIN)/copilot monitoring render

# Prometheus over the local mesh (`make up` in another terminal) with those rules; prints its URL.
prometheus: install
	$(BIN)/copilot monitoring prometheus

# The four service images and redis with Podman (base from debootstrap where nothing can be pulled; see README).
images:
	scripts/images.sh

# Push those images to REGISTRY (and mirror the collector and Jaeger) and pin the prod overlay on the pushed
# digests: `make release REGISTRY=registry.copilot.internal`, then review and commit deploy/k8s/overlays/prod.
release:
	@test -n "$(REGISTRY)" || { echo "usage: make release REGISTRY=<registry host[:port]>"; exit 2; }
	scripts/release-images.sh $(REGISTRY)

# The dev overlay as Podman pods from those images, left running (orchestrator on 127.0.0.1:50051).
pods: install images
	$(BIN)/python -m tests.containers.podman up

pods-down: install
	$(BIN)/python -m tests.containers.podman down

clean:
	rm -rf .copilot-data .venv-policy src/copilot/v1 src/buf/validate/*_pb2*.py src/buf/validate/*.pyi .pytest_cache
