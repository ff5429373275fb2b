"""The MLflow layer of geco: runs for the training drivers and the Ray workers, and the one
client factory the registry uses too.

Every call goes through an explicit `mlflow.MlflowClient` bound to one URI (`client(uri)`; no
fluent global state, so threads, Tune trials and Train workers cannot steal each other's
active run). MLflow is imported lazily: `import geco.tracking` stays cheap and works without
the orchestration extra.

Failure policy (`tracking.on_error`): "fail" raises `TrackingError` naming the URI; "warn" logs
one warning on the "geco" logger and turns the tracker into a no-op (run_id None), so training
goes on untracked but never silently. Either way the tracker keeps its first failure
(`Tracker.failure`: what it was doing, and why) for the job's summary, and ending a run as
FAILED or KILLED never raises: the error that ended it is the one to report.
"""

from __future__ import annotations

import json
import logging
import math
import numbers
import os
import time
import urllib.error
import urllib.request
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from geco.errors import ConfigError, TrackingError

log = logging.getLogger("geco")

# MLflow's limits (mlflow.utils.validation), restated so this module does not import mlflow.
MAX_PARAM_VALUE = 6000
MAX_TAG_VALUE = 8000
# Config keys never sent to the tracking server, whatever their value.
SECRET_MARKERS = ("secret", "password", "token", "access_key")
START_HINT = "start it (infra/local/mlflow.sh start) or set tracking.on_error=warn / tracking.enabled=false"


# Metrics every registered GECo version carries (its run logs them): what the gate may compare.
GATE_METRICS = tuple(f"{split}_{m}" for split in ("valid", "test")
                     for m in ("auc_1vs1", "auc_1vs3", "mrr_1vs9", "mrr_full", "recall_at_1",
                               "recall_at_10", "ndcg_at_1", "ndcg_at_10"))


@dataclass
class TrackingConfig:
    """MLflow tracking of the Ray jobs and `geco compare`."""

    enabled: bool = True
    # Tracking server or store; empty = $MLFLOW_TRACKING_URI, else a local sqlite store
    # (sqlite:///<cwd>/runs/mlflow.db).
    uri: str = ""
    experiment: str = "geco"
    # fail | warn: an unreachable server stops the run (named), or the run goes on untracked
    # with a warning; never silently.
    on_error: Literal["fail", "warn"] = "fail"
    registered_model: str = "geco-retriever"
    # Promotion gate: the candidate's validation metric must beat the champion's by `margin`.
    gate_metric: str = "valid_auc_1vs1"
    gate_margin: float = 0.0

    def validate(self, key: str) -> None:
        # The gate reads this metric of a registered version: a name no run logs would refuse
        # every candidate only after training.
        if self.gate_metric not in GATE_METRICS:
            raise ConfigError(f"{key}.gate_metric={self.gate_metric!r}: expected one of "
                              f"{', '.join(GATE_METRICS)}")
        if not math.isfinite(self.gate_margin) or self.gate_margin < 0:
            # A negative margin would promote a candidate worse than the champion.
            raise ConfigError(f"{key}.gate_margin={self.gate_margin}: must be a finite "
                              "number >= 0")


@dataclass(frozen=True)
class TrackingFailure:
    """The first MLflow failure of a tracker: what it was doing (`when`, e.g. "logging epoch 2
    of run 1f3c..."), why (`cause`, e.g. "ConnectionRefusedError: [Errno 111] Connection
    refused") and when (`time`, seconds since the epoch: the first of several failures, in
    the driver or on a worker, is the one to name)."""

    when: str
    cause: str
    unreachable: bool = False
    time: float = field(default_factory=time.time)

    @classmethod
    def of(cls, when: str, exc: BaseException) -> TrackingFailure:
        root = _network_error(exc)
        if root is not None:
            return cls(when, f"{type(root).__name__}: {root}", unreachable=True)
        text = str(exc).strip().splitlines()
        cause = str(exc) if isinstance(exc, TrackingError) else (
            f"{type(exc).__name__}: {text[0] if text else ''}")
        return cls(when, cause)

    def message(self, uri: str, *, hint: bool) -> str:
        """One line naming the server, what failed and why (with how to fix it if `hint`)."""
        if self.unreachable:
            text = f"MLflow tracking server {uri} unreachable while {self.when}: {self.cause}"
        else:
            text = f"MLflow tracking at {uri} failed while {self.when}: {self.cause}"
        return f"{text}; {START_HINT}" if hint else text

    # A Ray worker's failure reaches the driver in the metrics it reports (flat values).
    def fields(self) -> dict[str, Any]:
        return {"mlflow_failure": self.when, "mlflow_failure_cause": self.cause,
                "mlflow_failure_time": self.time}

    @classmethod
    def from_fields(cls, record: Mapping[str, Any]) -> TrackingFailure | None:
        if not record.get("mlflow_failure"):
            return None
        return cls(str(record["mlflow_failure"]), str(record.get("mlflow_failure_cause", "")),
                   time=float(record.get("mlflow_failure_time") or 0.0))


