# Everything runs inside .venv, which the first target that needs it creates and fills;
# it is refreshed only when a requirements file changes.
SHELL := /bin/bash
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

DATA ?= data/tiny
RUN ?= runs/demo
WORKERS ?= 1

# The demo's pretraining: MoCo v2 shrunk to fit a laptop CPU in about 4 minutes (ResNet-18, 64-pixel crops,
# a 4096-key queue). A key momentum of 0.99 instead of 0.999: in a few hundred steps a 0.999 key encoder barely
# leaves its random initialisation (measured: loss stays at chance).
DEMO_PRETRAIN_FLAGS ?= -a resnet18 --image-size 64 --epochs 8 -b 64 --lr 0.03 --moco-k 4096 \
	--moco-m 0.99 --mlp --moco-t 0.2 --aug-plus --cos --bn-splits 8 --save-freq 4 --probe-freq 4 -p 20

.DEFAULT_GOAL := help
.PHONY: help venv data pretrain demo test test-fast clean

help: ## List the targets
	@grep -E '^[a-z-]+:.*## ' $(MAKEFILE_LIST) | sed -E 's/^([a-z-]+):.*## (.*)/  make \1\t\2/' | expand -t 20

$(STAMP): requirements.txt requirements-test.txt
	@$(PYTHON) -c 'import sys; sys.exit(sys.version_info < (3, 10) and "Python 3.10+ needed, found " + sys.version.split()[0])'
	$(PYTHON) -m venv $(VENV)
	$(VENV)/bin/pip install --quiet --upgrade pip
	$(VENV)/bin/pip install --quiet -r requirements.txt -r requirements-test.txt
	touch $@

venv: $(STAMP) ## Create or refresh the virtualenv (.venv)

data: $(STAMP) ## Generate the tiny dataset in data/tiny (about 20 s; skipped when already there)
	$(PY) -m moco.tinyset --out $(DATA) --workers 2

pretrain: data ## MoCo v2 pretraining on the tiny dataset, into runs/demo/moco (resumes if interrupted)
	$(PY) -m moco.train $(DATA)/train --output-dir $(RUN)/moco --probe-data $(DATA)/labeled \
		--workers $(WORKERS) $(DEMO_PRETRAIN_FLAGS)

demo: pretrain ## The main job end to end on the tiny dataset
	@echo "Backbone checkpoint: $(RUN)/moco/checkpoint_last.pth.tar (detection fine-tuning arrives with demo/)"

test: $(STAMP) ## Run the whole test suite
	$(PY) -m pytest tests

test-fast: $(STAMP) ## Run the tests without the slow tier (multi-process, end to end)
	$(PY) -m pytest -m "not slow" tests

clean: ## Remove generated data and runs (keeps .venv)
	rm -rf $(DATA) $(RUN)
