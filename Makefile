# Two commands on a fresh machine: `make demo` (the main job) and `make test` (the tests).
# Both create the virtual environment first; both are safe to re-run.
VENV ?= .venv
PY := $(VENV)/bin/python
CONFIG ?= configs/synthetic-cpu.yaml
RUN_DIR ?= runs/demo
PYTEST_ARGS ?=
# pytest-xdist processes for `make test` (each module's tests stay in one process, the longest
# modules start first: tests/conftest.py); 0 runs everything in one process.
TEST_WORKERS ?= 2
XDIST := -n $(TEST_WORKERS) --dist loadgroup --no-loadscope-reorder

.PHONY: venv demo serve demo-cluster sweep compare compare-cluster demo-torch demo-local stop test test-fast lint bench gpu-smoke clean

venv:
	@bash scripts/setup_venv.sh

SHARDS ?= s3://geco/synthetic
NAME ?= demo
RAY_STORAGE ?= s3://geco/ray
# Batch sizes are per DDP worker: 2 workers x 16 = the 32-pair batch of $(CONFIG).
RAY_ARGS ?= cluster.num_workers=2 cigm.batch_size=16 geco.batch_size=16

# The main job: synthetic outfits -> WebDataset shards in the local S3 server (SeaweedFS on
# 127.0.0.1) -> `ray job submit` to a local Ray head (127.0.0.1) -> CIGM then GECo with Ray
# Train DDP on 2 CPU workers, data streamed from S3, every run tracked in the local MLflow
# server (sqlite, artifacts in S3) -> test metrics next to the checkpoints in
# s3://geco/ray/$(NAME)-geco/ -> the retriever registered and put through the promotion gate.
# Re-running resumes the runs of the same NAME.
demo: venv
	bash infra/local/s3.sh start
	bash infra/local/s3.sh bucket $(word 2,$(subst /, ,$(SHARDS)))
	eval "$$(bash infra/local/s3.sh profile-env)" && \
	  $(PY) -m geco.cli data shard --out $(SHARDS) --config $(CONFIG) --image-size 64
	bash infra/local/mlflow.sh start
	bash infra/local/ray.sh start $(RAY_START_ARGS)
	bash infra/local/ray.sh nodes
	eval "$$(bash infra/local/ray.sh env)" && \
	  $(VENV)/bin/ray job submit --runtime-env "$$(bash infra/local/ray.sh runtime-env)" -- \
	  python ray_jobs/train_geco.py --config $(CONFIG) --name $(NAME) \
	  data.shards=$(SHARDS) cluster.storage_path=$(RAY_STORAGE) $(RAY_ARGS)

# The demo's job on a local multi-node Ray cluster shaped like a KubeRay one: a head with 0 CPUs
# (drivers and Ray's services only) and RAY_NODES worker nodes of RAY_NODE_CPUS CPUs, each its
# own raylet, object store and temp dir on 127.0.0.1 (infra/local/ray.sh --workers). The DDP
# ranks and the evaluation task run on worker nodes; data come from the S3 shards and
# checkpoints go to S3 only. `make stop` stops every node. Knobs as `make demo` (NAME defaults
# to demo-cluster); a single-node head from `make demo` must be stopped first.
RAY_NODES ?= 3
RAY_NODE_CPUS ?= 1
demo-cluster: NAME = demo-cluster
demo-cluster: RAY_START_ARGS = --workers $(RAY_NODES) --worker-cpus $(RAY_NODE_CPUS)
demo-cluster: demo

# $(call ray_job,SCRIPT,EXTRA ARGS): the local stack (idempotent starts), then `ray job submit`
# of SCRIPT on the demo's data and storage.
define ray_job
	bash infra/local/s3.sh start
	bash infra/local/mlflow.sh start
	bash infra/local/ray.sh start
	eval "$$(bash infra/local/ray.sh env)" && \
	  $(VENV)/bin/ray job submit --runtime-env "$$(bash infra/local/ray.sh runtime-env)" -- \
	  python $(1) --config $(CONFIG) --name $(NAME) \
	  data.shards=$(SHARDS) cluster.storage_path=$(RAY_STORAGE) $(RAY_ARGS) $(2)