def _chain(exc: BaseException) -> Iterator[BaseException]:
    seen: set[int] = set()
    cur: BaseException | None = exc
    while cur is not None and id(cur) not in seen:
        seen.add(id(cur))
        yield cur
        cur = cur.__cause__ or cur.__context__


def _is_connection_error(exc: BaseException) -> bool:
    if isinstance(exc, (ConnectionError, TimeoutError)):
        return True
    try:  # what MLflow's REST client raises (wrapped in an MlflowException)
        from requests.exceptions import ConnectionError as RequestsConnectionError
        from requests.exceptions import Timeout
    except ImportError:
        return False
    return isinstance(exc, (RequestsConnectionError, Timeout))


def _network_error(exc: BaseException) -> BaseException | None:
    """The innermost OS error under a failed connection in `exc`'s chain ("[Errno 111]
    Connection refused" rather than three layers of HTTP client wrappers), else None."""
    chain = list(_chain(exc))
    if not any(_is_connection_error(e) for e in chain):
        return None
    return [e for e in chain if isinstance(e, OSError)][-1]


def is_unreachable(exc: BaseException) -> bool:
    """Whether `exc` is a connection failure (as opposed to an answer from the server)."""
    return _network_error(exc) is not None


def is_tracking_failure(exc: BaseException) -> bool:
    """Whether `exc` comes from MLflow or the network (and so follows tracking.on_error)."""
    if _network_error(exc) is not None:
        return True
    try:
        from mlflow.exceptions import MlflowException
    except ImportError:
        return False
    return any(isinstance(e, MlflowException) for e in _chain(exc))


def numeric(record: Mapping[str, Any], skip: tuple[str, ...] = ()) -> dict[str, float]:
    """The numbers of a record (an epoch, a metrics dict) as floats: what MLflow logs as
    metrics and Ray reports; booleans, strings and the keys in `skip` are left out."""
    return {k: float(v) for k, v in record.items() if _is_number(v) and k not in skip}


def resolve_uri(cfg: TrackingConfig) -> str:
    """cfg.uri, else $MLFLOW_TRACKING_URI, else a SQLite store in <cwd>/runs/mlflow.db."""
    if cfg.uri:
        return cfg.uri
    env = os.environ.get("MLFLOW_TRACKING_URI", "")
    if env:
        return env
    runs = Path.cwd() / "runs"
    runs.mkdir(parents=True, exist_ok=True)
    return f"sqlite:///{runs / 'mlflow.db'}"


def _is_http(uri: str) -> bool:
    return uri.startswith(("http://", "https://"))


def check_reachable(uri: str, timeout_s: float = 5.0) -> None:
    """For an http(s) tracking URI, GET {uri}/health; raise TrackingError if it does not answer.

    Other URIs (sqlite, file, databricks) are not checked here: opening them reports problems.
    """
    if not _is_http(uri):
        return
    url = uri.rstrip("/") + "/health"
    try:
        with urllib.request.urlopen(url, timeout=timeout_s) as resp:
            if resp.status != 200:
                raise TrackingError(
                    f"MLflow tracking server at {uri} is not reachable: /health answered "
                    f"HTTP {resp.status}"
                )
    except urllib.error.HTTPError as e:
        raise TrackingError(
            f"MLflow tracking server at {uri} is not reachable: /health answered HTTP {e.code}"
        ) from e
    except (urllib.error.URLError, OSError) as e:
        reason = getattr(e, "reason", e)
        raise TrackingError(f"MLflow tracking server at {uri} is not reachable: {reason}") from e


