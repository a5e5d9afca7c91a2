# dBOT transfer suite. `make help` lists targets and variables.
SHELL := /bin/bash
.DEFAULT_GOAL := help

PYTHON      ?= python3
VENV        ?= .venv
PY          := $(VENV)/bin/python
MODEL       ?= tiny
DATA        ?=
CKPT        ?=
RUNS        ?= runs
NGPUS       ?= 1
NNODES      ?= 1
NODE_RANK   ?= 0
MASTER_ADDR ?= 127.0.0.1
MASTER_PORT ?= 29500
ARGS        ?=
TO          ?= timm
OUT         ?=
BENCH       ?= pretrain finetune coco ade20k
TINY        := data/tiny
LABELS      ?=
PYTEST_ARGS ?=
SCALE       ?= cpu

# One process: plain python. Several: torchrun (same command on every node, with NODE_RANK set per node).
ifeq ($(NGPUS)$(NNODES),11)
LAUNCH = $(PY) -m
else
LAUNCH = $(VENV)/bin/torchrun --nnodes=$(NNODES) --nproc_per_node=$(NGPUS) --node_rank=$(NODE_RANK) \
	--master_addr=$(MASTER_ADDR) --master_port=$(MASTER_PORT) -m
endif

PRETRAIN_DATA = $(if $(DATA),$(DATA),$(TINY)/imagenet)
TINY_DEPS     = $(if $(DATA),,$(TINY)/imagenet/.done)
# Downstream tasks start from CKPT, by default the final-stage student of the tiny pretraining run
# (made by `make pretrain` if absent).
TINY_CKPT     := $(RUNS)/pretrain-tiny/checkpoint-stage1-student.pth
START_CKPT    = $(if $(CKPT),$(CKPT),$(TINY_CKPT))
CKPT_DEPS     = $(if $(CKPT),,$(TINY_CKPT))

.PHONY: help venv demo pretrain finetune coco ade20k convert table analysis study study-wider test test-all lint format bench gpu-check clean

help: ## this list
	@echo "dBOT transfer suite"
	@echo
	@echo "Targets:"
	@awk 'BEGIN {FS = ":.*## "} /^[a-z0-9-]+:.*## / {printf "  %-10s %s\n", $$1, $$2}' $(MAKEFILE_LIST)
	@echo
	@echo "Variables (default):"
	@echo "  MODEL=$(MODEL)      recipe of the task: tiny small base large huge (finetune also huge448 linprobe_base ...)"
	@echo "  DATA=           dataset root in its standard layout; empty = the generated tiny data"
	@echo "  CKPT=           checkpoint a downstream task starts from; empty = the tiny pretraining run's"
	@echo "  RUNS=$(RUNS)      folder for run outputs (<RUNS>/<task>-<MODEL>)"
	@echo "  NGPUS=$(NGPUS) NNODES=$(NNODES) processes per node / nodes (more than one launches torchrun)"
	@echo "  NODE_RANK=$(NODE_RANK) MASTER_ADDR=$(MASTER_ADDR) MASTER_PORT=$(MASTER_PORT)  multi-node rendezvous"
	@echo "  BENCH=$(BENCH)  make bench: which throughput benchmarks to run"
	@echo "  ARGS=           extra key=value config overrides, e.g. ARGS='optim.blr=1e-4 log.every=50'"
	@echo "                  (each checked; a bad one is one line 'error: ...'; ARGS=--debug or DBOT_DEBUG=1: traceback)"
	@echo "  TO=$(TO) OUT=   convert: layout (timm detectron2 mmdet mmseg mmseg-vit mmpretrain backbone) and output file"
	@echo "  LABELS=         table: YAML naming the rows of checkpoints not made here (see README)"
	@echo "  SCALE=$(SCALE)      study: cpu (tiny ViT, 2 cores, <= 30 min) or gpu (ViT-S/8 at 64 px, one GPU)"
	@echo "  PYTHON=$(PYTHON) interpreter used to create $(VENV)"

