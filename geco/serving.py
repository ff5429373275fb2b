"""The served retriever: top image bytes in, top-k catalogue bottoms out.

`load_bundle` puts a GECo checkpoint, its CIGM generator and an embedded catalogue together;
`rank` answers queries with them. `GecoRetrieverModel` wraps both as an MLflow pyfunc; MLflow
builds it from code (geco/serving_model.py, logged with geco's source by geco.registry), so a
registered model needs no installed geco package.

What a served model accepts (docs/serving.md): a DataFrame with one binary column "image"
(base64 in JSON), params k and seed. A served model never opens a path given by a client: that
would let callers probe the serving host's files. In-process callers (`geco retrieve`, tests)
may pass paths to `rank` with allow_paths=True.

MLflow (and torch) are imported inside functions only, so importing this module is cheap; the
pyfunc class subclasses mlflow.pyfunc.PythonModel and is therefore built on first access.
"""

from __future__ import annotations

import io
import os
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from geco.errors import DataError, GecoError

if TYPE_CHECKING:
    import torch

DEFAULT_K, DEFAULT_SEED = 10, 0
# The largest top a served model decodes (4096 x 4096): a bigger upload is refused before it is
# decoded, so one request cannot hold hundreds of MB of pixels. GECO_SERVE_MAX_PIXELS overrides.
MAX_PIXELS = 4096 * 4096
# Where a serving process finds a catalogue other than the one logged with the model.
CATALOGUE_ENV = "GECO_CATALOGUE"
_BATCH = 64  # query images embedded per forward pass

_model_class: type | None = None


def __getattr__(name: str) -> Any:
    if name == "GecoRetrieverModel":
        global _model_class
        if _model_class is None:
            _model_class = _build_model_class()
        return _model_class
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


@dataclass
class Bundle:
    """Everything `rank` needs: the CPU retriever, its input size and the catalogue."""

    retriever: Any  # geco.models.geco.Retriever
    image_size: int
    ids: list[str]
    embeddings: torch.Tensor  # [N, d] float32, plus the prior column with a popularity weight
    image_uris: list[str]  # per bottom, "" where the catalogue does not know it
    catalogue: str = ""  # where the catalogue came from


def load_catalogue(location: str | Path) -> dict[str, Any]:
    """A catalogue file (local path or s3:// URI): {ids, embeddings, image_size, ...}."""
    import torch

    from geco.catalogue import read_bytes

    try:
        raw = read_bytes(str(location))
        cat = torch.load(io.BytesIO(raw), map_location="cpu", weights_only=True)
    except Exception as exc:  # noqa: BLE001 - re-raised with the file named
        raise GecoError(f"cannot read catalogue {location}: {exc}") from exc
    if not isinstance(cat, dict) or not {"ids", "embeddings", "image_size"} <= set(cat):
        raise GecoError(f"{location} is not a geco catalogue (ids, embeddings, image_size)")
    if len(cat["ids"]) != len(cat["embeddings"]) or not cat["ids"]:
        raise GecoError(f"{location}: {len(cat['ids'])} ids for {len(cat['embeddings'])} "
                        "embeddings")
    uris = cat.get("image_uris")
    if uris is not None and len(uris) != len(cat["ids"]):
        raise GecoError(f"{location}: {len(uris)} image URIs for {len(cat['ids'])} ids")
    return cat


def load_bundle(geco_checkpoint: str | Path, generator_checkpoint: str | Path,
                catalogue: str | Path) -> Bundle:
    import torch

    from geco.models.geco import load_retriever

    retriever, ckpt = load_retriever(geco_checkpoint, torch.device("cpu"),
                                     generator_path=generator_checkpoint)
    return make_bundle(retriever, int(ckpt["config"]["data"]["image_size"]),
                       load_catalogue(catalogue), str(catalogue), str(geco_checkpoint))


def make_bundle(retriever: Any, size: int, cat: dict[str, Any], catalogue: str,
                geco_checkpoint: str) -> Bundle:
    """A Bundle from a loaded retriever and catalogue, once the catalogue is checked against
    the model (image size, embedding width, weights fingerprint)."""
    emb = cat["embeddings"].float()
    if int(cat["image_size"]) != size:
        raise GecoError(f"catalogue {catalogue} was embedded at {cat['image_size']} px, "
                        f"the GECo model {geco_checkpoint} expects {size} px")
    dim = retriever.model.bottom_proj.out_features
    if emb.dim() != 2 or emb.shape[1] != dim:
        raise GecoError(f"catalogue {catalogue}: embeddings {tuple(emb.shape)}, model has {dim}-d")
    built_for = (cat.get("model") or {}).get("fingerprint")
    if built_for:
        from geco.catalogue import bottom_fingerprint

        if built_for != bottom_fingerprint(retriever.model):
            made_with = (cat.get("model") or {}).get("uri") or "another model"
            raise GecoError(f"catalogue {catalogue} was embedded with {made_with}, whose "
                            f"weights differ from {geco_checkpoint}'s: rebuild it for this "
                            "model (geco catalogue build --model ...)")
    ids = [str(i) for i in cat["ids"]]
    uris = [str(u) for u in cat.get("image_uris") or [""] * len(ids)]
    return Bundle(retriever, size, ids, retriever.with_prior_bottoms(ids, emb), uris, catalogue)


