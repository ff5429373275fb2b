"""The served retriever: an MLflow pyfunc over (GECo, CIGM, embedded catalogue), its
registration, and the champion/candidate promotion gate with rollback.

MLflow (and torch) are imported inside functions only, so `import geco.registry` stays cheap
(the promotion CLI needs neither torch nor a model) and works without MLflow.
`GecoRetrieverModel` must subclass mlflow.pyfunc.PythonModel, so it is built on first
attribute access (PEP 562) and cached under its own module and name: cloudpickle then stores
it by reference (`geco.registry.GecoRetrieverModel`), not by value, and a fresh process that
loads the model imports this module to get the class back.

Registry layout: aliases "candidate" (last registered) and "champion" (served); the gate
writes its decision as `gate.*` tags on the candidate version, and a new champion records the
one it replaced in `geco.previous_champion`, which is what `rollback` follows.
"""

from __future__ import annotations

import io
import math
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from geco.errors import DataError, GecoError

ARTIFACT_PATH = "retriever"
CANDIDATE, CHAMPION = "candidate", "champion"
PREVIOUS_TAG = "geco.previous_champion"
DEFAULT_K, DEFAULT_SEED = 10, 0
_BATCH = 64  # query images embedded per forward pass

if TYPE_CHECKING:
    import torch

_model_class: type | None = None


def __getattr__(name: str) -> Any:
    if name == "GecoRetrieverModel":
        global _model_class
        if _model_class is None:
            _model_class = _build_model_class()
        return _model_class
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


# ---------------------------------------------------------------------------------------------
# Inference: plain functions, so tests and other callers can use them without MLflow.


@dataclass
class Bundle:
    """Everything `predict` needs: the CPU retriever, its input size and the catalogue."""

    retriever: Any  # geco.models.geco.Retriever
    image_size: int
    ids: list[str]
    embeddings: torch.Tensor  # [N, d] float32, plus the prior column with a popularity weight


def load_catalogue(path: str | Path) -> dict[str, Any]:
    import torch

    try:
        cat = torch.load(Path(path), map_location="cpu", weights_only=True)
    except Exception as exc:  # noqa: BLE001 - re-raised with the file named
        raise GecoError(f"cannot read catalogue {path}: {exc}") from exc
    if not isinstance(cat, dict) or not {"ids", "embeddings", "image_size"} <= set(cat):
        raise GecoError(f"{path} is not a geco catalogue (ids, embeddings, image_size)")
    if len(cat["ids"]) != len(cat["embeddings"]) or not cat["ids"]:
        raise GecoError(f"{path}: {len(cat['ids'])} ids for {len(cat['embeddings'])} embeddings")
    return cat


def load_bundle(geco_checkpoint: str | Path, generator_checkpoint: str | Path,
                catalogue: str | Path) -> Bundle:
    import torch

    from geco.models.geco import load_retriever

    retriever, ckpt = load_retriever(geco_checkpoint, torch.device("cpu"),
                                     generator_path=generator_checkpoint)
    size = int(ckpt["config"]["data"]["image_size"])
    cat = load_catalogue(catalogue)
    emb = cat["embeddings"].float()
    if int(cat["image_size"]) != size:
        raise GecoError(f"catalogue {catalogue} was embedded at {cat['image_size']} px, "
                        f"the GECo model {geco_checkpoint} expects {size} px")
    dim = retriever.model.bottom_proj.out_features
    if emb.dim() != 2 or emb.shape[1] != dim:
        raise GecoError(f"catalogue {catalogue}: embeddings {tuple(emb.shape)}, model has {dim}-d")
    ids = [str(i) for i in cat["ids"]]
    return Bundle(retriever, size, ids, retriever.with_prior_bottoms(ids, emb))