$(VENV)/.installed: pyproject.toml constraints.txt
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -c constraints.txt -e '.[dev,interop]' --config-settings editable_mode=compat
	@touch $@

venv: $(VENV)/.installed ## create/refresh the virtual environment in .venv

$(TINY)/imagenet/.done: tools/datasets.py | $(VENV)/.installed
	rm -rf $(TINY)/imagenet
	$(PY) -m tools.datasets imagenet --out $(TINY)/imagenet
	@touch $@

$(TINY)/coco/.done: tools/datasets.py | $(VENV)/.installed
	rm -rf $(TINY)/coco
	$(PY) -m tools.datasets coco --out $(TINY)/coco
	@touch $@

$(TINY)/ade20k/.done: tools/datasets.py | $(VENV)/.installed
	rm -rf $(TINY)/ade20k
	$(PY) -m tools.datasets ade20k --out $(TINY)/ade20k
	@touch $@

$(TINY_CKPT): | $(VENV)/.installed
	$(MAKE) --no-print-directory pretrain MODEL=tiny DATA= NGPUS=1 NNODES=1 ARGS=

demo: venv ## the whole tiny chain on CPU: pretrain -> convert -> finetune (and from random init) -> coco -> ade20k -> table
	$(MAKE) --no-print-directory pretrain MODEL=tiny DATA= NGPUS=1 NNODES=1 ARGS=
	$(MAKE) --no-print-directory convert MODEL=tiny CKPT= TO=timm OUT=$(RUNS)/pretrain-tiny/vit_tiny_dbot_timm.pth
	$(MAKE) --no-print-directory finetune MODEL=tiny DATA= CKPT= NGPUS=1 NNODES=1 ARGS=
	$(MAKE) --no-print-directory finetune MODEL=tiny DATA= CKPT= NGPUS=1 NNODES=1 \
		ARGS='checkpoint=null out=$(RUNS)/finetune-tiny-random'
	$(MAKE) --no-print-directory coco MODEL=tiny DATA= CKPT= NGPUS=1 NNODES=1 ARGS=
	$(MAKE) --no-print-directory ade20k MODEL=tiny DATA= CKPT= NGPUS=1 NNODES=1 ARGS=
	$(MAKE) --no-print-directory table RUNS=$(RUNS) ARGS=
	@$(PY) -m tools.compare $(RUNS)/finetune-tiny $(RUNS)/finetune-tiny-random

pretrain: venv $(TINY_DEPS) ## dBOT pretraining (tiny data by default; DATA=imagenet MODEL=base NGPUS=8 ...)
	$(LAUNCH) pretrain -c $(MODEL) data.root=$(PRETRAIN_DATA) out=$(RUNS)/pretrain-$(MODEL) $(ARGS)

finetune: venv $(TINY_DEPS) $(CKPT_DEPS) ## ImageNet fine-tuning (tiny by default; DATA=imagenet MODEL=base CKPT=...; MODEL=linprobe_base ...)
	$(LAUNCH) finetune -c $(MODEL) data.root=$(PRETRAIN_DATA) checkpoint=$(START_CKPT) out=$(RUNS)/finetune-$(MODEL) $(ARGS)

coco: venv $(if $(DATA),,$(TINY)/coco/.done) $(CKPT_DEPS) ## COCO Mask R-CNN (ViTDet); tiny by default; DATA=/coco MODEL=base CKPT=... NGPUS=8 NNODES=8
	$(LAUNCH) detection -c $(MODEL) data.root=$(if $(DATA),$(DATA),$(TINY)/coco) checkpoint=$(START_CKPT) out=$(RUNS)/coco-$(MODEL) $(ARGS)

ade20k: venv $(if $(DATA),,$(TINY)/ade20k/.done) $(CKPT_DEPS) ## ADE20K UperNet segmentation (tiny by default; DATA=.../ADEChallengeData2016 MODEL=base CKPT=...)
	$(LAUNCH) segmentation -c $(MODEL) data.root=$(if $(DATA),$(DATA),$(TINY)/ade20k) checkpoint=$(START_CKPT) \
		out=$(RUNS)/ade20k-$(MODEL) $(ARGS)

