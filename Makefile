# Two commands on a fresh machine: `make demo` (the main job) and `make test` (the tests).
# Both create the virtual environment first; both are safe to re-run.
VENV ?= .venv
PY := $(VENV)/bin/python
CONFIG ?= configs/synthetic-cpu.yaml
RUN_DIR ?= runs/demo
PYTEST_ARGS ?=

.PHONY: venv demo demo-local stop test lint bench gpu-smoke clean

venv:
	@bash scripts/setup_venv.sh

SHARDS ?= s3://geco/synthetic

# Synthetic outfits -> WebDataset shards in the local S3 server (SeaweedFS on 127.0.0.1) ->
# CIGM -> GECo (training pairs streamed from S3) -> test metrics. Resumes if interrupted.
demo: venv
	bash infra/local/s3.sh start
	bash infra/local/s3.sh bucket $(word 2,$(subst /, ,$(SHARDS)))
	eval "$$(bash infra/local/s3.sh env)" && \
	  $(PY) -m geco.cli data shard --out $(SHARDS) --config $(CONFIG) --image-size 64 && \
	  $(PY) -m geco.cli pipeline --config $(CONFIG) --run-dir $(RUN_DIR) data.shards=$(SHARDS)

# The same pipeline reading the dataset folder directly (no S3 server).
demo-local: venv
	$(PY) -m geco.cli pipeline --config $(CONFIG) --run-dir runs/demo-local

stop:
	bash infra/local/s3.sh stop

# Lint, then every test that needs no GPU (GPU tests skip themselves without CUDA).
test: venv
	$(VENV)/bin/ruff check geco tests bench scripts
	$(VENV)/bin/pytest $(PYTEST_ARGS)

lint: venv
	$(VENV)/bin/ruff check geco tests bench scripts

bench: venv
	$(PY) bench/bench_mrr.py
	$(PY) bench/bench_reader.py

gpu-smoke: venv
	$(PY) scripts/gpu_smoke.py

clean: stop
	rm -rf runs data/synthetic