def _image_values(model_input: Any) -> list[Any]:
    """A DataFrame with an "image" column, a mapping {"image": [...]}, or a plain list/tuple
    of paths or bytes."""
    if isinstance(model_input, (list, tuple)):
        return list(model_input)
    if isinstance(model_input, dict):
        if "image" not in model_input:
            raise DataError(f"input has no 'image' key (keys: {sorted(model_input)})")
        value = model_input["image"]
        return list(value) if isinstance(value, (list, tuple)) else [value]
    columns = getattr(model_input, "columns", None)
    if columns is None and hasattr(model_input, "tolist"):  # a Series or a 1-d array
        return list(model_input.tolist())
    if columns is None:
        raise DataError(f"expected a DataFrame with an 'image' column or a list of paths/bytes, "
                        f"got {type(model_input).__name__}")
    if "image" not in columns:
        raise DataError(f"input has no 'image' column (columns: {list(columns)})")
    return list(model_input["image"])


def _open(row: int, value: Any):
    from PIL import Image

    if isinstance(value, (bytes, bytearray, memoryview)):
        where, source = f"row {row} (bytes)", io.BytesIO(bytes(value))
    elif isinstance(value, (str, Path)):
        where, source = f"row {row} ({value})", str(value)
    else:
        raise DataError(f"row {row}: expected a file path or image bytes, "
                        f"got {type(value).__name__}")
    try:
        with Image.open(source) as im:
            im.load()  # decode now: a truncated file fails here, named
            return im.convert("RGB")
    except FileNotFoundError:
        reason = "file not found"
    except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as exc:
        reason = f"{type(exc).__name__}: {exc}"
    raise DataError(f"cannot read image at {where}: {reason}")


def query_noise(retriever: Any, n: int, seed: int) -> torch.Tensor:
    """One noise vector from `seed`, shared by every row: a query's answer depends only on its
    image and the seed, not on which other images came in the same request."""
    import torch

    z = torch.randn(1, retriever.generator.noise_dim, generator=torch.Generator().manual_seed(seed))
    return z.expand(n, -1)


def rank(bundle: Bundle, model_input: Any, *, k: int = DEFAULT_K, seed: int = DEFAULT_SEED):
    """Top-k catalogue bottoms per input top: DataFrame(query, rank, bottom_id, score)."""
    import pandas as pd
    import torch

    from geco.data.transforms import imagenet_transform

    if k < 1:
        raise GecoError(f"k must be >= 1, got {k}")
    values = _image_values(model_input)
    tf = imagenet_transform(bundle.image_size)
    tops = [tf(_open(r, v)) for r, v in enumerate(values)]  # every row checked before any work
    k = min(k, len(bundle.ids))
    cols: dict[str, list] = {"query": [], "rank": [], "bottom_id": [], "score": []}
    for start in range(0, len(tops), _BATCH):  # Retriever methods run under no_grad
        x = torch.stack(tops[start:start + _BATCH])
        q = bundle.retriever.queries(x, query_noise(bundle.retriever, len(x), seed)).float()
        q = bundle.retriever.with_prior_queries(q)  # geco.popularity_weight
        # A stable sort keeps ties in catalogue order, so rankings are reproducible.
        scores, order = torch.sort(q @ bundle.embeddings.T, dim=1, descending=True, stable=True)
        for i in range(len(x)):
            cols["query"] += [start + i] * k
            cols["rank"] += range(1, k + 1)
            cols["bottom_id"] += [bundle.ids[j] for j in order[i, :k].tolist()]
            cols["score"] += scores[i, :k].tolist()
    return pd.DataFrame(cols)