def _dataset_source(source: str) -> Any:
    """An mlflow.data source for a shard location or dataset folder (S3 or local artifact
    source, as MLflow resolves the URI)."""
    import warnings

    from mlflow.data.dataset_source_registry import resolve_dataset_source

    if "://" not in source:
        source = str(Path(source).expanduser().resolve())
    with warnings.catch_warnings():  # "can be interpreted in multiple ways": both are local
        warnings.simplefilter("ignore")
        return resolve_dataset_source(source)


def flatten_config(config: Mapping[str, Any], prefix: str = "") -> Iterator[tuple[str, str]]:
    """Nested dict -> ("a.b.c", str(value)) pairs, truncated to MLflow's limit, secrets dropped."""
    for key, value in config.items():
        name = f"{prefix}{key}"
        if any(marker in str(key).lower() for marker in SECRET_MARKERS):
            continue
        if isinstance(value, Mapping):
            yield from flatten_config(value, prefix=f"{name}.")
        else:
            yield name, str(value)[:MAX_PARAM_VALUE]


def _is_number(value: Any) -> bool:
    return isinstance(value, numbers.Real) and not isinstance(value, bool)


class Tracker:
    """One MLflow run, written through an explicit client; a no-op when disabled/degraded."""

    def __init__(self, cfg: TrackingConfig, *, uri: str = "", client: Any = None,
                 run_id: str | None = None, owned: bool = False) -> None:
        self.cfg = cfg
        self.uri = uri
        self.run_id: str | None = run_id if client is not None else None
        self._client = client
        # Only the creator of a run terminates it: an attached worker merely stops logging.
        self._owned = owned
        self._ended = self.run_id is None
        self.failure: TrackingFailure | None = None  # the first, in either on_error mode
        self._pending: list[Any] = []  # asynchronous log calls not yet known to have landed

    @property
    def enabled(self) -> bool:
        return self.run_id is not None and not self._ended

    # -- construction -------------------------------------------------------------------------

    @classmethod
    def start(cls, cfg: TrackingConfig, *, run_name: str, parent_run_id: str | None = None,
              tags: dict[str, str] | None = None) -> Tracker:
        """Create a run (a child of parent_run_id if given) in cfg.experiment."""
        if not cfg.enabled:
            return cls(cfg)
        uri = resolve_uri(cfg)
        try:
            check_reachable(uri)
            mlflow_client = client(uri)
            experiment_id = _experiment_id(mlflow_client, cfg.experiment, uri)
            run_tags = {k: str(v)[:MAX_TAG_VALUE] for k, v in (tags or {}).items()}
            if parent_run_id:
                run_tags["mlflow.parentRunId"] = parent_run_id
            run = mlflow_client.create_run(experiment_id, run_name=run_name, tags=run_tags)
        except Exception as e:  # noqa: BLE001 - any failure follows the on_error policy
            message = str(e) if isinstance(e, TrackingError) else (
                f"MLflow tracking at {uri} failed to start run {run_name!r}: "
                f"{type(e).__name__}: {e}"
            )
            message = f"{message}; {START_HINT}"
            if cfg.on_error == "warn":
                log.warning("%s (tracking disabled for this run)", message)
                return cls._failed(cfg, uri, f"opening run {run_name!r}", e)
            raise TrackingError(message) from e
        return cls(cfg, uri=uri, client=mlflow_client, run_id=run.info.run_id, owned=True)

    @classmethod
    def resume_or_start(cls, cfg: TrackingConfig, *, key: str, run_name: str,
                        parent_run_id: str | None = None,
                        tags: dict[str, str] | None = None) -> tuple[Tracker, bool]:
        """(tracker, created): the run tagged `geco.run_key=key` in cfg.experiment, reopened
        (a resubmitted job continues its runs), else a new one. The reopened run is owned."""
        if not cfg.enabled:
            return cls(cfg), False
        uri = resolve_uri(cfg)
        try:
            check_reachable(uri)
            mlflow_client = client(uri)
            experiment_id = _experiment_id(mlflow_client, cfg.experiment, uri)
            found = mlflow_client.search_runs([experiment_id], max_results=1,
                                       filter_string=f"tags.`geco.run_key` = '{key}'")
        except Exception as e:  # noqa: BLE001 - same policy as start()
            message = str(e) if isinstance(e, TrackingError) else (
                f"MLflow tracking at {uri} failed to look up run {key!r}: "
                f"{type(e).__name__}: {e}")
            if cfg.on_error == "warn":
                log.warning("%s; %s (tracking disabled for this run)", message, START_HINT)
                return cls._failed(cfg, uri, f"looking up run {key!r}", e), False
            raise TrackingError(f"{message}; {START_HINT}") from e
        if found:
            tracker = cls(cfg, uri=uri, client=mlflow_client, run_id=found[0].info.run_id,
                          owned=True)
            tracker._call("reopening the run", mlflow_client.update_run, tracker.run_id,
                          status="RUNNING")
            return tracker, False
        tracker = cls.start(cfg, run_name=run_name, parent_run_id=parent_run_id,
                            tags={**(tags or {}), "geco.run_key": key})
        return tracker, tracker.enabled

    @classmethod
    def attach(cls, cfg: TrackingConfig, run_id: str | None) -> Tracker:
        """Log into an existing run (e.g. inside a Ray worker); None -> a disabled tracker.

        The attached tracker does not terminate the run on end(): its creator does.
        """
        if not cfg.enabled or not run_id:
            return cls(cfg)
        uri = resolve_uri(cfg)
        try:
            mlflow_client = client(uri)
        except Exception as e:  # noqa: BLE001
            if cfg.on_error == "warn":
                log.warning("MLflow tracking at %s unavailable (%s); not logging", uri, e)
                return cls._failed(cfg, uri, f"attaching to run {run_id}", e)
            raise TrackingError(f"MLflow tracking at {uri} unavailable: {e}") from e
        return cls(cfg, uri=uri, client=mlflow_client, run_id=run_id, owned=False)

    @classmethod
    def _failed(cls, cfg: TrackingConfig, uri: str, when: str, exc: BaseException) -> Tracker:
        """The no-op tracker of a run that could not be opened (warn), failure kept."""
        tracker = cls(cfg, uri=uri)
        tracker.failure = TrackingFailure.of(when, exc)
        return tracker

    # -- logging ------------------------------------------------------------------------------

    def _call(self, what: str, fn: Any, *args: Any, **kwargs: Any) -> Any:
        """Run one client call under the on_error policy; `what` says what it does ("logging
        epoch 2"), for the message naming the failure. Returns the call's result (None if it
        failed under warn)."""
        if not self.enabled:
            return None
        try:
            return fn(*args, **kwargs)
        except Exception as e:  # noqa: BLE001 - network, server and store errors alike
            failure = TrackingFailure.of(f"{what} of run {self.run_id}", e)
            self.failure = self.failure or failure
            if self.cfg.on_error != "warn":
                raise TrackingError(failure.message(self.uri, hint=True)) from e
            log.warning("%s; tracking disabled for the rest of this run",
                        failure.message(self.uri, hint=False))
            self._degrade()
            return None

    def _degrade(self) -> None:
        self._client = None
        self.run_id = None
        self._ended = True

    def log_config(self, config: Mapping[str, Any]) -> None:
        """Log a nested config as flattened dotted params ("geco.alpha"), in batches."""
        if not self.enabled:
            return
        from mlflow.entities import Param

        params = [Param(k, v) for k, v in flatten_config(config)]
        # log_batch splits into MLflow's 100-params-per-request chunks itself.
        self._call("logging params", self._client.log_batch, self.run_id, params=params)

    def log_metrics(self, metrics: Mapping[str, Any], step: int | None = None, *,
                    what: str = "", synchronous: bool = True) -> None:
        """Log the numeric values of `metrics` at `step` (others are ignored); `what` names
        them in a failure ("logging epoch 2"; default: "logging metrics at step N").

        synchronous=False queues the batch in MLflow's asynchronous logger (training steps:
        the loop does not wait on the server); `flush` waits for what is queued and reports
        a failure under the on_error policy."""
        if not self.enabled:
            return
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        batch = [Metric(k, v, now, step or 0) for k, v in numeric(metrics).items()]
        if not batch:
            return
        what = what or f"logging metrics at step {step or 0}"
        if synchronous:
            self._call(what, self._client.log_batch, self.run_id, metrics=batch)
            return
        ops = self._call(what, self._client.log_batch, self.run_id, metrics=batch,
                         synchronous=False)
        if ops is not None:
            self._pending.append((what, ops))

    def flush(self) -> None:
        """Wait for the asynchronous log calls; the first that failed follows on_error."""
        pending, self._pending = self._pending, []
        for what, ops in pending:
            self._call(what, ops.wait)

    def log_image(self, path: str | Path, key: str, step: int, *, what: str = "") -> None:
        """A picture as an MLflow image with a step (the run page's image slider), e.g. the
        template grid of each epoch under key "templates"."""
        if not self.enabled:
            return
        from PIL import Image

        with Image.open(path) as im:
            image = im.convert("RGB")
        self._call(what or f"logging image {key} at step {step}", self._client.log_image,
                   self.run_id, image, key=key, step=int(step))

    def log_dataset(self, *, name: str, source: str, digest: str, context: str,
                    schema: Mapping[str, Any] | None = None) -> None:
        """A dataset input of the run (the run page's Datasets panel and `mlflow.data`
        lineage): `source` where it lives (an s3:// prefix, a folder), `digest` what it held
        (geco: the shard manifest's sha256), `context` how the run used it (training,
        evaluation)."""
        if not self.enabled:
            return
        from mlflow.entities import Dataset, DatasetInput, InputTag

        def log() -> None:
            data_source = _dataset_source(source)
            entity = Dataset(name=name, digest=digest[:36],
                             source_type=data_source._get_source_type(),
                             source=data_source.to_json(),
                             profile=json.dumps(dict(schema or {}), sort_keys=True))
            self._client.log_inputs(self.run_id, datasets=[DatasetInput(
                entity, tags=[InputTag("mlflow.data.context", context)])])

        self._call(f"logging dataset {name}", log)

    def logged_steps(self, key: str) -> set[int]:
        """The steps at which metric `key` was logged in this run (empty when disabled)."""
        steps: set[int] = set()

        def read() -> None:
            steps.update(int(m.step) for m in self._client.get_metric_history(self.run_id, key))

        self._call(f"reading the logged steps of {key}", read)
        return steps

    def log_artifact(self, path: str | Path, artifact_path: str | None = None, *,
                     what: str = "") -> None:
        """Upload one local file (or folder) into the run's artifacts."""
        if not self.enabled:
            return
        upload = self._client.log_artifacts if Path(path).is_dir() else self._client.log_artifact
        self._call(what or f"uploading {path}", upload, self.run_id, str(path), artifact_path)

    def set_tags(self, tags: Mapping[str, Any]) -> None:
        if not self.enabled or not tags:
            return
        from mlflow.entities import RunTag

        batch = [RunTag(k, str(v)[:MAX_TAG_VALUE]) for k, v in tags.items()]
        self._call("setting tags", self._client.log_batch, self.run_id, tags=batch)

    def end(self, status: str = "FINISHED") -> None:
        """Terminate the run with `status` (FINISHED, FAILED, KILLED); idempotent. Only
        FINISHED can raise: a run ends otherwise because something failed (often the tracking
        server itself), and that failure, not this one, is the error to report."""
        if not self.enabled:
            return
        steps = [self.flush]  # queued step metrics first; the run is ended even if they fail
        if self._owned:
            steps.append(lambda: self._call(f"ending the run as {status}",
                                            self._client.set_terminated, self.run_id, status))
        for step in steps:
            try:
                step()
            except TrackingError as e:
                if status == "FINISHED":
                    raise
                log.warning("%s", e)
        self._ended = True

    def __enter__(self) -> Tracker:
        return self

    def __exit__(self, exc_type: Any, exc: Any, tb: Any) -> None:
        self.end("FINISHED" if exc_type is None else "FAILED")


def client(uri: str | None) -> Any:
    """An MlflowClient bound to `uri` for tracking and the model registry alike."""
    try:
        import mlflow
    except ImportError as e:
        raise TrackingError(
            "MLflow tracking is enabled but mlflow is not installed: "
            "pip install -e '.[orchestration]' or set tracking.enabled=false"
        ) from e
    return mlflow.MlflowClient(tracking_uri=uri, registry_uri=uri)


def _experiment_id(client: Any, name: str, uri: str) -> str:
    """The id of experiment `name`, created if missing (tolerating a concurrent creator)."""
    from mlflow.exceptions import MlflowException

    exp = client.get_experiment_by_name(name)
    if exp is not None:
        return exp.experiment_id
    location = None
    if uri.startswith("sqlite:///"):
        # MLflow's default for a database store is ./mlruns under the *current* directory;
        # keep the artifacts next to the database instead.
        location = (Path(uri.removeprefix("sqlite:///")).parent / "mlartifacts").as_uri()
    try:
        return client.create_experiment(name, artifact_location=location)
    except MlflowException:
        exp = client.get_experiment_by_name(name)
        if exp is None:
            raise
        return exp.experiment_id
