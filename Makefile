# The README's two commands are `make demo` and `make test`; both bootstrap first.
SHELL := /bin/bash
VENV := .venv
PY := $(VENV)/bin/python
export SPARK_KMS_CONF := $(CURDIR)/.state/spark-kms.conf
export PYSPARK_PYTHON := $(CURDIR)/$(VENV)/bin/python
export PYSPARK_DRIVER_PYTHON := $(CURDIR)/$(VENV)/bin/python
export SPARK_LOCAL_IP := 127.0.0.1

.PHONY: bootstrap demo test lint unit bench clean

bootstrap:
	@scripts/bootstrap.sh

demo: bootstrap
	@scripts/demo.sh

lint: bootstrap
	$(VENV)/bin/ruff check spark_kms tests scripts
	$(VENV)/bin/mypy spark_kms

test: lint
	$(PY) -m pytest -q -p no:cacheprovider tests

unit: bootstrap
	$(PY) -m pytest -q tests/unit

clean:
	rm -rf demo-output build *.egg-info
