# The README's two commands are `make demo` and `make test`; both bootstrap first.
SHELL := /bin/bash
VENV := .venv
PY := $(VENV)/bin/python
export SPARK_KMS_CONF := $(CURDIR)/.state/spark-kms.conf
export PYSPARK_PYTHON := $(CURDIR)/$(VENV)/bin/python
export PYSPARK_DRIVER_PYTHON := $(CURDIR)/$(VENV)/bin/python
export SPARK_LOCAL_IP := 127.0.0.1

.PHONY: bootstrap demo test lint unit bench bench-profile clean

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

# The benchmark runs only when asked: it takes minutes and its timings depend
# on the machine, so neither `make test` nor CI runs it. bench/README.md
# explains it; `make bench BENCH_ARGS=--quick` checks the script.
bench: bootstrap
	$(PY) scripts/bench.py $(BENCH_ARGS)

# Where the time of a kms_parquet write and read goes.
bench-profile: bootstrap
	$(PY) scripts/bench_profile.py $(BENCH_ARGS)

clean:
	rm -rf demo-output build *.egg-info
