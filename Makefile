# labkit: the two commands a user needs are `make lab` and `make test`.
# Both set up .venv first (quick when nothing changed).

VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.labkit-installed
PORT   ?= 8888
# Jupyter refuses to run as root unless told to (containers, CI)
ROOT_FLAG := $(if $(filter 0,$(shell id -u)),--allow-root)

.PHONY: setup lab test test-fast dashboard grade system-deps bench lint clean

setup: $(STAMP)

$(STAMP): pyproject.toml scripts/setup_env.sh
	@bash scripts/setup_env.sh
	@touch $@

## make lab: open JupyterLab on the course, starting at notebooks/00_start_here.ipynb
lab: setup
	$(BIN)/jupyter lab --port=$(PORT) --ServerApp.root_dir=$(CURDIR) $(ROOT_FLAG) \
	    --LabApp.default_url=/lab/tree/notebooks/00_start_here.ipynb

## make test: the whole suite, including the browser and SLURM tests
test: setup system-deps
	$(BIN)/python -m pytest -q --durations=25

## make test-fast: skip the slow end-to-end tests
test-fast: setup
	$(BIN)/python -m pytest -q -m "not slow and not slurm and not browser"

## system packages for the browser and SLURM tests (Debian, as root; skipped otherwise)
system-deps:
	@bash scripts/system_deps.sh

## make dashboard: the training dashboard in Voila (no code shown)
dashboard: setup
	$(BIN)/voila --port=$(PORT) notebooks/dashboards/training.ipynb

## make grade: the instructor's nbgrader pipeline over assignments/submitted/
grade: setup
	$(BIN)/python -m labkit.grading --course assignments

bench: setup
	$(BIN)/labkit bench allreduce

lint: setup
	$(BIN)/ruff check labkit tests

clean:
	rm -rf $(VENV) runs .pytest_cache
