# sgexp: every target installs what it needs into .venv on first use.
# Tested versions are pinned in constraints.txt (torch 2.14.1 is found on local disk).

PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.sgexp-installed

.PHONY: install train eval sweep ui test test-slow lint flops clean

# make train [EXP=mnist_dense] [resume=RUN_DIR_OR_CKPT] [ARGS="trainer.max_steps=500 ..."]
EXP    ?= mnist_tread
TRAIN_ARGS = experiment=$(EXP) $(if $(resume),resume=$(resume)) $(ARGS)

install: $(STAMP)

$(STAMP): pyproject.toml constraints.txt
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -c constraints.txt -e '.[dev]'
	touch $(STAMP)

train: $(STAMP)
	$(PY) -m sgexp.train $(TRAIN_ARGS)

# make eval [ckpt=RUN_DIR_OR_CKPT] [ARGS="guidance=[none,cfg,sg,cfg_sg] num_samples=2000"]
eval: $(STAMP)
	$(PY) -m sgexp.evaluate checkpoint=$(or $(ckpt),latest) $(ARGS)

# make sweep [STUDY=cfg_scale] [ARGS="--workers 2 --n-trials 40"]
STUDY ?= sparsity_pareto
sweep: $(STAMP)
	$(PY) -m sgexp.sweep --study $(STUDY) $(ARGS)

# MLflow UI on the default local store: runs/mlflow.db, artifacts in runs/mlartifacts.
# One worker and no job runner (~0.5 GB, 2 processes; the default starts ~15 processes, ~3 GB).
UI_PORT ?= 5000
ui: $(STAMP)
	mkdir -p runs
	MLFLOW_SERVER_ENABLE_JOB_EXECUTION=false $(PY) -m mlflow ui --host 127.0.0.1 --port $(UI_PORT) --workers 1 \
		--backend-store-uri sqlite:///$(CURDIR)/runs/mlflow.db --artifacts-destination $(CURDIR)/runs/mlartifacts

test: $(STAMP)
	$(PY) -m pytest -q

test-slow: $(STAMP)
	$(PY) -m pytest -q -m slow

lint: $(STAMP)
	$(PY) -m ruff check sgexp tests
	$(PY) -m ruff format --check sgexp tests

# The paper's SiT-XL/2 numbers: unguided, CFG and SG(0.5, 0.9) per step.
flops: $(STAMP)
	$(PY) -m sgexp.flops --model SiT-XL/2 --image-size 256 --channels 4 --route 2:24 --guidance none
	$(PY) -m sgexp.flops --model SiT-XL/2 --image-size 256 --channels 4 --route 2:24 --guidance cfg --scale 1.5
	$(PY) -m sgexp.flops --model SiT-XL/2 --image-size 256 --channels 4 --route 2:24 --guidance sg \
		--scale 1.5 --gamma-strong 0.5 --gamma-weak 0.9

clean:
	rm -rf $(VENV) .pytest_cache .ruff_cache build *.egg-info