def _image_values(model_input: Any) -> list[Any]:
    """A DataFrame with an "image" column, a mapping {"image": [...]}, or a plain list/tuple
    of images."""
    if isinstance(model_input, (list, tuple)):
        return list(model_input)
    if isinstance(model_input, dict):
        if "image" not in model_input:
            raise DataError(f"input has no 'image' key (keys: {sorted(model_input)})")
        value = model_input["image"]
        if hasattr(value, "tolist") and not isinstance(value, (bytes, str)):
            value = value.tolist()  # MLflow's "inputs" JSON format gives a numpy array
        return list(value) if isinstance(value, (list, tuple)) else [value]
    columns = getattr(model_input, "columns", None)
    if columns is None and hasattr(model_input, "tolist"):  # a Series or a 1-d array
        return list(model_input.tolist())
    if columns is None:
        raise DataError(f"expected a DataFrame with an 'image' column or a list of images, "
                        f"got {type(model_input).__name__}")
    if "image" not in columns:
        raise DataError(f"input has no 'image' column (columns: {list(columns)})")
    out: list[Any] = []
    for value in model_input["image"]:
        # pyfunc turns {"image": [a, b]} into one row holding the list: one query per item.
        is_list = hasattr(value, "tolist") or isinstance(value, (list, tuple))
        out += list(value.tolist() if hasattr(value, "tolist") else value) if is_list else [value]
    return out


def max_pixels() -> int:
    raw = os.environ.get("GECO_SERVE_MAX_PIXELS", "")
    try:
        return int(raw) if raw else MAX_PIXELS
    except ValueError:
        raise GecoError(f"GECO_SERVE_MAX_PIXELS={raw!r} is not a whole number") from None


def open_image(row: int, value: Any, *, allow_paths: bool):
    """Row `row`'s image, decoded to RGB, or a DataError that names the row and the reason."""
    from PIL import Image

    if isinstance(value, str) and not allow_paths:
        value = value.encode("ascii", "replace")  # served: a string is base64, never a path
    if isinstance(value, (bytes, bytearray, memoryview)):
        data = _unbase64(bytes(value))
        if not data:
            raise DataError(f"row {row}: the image is empty (0 bytes)")
        where, source = f"row {row} (bytes)", io.BytesIO(data)
    elif isinstance(value, (str, Path)):
        where, source = f"row {row} ({value})", str(value)
    else:
        raise DataError(f"row {row}: expected image bytes{' or a file path' * allow_paths}, "
                        f"got {type(value).__name__}")
    limit = max_pixels()
    try:
        with Image.open(source) as im:
            if im.width * im.height > limit:  # from the header, before decoding the pixels
                raise DataError(f"row {row}: the image is {im.width}x{im.height} "
                                f"({im.width * im.height / 1e6:.1f} MP), more than the "
                                f"{limit / 1e6:.1f} MP a query may have; send a smaller one")
            im.load()  # decode now: a truncated file fails here, named
            return im.convert("RGB")
    except FileNotFoundError:
        reason = "file not found"
    except Image.UnidentifiedImageError:
        reason = "not an image file PIL can read (JPEG, PNG, WebP, ...)"
    except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as exc:
        reason = f"{type(exc).__name__}: {exc}"
    raise DataError(f"cannot read image at {where}: {reason}")


def _unbase64(data: bytes) -> bytes:
    """Image bytes as sent: MLflow base64-decodes a binary column given as "dataframe_split"
    but hands "inputs"/"instances" over still encoded. Image files are never valid base64
    (JPEG and PNG start with bytes outside its alphabet), so a strict decode tells them apart."""
    import base64
    import binascii

    try:
        return base64.b64decode(data.replace(b"\n", b""), validate=True)
    except (binascii.Error, ValueError):
        return data


def query_noise(retriever: Any, n: int, seed: int) -> torch.Tensor:
    """One noise vector from `seed`, shared by every row: a query's answer depends only on its
    image and the seed, not on which other images came in the same request."""
    import torch

    z = torch.randn(1, retriever.generator.noise_dim, generator=torch.Generator().manual_seed(seed))
    return z.expand(n, -1)


