"""The registered retriever: logging the MLflow pyfunc (geco.serving) over GECo, CIGM and an
embedded catalogue, its registration, and the champion/candidate promotion gate with rollback.

The pyfunc is logged as code ("models from code": geco/serving_model.py plus a copy of the
geco package as its code path), so loading or serving it needs torch, torchvision and the
other requirements it lists, but no installed geco package.

MLflow (and torch) are imported inside functions only, so `import geco.registry` stays cheap
(the promotion CLI needs neither torch nor a model) and works without MLflow.

Registry layout: aliases "candidate" (last registered) and "champion" (served); the gate
writes its latest decision as `gate.*` tags on the candidate version, and a new champion
records the one it replaced in `geco.previous_champion`, which is what `rollback` follows.
Every decision and alias move (register, promote, rollback) is also appended to an audit
trail that nothing rewrites: one JSON `gate.history.<UTC time>` tag per event on the
registered model and on the versions concerned.
"""

from __future__ import annotations

import io
import json
import math
import shutil
import tempfile
from pathlib import Path
from typing import Any

from geco.errors import ConfigError, GecoError

ARTIFACT_PATH = "retriever"
CANDIDATE, CHAMPION = "candidate", "champion"
PREVIOUS_TAG = "geco.previous_champion"
PACKAGE_DIR = Path(__file__).resolve().parent  # the geco package, logged with every model


def __getattr__(name: str) -> Any:
    # Versions registered before the models-from-code switch pickled the pyfunc class by
    # reference as geco.registry.GecoRetrieverModel: keep loading them.
    if name == "GecoRetrieverModel":
        from geco import serving

        return serving.GecoRetrieverModel
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")

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
    # Where a client finds each bottom's picture: the image file of a dataset folder; shards
    # keep images inside tars, which no client can fetch by URI ("").
    from geco.data.source import FolderData

    folder = data.splits((split,))[1] if isinstance(data, FolderData) else None
    uris = [str(folder.path(i).resolve()) if folder else "" for i in ids]
    from geco.catalogue import FORMAT, bottom_fingerprint

    cat = {"format": FORMAT, "ids": list(ids), "embeddings": emb.float().contiguous(),
           "image_size": image_size, "image_uris": uris, "source": data.describe(split),
           "model": {"uri": "", "fingerprint": bottom_fingerprint(retriever.model)}}
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


# What the logged geco code imports to serve (geco itself travels as the model's code path:
# "geco" on PyPI is an unrelated package). boto3: catalogues in S3.
SERVING_REQUIREMENTS = ("torch", "torchvision", "pillow", "numpy", "pandas", "pyyaml", "boto3",
                        "mlflow")


def _requirements() -> list[str]:
    # Explicit pins: MLflow's inference would load the model in a subprocess at log time.
    from importlib.metadata import PackageNotFoundError, version

    reqs = []
    for pkg in SERVING_REQUIREMENTS:
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


def _package_copy(dst: Path) -> str:
    """geco's source without caches or compiled files: the model's code path."""
    shutil.copytree(PACKAGE_DIR, dst / "geco",
                    ignore=shutil.ignore_patterns("__pycache__", "*.pyc", "*.so"))
    return str(dst / "geco")


def _grey_jpeg(size: int = 64) -> bytes:
    from PIL import Image

    buf = io.BytesIO()
    Image.new("RGB", (size, size), (128, 128, 128)).save(buf, format="JPEG")
    return buf.getvalue()


