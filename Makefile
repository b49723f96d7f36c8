# The two commands of the README's quick start; each sets the project up first when it needs to:
#
#   make pipeline   the demo pipeline (dvc repro), the model registered in MLflow
#   make test       the test suite (what CI runs)
#
# The set-up is the virtual environment .venv with every dependency pinned by constraints.txt (CPU torch 2.13.0),
# made when it is missing and made again when pyproject.toml or constraints.txt change. On a machine where pip finds
# no CPU wheel of torch locally, add the CPU index:  make pipeline PIP_ARGS="--extra-index-url https://download.pytorch.org/whl/cpu"

PYTHON ?= python3
VENV ?= .venv
PIP_ARGS ?=
BIN := $(VENV)/bin
READY := $(VENV)/.medseg-installed

.PHONY: pipeline test setup

# The environment's bin/ first on PATH, as in an activated venv: dvc's stages run `medseg`, and tests run the tools
# the environment installed (dcm2niix, mlflow's uvicorn), which would otherwise be skipped or not found.
ACTIVE := PATH="$(abspath $(BIN)):$$PATH"

pipeline: $(READY)
	$(ACTIVE) dvc repro

test: $(READY)
	$(ACTIVE) $(BIN)/python -m pytest -q -p no:cacheprovider

setup: $(READY)

$(READY): pyproject.toml constraints.txt
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -c constraints.txt -e ".[test]" $(PIP_ARGS)
	$(BIN)/python -c "import torch, monai, mlflow, prefect; print('torch', torch.__version__, 'monai', monai.__version__, 'mlflow', mlflow.__version__, 'prefect', prefect.__version__)"
	touch $@
