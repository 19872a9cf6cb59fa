# Everything runs inside .venv, which the first target that needs it creates and fills;
# it is refreshed only when a requirements file changes.
SHELL := /bin/bash
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python

# The torch build, chosen in one place: TORCH_BUILD and the GPU architectures it must carry (CUDA_ARCHS) come from
# the site config (slurm/site.conf, else the example; the environment or `make TORCH_BUILD=...` wins). Each build is
# PyPI's default wheel of that torch release, read from the wheel itself (see "GPUs" in the README):
#   cu128  torch 2.10 / CUDA 12.8: kernels sm_70 sm_75 sm_80 sm_86 sm_90 sm_100 sm_120 (V100 .. Blackwell); R525+
#          drivers through CUDA's minor-version compatibility, R570+ natively.
#   cu132  torch 2.15 / CUDA 13.2: sm_75 .. sm_120, no V100; R580+ drivers.
SITE_CONF ?= $(firstword $(wildcard slurm/site.conf) slurm/site.conf.example)
site_value = $(shell REPO="$(CURDIR)" bash -c 'source "$(SITE_CONF)" >/dev/null 2>&1; echo "$$$(1)"')
# Read once (:=): an exported recursive variable would source the site config again for every recipe line.
ifndef TORCH_BUILD
TORCH_BUILD := $(or $(call site_value,TORCH_BUILD),cu128)
endif
ifndef CUDA_ARCHS
CUDA_ARCHS := $(call site_value,CUDA_ARCHS)
endif
export CUDA_ARCHS
TORCH_PINS_cu128 := torch==2.10.0 torchvision==0.25.0
TORCH_PINS_cu132 := torch==2.15.0 torchvision==0.29.2
TORCH_PINS := $(or $(TORCH_PINS_$(TORCH_BUILD)),$(error TORCH_BUILD=$(TORCH_BUILD): one of cu128, cu132))
STAMP := $(VENV)/.installed-$(TORCH_BUILD)

DATA ?= data/tiny
RUN ?= runs/demo
WORKERS ?= 1

# The demo's pretraining: MoCo v2 shrunk to fit a laptop CPU (ResNet-18, 64-pixel crops, PRETRAIN_EPOCHS epochs of
# 3,000 images at batch 64: 1,104 steps at 24). The paper's lr per image (0.03 at 256, so 0.0075 at 64); a queue of
# 8 batches (512 keys, as the facebookresearch/moco CIFAR demo's 4096 at 512) and its weight decay 5e-4; key momentum
# 0.99, since a 0.999 key encoder barely leaves its random start in a few hundred steps. With the demo's earlier lr
# 0.03 and 4,096 keys, InfoNCE found a shortcut (the fresh key told apart from stale queued ones) and the kNN probe
# fell below a random backbone. 24 epochs, not 8: the loss starts to fall only after about 400 steps, and only the
# longer run gives the detector something (see "Does pretraining help?" in the README).
PRETRAIN_EPOCHS ?= 24
DEMO_PRETRAIN_FLAGS ?= -a resnet18 --image-size 64 --epochs $(PRETRAIN_EPOCHS) -b 64 --lr 0.0075 --moco-k 512 \
	--wd 5e-4 --moco-m 0.99 --mlp --moco-t 0.2 --aug-plus --cos --bn-splits 8 --save-freq 8 --probe-freq 4 -p 20

# The demo's fine-tuning: the recipe's stages r1 -> r2 -> r3 at batch 4 under the default (moco) transfer protocol,
# with its lrs 0.01 / 0.001 / 0.0001, shrunk to about 5 minutes: a ResNet-18 trained at short sides 160-224 and
# evaluated at 224, a 128-channel FPN, 64 RoIs an image, epochs 3 / 1 / 1.
DEMO_FINETUNE_FLAGS ?= --min-size 224 --max-size 320 --rois-per-image 64 --fpn-channels 128 -b 4 -p 50
FPN_CHECKPOINT := $(RUN)/fpn/r3/checkpoint_last.pth.tar

# The Slurm jobs `make pipeline` chains, and sbatch options for all of them (e.g. SBATCH_ARGS=--time=1:00:00);
# knobs and the site config apply as in slurm/submit.sh.
PIPELINE ?= moco_v2 demo_mocov2_fpn_r1 demo_mocov2_fpn_r2 demo_mocov2_fpn_r3 eval_mocov2_fpn
SBATCH_ARGS ?=