def _build_model_class() -> type:
    import mlflow.pyfunc
    import pandas as pd

    def load_context(self, context) -> None:
        a = context.artifacts
        self.bundle = load_bundle(a["geco"], a["generator"], a["catalogue"])

    def predict(self, context, model_input, params=None):
        params = params or {}
        return rank(self.bundle, model_input, k=int(params.get("k", DEFAULT_K)),
                    seed=int(params.get("seed", DEFAULT_SEED)))

    # MLflow 3 inspects predict's input hint when the class is created: without one it warns
    # in every process that loads the model; DataFrame is a hint it takes as "no schema to
    # infer, nothing to enforce" (a list input still reaches `rank`). The hint must be a real
    # object: this module's postponed (string) annotations would not resolve here.
    predict.__annotations__ = {"model_input": pd.DataFrame}
    # __module__/__qualname__ name where `__getattr__` serves the class from, so pickle and
    # cloudpickle store a reference to it, not its code.
    return type("GecoRetrieverModel", (mlflow.pyfunc.PythonModel,), {
        "__doc__": "Top image(s) in, top-k catalogue bottoms out (see geco.registry.rank).",
        "__module__": __name__, "__qualname__": "GecoRetrieverModel",
        "load_context": load_context, "predict": predict,
    })


def signature():
    """Params k and seed (MLflow drops params at predict time unless the signature declares
    them) and the output columns. No input schema: MLflow would then refuse a plain list of
    paths; `rank` checks the input itself ("image" column of paths or bytes, or a list)."""
    from mlflow.models.signature import ModelSignature
    from mlflow.types.schema import ColSpec, ParamSchema, ParamSpec, Schema

    return ModelSignature(
        outputs=Schema([ColSpec("long", "query"), ColSpec("long", "rank"),
                        ColSpec("string", "bottom_id"), ColSpec("double", "score")]),
        params=ParamSchema([ParamSpec("k", "long", DEFAULT_K),
                            ParamSpec("seed", "long", DEFAULT_SEED)]),
    )


# ---------------------------------------------------------------------------------------------
# Catalogue building.


def build_catalogue(retriever: Any, data: Any, split: str, out_path: str | Path, *,
                    image_size: int, batch_size: int = 128) -> dict[str, Any]:
    """Embed every candidate bottom of `split` of `data` (geco.data.source.open_data: a
    folder or shards) once and save {ids, embeddings, image_size, source}."""
    import torch

    from geco.evaluate import embed_candidates
    from geco.train.runtime import Runtime

    rt = Runtime(torch.device("cpu"), 0, 1, 0, None, False)
    retriever.generator.eval()
    retriever.model.eval()
    ids, emb, _ = embed_candidates(retriever.bottoms, data, split, rt=rt,
                                   image_size=image_size, batch_size=batch_size)
    if not ids:
        raise GecoError(f"build_catalogue: no bottoms in {data.describe(split)}")
    cat = {"ids": list(ids), "embeddings": emb.float().contiguous(), "image_size": image_size,
           "source": data.describe(split)}
    Path(out_path).parent.mkdir(parents=True, exist_ok=True)
    torch.save(cat, out_path)
    return cat


# ---------------------------------------------------------------------------------------------
# Logging, registration, promotion.


def _client(client_or_uri: Any):
    """An MlflowClient: the given one, or geco.tracking's for a URI (None: the environment's)."""
    if client_or_uri is None or isinstance(client_or_uri, str):
        from geco.tracking import client

        return client(client_or_uri)
    return client_or_uri


def _requirements() -> list[str]:
    # Explicit pins: MLflow's inference would load the model in a subprocess at log time.
    from importlib.metadata import PackageNotFoundError, version

    reqs = []
    for pkg in ("geco", "torch", "torchvision", "pillow", "pandas", "mlflow"):
        try:
            reqs.append(f"{pkg}=={version(pkg).split('+')[0]}")
        except PackageNotFoundError:
            reqs.append(pkg)
    return reqs


# What serving needs of each checkpoint's `state`: optimiser and discriminator state would
# triple the size of every registered version for nothing.
_SERVING_STATE = {"geco": ("model", "prior", "prior_weight"), "cigm": ("generator",)}


def _serving_copy(src: str | Path, stage: str, dst: Path) -> str:
    import torch

    from geco.train.runtime import load_checkpoint

    ckpt = load_checkpoint(src)
    if ckpt.get("stage") != stage:
        raise GecoError(f"{src} is not a {stage.upper()} checkpoint (stage={ckpt.get('stage')!r})")
    slim = {key: value for key, value in ckpt.items() if key not in ("state", "history")}
    slim["state"] = {key: ckpt["state"][key] for key in _SERVING_STATE[stage]
                     if key in ckpt["state"]}  # "prior": GECo checkpoints since the prior
    torch.save(slim, dst)
    return str(dst)