def log_retriever(run_id: str, *, tracking_uri: str, geco_checkpoint: str | Path,
                  generator_checkpoint: str | Path, catalogue: str | Path,
                  registered_model: str | None = None,
                  metrics: dict[str, float] | None = None,
                  example_image: bytes | None = None) -> dict[str, Any]:
    """Save the pyfunc and log it as artifacts `retriever/` of run `run_id` (its status is
    left as it was); with `registered_model`, register it as a new version tagged with
    `metrics` and point alias "candidate" at it. Everything goes through one explicit client
    bound to `tracking_uri`: MLflow's global tracking URI and active run are never touched.
    `example_image` (a top's JPEG bytes; default a grey square) is the logged input example,
    which MLflow's UI shows as the request format.

    Returns {"model_uri", "run_model_uri", "version"} (version None when not registered)."""
    import mlflow.pyfunc
    import pandas as pd
    from mlflow.exceptions import MlflowException

    from geco.serving import DEFAULT_K, DEFAULT_SEED, signature

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
        example = pd.DataFrame({"image": [example_image or _grey_jpeg()]})
        # With a signature given, save_model stores the example without running the model.
        mlflow.pyfunc.save_model(
            str(model_dir), python_model=str(PACKAGE_DIR / "serving_model.py"),
            code_paths=[_package_copy(Path(tmp) / "code")], artifacts=artifacts,
            signature=signature(), pip_requirements=_requirements(),
            # Declared so that load_model(..., model_config={"catalogue": URI}) may set it.
            model_config={"catalogue": ""},
            input_example=(example, {"k": DEFAULT_K, "seed": DEFAULT_SEED}))
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
        previous = _alias(client, registered_model, CANDIDATE)
        _append(client, registered_model, [int(mv.version)], action="register",
                decision="registered", alias=CANDIDATE, version=int(mv.version),
                from_version=None if previous is None else int(previous.version),
                to_version=int(mv.version))
        client.set_registered_model_alias(registered_model, CANDIDATE, str(mv.version))
        out["version"] = int(mv.version)
        out["model_uri"] = f"models:/{registered_model}/{mv.version}"
    return out


def _version(client: Any, name: str, version: int | str):
    from mlflow.exceptions import MlflowException

    from geco.tracking import is_unreachable

    try:
        return client.get_model_version(name, str(version))
    except MlflowException as exc:
        if is_unreachable(exc):  # no answer is not "no such version"
            raise
        known = _versions(client, name)
        raise GecoError(f"registered model {name!r} has no version {version} "
                        f"(versions: {', '.join(map(str, known)) or 'none'})") from None


def _versions(client: Any, name: str) -> list[int]:
    from mlflow.exceptions import MlflowException

    from geco.tracking import is_unreachable

    try:
        found = client.search_model_versions(f"name = '{name}'")
    except MlflowException as exc:
        if is_unreachable(exc):
            raise
        return []
    return sorted(int(mv.version) for mv in found)


def _alias(client: Any, name: str, alias: str):
    from mlflow.exceptions import MlflowException

    from geco.tracking import is_unreachable

    try:
        return client.get_model_version_by_alias(name, alias)
    except MlflowException as exc:
        if is_unreachable(exc):  # an unanswered question is not "no champion"
            raise
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


def check_margin(margin: float, *, force: bool = False, name: str = "margin") -> bool:
    """Whether the gate runs with a forced margin: a NaN, infinite or negative `margin` raises
    a ConfigError naming `name` unless `force`, and is then forced (True). Such a margin is
    never a good default: a negative one promotes a worse model, NaN refuses every version."""
    margin = float(margin)
    if math.isfinite(margin) and margin >= 0:
        return False
    if not force:
        raise ConfigError(f"{name}={margin:g}: the gate needs a finite margin >= 0 (a negative "
                          "one promotes a worse model, NaN refuses every one); --force gates "
                          "with it anyway and records that")
    return True


def _reason(metric: str, v: int, cand: float, c: int | None, champ_value: float | None,
            margin: float, accepted: bool, forced: bool) -> str:
    if c is None:
        return f"no champion yet: version {v} becomes the champion"
    if not forced:
        verb = "beats" if accepted else "does not beat"
        return (f"{metric} {cand:.6g} of version {v} {verb} champion version {c}'s "
                f"{champ_value:.6g} + margin {margin:g}")
    # A forced margin may accept a worse model: say how the two compare, not how the sum does.
    verb = "beats" if cand > champ_value else "does not beat"
    return (f"{metric} {cand:.6g} of version {v} {verb} champion version {c}'s "
            f"{champ_value:.6g}; {'accepted' if accepted else 'refused'} under the forced "
            f"margin {margin:g}")