.DEFAULT_GOAL := help
.PHONY: help venv doctor data check-data pretrain finetune compare evaluate plots figures demo bench test test-fast lint mutate
.PHONY: gpu-check clean slurm-up slurm-down pipeline

help: ## List the targets
	@grep -E '^[a-z-]+:.*## ' $(MAKEFILE_LIST) | sed -E 's/^([a-z-]+):.*## (.*)/  make \1\t\2/' | expand -t 20

$(STAMP): requirements.txt requirements-test.txt
	@$(PYTHON) -c 'import sys; sys.exit(sys.version_info < (3, 10) and "Python 3.10+ needed, found " + sys.version.split()[0])'
	$(PYTHON) -m venv $(VENV)
	$(VENV)/bin/pip install --quiet --upgrade pip
	$(VENV)/bin/pip install --quiet -r requirements.txt -r requirements-test.txt $(TORCH_PINS)
	$(PY) -m moco.runtime.doctor --build-only  # the build must carry CUDA_ARCHS: fail here, not on the cluster
	rm -f $(VENV)/.installed-*
	touch $@

venv: $(STAMP) ## Create or refresh the virtualenv (.venv) with the torch build TORCH_BUILD (cu128: V100 and newer)

doctor: $(STAMP) ## Preflight: torch build, its GPU architectures, driver, GPUs, launch; fails when GPUs are unusable
	$(PY) -m moco.runtime.doctor

data: $(STAMP) ## Generate the tiny dataset in data/tiny (about 20 s; skipped when already there)
	$(PY) -m moco.course.tinyset --out $(DATA) --workers 2

check-data: data ## Check every file of the tiny dataset (full decode, labels, classes); exit 1 on errors
	$(PY) -m demo.check $(DATA)/train $(DATA)/labeled

pretrain: data ## MoCo v2 pretraining on the tiny dataset, into runs/demo/moco (resumes if interrupted)
	$(PY) -m moco.train $(DATA)/train --output-dir $(RUN)/moco --probe-data $(DATA)/labeled \
		--workers $(WORKERS) $(DEMO_PRETRAIN_FLAGS)

finetune: pretrain ## Faster R-CNN + FPN stages r1, r2, r3 on the tiny dataset, into runs/demo/fpn (resumes)
	$(PY) -m demo.train --stage r1 --bp $(RUN)/moco/checkpoint_last.pth.tar --epochs 3 \
		--dataset-root $(DATA)/labeled --output-dir $(RUN)/fpn --workers $(WORKERS) $(DEMO_FINETUNE_FLAGS)
	$(PY) -m demo.train --stage r2 --epochs 4 \
		--dataset-root $(DATA)/labeled --output-dir $(RUN)/fpn --workers $(WORKERS) $(DEMO_FINETUNE_FLAGS)
	$(PY) -m demo.train --stage r3 --epochs 5 \
		--dataset-root $(DATA)/labeled --output-dir $(RUN)/fpn --workers $(WORKERS) $(DEMO_FINETUNE_FLAGS)

# `make compare`: the demo's fine-tuning from the demo's MoCo backbone and from random backbones, seeds 0 1 2.
COMPARE ?= runs/compare
COMPARE_SEEDS ?= 0 1 2

compare: pretrain ## MoCo vs random init: the demo's fine-tuning, 3 seeds each, mean ± std of AP, kNN (~1 h)
	$(PY) -m demo.compare --bp $(RUN)/moco/checkpoint_last.pth.tar --dataset-root $(DATA)/labeled \
		--output-dir $(COMPARE) --seeds $(COMPARE_SEEDS) --epochs 3 4 5 -- --workers $(WORKERS) $(DEMO_FINETUNE_FLAGS)

evaluate: $(STAMP) ## COCO AP/AR of the fine-tuned demo detector on the validation split
	$(PY) -m demo.evaluate --checkpoint-path $(FPN_CHECKPOINT) --dataset-root $(DATA)/labeled \
		--dataset-split validation --workers $(WORKERS)

plots: $(STAMP) ## PNG figures of a run (RUN=runs/demo) from its metrics.jsonl files, into RUN/plots
	$(PY) -m demo.plots $(RUN)

# The README's figures, from the demo's run: its curves and one validation image, ground truth beside detections.
FIGURES := demo/figures