def log_retriever(run_id: str, *, tracking_uri: str, geco_checkpoint: str | Path,
                  generator_checkpoint: str | Path, catalogue: str | Path,
                  registered_model: str | None = None,
                  metrics: dict[str, float] | None = None) -> dict[str, Any]:
    """Save the pyfunc and log it as artifacts `retriever/` of run `run_id` (its status is
    left as it was); with `registered_model`, register it as a new version tagged with
    `metrics` and point alias "candidate" at it. Everything goes through one explicit client
    bound to `tracking_uri`: MLflow's global tracking URI and active run are never touched.

    Returns {"model_uri", "run_model_uri", "version"} (version None when not registered)."""
    import warnings

    import mlflow.pyfunc
    from mlflow.exceptions import MlflowException

    for label, path in (("GECo checkpoint", geco_checkpoint), ("CIGM checkpoint",
                        generator_checkpoint), ("catalogue", catalogue)):
        if not Path(path).is_file():
            raise GecoError(f"log_retriever: {label} not found: {path}")
    client = _client(tracking_uri)
    run_model_uri = f"runs:/{run_id}/{ARTIFACT_PATH}"
    with tempfile.TemporaryDirectory() as tmp:
        artifacts = {"geco": _serving_copy(geco_checkpoint, "geco", Path(tmp) / "geco.pt"),
                     "generator": _serving_copy(generator_checkpoint, "cigm",
                                                Path(tmp) / "generator.pt"),
                     "catalogue": str(catalogue)}
        model_dir = Path(tmp) / ARTIFACT_PATH
        with warnings.catch_warnings():
            # No input example on purpose: MLflow would load and run the model to validate it.
            warnings.filterwarnings("ignore", message=".*input_example.*", category=UserWarning)
            mlflow.pyfunc.save_model(str(model_dir),
                                     python_model=__getattr__("GecoRetrieverModel")(),
                                     artifacts=artifacts, signature=signature(),
                                     pip_requirements=_requirements())
        client.log_artifacts(run_id, str(model_dir), ARTIFACT_PATH)
    out: dict[str, Any] = {"model_uri": run_model_uri, "run_model_uri": run_model_uri,
                           "version": None}
    if registered_model:
        try:
            client.create_registered_model(registered_model)
        except MlflowException as exc:
            if exc.error_code not in ("RESOURCE_ALREADY_EXISTS", "ALREADY_EXISTS"):
                raise
        source = f"{client.get_run(run_id).info.artifact_uri.rstrip('/')}/{ARTIFACT_PATH}"
        tags = {key: str(float(v)) for key, v in (metrics or {}).items()}
        mv = client.create_model_version(registered_model, source, run_id=run_id, tags=tags)
        client.set_registered_model_alias(registered_model, CANDIDATE, str(mv.version))
        out["version"] = int(mv.version)
        out["model_uri"] = f"models:/{registered_model}/{mv.version}"
    return out


def _version(client: Any, name: str, version: int | str):
    from mlflow.exceptions import MlflowException

    try:
        return client.get_model_version(name, str(version))
    except MlflowException:
        known = _versions(client, name)
        raise GecoError(f"registered model {name!r} has no version {version} "
                        f"(versions: {', '.join(map(str, known)) or 'none'})") from None


def _versions(client: Any, name: str) -> list[int]:
    from mlflow.exceptions import MlflowException

    try:
        found = client.search_model_versions(f"name = '{name}'")
    except MlflowException:
        return []
    return sorted(int(mv.version) for mv in found)


def _alias(client: Any, name: str, alias: str):
    from mlflow.exceptions import MlflowException

    try:
        return client.get_model_version_by_alias(name, alias)
    except MlflowException:
        return None


