# Thin wrappers over the module commands in README.md. `make help` lists the targets.
.DEFAULT_GOAL := help
SHELL := /bin/bash

VENV ?= .venv
PYTHON ?= $(VENV)/bin/python
SOURCE ?= fineweb_sample_10bt
EXPERIMENT ?=
RUN ?= demo
NPROC ?= 1
ARGS ?=
SHARDS ?= $(SOURCE)
SHARDS_REPO ?=
CHECKPOINT_REPO ?=
MIRROR ?=
JOBS ?=
GPUS_PER_JOB ?= 1
LAUNCHER ?= parallel
PARTITION ?=
TIME_MIN ?=
STEP ?=
MODEL ?= gpt2
TOKENS ?= 10e9
GPUS ?= 8
PRICE ?= 2.5
TOKENS_PER_S ?=
SWEEP ?= lr_grid
PROMPT ?= Hello, I'm a language model,
FORMAT ?= hf
OUT ?= $(FORMAT)/$(RUN)
HF_REPO ?=
HELLASWAG ?=
TOKENIZER_DIR ?=
TASKS ?=
RUNS ?= runs/$(RUN)
PLOT ?= runs/loss.png
need = $(if $($(1)),,$(error set $(1)=USER/NAME, e.g. make $@ $(1)=me/$(2)))

# The demo reads the FineWeb sample from $FINEWEB_SAMPLE when it is set (offline), else it
# streams 4,000 documents of FineWeb sample-10BT from the hub.
DEMO_SOURCE := $(if $(FINEWEB_SAMPLE),source=local,source=fineweb_sample_10bt source.max_documents=4000)
DEMO_PREPARE := $(DEMO_SOURCE) name=demo shard_size=1000000 val_tokens=250000 source.shuffle_buffer=10000
DEMO_ENV := $(if $(FINEWEB_SAMPLE),HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1)

.PHONY: help setup setup-gpu demo prepare train train-auto resume evaluate test lint format clean \
	train-nodes upload-shards download-shards push-checkpoint pull-checkpoint max-batch memory cost sweep plot \
	sample hellaswag gpt2-hellaswag export push-hf bench compare lm-eval test-gpu preflight

help: ## List the targets
	@awk 'BEGIN {FS = ":.*## "} /^[a-zA-Z_-]+:.*## / {printf "  \033[36m%-16s\033[0m %s\n", $$1, $$2}' $(MAKEFILE_LIST)
	@echo "Variables: SOURCE=$(SOURCE) EXPERIMENT=$(EXPERIMENT) NPROC=$(NPROC) RUN=$(RUN) ARGS='<overrides>'"
	@echo "  SWEEP=$(SWEEP) RUNS=$(RUNS) PLOT=$(PLOT) SHARDS_REPO= CHECKPOINT_REPO= STEP="
	@echo "  PROMPT='$(PROMPT)' FORMAT=$(FORMAT) OUT=$(OUT) HF_REPO= HELLASWAG= TOKENIZER_DIR= TASKS="
	@echo "  MODEL=$(MODEL) TOKENS=$(TOKENS) GPUS=$(GPUS) PRICE=$(PRICE)"
	@echo "  MIRROR=<fsspec URL: checkpoint mirror> JOBS=<sweep jobs at a time> GPUS_PER_JOB=$(GPUS_PER_JOB)"
	@echo "  LAUNCHER=$(LAUNCHER) (or slurm, slurm_local) PARTITION=<SLURM partition> TIME_MIN=<SLURM minutes>"

# Last, the book's package (llms-from-scratch, for `export --format book` and its tests): its
# ch04 needs only torch, but its metadata asks for tensorflow, numpy<2.1 and Python <= 3.13.
$(VENV)/.installed: pyproject.toml
	python3 -m venv $(VENV)
	$(VENV)/bin/pip install --upgrade pip
	$(VENV)/bin/pip install torch==2.13.0
	$(VENV)/bin/pip install -e '.[dev]'
	$(VENV)/bin/pip install --no-deps --ignore-requires-python llms-from-scratch==1.0.19
	touch $@

setup: $(VENV)/.installed ## Create .venv with torch 2.13.0, the project (dev extra) and the book's package

setup-gpu: ## Set up a fresh Ubuntu GPU machine (DATA_DISK=/dev/... to mount a data disk)
	bash launch/setup_gpu_machine.sh

demo: $(VENV)/.installed ## End to end on the FineWeb sample: prepare, train the tiny model on CPU, evaluate
	$(DEMO_ENV) $(PYTHON) -m pipeline.prepare $(DEMO_PREPARE)
	$(PYTHON) -m pipeline.train experiment=demo
	$(PYTHON) -m pipeline.evaluate checkpoint=runs/demo

