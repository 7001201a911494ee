# The two quick-start commands (README): `make demo` and `make test`. Both create the local venv
# on first use with the pinned CPU install path: torch==2.13.0 first, then everything else under
# constraints-cpu.txt, so pip never resolves a multi-GB CUDA build of torch.

VENV ?= .venv
PYTHON ?= python3
BIN := $(VENV)/bin
RUNS ?= runs/demo

export WANDB_MODE ?= disabled
export DS_BUILD_OPS ?= 0

.PHONY: install demo base-model test test-all docs clean

install: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml constraints-cpu.txt
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet torch==2.13.0
	$(BIN)/pip install --quiet -c constraints-cpu.txt -e '.[test]'
	touch $@

# The main job on the embedded default (`longtune demo`): the shipped base model tiny-base-256 (256
# tokens) extended to 2,048 tokens with PI and with YaRN on 2 processes (sp = 2), then passkey and
# perplexity of base and extended models → $(RUNS)/results.md and PNG plots.
demo: install
	$(BIN)/longtune demo --out $(RUNS)

# Re-train the shipped base model from scratch (2,500 steps: about 25 min on one idle CPU core).
base-model: install
	PATH=$(abspath $(BIN)):$$PATH PYTHON=$(abspath $(BIN))/python bash examples/base-model/train.sh

test: install
	$(BIN)/python -m pytest

test-all: install
	$(BIN)/python -m pytest -m ''

# docs/recipes.md from the recipe schema's field descriptions (tests/test_recipe_docs.py checks it is current).
docs: install
	$(BIN)/python -m longtune.train.recipe_docs > docs/recipes.md.tmp
	mv docs/recipes.md.tmp docs/recipes.md

clean:
	rm -rf $(VENV) runs
