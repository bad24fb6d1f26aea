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

.PHONY: venv demo ui test lint bench clean

venv: $(STAMP)

$(STAMP): pyproject.toml constraints.txt
	test -x $(VENV)/bin/python || $(PY) -m venv $(VENV)
	$(VENV)/bin/pip install -q --upgrade pip
	# torch first, alone: the CPU wheel on disk; then everything else under the constraints.
	$(VENV)/bin/pip install -q torch==2.13.0
	$(VENV)/bin/pip install -q -c constraints.txt -e '.[dev]'
	$(VENV)/bin/pip check
	touch $(STAMP)

# After the run (also a failed one), the one command that reopens the UI on the demo's database.
demo: $(STAMP)
	$(VENV)/bin/conan run --config configs/demo.yaml; status=$$?; \
	echo "The Prefect UI on this demo's database ($(PREFECT_HOME)): make ui  (stop it: $(VENV)/bin/conan server stop)"; \
	exit $$status

# A Prefect server (API and UI on 127.0.0.1:4200) that outlives runs; `conan run` / `make demo` use it.
ui: $(STAMP)
	$(VENV)/bin/conan server start

test: $(STAMP)
	$(VENV)/bin/ruff check conan_core conan_cli tasks flows deployments tests bench
	$(VENV)/bin/python -m pytest -q -ra

lint: $(STAMP)
	$(VENV)/bin/ruff check conan_core conan_cli tasks flows deployments tests bench

clean:
	@if [ -x $(VENV)/bin/conan ]; then $(VENV)/bin/conan server stop; fi
	rm -rf $(WORK) .pytest_cache