prepare: $(VENV)/.installed ## Tokenize SOURCE into shards/<name>/ (ARGS: more overrides)
	$(PYTHON) -m pipeline.prepare source=$(SOURCE) $(ARGS)

TRAIN_ARGS = $(if $(EXPERIMENT),experiment=$(EXPERIMENT)) $(if $(MIRROR),checkpoint.mirror=$(MIRROR)) $(ARGS)
ifeq ($(NPROC),1)
TRAIN = $(PYTHON) -m pipeline.train
else
TRAIN = env NPROC=$(NPROC) PYTHON=$(PYTHON) bash launch/train_single_node.sh
endif

train: $(VENV)/.installed ## Train or continue (EXPERIMENT: conf/experiment/<name>.yaml, NPROC: GPUs, ARGS)
	$(TRAIN) $(TRAIN_ARGS)

train-auto: $(VENV)/.installed ## Train, restarting after preemption or a crash until the run is complete
	bash launch/auto_resume.sh $(TRAIN) $(TRAIN_ARGS)

train-nodes: $(VENV)/.installed ## One node of a multi-node run (MAIN_ADDR, NNODES, NODE_RANK set; launch/train_multi_node.sh)
	bash launch/train_multi_node.sh $(TRAIN_ARGS)

resume: $(VENV)/.installed ## Continue EXPERIMENT from its newest checkpoint (fails if it has none)
	$(TRAIN) $(TRAIN_ARGS) checkpoint.resume=latest

sweep: $(VENV)/.installed ## Hydra sweep SWEEP (conf/sweep/) over EXPERIMENT, JOBS at a time of GPUS_PER_JOB GPUs each (LAUNCHER=slurm: SLURM jobs): job N is runs/<run_name>/N
	$(PYTHON) -m pipeline.train $(if $(EXPERIMENT),experiment=$(EXPERIMENT)) sweep=$(SWEEP) \
		hydra/launcher=$(LAUNCHER) launch.gpus_per_job=$(GPUS_PER_JOB) $(if $(JOBS),launch.jobs=$(JOBS)) \
		$(if $(PARTITION),launch.partition=$(PARTITION)) $(if $(TIME_MIN),launch.time_min=$(TIME_MIN)) $(ARGS)

plot: $(VENV)/.installed ## Train and validation loss against tokens of RUNS (runs or sweeps) into PLOT
	$(PYTHON) -m pipeline.plot $(RUNS) --out $(PLOT)

evaluate: $(VENV)/.installed ## Validation loss and perplexity of the newest checkpoint of runs/RUN
	$(PYTHON) -m pipeline.evaluate checkpoint=runs/$(RUN) $(ARGS)

upload-shards: $(VENV)/.installed ## Upload shards/SHARDS to the hub dataset repo SHARDS_REPO (verified first)
	$(call need,SHARDS_REPO,fineweb-gpt2-shards)
	$(PYTHON) -m pipeline.hub upload-shards shards/$(SHARDS) $(SHARDS_REPO)

download-shards: $(VENV)/.installed ## Download and verify SHARDS from SHARDS_REPO into shards/SHARDS/
	$(call need,SHARDS_REPO,fineweb-gpt2-shards)
	$(PYTHON) -m pipeline.hub download-shards $(SHARDS_REPO) $(SHARDS) --out-dir shards

push-checkpoint: $(VENV)/.installed ## Upload the newest checkpoint of runs/RUN to the hub model repo CHECKPOINT_REPO
	$(call need,CHECKPOINT_REPO,gpt2-checkpoints)
	$(PYTHON) -m pipeline.hub push-checkpoint runs/$(RUN) $(CHECKPOINT_REPO)

pull-checkpoint: $(VENV)/.installed ## Download the newest (or STEP) checkpoint of RUN from CHECKPOINT_REPO into runs/RUN/
	$(call need,CHECKPOINT_REPO,gpt2-checkpoints)
	$(PYTHON) -m pipeline.hub pull-checkpoint $(CHECKPOINT_REPO) $(RUN) $(if $(STEP),--step $(STEP))

max-batch: $(VENV)/.installed ## Largest trainer.micro_batch_size of EXPERIMENT (or MODEL) on this GPU (ARGS: overrides)
	$(PYTHON) -m pipeline.plan max-batch $(if $(EXPERIMENT),--experiment $(EXPERIMENT),--model $(MODEL)) --gpus $(GPUS) $(ARGS)

