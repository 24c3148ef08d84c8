# sgexp: every target installs what it needs into .venv on first use.
# Tested versions are pinned in constraints.txt (torch 2.14.1 is found on local disk).

PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.sgexp-installed

.PHONY: install train train-slurm slurm-up slurm-down test-slurm eval sweep dashboard reproduce ui test test-slow lint flops clean prepare-latents

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

# make train-slurm EXP=imagenet256_sit_xl2_tread NODES=4 GPUS=8 [ARGS="launcher.partition=gpu launcher.account=me"]
# Submits an sbatch job (configs/launcher/slurm.yaml; script and logs in <run_dir>/slurm/); GPUS=0: CPU tasks.
NODES ?= 1
GPUS  ?= 8
train-slurm: $(STAMP)
	$(PY) -m sgexp.train $(TRAIN_ARGS) launcher=slurm launcher.nodes=$(NODES) launcher.gpus_per_node=$(GPUS)

# Real SLURM clusters on this machine (root; Debian packages): a single node (scripts/slurm/local_slurm.sh,
# the default /etc/slurm config) and two nodes (scripts/slurm/two_node_slurm.sh, its own config: run
# `source /tmp/sgexp-2node/env.sh` to submit to it, e.g. make train-slurm NODES=2 GPUS=0).
slurm-up:
	scripts/slurm/local_slurm.sh start
	scripts/slurm/two_node_slurm.sh start
slurm-down:
	scripts/slurm/two_node_slurm.sh stop
	scripts/slurm/local_slurm.sh stop

# The `slurm` tests: starts both clusters, runs pytest -m slurm with SGEXP_REQUIRE_SLURM=1, stops the clusters
# (also when a test fails). make test-slurm [ARGS="-k two_node"]
test-slurm: $(STAMP)
	PY=$(PY) scripts/slurm/test_slurm.sh $(ARGS)

# SD-VAE latents of a prepared image dataset (resumable: run it again after an interruption):
# make prepare-latents [IMAGES=data/shards/imagenet256] [VAE=models/sd-vae-ft-ema] [ARGS="--workers 8 --batch-size 128"]
# One process per visible GPU by default (--workers N); many nodes: torchrun ... -m sgexp.data prepare latents ...
IMAGES ?= data/shards/imagenet256
VAE    ?= models/sd-vae-ft-ema
prepare-latents: $(STAMP)
	$(PY) -m sgexp.data prepare latents --images $(IMAGES) --vae $(VAE) --flip $(ARGS)

# make eval [ckpt=RUN_DIR_OR_CKPT] [ARGS="guidance=[none,cfg,sg,cfg_sg] num_samples=2000"]
eval: $(STAMP)
	$(PY) -m sgexp.evaluate checkpoint=$(or $(ckpt),latest) $(ARGS)

# make sweep [STUDY=cfg_scale] [ARGS="--workers 2 --n-trials 40"]
STUDY ?= sparsity_pareto
sweep: $(STAMP)
	$(PY) -m sgexp.sweeps --study $(STUDY) $(ARGS)

# make reproduce [PRESET=smoke] [ARGS=--report-only]: docs/results.md and its PNGs (reproduce/, outside the package).
# Resumable: re-run the same command after an interruption; finished stages are skipped.
PRESET ?= full
reproduce: $(STAMP)
	$(PY) -m reproduce --preset $(PRESET) $(ARGS)

# MLflow UI on the default local store: runs/mlflow.db, artifacts in runs/mlartifacts.
# One worker and no job runner (~0.5 GB, 2 processes; the default starts ~15 processes, ~3 GB).
UI_PORT ?= 5000
# make dashboard [STUDY=sparsity_pareto] [STORAGE=runs/optuna/<study>.log | sqlite:///...] [DASH_PORT=8080]
DASH_PORT ?= 8080
dashboard: $(STAMP)
	$(PY) -m sgexp.sweeps dashboard --study $(STUDY) $(if $(STORAGE),--storage $(STORAGE)) --port $(DASH_PORT)

ui: $(STAMP)
	mkdir -p runs
	@echo "runs view: http://127.0.0.1:$(UI_PORT)/#/experiments?workflowType=machine_learning (or click 'Model training' at the top left once)"
	MLFLOW_SERVER_ENABLE_JOB_EXECUTION=false $(PY) -m mlflow ui --host 127.0.0.1 --port $(UI_PORT) --workers 1 \
		--backend-store-uri sqlite:///$(CURDIR)/runs/mlflow.db --artifacts-destination $(CURDIR)/runs/mlartifacts

test: $(STAMP)
	$(PY) -m pytest -q

test-slow: $(STAMP)
	$(PY) -m pytest -q -m slow

lint: $(STAMP)
	$(PY) -m ruff check sgexp tests benchmarks reproduce
	$(PY) -m ruff format --check sgexp tests benchmarks reproduce

# The paper's SiT-XL/2 numbers: unguided, CFG and SG(0.5, 0.9) per step (every pass counted in full, as the
# paper does), then SG as sgexp runs it (the dense prefix once).
flops: $(STAMP)
	$(PY) -m sgexp.flops --model SiT-XL/2 --image-size 256 --channels 4 --route 2:24 --guidance none
	$(PY) -m sgexp.flops --model SiT-XL/2 --image-size 256 --channels 4 --route 2:24 --guidance cfg --scale 1.5
	$(PY) -m sgexp.flops --model SiT-XL/2 --image-size 256 --channels 4 --route 2:24 --guidance sg \
		--scale 1.5 --gamma-strong 0.5 --gamma-weak 0.9 --no-share-prefix
	$(PY) -m sgexp.flops --model SiT-XL/2 --image-size 256 --channels 4 --route 2:24 --guidance sg \
		--scale 1.5 --gamma-strong 0.5 --gamma-weak 0.9

# CPU benchmarks (~6 min on 2 cores): rich tables, JSON in benchmarks/results/ (git-ignored).
# make bench [ARGS="--quick" or "--threads 0"]; on a GPU machine: bash benchmarks/gpu.sh
.PHONY: bench
bench: $(STAMP)
	$(PY) -m benchmarks.run_all $(ARGS)

clean:
	rm -rf $(VENV) .pytest_cache .ruff_cache build *.egg-info