convert: venv ## convert CKPT for another codebase: make convert CKPT=... TO=timm|detectron2|mmdet|mmseg|mmseg-vit|mmpretrain|backbone [OUT=...]
	$(PY) -m tools.convert $(START_CKPT) $(if $(OUT),$(OUT),$(basename $(START_CKPT))-$(TO).pth) --to $(TO) $(if $(filter-out tiny,$(MODEL)),--model $(MODEL),)

table: venv ## results table from every results.json under RUNS (Markdown printed; LaTeX, CSV, PNG in RUNS/table)
	$(PY) -m tools.table --runs $(RUNS) $(if $(LABELS),--labels $(LABELS),) $(ARGS)

# analysis: the images of DATA (any folder, e.g. /imagenet/val); several checkpoints: CKPT="a.pth name=b.pth"
ANALYSIS_DATA = $(if $(DATA),$(DATA),$(TINY)/imagenet/val)

analysis: venv $(TINY_DEPS) $(CKPT_DEPS) ## attention distance + singular values: make analysis CKPT="a.pth mae=b.pth" DATA=/imagenet/val
	$(PY) -m tools.analysis $(START_CKPT) --data $(ANALYSIS_DATA) --out $(if $(OUT),$(OUT),$(RUNS)/analysis) $(ARGS)

study: venv ## does dBOT learn? claims (a)-(c) on generated data -> RUNS/study-SCALE/study.{md,json,png} (docs/STUDY.md)
	$(PY) -m tools.study targets --scale $(SCALE) --out $(RUNS)/study-$(SCALE) $(if $(filter gpu,$(SCALE)),--device cuda --data-workers 16,) $(ARGS)

study-wider: venv ## claim (d): a wider dBOT teacher vs a same-size one, same study -> RUNS/study-SCALE/wider.{md,json}
	$(PY) -m tools.study wider --scale $(SCALE) --out $(RUNS)/study-$(SCALE) $(if $(filter gpu,$(SCALE)),--device cuda --data-workers 16,) $(ARGS)

test: venv ## lint + import layers + the fast test suite (includes one tiny end-to-end run)
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .
	$(VENV)/bin/lint-imports --no-cache
	$(PY) -m pytest -q -m "not slow" $(PYTEST_ARGS)

test-all: venv ## every test, the slow end-to-end ones too
	$(PY) -m pytest -q $(PYTEST_ARGS)

lint: venv ## ruff check + format check + import layers (core <- tasks <- tools, pyproject.toml)
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .
	$(VENV)/bin/lint-imports --no-cache

format: venv ## apply ruff formatting and safe fixes
	$(VENV)/bin/ruff format .
	$(VENV)/bin/ruff check --fix .

bench: venv ## throughput of MODEL (tiny, CPU by default) for each task in BENCH; ARGS go to each; see docs/BENCHMARKS.md
	$(if $(filter pretrain,$(BENCH)),$(PY) -m tools.bench pretrain -c $(MODEL) $(ARGS))
	$(if $(filter finetune,$(BENCH)),$(PY) -m tools.bench finetune -c $(MODEL) $(ARGS))
	$(if $(filter coco,$(BENCH)),$(PY) -m tools.bench coco -c $(MODEL) $(ARGS))
	$(if $(filter ade20k,$(BENCH)),$(PY) -m tools.bench ade20k -c $(MODEL) $(ARGS))

gpu-check: venv ## the prepared GPU check (~11 min on a GPU: GPU tests, speed targets, study; ARGS='--dry-run' anywhere): RUNS/gpu-check/gpu_check.{json,md}
	$(PY) -m tools.gpu_check --out $(RUNS)/gpu-check $(ARGS)

clean: ## remove generated data and runs (keeps .venv)
	rm -rf $(TINY) $(RUNS)