memory: $(VENV)/.installed ## Estimated peak memory per GPU of MODEL (ARGS: --micro-batch-size 16 32 ...)
	$(PYTHON) -m pipeline.plan memory --model $(MODEL) $(ARGS)

cost: $(VENV)/.installed ## Wall time and cost of TOKENS on GPUS at PRICE per GPU-hour (runs/RUN or TOKENS_PER_S)
	$(PYTHON) -m pipeline.plan cost --tokens $(TOKENS) --gpus $(GPUS) --price $(PRICE) \
	  $(if $(TOKENS_PER_S),--tokens-per-s $(TOKENS_PER_S),--metrics runs/$(RUN)/metrics.jsonl)

sample: $(VENV)/.installed ## Continue PROMPT with the newest checkpoint of runs/RUN (ARGS: temperature=0 ...)
	$(PYTHON) -m pipeline.sample checkpoint=runs/$(RUN) "prompt=\"$(PROMPT)\"" $(ARGS)

hellaswag: $(VENV)/.installed ## Validation loss and HellaSwag acc/acc_norm of runs/RUN (HELLASWAG=file)
	$(PYTHON) -m pipeline.evaluate checkpoint=runs/$(RUN) 'tasks=[val_loss,hellaswag]' \
	  $(if $(HELLASWAG),hellaswag_path=$(HELLASWAG)) $(ARGS)

gpt2-hellaswag: $(VENV)/.installed ## HellaSwag of OpenAI's GPT-2 MODEL (gpt2 .. gpt2-xl) from the hub
	$(PYTHON) -m pipeline.evaluate pretrained=$(MODEL) 'tasks=[hellaswag]' \
	  $(if $(HELLASWAG),hellaswag_path=$(HELLASWAG)) $(ARGS)

export: $(VENV)/.installed ## Write the newest checkpoint of runs/RUN to folder OUT in FORMAT: hf, book or llmc
	$(PYTHON) -m pipeline.export checkpoint runs/$(RUN) $(OUT) --format $(FORMAT) \
	  $(if $(TOKENIZER_DIR),--tokenizer-dir $(TOKENIZER_DIR))

lm-eval: $(VENV)/.installed ## lm-evaluation-harness on the newest checkpoint of runs/RUN (TASKS=a,b or a task YAML, ARGS: --limit N)
	$(PYTHON) -m pipeline.lm_eval runs/$(RUN) $(if $(TASKS),--tasks $(TASKS)) $(ARGS)

push-hf: $(VENV)/.installed ## Upload the exported folder OUT to the hub model repo HF_REPO
	$(call need,HF_REPO,gpt2-fineweb)
	$(PYTHON) -m pipeline.export push $(OUT) $(HF_REPO)

bench: $(VENV)/.installed ## Measure prepare, loader, training throughput, memory and sampling into BENCHMARKS.md (ARGS: --only ...)
	$(PYTHON) -m pipeline.bench $(ARGS)

compare: $(VENV)/.installed ## Tune AdamW and Muon on the tiny model (sweeps), compare the best into BENCHMARKS.md (hours on a CPU)
	$(DEMO_ENV) $(PYTHON) -m pipeline.prepare $(DEMO_PREPARE)
	$(PYTHON) -m pipeline.compare $(ARGS)

test: $(VENV)/.installed ## Run the test suite (CPU, offline, about 9 minutes on 2 cores)
	$(PYTHON) -m pytest

preflight: $(VENV)/.installed ## Check this GPU machine in minutes: versions, bf16, attention, compile, a step, NCCL, EXPERIMENT's speed and cost at PRICE, disk
	$(PYTHON) -m pipeline.preflight $(if $(EXPERIMENT),--experiment $(EXPERIMENT)) --price $(PRICE) $(ARGS)

test-gpu: $(VENV)/.installed ## Run the gpu-marked tests (a CUDA machine: compile, bf16, flash SDPA, fused AdamW, Muon, losses, DDP, FSDP2)
	$(PYTHON) -m pytest -m gpu

lint: $(VENV)/.installed ## ruff lint and format check
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .

format: $(VENV)/.installed ## Apply ruff's fixes and formatting
	$(VENV)/bin/ruff check --fix .
	$(VENV)/bin/ruff format .

clean: ## Delete runs, shards, Hydra outputs and caches (keeps .venv)
	rm -rf runs outputs multirun wandb .pytest_cache .ruff_cache
	find shards -mindepth 1 ! -name .gitkeep -exec rm -rf {} +
	find . -name __pycache__ -not -path './$(VENV)/*' -exec rm -rf {} +
