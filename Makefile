# The two quick-start commands (README): `make demo` and `make test`. Both create the local venv
# on first use with the pinned CPU install path: torch==2.13.0 first, then everything else under
# constraints-cpu.txt, so pip never resolves a multi-GB CUDA build of torch.

VENV ?= .venv
PYTHON ?= python3
BIN := $(VENV)/bin
RUNS ?= runs/demo

export WANDB_MODE ?= disabled
export DS_BUILD_OPS ?= 0

.PHONY: install demo test test-all clean

install: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml constraints-cpu.txt
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet torch==2.13.0
	$(BIN)/pip install --quiet -c constraints-cpu.txt -e '.[test]'
	touch $@

# The main job on the embedded default: train the tiny base model at 256 tokens (1 process), then
# extend it to 1024 tokens with YaRN on 2 processes, and export both as HF model dirs.
demo: install
	$(BIN)/longtune train tiny-smoke train.output_dir=$(RUNS)/base
	$(BIN)/longtune train tiny-extend-yarn model.name_or_path=$(RUNS)/base/model train.output_dir=$(RUNS)/extended
	@echo "exported: $(RUNS)/base/model $(RUNS)/extended/model"

test: install
	$(BIN)/python -m pytest

test-all: install
	$(BIN)/python -m pytest -m ''

clean:
	rm -rf $(VENV) runs
