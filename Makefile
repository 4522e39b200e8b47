# labkit: the two commands a user needs are `make lab` and `make test`.
# Both set up .venv first (quick when nothing changed).

VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.labkit-installed
PORT   ?= 8888
# the student's workspace: copies of the walk-throughs and of the released assignments (git-ignored)
WORKSPACE ?= workspace
# Jupyter refuses to run as root unless told to (containers, CI)
ROOT_FLAG := $(if $(filter 0,$(shell id -u)),--allow-root)

.PHONY: setup lab fresh workspace release test test-fast dashboard dashboards hub hub-down grade system-deps bench lint clean

setup: $(STAMP)

$(STAMP): pyproject.toml scripts/setup_env.sh
	@bash scripts/setup_env.sh
	@touch $@

## make lab: JupyterLab on the student's workspace (made on first use, never overwritten),
## opening notebooks/00_start_here.ipynb; the repository itself is not served
lab: workspace
	$(BIN)/jupyter lab --port=$(PORT) --ServerApp.root_dir=$(abspath $(WORKSPACE)) $(ROOT_FLAG) \
	    --LabApp.default_url=/lab/tree/notebooks/00_start_here.ipynb

## make workspace: copy into $(WORKSPACE)/ what is new (walk-throughs, released assignments)
workspace: setup
	$(BIN)/python -m labkit.course workspace --dest $(WORKSPACE)

## make fresh NB=003_cnn_training_and_easgd.ipynb: a fresh copy of one notebook (yours is kept beside it)
fresh: setup
	@test -n "$(NB)" || { echo "make fresh: say which notebook, e.g. make fresh NB=00_start_here.ipynb"; exit 2; }
	$(BIN)/python -m labkit.course workspace --dest $(WORKSPACE) --fresh $(NB)

## make release: the instructor's release, nbgrader generate_assignment for every assignment
## (A="ps1_easgd ps2_consistency" for some); no activated environment needed
release: setup
	$(BIN)/python -m labkit.course release $(A)

## make test: the whole suite, including the browser and SLURM tests, TEST_JOBS at a time
## (most tests wait on processes starting up, so two at a time fill two cores; TEST_JOBS=0: one)
TEST_JOBS ?= 2
test: setup system-deps
	$(BIN)/python -m pytest -q --durations=60 $(if $(filter-out 0 1,$(TEST_JOBS)),-n $(TEST_JOBS) --dist loadgroup)

## make test-fast: skip the slow end-to-end tests
test-fast: setup
	$(BIN)/python -m pytest -q -m "not slow and not slurm and not browser"

## system packages for the browser and SLURM tests (Debian, as root; skipped otherwise)
system-deps:
	@bash scripts/system_deps.sh

## make dashboard: the training dashboard in Voila (no code shown)
dashboard: setup
	$(BIN)/voila --port=$(PORT) notebooks/dashboards/training.ipynb

## make dashboards: every dashboard in Voila, listed on index.ipynb (no code shown)
dashboards: setup
	@echo "open http://localhost:$(PORT)/voila/render/index.ipynb"
	$(BIN)/voila --port=$(PORT) --no-browser --VoilaExecutor.timeout=300 --preheat_kernel=True \
	    --pool_size=1 --VoilaKernelManager.fill_delay=30 notebooks/dashboards

## make hub: a one-node SLURM on this machine and the course's JupyterHub on it (as root;
## http://127.0.0.1:8000, every student's server a SLURM job); make hub-down stops both
hub: setup system-deps
	bash cluster/local-slurm.sh up && bash cluster/local-hub.sh up

hub-down:
	bash cluster/local-hub.sh down; bash cluster/local-slurm.sh down

## make grade: the instructor's nbgrader pipeline over assignments/submitted/
## (JOBS=4: four notebooks graded at once; default one per core)
grade: setup
	$(BIN)/python -m labkit.grading --course assignments $(if $(JOBS),--jobs $(JOBS))

bench: setup
	$(BIN)/labkit bench allreduce

lint: setup
	$(BIN)/ruff check labkit tests

clean:
	rm -rf $(VENV) runs .pytest_cache
	@echo "(the workspace, $(WORKSPACE)/, holds your own work: remove it yourself if you mean to)"
