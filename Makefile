# Two commands on a fresh machine: `make demo` (the main job) and `make test` (the tests).
# Both create the virtual environment first; both are safe to re-run.
VENV ?= .venv
PY := $(VENV)/bin/python
CONFIG ?= configs/synthetic-cpu.yaml
RUN_DIR ?= runs/demo
PYTEST_ARGS ?=

.PHONY: venv demo test test-all lint bench gpu-smoke clean

venv:
	@bash scripts/setup_venv.sh

# Synthetic outfits -> CIGM -> GECo -> test metrics, on this machine (resumes if interrupted).
demo: venv
	$(PY) -m geco.cli pipeline --config $(CONFIG) --run-dir $(RUN_DIR)

# Lint, then every test that needs no GPU (GPU tests skip themselves without CUDA).
test: venv
	$(VENV)/bin/ruff check geco tests bench scripts
	$(VENV)/bin/pytest $(PYTEST_ARGS)

lint: venv
	$(VENV)/bin/ruff check geco tests bench scripts

bench: venv
	$(PY) bench/bench_mrr.py

gpu-smoke: venv
	$(PY) scripts/gpu_smoke.py

clean:
	rm -rf runs data/synthetic
