# One command to set up and run the default job, one to set up and run the tests.
#   make demo   # creates/reuses .venv, installs everything, runs `vlbench model=albef task=vqa` (tiny, synthetic)
#   make test   # creates/reuses .venv, installs everything, runs ruff and the test suite
# GPU machines: pass a CUDA build of torch, e.g.
#   make demo TORCH_PACKAGES="torch torchvision --index-url https://download.pytorch.org/whl/cu124"
PYTHON ?= python3
VENV ?= .venv
TORCH_PACKAGES ?= torch==2.14.1 torchvision==0.29.1
BIN := $(VENV)/bin
STAMP := $(VENV)/.vlbench-installed
DEV_STAMP := $(VENV)/.vlbench-dev-installed
# --no-compile: byte-compiling torch's thousands of files costs ~25 s of set-up; Python compiles what it imports.
PIP_INSTALL := $(BIN)/python -m pip install --quiet --no-compile

.PHONY: setup demo test test-all lint clean

setup: $(STAMP)

# the demo needs only the package; the tests add the dev extras (pytest, ruff, wandb) on top
$(STAMP): setup.cfg pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(PIP_INSTALL) $(TORCH_PACKAGES)
	$(PIP_INSTALL) -e .
	touch $(STAMP)

$(DEV_STAMP): $(STAMP)
	$(PIP_INSTALL) -e '.[dev]'
	touch $(DEV_STAMP)

demo: $(STAMP)
	$(BIN)/vlbench model=albef task=vqa

lint: $(DEV_STAMP)
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

# pytest exits 5 when it collected no tests: make treats that as a failure, as it should.
test: lint
	$(BIN)/python -m pytest -q

test-all: lint
	$(BIN)/python -m pytest -q -m "slow or not slow"

clean:
	rm -rf $(VENV) build *.egg-info