def _metric(client: Any, mv: Any, metric: str) -> float | None:
    """The version's tag `metric`, else the metric of the run that logged it."""
    if metric in (mv.tags or {}):
        return float(mv.tags[metric])
    if mv.run_id:
        value = client.get_run(mv.run_id).data.metrics.get(metric)
        if value is not None:
            return float(value)
    return None


def promote(client_or_uri: Any, name: str, version: int | str, *, metric: str,
            margin: float) -> dict[str, Any]:
    """The gate: make `version` the champion iff there is none or its `metric` beats the
    champion's by more than `margin`. The decision is always recorded as gate.* tags."""
    client = _client(client_or_uri)
    mv = _version(client, name, version)
    # MLflow hands versions back as int or str depending on the call: compare ints only.
    v = int(mv.version)
    cand = _metric(client, mv, metric)
    if cand is None or math.isnan(cand):
        raise GecoError(f"{name} version {v} has no {metric!r} (neither a version tag nor a "
                        f"metric of run {mv.run_id}, or it is NaN)")
    champ = _alias(client, name, CHAMPION)
    c = None if champ is None else int(champ.version)
    champ_value = None
    if champ is not None and c != v:
        champ_value = _metric(client, champ, metric)
        if champ_value is None or math.isnan(champ_value):
            raise GecoError(f"champion {name} version {c} has no {metric!r} to compare with; "
                            "choose a metric both versions have")
    if c is None:
        accepted, reason = True, f"no champion yet: version {v} becomes the champion"
    elif c == v:
        accepted, reason = False, f"version {v} is already the champion"
    else:
        accepted = cand > champ_value + margin
        verb = "beats" if accepted else "does not beat"
        reason = (f"{metric} {cand:.6g} of version {v} {verb} champion version {c}'s "
                  f"{champ_value:.6g} + margin {margin:g}")
    decision = {
        "gate.decision": "accepted" if accepted else "refused",
        "gate.metric": metric,
        "gate.candidate": f"{cand:.10g}",
        "gate.champion": "none" if champ_value is None else f"{champ_value:.10g}",
        "gate.champion_version": "none" if c is None else str(c),
        "gate.margin": f"{margin:g}",
        "gate.reason": reason,
    }
    for key, value in decision.items():
        client.set_model_version_tag(name, str(v), key, value)
    if accepted:
        client.set_registered_model_alias(name, CHAMPION, str(v))
        if c is not None:
            client.set_model_version_tag(name, str(v), PREVIOUS_TAG, str(c))
    return {"name": name, "version": v, "champion": v if accepted else c, **decision}


def rollback(client_or_uri: Any, name: str) -> dict[str, Any]:
    """Point "champion" back at the version the current champion replaced."""
    client = _client(client_or_uri)
    champ = _alias(client, name, CHAMPION)
    if champ is None:
        raise GecoError(f"registered model {name!r} has no champion: nothing to roll back")
    c = int(champ.version)
    previous = (champ.tags or {}).get(PREVIOUS_TAG)
    if not previous:
        raise GecoError(f"{name} champion version {c} replaced no earlier champion: nothing to "
                        "roll back to")
    back = int(_version(client, name, previous).version)
    client.set_registered_model_alias(name, CHAMPION, str(back))
    client.set_model_version_tag(name, str(c), "gate.rolled_back_to", str(back))
    client.set_model_version_tag(name, str(back), "gate.rolled_back_from", str(c))
    return {"name": name, "champion": back, "rolled_back_from": c}


def describe(client_or_uri: Any, name: str) -> list[dict[str, Any]]:
    """Every version with its aliases, run and tags, oldest first (for `promote.py show`)."""
    client = _client(client_or_uri)
    out = []
    for v in _versions(client, name):
        mv = client.get_model_version(name, str(v))
        out.append({"version": int(mv.version), "aliases": sorted(mv.aliases or []),
                    "run_id": mv.run_id, "tags": dict(mv.tags or {})})
    return out