def promote(client_or_uri: Any, name: str, version: int | str, *, metric: str,
            margin: float, force: bool = False) -> dict[str, Any]:
    """The gate: make `version` the champion iff there is none or its `metric` beats the
    champion's by more than `margin` (finite, >= 0 unless `force`; see check_margin).

    Every decision is appended to the trail (a gate.history.* record on the version, on the
    champion it replaces and on the registered model) and summarised as the version's gate.*
    tags. Promoting the current champion decides nothing: no tag is written."""
    forced = check_margin(margin, force=force)
    client = _client(client_or_uri)
    mv = _version(client, name, version)
    # MLflow hands versions back as int or str depending on the call: compare ints only.
    v = int(mv.version)
    champ = _alias(client, name, CHAMPION)
    c = None if champ is None else int(champ.version)
    if c == v:
        return {"name": name, "version": v, "champion": v, "gate.decision": "unchanged",
                "gate.reason": f"already champion: version {v} is the champion; nothing "
                               "decided, no tag written"}
    cand = _metric(client, mv, metric)
    if cand is None or math.isnan(cand):
        raise GecoError(f"{name} version {v} has no {metric!r} (neither a version tag nor a "
                        f"metric of run {mv.run_id}, or it is NaN)")
    champ_value = None
    if champ is not None:
        champ_value = _metric(client, champ, metric)
        if champ_value is None or math.isnan(champ_value):
            raise GecoError(f"champion {name} version {c} has no {metric!r} to compare with; "
                            "choose a metric both versions have")
    accepted = c is None or cand > champ_value + margin
    decision = {
        "gate.decision": "accepted" if accepted else "refused",
        "gate.metric": metric,
        "gate.candidate": f"{cand:.10g}",
        "gate.champion": "none" if champ_value is None else f"{champ_value:.10g}",
        "gate.champion_version": "none" if c is None else str(c),
        "gate.margin": f"{margin:g}",
        "gate.forced": "true" if forced else "false",
        "gate.reason": _reason(metric, v, cand, c, champ_value, margin, accepted, forced),
    }
    # Recorded before the alias moves: a move is never left without its record.
    _append(client, name, [v] if c is None or not accepted else [v, c], action="promote",
            decision=decision["gate.decision"], alias=CHAMPION, version=v, from_version=c,
            to_version=v if accepted else c, metric=metric, value=cand,
            champion_value=champ_value, margin=margin, forced=forced,
            reason=decision["gate.reason"])
    # The summary tags others read (geco.cluster.driver, the UI): only the changed ones.
    for key, value in decision.items():
        if (mv.tags or {}).get(key) != value:
            client.set_model_version_tag(name, str(v), key, value)
    if accepted:
        client.set_registered_model_alias(name, CHAMPION, str(v))
        if c is not None:
            client.set_model_version_tag(name, str(v), PREVIOUS_TAG, str(c))
    return {"name": name, "version": v, "champion": v if accepted else c, **decision}


def rollback(client_or_uri: Any, name: str) -> dict[str, Any]:
    """Point "champion" back at the version the current champion replaced (recorded in the
    trail of both versions and of the registered model)."""
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
    _append(client, name, [c, back], action="rollback", decision="rolled back",
            alias=CHAMPION, version=back, from_version=c, to_version=back)
    client.set_registered_model_alias(name, CHAMPION, str(back))
    client.set_model_version_tag(name, str(c), "gate.rolled_back_to", str(back))
    client.set_model_version_tag(name, str(back), "gate.rolled_back_from", str(c))
    return {"name": name, "champion": back, "rolled_back_from": c}


# The trail: one JSON record per gate decision or alias move, each under a key of its own
# (gate.history.<UTC time>) on the registered model and on the versions concerned, so that
# a later record never rewrites an earlier one and the keys sort oldest first.
HISTORY_TAG = "gate.history."


def _json_number(x: Any) -> Any:
    # JSON has no NaN or infinity (a forced margin may be either): keep those as strings.
    return str(x) if isinstance(x, float) and not math.isfinite(x) else x


def _who() -> tuple[str, str]:
    import getpass
    import socket

    try:
        user = getpass.getuser()
    except (KeyError, OSError):  # a container user without a passwd entry
        user = "unknown"
    return user, socket.gethostname()


def _append(client: Any, name: str, versions: list[int], **fields: Any) -> dict[str, Any]:
    """Append one record to the trail of `name` and of each of `versions`."""
    from datetime import UTC, datetime

    now = datetime.now(UTC)
    user, host = _who()
    record = {"time": now.strftime("%Y-%m-%dT%H:%M:%S.%fZ"),
              **{k: _json_number(v) for k, v in fields.items()}, "user": user, "host": host}
    base = HISTORY_TAG + now.strftime("%Y%m%dT%H%M%S.%fZ")
    taken = set(client.get_registered_model(name).tags or {})
    key, n = base, 1
    while key in taken:  # two records in one microsecond: never overwrite the first
        n += 1
        key = f"{base}-{n}"
    value = json.dumps(record)
    client.set_registered_model_tag(name, key, value)
    for v in versions:
        client.set_model_version_tag(name, str(v), key, value)
    return record


