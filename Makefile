# Two entry points: `make demo` runs the whole pipeline on a tiny offline model, `make test` runs the tests.
# Each creates the virtual environment it needs in .venv on first use.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
# The CPU build on CI machines; a GPU user keeps the torch they have by installing requirements.txt themselves.
TORCH_VERSION ?= 2.13.0
DEMO_DIR := demo_output

.PHONY: install test lint demo clean

$(VENV)/.installed: requirements.txt requirements-dev.txt
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q "torch==$(TORCH_VERSION)"
	$(BIN)/python -m pip install -q -r requirements-dev.txt
	touch $@

install: $(VENV)/.installed

test: install
	$(BIN)/ruff check .
	$(BIN)/python -m pytest -q tests

lint: install
	$(BIN)/ruff check .

demo: install
	$(BIN)/python tiny_model.py --output-dir $(DEMO_DIR)/tiny-model
	$(BIN)/python process_data.py --input-file demo/chats.jsonl --output-file $(DEMO_DIR)/tokenized.jsonl \
		--model-name-or-path $(DEMO_DIR)/tiny-model --num-proc 2
	$(BIN)/torchrun --nproc-per-node=2 train.py --data-path $(DEMO_DIR)/tokenized.jsonl \
		--model-name-or-path $(DEMO_DIR)/tiny-model --output-dir $(DEMO_DIR)/run \
		--batch-size 16 --max-tokens-per-gpu 1024 --learning-rate 3e-3 --num-warmup-steps 2 \
		--num-epochs 3 --min-samples-per-checkpoint 10000 --fsdp-sharding-strategy FULL_SHARD --seed 893

clean:
	rm -rf $(DEMO_DIR)
