# The two set-up commands of the README: `make demo` (the main job end to end) and `make test`.
# Each creates or refreshes .venv itself; re-running is cheap once the stamp is current.
PY ?= python3
VENV := .venv
STAMP := $(VENV)/.installed
WORK ?= $(CURDIR)/work
export CONAN_WORK_DIR ?= $(WORK)
export HF_HUB_OFFLINE := 1
export TRANSFORMERS_OFFLINE := 1
export HF_DATASETS_OFFLINE := 1
export HF_HOME := $(WORK)/hf_home
export PREFECT_HOME := $(WORK)/prefect_home
export MPLCONFIGDIR := $(WORK)/mpl
export TOKENIZERS_PARALLELISM := false

.PHONY: venv demo test lint bench clean

venv: $(STAMP)

$(STAMP): pyproject.toml constraints.txt
	test -x $(VENV)/bin/python || $(PY) -m venv $(VENV)
	$(VENV)/bin/pip install -q --upgrade pip
	# torch first, alone: the CPU wheel on disk; then everything else under the constraints.
	$(VENV)/bin/pip install -q torch==2.13.0
	$(VENV)/bin/pip install -q -c constraints.txt -e '.[dev]'
	$(VENV)/bin/pip check
	touch $(STAMP)

demo: $(STAMP)
	$(VENV)/bin/conan run --config configs/demo.yaml

test: $(STAMP)
	$(VENV)/bin/ruff check conan_core conan_cli tasks flows deployments tests bench
	$(VENV)/bin/python -m pytest -q -ra

lint: $(STAMP)
	$(VENV)/bin/ruff check conan_core conan_cli tasks flows deployments tests bench

clean:
	rm -rf $(WORK) .pytest_cache