def _history(tags: dict[str, str]) -> dict[str, dict[str, Any]]:
    """The trail records among `tags`, by key."""
    out = {}
    for key, value in tags.items():
        if key.startswith(HISTORY_TAG):
            try:
                record = json.loads(value)
            except ValueError:
                record = None
            # Edited by hand into something else: shown as it is.
            out[key] = record if isinstance(record, dict) else {
                "time": key.removeprefix(HISTORY_TAG), "raw": value}
    return out


def describe(client_or_uri: Any, name: str) -> list[dict[str, Any]]:
    """Every version, oldest first, with its aliases, run, tags and "history": its trail
    records, oldest first, kept out of "tags" (for `promote.py show`)."""
    client = _client(client_or_uri)
    out = []
    for v in _versions(client, name):
        mv = client.get_model_version(name, str(v))
        tags = dict(mv.tags or {})
        history = _history(tags)
        out.append({"version": int(mv.version), "aliases": sorted(mv.aliases or []),
                    "run_id": mv.run_id,
                    "tags": {k: t for k, t in tags.items() if k not in history},
                    "history": [history[k] for k in sorted(history)]})
    return out


def trail(client_or_uri: Any, name: str) -> list[dict[str, Any]]:
    """Every gate decision and alias move of registered model `name`, oldest first: the
    model's records merged with its versions' copies, should a tag of the model be lost."""
    from mlflow.exceptions import MlflowException

    client = _client(client_or_uri)
    try:
        records = _history(dict(client.get_registered_model(name).tags or {}))
    except MlflowException:
        return []
    for v in _versions(client, name):
        records.update(_history(dict(client.get_model_version(name, str(v)).tags or {})))
    return [records[k] for k in sorted(records)]


# ---------------------------------------------------------------------------------------------
# The retrieval gallery of a registered version.

GALLERY_PATH = "gallery/retrieval_gallery.html"
GALLERY_TAG = "geco.gallery"


def log_gallery(run_id: str, *, tracking_uri: str, geco_checkpoint: str | Path,
                generator_checkpoint: str | Path, data: Any, split: str = "valid",
                n: int = 24, metrics: dict[str, float] | None = None,
                registered_model: str | None = None, version: int | None = None
                ) -> dict[str, Any]:
    """Build the retrieval gallery (geco.gallery) of the first `n` rows of `split` (distinct
    tops), ranked over that split's candidate bottoms, and log it as run `run_id`'s artifact
    gallery/retrieval_gallery.html; with a registered version, tag it `geco.gallery` with the
    artifact's URI. Returns {"artifact", "uri", "rows"}."""
    import torch

    from geco.gallery import write_gallery
    from geco.models.geco import load_retriever
    from geco.serving import make_bundle

    client = _client(tracking_uri)
    splits, images = data.splits((split,))
    s = splits[split]
    first: dict[str, str] = {}  # top -> its first row's bottom
    for top, bottom in zip(s.tops, s.bottoms, strict=True):
        first.setdefault(top, bottom)
        if len(first) == n:
            break
    rows = list(first.items())
    with tempfile.TemporaryDirectory() as tmp:
        retriever, ckpt = load_retriever(geco_checkpoint, torch.device("cpu"),
                                         generator_path=generator_checkpoint)
        size = int(ckpt["config"]["data"]["image_size"])
        cat = build_catalogue(retriever, data, split, Path(tmp) / "catalogue.pt",
                              image_size=size)
        bundle = make_bundle(retriever, size, cat, data.describe(split), str(geco_checkpoint))
        title = (f"{registered_model} version {version}" if registered_model and version
                 else f"run {run_id}") + f": retrievals on the {split} split"
        notes = {"run": run_id, "catalogue": f"{len(cat['ids'])} candidate bottoms of "
                 f"{data.describe(split)}", "image size": f"{size} px",
                 "popularity weight": f"{retriever.prior_weight:g}"}
        page = write_gallery(bundle, rows, images, Path(tmp) / Path(GALLERY_PATH).name,
                             title=title, metrics=dict(metrics or {}), notes=notes)
        client.log_artifact(run_id, str(page), str(Path(GALLERY_PATH).parent))
    uri = f"{client.get_run(run_id).info.artifact_uri.rstrip('/')}/{GALLERY_PATH}"
    if registered_model and version:
        client.set_model_version_tag(registered_model, str(version), GALLERY_TAG, uri)
    return {"artifact": GALLERY_PATH, "uri": uri, "rows": len(rows)}
