# segstream: the two quick-start commands are `make demo` and `make test`.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip

.PHONY: demo test lint bench venv system remote-servers clean

$(VENV)/.stamp-runtime: pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PIP) install -q --upgrade pip
	$(PIP) install -q -e .
	touch $@

$(VENV)/.stamp-test: pyproject.toml $(VENV)/.stamp-runtime
	$(PIP) install -q -e '.[test,training]'
	touch $@

venv: $(VENV)/.stamp-runtime

system:
	bash scripts/install-system-deps.sh

## The inference servers of the remote-backend tests, each in its own venv: Triton (.venv-kserve, ~450 MB,
## ~3 min) and the Roboflow server (.venv-roboflow, ~7 GB, ~13 min: inference-cpu pulls a CUDA build of
## torch). A failed Roboflow install (disk, registry) only warns: its tests then skip, the rest run.
remote-servers:
	bash scripts/install-remote-servers.sh kserve
	bash scripts/install-remote-servers.sh roboflow || echo "WARNING: the Roboflow inference server" \
	  "(inference-cpu) could not be installed: the Roboflow server tests in tests/remote will skip" >&2

## The main job on the embedded default: bundled model + bundled clip, no external service.
demo: $(VENV)/.stamp-runtime
	$(VENV)/bin/segstream run pipelines/demo.yaml

## Everything the tests need (Python packages, mosquitto, GStreamer RTSP server, inference servers),
## then the tests.
test: $(VENV)/.stamp-test system remote-servers
	$(PY) -m pytest

## ruff, and mypy strict (with pydantic's plugin) on the package: settings in pyproject.toml
lint: $(VENV)/.stamp-test
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .
	$(VENV)/bin/mypy

## Benchmarks print their figures against a baseline measured in the same run (see benchmarks/README.md).
bench: $(VENV)/.stamp-test system
	$(PY) -m benchmarks.postprocess
	$(PY) -m benchmarks.model
	$(PY) -m benchmarks.throughput
	$(PY) -m benchmarks.overhead
	$(PY) -m benchmarks.latency
	$(PY) -m benchmarks.train_step

clean:
	rm -rf $(VENV) .venv-kserve .venv-roboflow out .pytest_cache .ruff_cache