endef

# A Ray Tune sweep of alpha, beta, tau, gamma (ASHA) on the demo's data, reusing the demo's
# CIGM (the Ray Train run $(NAME)-cigm is restored, not retrained); the best trial is tested,
# registered and put through the gate. Run after `make demo`.
# Trials are single-process: geco.batch_size=32 restores the global batch of $(CONFIG).
SWEEP_ARGS ?= tune.num_samples=4 tune.max_concurrent=2 geco.epochs=3 geco.lr_step=2 geco.batch_size=32
sweep: venv
	$(call ray_job,ray_jobs/tune_geco.py,$(SWEEP_ARGS))

# The paper's Tables 2 and 3 on the synthetic default, in one process on this CPU: GECo
# (trained into runs/compare unless it is there), MGCM, Pix2PixCM, BPR-DAE, Popularity and
# Random -> runs/compare/compare/compare.{md,csv,json}. Re-running loads what was trained.
COMPARE_DIR ?= runs/compare
compare: venv
	$(PY) -m geco.cli compare --config $(CONFIG) --run-dir $(COMPARE_DIR)

# The same comparison as a Ray job on the demo's data and cluster: GECo is the demo's Ray
# Train run (restored), the baselines run as Ray tasks; tables in s3://geco/ray/$(NAME)-compare/
# and in MLflow. Run after `make demo`.
compare-cluster: venv
	$(call ray_job,ray_jobs/compare.py,)

# The same two stages in one process, without Ray (shards from S3 when SHARDS is set up).
demo-torch: venv
	bash infra/local/s3.sh start
	bash infra/local/s3.sh bucket $(word 2,$(subst /, ,$(SHARDS)))
	eval "$$(bash infra/local/s3.sh profile-env)" && \
	  $(PY) -m geco.cli data shard --out $(SHARDS) --config $(CONFIG) --image-size 64 && \
	  $(PY) -m geco.cli pipeline --config $(CONFIG) --run-dir $(RUN_DIR) data.shards=$(SHARDS)

# The same pipeline reading the dataset folder directly (no S3 server).
demo-local: venv
	$(PY) -m geco.cli pipeline --config $(CONFIG) --run-dir runs/demo-local

# After `make demo`: the champion served over REST on 127.0.0.1 by MLflow's scoring server
# (MODEL=models:/geco-retriever/N for another version, SERVE_PORT for another port); prints the
# URL once it answers /ping and a curl that POSTs a test top. `make stop` stops it.
MODEL ?= models:/geco-retriever@champion
SERVE_PORT ?= 5080
serve: venv
	bash infra/local/s3.sh start
	bash infra/local/mlflow.sh start
	bash infra/local/serve.sh start --model $(MODEL) --port $(SERVE_PORT)

stop:
	bash infra/local/serve.sh stop
	bash infra/local/ray.sh stop
	bash infra/local/mlflow.sh stop
	bash infra/local/s3.sh stop

# Lint, then every test that needs no GPU (GPU tests skip themselves without CUDA).
test: venv
	$(VENV)/bin/ruff check geco ray_jobs tests bench scripts
	bash scripts/install_chromium.sh
	$(VENV)/bin/pytest $(XDIST) $(PYTEST_ARGS)

# The quick loop while developing: lint and every test that starts no service and is not
# marked slow (no S3 server, MLflow server or Ray head; a few minutes on 2 cores).
test-fast: venv
	$(VENV)/bin/ruff check geco ray_jobs tests bench scripts
	$(VENV)/bin/pytest $(XDIST) -m "not integration and not slow" $(PYTEST_ARGS)

lint: venv
	$(VENV)/bin/ruff check geco ray_jobs tests bench scripts

bench: venv
	$(PY) bench/bench_mrr.py
	$(PY) bench/bench_reader.py
	$(PY) bench/bench_train.py

gpu-smoke: venv
	$(PY) scripts/gpu_smoke.py

clean: stop
	rm -rf runs data/synthetic
