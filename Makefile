# Two set-up commands: `make demo` and `make test`. Both create .venv when it is missing.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
TORCH_VERSION := 2.13.0
# the torchvision made for that torch (the package index has only a CUDA build of it; tests/_torchvision_compat.py)
TORCHVISION_VERSION := 0.28.0

.PHONY: demo test install clean

$(BIN)/gpconv: pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet torch==$(TORCH_VERSION) torchvision==$(TORCHVISION_VERSION)
	$(BIN)/python -m pip install --quiet -e ".[dev,train,interop,deploy]" torch==$(TORCH_VERSION) \
		torchvision==$(TORCHVISION_VERSION)
	touch $(BIN)/gpconv

install: $(BIN)/gpconv

demo: install
	$(BIN)/gpconv demo --overwrite  # replaces the run files of the previous demo in runs/demo

test: install
	$(BIN)/python -m pytest -n auto --dist worksteal  # one worker per core (pytest-xdist)

clean:
	rm -rf $(VENV) build *.egg-info .pytest_cache
