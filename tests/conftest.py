"""Shared fixtures: the read-only shared data folder (skipped when absent), a small
synthetic dataset generated once per test session, and the tiny config every training test
starts from."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from geco.config import Config, load_config
from geco.data.synth import SynthSpec, generate

# A spec small enough to generate in well under a second, still covering all 72 classes.
SMALL_SPEC = SynthSpec(
    n_train_tops=192, pairs_per_top=2, n_valid=96, n_test=100, n_negatives=9, image_size=64
)


# MLflow's client settings for the test servers, as infra/local/mlflow.sh sets them for the
# local stack (geco leaves them to MLflow): one retry, 60 s. Inherited by every process the
# tests start, Ray nodes included; tests that stop a server mid-run fail in seconds.
os.environ.setdefault("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "1")
os.environ.setdefault("MLFLOW_HTTP_REQUEST_TIMEOUT", "60")

# Under pytest-xdist every worker gets its share of the cores: torch's default (one thread per
# core in every process) would oversubscribe the CPU.
if os.environ.get("PYTEST_XDIST_WORKER_COUNT"):
    import torch

    _threads = max(1, (os.cpu_count() or 1) // int(os.environ["PYTEST_XDIST_WORKER_COUNT"]))
    os.environ["OMP_NUM_THREADS"] = str(_threads)
    torch.set_num_threads(_threads)

# The smallest run that still trains every model on the CPU in seconds: 32 px, one epoch per
# stage, narrow networks, a random-init backbone, quiet progress. Tests add what they vary.
TINY = [
    "data.kind=standard", "data.image_size=32", "data.num_workers=0",
    "cigm.features=8", "cigm.epochs=1", "cigm.batch_size=16",
    "geco.epochs=1", "geco.batch_size=16", "geco.lr=3e-4",
    "geco.backbone.weights=random", "geco.backbone.allow_random_init=true",
    "baselines.bpr_dae.features=backbone", "baselines.bpr_dae.image_size=32",
    "baselines.mgcm.features=8", "baselines.mgcm.batch_size=16",
    "baselines.pix2pixcm.features=8", "baselines.pix2pixcm.batch_size=16",
    "eval.batch_size=64", "runtime.log_every=1000",
]


class Tiny:
    """`tiny(root, *overrides)`: the TINY config on the dataset folder `root` (None: no
    folder), then `overrides`; `tiny.args(*overrides)`: the same as command-line overrides."""

    def __call__(self, root: Path | str | None, *overrides: str) -> Config:
        return load_config(None, self.args(*overrides, root=root))

    @staticmethod
    def args(*overrides: str, root: Path | str | None = None) -> list[str]:
        return [*([f"data.root={root}"] if root is not None else []), *TINY, *overrides]


@pytest.fixture(scope="session")
def tiny() -> Tiny:
    return Tiny()


def shared_dir() -> Path:
    env = os.environ.get("GECO_SHARED_DIR")
    return Path(env) if env else Path(__file__).resolve().parents[1].parent / "shared"


@pytest.fixture(scope="session")
def shared_data() -> Path:
    """<shared>/data, or skip: CI and developers without the shared folder still pass."""
    data = shared_dir() / "data"
    if not data.is_dir():
        pytest.skip(f"shared data not found at {data} (set GECO_SHARED_DIR)")
    return data


@pytest.fixture(scope="session")
def synth_small_spec() -> SynthSpec:
    return SMALL_SPEC


@pytest.fixture(scope="session")
def synth_small(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A small synthetic dataset (SMALL_SPEC), generated once per session; read-only."""
    out = tmp_path_factory.mktemp("synth") / "small"
    generate(out, SMALL_SPEC)
    return out


@pytest.fixture(scope="session")
def retriever_files(synth_small, tiny, tmp_path_factory) -> tuple[dict[str, Path], dict]:
    """A 1-epoch CIGM + GECo at 32 px and a catalogue of every test-split bottom (with image
    URIs), trained once per session: ({"geco", "generator", "catalogue"}, GECo's summary)."""
    import torch

    from geco import registry
    from geco.data.source import open_data
    from geco.models.geco import load_retriever
    from geco.train.loop import train

    run = tmp_path_factory.mktemp("retriever_run")
    train(tiny(synth_small), "cigm", run)
    _, summary = train(tiny(synth_small), "geco", run)
    files = {"geco": run / "geco" / "best.pt", "generator": run / "cigm" / "last.pt",
             "catalogue": run / "catalogue.pt"}
    retriever, _ = load_retriever(files["geco"], torch.device("cpu"),
                                  generator_path=files["generator"])
    registry.build_catalogue(retriever, open_data(tiny(synth_small).data), "test",
                             files["catalogue"], image_size=32)
    return files, summary


def write_folder_shards(root: Path, out: Path, spec, source: str) -> Path:
    """Every split of the dataset folder `root` written as shards into `out` with `spec`."""
    from geco.data.images import ImageFolder
    from geco.data.shards import write_shards
    from geco.data.splits import load_splits, resolve_layout

    layout = resolve_layout(root)
    write_shards(load_splits(layout), ImageFolder(layout.img_dir), out, spec, source=source)
    return out


def register_retriever(store: Path, files: dict[str, Path], name: str, **kw):
    """Version 1 of `name` from `files` (retriever_files) in a new SQLite store under `store`
    (artifacts there too): (tracking URI, MlflowClient, run id, log_retriever's result)."""
    import mlflow

    from geco import registry

    uri = f"sqlite:///{store}/mlflow.db"
    client = mlflow.MlflowClient(uri)
    exp = client.create_experiment("geco", artifact_location=(store / "artifacts").as_uri())
    run_id = client.create_run(exp).info.run_id
    out = registry.log_retriever(
        run_id, tracking_uri=uri, geco_checkpoint=files["geco"],
        generator_checkpoint=files["generator"], catalogue=files["catalogue"],
        registered_model=name, **kw)
    return uri, client, run_id, out


# The modules that take minutes (measured with `pytest --durations=40`), longest first: under
# pytest-xdist they start first, so the short modules fill the other worker around them instead
# of one long module starting last and running alone.
LONGEST_FIRST = ["test_ray_tune", "test_ray_faults", "test_ray_train", "test_learning",
                 "test_compare", "test_ddp", "test_registry", "test_train"]


@pytest.hookimpl(tryfirst=True)
def pytest_collection_modifyitems(config, items):
    """`gpu` tests skip themselves on machines without CUDA (CI, laptops). Under pytest-xdist
    (`make test`: `-n 2 --dist loadgroup --no-loadscope-reorder`) a module's tests stay in one
    worker, so its session and module fixtures start once there, and the longest modules are
    handed out first."""
    import torch

    skip = pytest.mark.skip(reason="needs a CUDA device")
    for item in items:
        if "gpu" in item.keywords and not torch.cuda.is_available():
            item.add_marker(skip)
        item.add_marker(pytest.mark.xdist_group(item.module.__name__))
    rank = {name: i for i, name in enumerate(LONGEST_FIRST)}
    items.sort(key=lambda item: rank.get(item.module.__name__.rpartition(".")[2],
                                         len(rank)))


# A real SeaweedFS S3 server on loopback (auth on), started once per session when a test asks.
from tests.mlflow_server import mlflow_env, mlflow_server  # noqa: E402, F401
from tests.ray_cluster import ray_cluster, ray_head  # noqa: E402, F401
from tests.s3_server import s3_env, s3_server  # noqa: E402, F401