figures: plots ## The README's figures from the demo's run (after make demo), into demo/figures
	$(PY) -m demo.evaluate --checkpoint-path $(FPN_CHECKPOINT) --dataset-root $(DATA)/labeled \
		--dataset-split validation --workers $(WORKERS) --output-dir $(RUN)/figures \
		--save-pictures 1 --score-threshold 0.3
	mkdir -p $(FIGURES)
	cp $(RUN)/plots/pretraining.png $(RUN)/plots/finetuning.png $(FIGURES)/
	cp $(RUN)/figures/pictures/*.png $(FIGURES)/detections.png

demo: finetune evaluate plots ## The main job end to end on the tiny dataset: pretrain, r1, r2, r3, evaluate, plots

bench: data ## Speed and memory of our defaults vs the original's way, as ratios in one run (~15 min; runs/bench)
	$(PY) -m demo.bench --output-dir runs/bench --data $(DATA)/train

# `make gpu-check`: what runs on a GPU, checked by one script sized for under 8 minutes on one GPU (not yet timed on
# one); figures in runs/gpu-check/gpu_check.json. DEVICE=cpu rehearses the same script on the CPU.
DEVICE ?= cuda

gpu-check: data ## Check a GPU: preflight, MoCo step vs CPU, host syncs, r1, evaluation, bench, 2 ranks (DEVICE=cpu)
	$(PY) -m demo.gpu_check --device $(DEVICE) --data $(DATA) --output-dir runs/gpu-check

test: $(STAMP) ## Run the whole test suite (PYTEST_ARGS="-m 'not slurm'" and the like pass through)
	$(PY) -m pytest tests $(PYTEST_ARGS)

lint: $(STAMP) ## Lint the Python code (ruff, settings in pyproject.toml: 120 columns, import order, bugbear)
	$(VENV)/bin/ruff check moco demo tests slurm

test-fast: $(STAMP) ## Run the tests without the slow tier (multi-process, end to end, real Slurm)
	$(PY) -m pytest -m "not slow" tests

# Mutation testing (`make mutate`): mutmut mutates the core modules in a scratch copy of the repository and runs the
# fast tests that reach each mutated function. Functions under a decorator (@torch.no_grad) are not mutated by
# mutmut. MUTANTS narrows the run, e.g. MUTANTS="'demo.sampler.*'"; results stay in MUTATE_DIR (mutmut show NAME).
MUTMUT_VERSION := 3.8.1
MUTATE_DIR ?= runs/mutate
MUTATE_JOBS ?= 2
MUTANTS ?= 'moco.builder.*' 'moco.batchnorm.*' 'moco.augment.*' 'moco.probe.*' 'demo.coco_eval.*' \
	'demo.datasets.*' 'demo.sampler.*' 'demo.recipe.*'

mutate: $(STAMP) ## Mutation testing of the core modules against the fast tests (mutmut; about 30 minutes)
	$(PY) -c 'import mutmut' 2>/dev/null || $(VENV)/bin/pip install --quiet mutmut==$(MUTMUT_VERSION)
	rm -rf $(MUTATE_DIR) && mkdir -p $(MUTATE_DIR)
	cp -r moco demo tests $(MUTATE_DIR)/
	cp tests/mutation/setup.cfg $(MUTATE_DIR)/setup.cfg
	cd $(MUTATE_DIR) && nice -n 10 $(abspath $(VENV))/bin/mutmut run --max-children $(MUTATE_JOBS) $(MUTANTS) \
		>mutmut.log 2>&1 || (tail -c 3000 mutmut.log; exit 1)
	cd $(MUTATE_DIR) && $(abspath $(PY)) $(CURDIR)/tests/mutation/scores.py $(MUTANTS) | tee scores.txt

clean: ## Remove generated data and runs (keeps .venv)
	rm -rf $(DATA) $(RUN)

slurm-up: ## Start a private Slurm cluster on this machine in .slurm (2 nodes, fake GPUs; installs Slurm if missing)
	$(PYTHON) slurm/local_cluster.py up

slurm-down: ## Cancel its jobs and stop the private Slurm cluster
	$(PYTHON) slurm/local_cluster.py down

pipeline: ## Submit pretrain -> r1 -> r2 -> r3 -> eval to Slurm as an afterok chain; prints the job ids
	slurm/submit.sh $(PIPELINE) -- $(SBATCH_ARGS)
