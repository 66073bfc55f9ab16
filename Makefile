# vaebench: `make run` and `make test` create .venv when it is missing, install, then run.
# CPU builds of the frameworks are pinned in requirements-ci.txt (see README for GPU set-up).
VENV   ?= .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed
ARGS   ?=
PYTEST ?= -q
# the suite runs in this many pytest-xdist workers, a test file per worker at a time (module
# fixtures stay shared): on 2 cores a CLI test's subprocess imports and compiles while the other
# worker computes. XDIST= runs it in one process.
XDIST  ?= -n 2 --dist loadfile

.DEFAULT_GOAL := help
.PHONY: help run test test-fast durations lint bench bench-compare report regress release-check sample-records gpu-reference clean

help: ## list the targets
	@grep -E '^[a-z-]+:.*## ' $(MAKEFILE_LIST) | awk -F':.*## ' '{printf "  make %-13s %s\n", $$1, $$2}'
	@echo "  ARGS='framework=torch measure=conformance' make run   passes Hydra overrides"

$(STAMP): pyproject.toml requirements-ci.txt
	test -x $(PY) || python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -r requirements-ci.txt -e '.[dev]'
	touch $(STAMP)

run: $(STAMP) ## run the default suite (all frameworks, digits); ARGS= passes overrides
	$(VENV)/bin/vaebench $(ARGS)

test: $(STAMP) ## run the whole test suite (CPU; what CI runs)
	$(PY) -m pytest $(XDIST) $(PYTEST)

test-fast: $(STAMP) ## the edit-test loop: every test not marked slow (measured under 10 s each)
	$(PY) -m pytest $(XDIST) -q -m "not slow"

durations: $(STAMP) ## run the whole suite and store each test's time in tests/durations.json (marks the slow ones)
	$(PY) -m pytest -q -p no:cacheprovider --store-durations

lint: $(STAMP) ## ruff and mypy
	$(VENV)/bin/ruff check harness impls tests hydra_plugins
	$(VENV)/bin/mypy harness impls hydra_plugins

# two back-to-back `make bench` runs on the 2-core reference machine moved medians by -45% to +47%
# (torch eager, tensorflow function): a slowdown must exceed that to be more than noise
BENCH_FAIL ?= median:60%

bench: $(STAMP) ## time one training step per framework x mode (pytest-benchmark); saves the run in .benchmarks/
	$(PY) -m pytest tests/bench --benchmark-enable --benchmark-autosave -q

bench-compare: $(STAMP) ## time again and fail when a median is slower than the last saved run by more than BENCH_FAIL
	$(PY) -m pytest tests/bench --benchmark-enable --benchmark-compare --benchmark-compare-fail=$(BENCH_FAIL) -q

report: $(STAMP) ## rebuild tables, plots, report.md and report.html of the newest run or sweep (or DIR=...)
	$(VENV)/bin/vaebench report $${DIR:-$$(ls -td results/runs/*/ | head -1)}

# the deterministic part of the default suite (no throughput: CI machines vary), compared with
# the committed reference records of this machine class; exit 1 on a numerical regression
REGRESS_REF ?= results/reference/cpu-2core
REGRESS_DIR ?= results/runs/regress
regress: $(STAMP) ## run the suite without throughput and compare it with results/reference/cpu-2core
	rm -rf $(REGRESS_DIR)
	$(VENV)/bin/vaebench 'measure.names=[conformance,gradflow,identity,convergence]' progress=false hydra.run.dir=$(REGRESS_DIR) $(ARGS) || true
	$(VENV)/bin/vaebench compare $(REGRESS_REF) $(REGRESS_DIR) -o $(REGRESS_DIR)/compare.md

# small real runs of every measure, committed under tests/records/: the records the registry tests
# (tests/test_nonfinite.py) plant NaN and inf in; regenerate them when a measure's record changes
SAMPLE = $(VENV)/bin/vaebench progress=false
sample-records: $(STAMP) ## regenerate the small sample records under tests/records/ (about 5 minutes)
	rm -rf tests/records/suite tests/records/linear tests/records/inference
	$(SAMPLE) hydra.run.dir=tests/records/suite measure.conformance.steps=4 measure.gradflow.train_steps=10 \
	  measure.identity.mc_samples=200 'measure.identity.iwae_ks=[1,10,100]' 'measure.throughput.batch_sizes=[64]' \
	  measure.throughput.repeats=3 measure.throughput.steps=5 measure.throughput.matmul_n=128 measure.throughput.plain=true \
	  measure.convergence.epochs=2 'measure.convergence.seeds=[0,1]' measure.convergence.iwae_k=20
	$(SAMPLE) hydra.run.dir=tests/records/linear model=linear data=synthetic 'measure.names=[conformance,convergence]' \
	  data.n_train=256 data.n_test=64 measure.conformance.steps=10 measure.convergence.shared_noise=true \
	  measure.convergence.epochs=3 'measure.convergence.seeds=[0,1]' measure.convergence.iwae_k=20 \
	  measure.convergence.optimum_tol=100 measure.convergence.posterior_gap_tol=100
	$(SAMPLE) hydra.run.dir=tests/records/inference 'measure.names=[gaps,snr]' measure.gaps.train_steps=50 \
	  measure.gaps.epochs=1 measure.gaps.n_test=8 measure.gaps.iwae_k=50 measure.gaps.elbo_samples=50 \
	  measure.gaps.local_samples=10 'measure.snr.ks=[1,3,10]' measure.snr.trained_epochs=1 'measure.snr.trained_ks=[1,3]' \
	  measure.snr.trained_draws=100
	rm -rf tests/records/*/jobs tests/records/*/*.png tests/records/*/*.html tests/records/*/*.tex tests/records/*/.vaebench.lock

release-check: $(STAMP) ## did a framework upgrade change anything? JAX's previous release in envs/jax0101 vs the pinned one, plus two planted environments that must be caught
	$(PY) scripts/release-check $(ARGS)

# on a CUDA machine, with the Python that has torch and JAX (VAEBENCH_PYTHON=..., or ARGS=--python ...):
# nothing is installed, so no $(STAMP); ARGS=--dry-run prints every command and the output folder
gpu-reference: ## throughput on the GPU (torch, JAX; TensorFlow where it sees it) into results/reference/<gpu>/, in 8 minutes
	scripts/gpu-reference $(ARGS)

clean: ## remove run outputs (keeps .venv and results/reference)
	rm -rf results/runs outputs multirun .pytest_cache