def rank(bundle: Bundle, model_input: Any, *, k: int = DEFAULT_K, seed: int = DEFAULT_SEED,
         allow_paths: bool = True):
    """Top-k catalogue bottoms per input top:
    DataFrame(query, rank, bottom_id, score, image_uri)."""
    import pandas as pd
    import torch

    from geco.data.transforms import imagenet_transform

    if not isinstance(k, int) or k < 1:
        raise DataError(f"k must be a whole number >= 1, got {k!r}")
    values = _image_values(model_input)
    if not values:
        raise DataError("no images in the request: send at least one row")
    tf = imagenet_transform(bundle.image_size)
    # Every row checked before any work.
    tops = [tf(open_image(r, v, allow_paths=allow_paths)) for r, v in enumerate(values)]
    k = min(k, len(bundle.ids))
    cols: dict[str, list] = {"query": [], "rank": [], "bottom_id": [], "score": [],
                             "image_uri": []}
    for start in range(0, len(tops), _BATCH):  # Retriever methods run under no_grad
        x = torch.stack(tops[start:start + _BATCH])
        q = bundle.retriever.queries(x, query_noise(bundle.retriever, len(x), seed)).float()
        q = bundle.retriever.with_prior_queries(q)  # geco.popularity_weight
        # top-k, not a full sort: 1.6 ms instead of 12 ms over 100,000 bottoms (bench/).
        scores, order = torch.topk(q @ bundle.embeddings.T, k, dim=1)
        for i in range(len(x)):
            # Ties in catalogue order, so rankings are reproducible.
            ranked = sorted(zip(scores[i].tolist(), order[i].tolist(), strict=True),
                            key=lambda sj: (-sj[0], sj[1]))
            cols["query"] += [start + i] * k
            cols["rank"] += range(1, k + 1)
            cols["bottom_id"] += [bundle.ids[j] for _, j in ranked]
            cols["score"] += [s for s, _ in ranked]
            cols["image_uri"] += [bundle.image_uris[j] for _, j in ranked]
    return pd.DataFrame(cols)


def _build_model_class() -> type:
    import mlflow.pyfunc
    import pandas as pd
    from mlflow.environment_variables import _MLFLOW_IS_IN_SERVING_ENVIRONMENT
    from mlflow.exceptions import MlflowException
    from mlflow.protos.databricks_pb2 import INVALID_PARAMETER_VALUE

    def load_context(self, context) -> None:
        a = context.artifacts
        # A catalogue other than the logged one: model_config {"catalogue": URI} at load time,
        # else $GECO_CATALOGUE (how `mlflow models serve` gets one).
        catalogue = ((context.model_config or {}).get("catalogue")
                     or os.environ.get(CATALOGUE_ENV) or a["catalogue"])
        self.bundle = load_bundle(a["geco"], a["generator"], catalogue)

    def predict(self, context, model_input, params=None):
        params = params or {}
        try:
            return rank(self.bundle, model_input, k=_whole(params.get("k", DEFAULT_K), "k"),
                        seed=_whole(params.get("seed", DEFAULT_SEED), "seed"),
                        allow_paths=not _MLFLOW_IS_IN_SERVING_ENVIRONMENT.get())
        except DataError as exc:
            raise RequestError(str(exc)) from None

    class RequestError(MlflowException):
        """A bad request: MLflow's scoring server answers it with HTTP 400 and this message.
        The server rewrites an exception's message to "Failed to predict data '<the whole
        request>' ..." before answering; for image bytes that buries the one line that says
        what is wrong, so the message here ignores the rewrite."""

        def __init__(self, message: str) -> None:
            self._clean = message
            super().__init__(message, error_code=INVALID_PARAMETER_VALUE)

        @property
        def message(self) -> str:
            return self._clean

        @message.setter
        def message(self, _value: str) -> None:
            pass

    # MLflow 3 inspects predict's input hint when the class is created; DataFrame is a hint it
    # takes as "no schema to infer" (the signature declares it). It must be a real object:
    # this module's postponed (string) annotations would not resolve here.
    predict.__annotations__ = {"model_input": pd.DataFrame}
    return type("GecoRetrieverModel", (mlflow.pyfunc.PythonModel,), {
        "__doc__": "Top image(s) in, top-k catalogue bottoms out (see geco.serving.rank).",
        "__module__": __name__, "__qualname__": "GecoRetrieverModel",
        "load_context": load_context, "predict": predict,
    })


def _whole(value: Any, name: str) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or value != int(value):
        raise DataError(f"param {name} must be a whole number, got {value!r}")
    return int(value)


def signature():
    """One binary column "image" (MLflow base64-decodes it from JSON), params k and seed
    (MLflow drops params at predict time unless the signature declares them), the answer's
    columns."""
    from mlflow.models.signature import ModelSignature
    from mlflow.types.schema import ColSpec, ParamSchema, ParamSpec, Schema

    return ModelSignature(
        inputs=Schema([ColSpec("binary", "image")]),
        outputs=Schema([ColSpec("long", "query"), ColSpec("long", "rank"),
                        ColSpec("string", "bottom_id"), ColSpec("double", "score"),
                        ColSpec("string", "image_uri")]),
        params=ParamSchema([ParamSpec("k", "long", DEFAULT_K),
                            ParamSpec("seed", "long", DEFAULT_SEED)]),
    )


def set_served_model() -> None:
    """Called by geco/serving_model.py when MLflow loads a registered retriever from code."""
    import mlflow.models

    mlflow.models.set_model(__getattr__("GecoRetrieverModel")())
