# Two commands on a fresh machine:
#   make train   set up .venv (pinned) and run the main job on the embedded default
#   make test    set up .venv (pinned) and run the test suite
PY      ?= python3
VENV    ?= .venv
BIN     := $(VENV)/bin
STAMP   := $(VENV)/.installed
# torch is installed first and alone, so nothing else pulls a different (CUDA) build.
# Machines here serve a local CPU wheel for torch==2.13.0. Elsewhere, on a CPU-only machine,
# run `make TORCH_INDEX=https://download.pytorch.org/whl/cpu ...` to avoid the CUDA wheels.
TORCH_INDEX ?=
TORCH   := torch==2.13.0 $(if $(TORCH_INDEX),--index-url $(TORCH_INDEX))
NPROC   ?= 2
TRAIN_ARGS ?=
PYTEST_ARGS ?=

.PHONY: setup train test test-fast test-multirank lint gpu-check gpu-pack gpu-rehearsal bench bench-micro memory-report clean

setup: $(STAMP)

$(STAMP): requirements.txt requirements-assets.txt setup.py
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/pip install --quiet $(TORCH)
	$(BIN)/pip install --quiet -r requirements.txt
	$(BIN)/pip install --quiet --no-deps -r requirements-assets.txt
	$(BIN)/pip install --quiet --no-deps --no-build-isolation -e .
	touch $(STAMP)

train: setup
	PATH=$(abspath $(BIN)):$$PATH $(BIN)/deepspeed --num_gpus $(NPROC) launch/train.py --deepspeed ds_configs/zero2.json $(TRAIN_ARGS)

test: setup
	$(BIN)/python -m pytest tests $(PYTEST_ARGS)

# ruff (pinned in requirements.txt), configured in ruff.toml; CI runs it before the tests.
lint: setup
	$(BIN)/ruff check .

# The GPU verdict (bench/gpu/run.sh: the pack's missing wheels installed offline into a temporary
# target, then bench/gpu/check.py under one 7-minute deadline; verdict in $OUT or bench/results/).
# No `setup`: a lent GPU machine is offline and uses its own Python (the .venv's if there is one).
gpu-check:
	PYTHON=$(if $(wildcard $(BIN)/python),$(abspath $(BIN))/python,python3) bash bench/gpu/run.sh

# The GPU verdict for a lent, offline GPU machine (docs: bench/gpu/run.sh): `make gpu-pack` here
# (network) builds .gpu/ (wheels the device image lacks, model configs; under 60 MiB); the device
# runs `bash bench/gpu/run.sh` with .gpu carried. `make gpu-rehearsal`: the same on the CPU accelerator.
gpu-pack: setup
	$(BIN)/python -m bench.gpu.pack

gpu-rehearsal: setup
	PYTHON=$(abspath $(BIN))/python OUT=runs/gpu_rehearsal bash bench/gpu/run.sh --rehearsal

test-fast: setup
	$(BIN)/python -m pytest tests/unit $(PYTEST_ARGS)

test-multirank: setup
	$(BIN)/python -m pytest tests/multirank $(PYTEST_ARGS)

memory-report: setup
	$(BIN)/python -m rosa_ds.memory --model default --method rosa --rank 8 --zero 2 --world-size 2 --dtype fp32 \
	    --ds-config ds_configs/zero2.json --micro-batch 4 --seq-len 128 \
	    --markdown bench/results/memory_default.md --png bench/results/memory_default.png

SUITE ?= quick
bench: setup
	$(BIN)/python -m bench.run --suite $(SUITE)

bench-micro: setup
	$(BIN)/python -m bench.micro
	$(BIN)/python -m bench.solvers

clean:
	rm -rf $(VENV) .pytest_cache build *.egg-info
