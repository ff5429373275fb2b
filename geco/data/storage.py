"""Object storage for shards and checkpoints: a local folder or an S3 prefix, one API.

    store = Storage("s3://bucket/shards/synthetic")    # or Storage("runs/shards")
    store.sync_dir(Path("out/shards"))                  # uploads what changed, skips the rest
    with store.open_stream("train-000000.tar") as f: ...

S3 goes through boto3 (imported lazily). Endpoint, region and credentials come from the
standard AWS environment variables and config files (`AWS_ENDPOINT_URL` is honoured, so any
S3 API works: AWS, SeaweedFS, MinIO); addressing is path-style. Every upload stores the
object's sha256 as user metadata `sha256`, so re-running an upload transfers only objects whose
content changed: an interrupted upload resumes and nothing is duplicated. Large files go up in
parts (boto3 TransferConfig, threshold configurable); `sync_dir` uploads several objects at once.

Retries follow the standard AWS settings (AWS_MAX_ATTEMPTS / AWS_RETRY_MODE, or max_attempts /
retry_mode in the AWS config file) as botocore resolves them; only when none is set does geco
use its own: 5 attempts, standard mode. Timeouts have no standard setting: GECO_S3_CONNECT_TIMEOUT
(5 s) and GECO_S3_READ_TIMEOUT (60 s).

Every failure is a `StorageError` naming the object URL and a plain reason (bad credentials,
missing bucket, missing object, unreachable endpoint). A secret never appears in a message.

`register_webdataset_s3()` lets `webdataset` open `s3://bucket/key` URLs through boto3
(no external CLI, no s3fs).
"""

from __future__ import annotations

import hashlib
import logging
import os
import tempfile
from concurrent.futures import ThreadPoolExecutor, as_completed
from pathlib import Path
from typing import IO, Any

from geco.errors import GecoError

MiB = 1024 * 1024
DEFAULT_MULTIPART_THRESHOLD = 8 * MiB
MIN_PART_SIZE = 5 * MiB  # S3's minimum part size (all but the last part)
SYNC_THREADS = 8  # objects `sync_dir` uploads at once
_FILE_CONCURRENCY = 4  # parts of one multipart upload in flight at once
_HASH_BLOCK = 1 * MiB
_TMP_MARK = ".tmp-"  # local-mode temporary files: ".<name>.tmp-XXXX", never listed

_AUTH_CODES = {
    "AccessDenied",
    "InvalidAccessKeyId",
    "SignatureDoesNotMatch",
    "InvalidToken",
    "ExpiredToken",
    "InvalidClientTokenId",
    "AuthorizationHeaderMalformed",
    "403",
    "Forbidden",
}
_MISSING_KEY_CODES = {"NoSuchKey", "404", "NotFound"}


class StorageError(GecoError):
    """A storage operation failed; the message names the object and the reason, never a secret."""


# --------------------------------------------------------------------------------------- URLs


def is_s3(url: str) -> bool:
    return str(url).startswith("s3://")


def parse_s3_url(url: str) -> tuple[str, str]:
    """"s3://bucket/key/prefix" -> ("bucket", "key/prefix"); "s3://bucket" -> ("bucket", "")."""
    if not is_s3(url):
        raise StorageError(f"not an S3 URL: {url!r} (expected s3://bucket/key)")
    bucket, _, key = url[len("s3://") :].partition("/")
    if not bucket:
        raise StorageError(f"malformed S3 URL {url!r}: no bucket (expected s3://bucket/key)")
    return bucket, key


def _join(*parts: str) -> str:
    return "/".join(p.strip("/") for p in parts if p and p.strip("/"))


def _check_name(name: str) -> str:
    name = str(name).replace(os.sep, "/")
    if not name or name.startswith("/") or any(p in ("", ".", "..") for p in name.split("/")):
        raise StorageError(f"invalid object name {name!r}: use a relative path like 'a/b.tar'")
    return name


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(_HASH_BLOCK):
            h.update(block)
    return h.hexdigest()


# ----------------------------------------------------------------------------------- S3 client


# Retries where no standard AWS setting says otherwise: a busy S3 server (a node restarting
# while the others upload) needs more than botocore's 3 attempts.
DEFAULT_MAX_ATTEMPTS = 5  # attempts in all, the first included
DEFAULT_RETRY_MODE = "standard"
_BOTOCORE_ATTEMPTS = {"legacy": 5}  # botocore's own defaults when only the mode is set; else 3
_RETRY_SETTINGS = (("max_attempts", "AWS_MAX_ATTEMPTS"), ("retry_mode", "AWS_RETRY_MODE"))
_warned_geco_attempts = False


def _timeouts() -> tuple[float, float]:
    """(connect, read) seconds: AWS has no standard variable for these, so geco's own."""
    return (float(os.environ.get("GECO_S3_CONNECT_TIMEOUT", "5")),
            float(os.environ.get("GECO_S3_READ_TIMEOUT", "60")))


def _warn_retired_setting() -> None:
    """GECO_S3_MAX_ATTEMPTS once overrode the standard settings: say (once) it is ignored."""
    global _warned_geco_attempts
    if "GECO_S3_MAX_ATTEMPTS" in os.environ and not _warned_geco_attempts:
        _warned_geco_attempts = True
        logging.getLogger("geco").warning(
            "GECO_S3_MAX_ATTEMPTS is no longer read: set AWS_MAX_ATTEMPTS (or max_attempts "
            "in the AWS config file) instead")


def _standard_retries(session) -> bool:
    """Whether AWS_MAX_ATTEMPTS / AWS_RETRY_MODE or the profile's max_attempts / retry_mode
    (AWS config file) are set: then botocore resolves the retry policy as documented."""
    _warn_retired_setting()
    if any(env in os.environ for _, env in _RETRY_SETTINGS):
        return True
    from botocore.exceptions import ProfileNotFound

    try:
        profile = session.get_scoped_config()
    except ProfileNotFound:
        return False  # creating the client names the missing profile
    return any(key in profile for key, _ in _RETRY_SETTINGS)


def retry_policy(session=None) -> tuple[int, str]:
    """(attempts in all, retry mode) of S3 calls: the standard AWS settings resolved as
    botocore does when any is set, else geco's defaults (5, standard)."""
    import botocore.session

    session = session or botocore.session.get_session()
    if not _standard_retries(session):
        return DEFAULT_MAX_ATTEMPTS, DEFAULT_RETRY_MODE
    mode = session.get_config_variable("retry_mode") or "standard"
    attempts = session.get_config_variable("max_attempts")
    return int(attempts or _BOTOCORE_ATTEMPTS.get(mode, 3)), mode


def s3_client():
    """A boto3 S3 client from the standard AWS env/config (AWS_ENDPOINT_URL honoured).

    Path-style addressing (works with any S3 server on any host name), bounded connect/read
    timeouts. Retries: botocore's own resolution of AWS_MAX_ATTEMPTS / AWS_RETRY_MODE and the
    profile's max_attempts / retry_mode when any is set; otherwise geco's defaults (5
    attempts, standard mode). Not fork-safe: create one per process.
    """
    import boto3
    import botocore.session
    from botocore.config import Config

    session = botocore.session.get_session()
    connect, read = _timeouts()
    options: dict[str, Any] = {
        "s3": {"addressing_style": "path"}, "connect_timeout": connect, "read_timeout": read,
        "max_pool_connections": SYNC_THREADS * _FILE_CONCURRENCY,
    }
    if not _standard_retries(session):  # an explicit Config would override the standard ones
        options["retries"] = {"total_max_attempts": DEFAULT_MAX_ATTEMPTS,
                              "mode": DEFAULT_RETRY_MODE}
    return boto3.session.Session(botocore_session=session).client("s3", config=Config(**options))


def arrow_location(url: str) -> tuple[str, Any]:
    """(path, pyarrow filesystem or None) for a Ray storage location (`RunConfig`'s
    storage_path/storage_filesystem, `Checkpoint(path, filesystem)`).

    For s3:// an S3FileSystem from the standard AWS environment (endpoint, region, credentials
    file: no key is put in the object, so pickling it to workers carries no secret) with the
    timeouts of `s3_client` and the attempts of `retry_policy` (pyarrow's strategy is always
    the standard one): pyarrow's own defaults (the AWS SDK's 1 s connect, 3 s without a byte)
    fail checkpoint uploads and restores when the S3 server is busy. Anything else: as given,
    and None (Ray resolves it).
    """
    if not is_s3(url):
        return url, None
    from pyarrow import fs

    bucket, key = parse_s3_url(url.rstrip("/"))
    endpoint = os.environ.get("AWS_ENDPOINT_URL_S3") or os.environ.get("AWS_ENDPOINT_URL")
    region = os.environ.get("AWS_REGION") or os.environ.get("AWS_DEFAULT_REGION")
    connect, read = _timeouts()
    options: dict[str, Any] = {
        "connect_timeout": connect,
        "request_timeout": read,
        "retry_strategy": fs.AwsStandardS3RetryStrategy(max_attempts=retry_policy()[0]),
    }
    if endpoint:
        options["endpoint_override"] = endpoint
    if region:
        options["region"] = region
    return _join(bucket, key), fs.S3FileSystem(**options)


_CLIENTS: dict[tuple, Any] = {}
_ENV_KEYS = (
    "AWS_ENDPOINT_URL",
    "AWS_ENDPOINT_URL_S3",
    "AWS_ACCESS_KEY_ID",
    "AWS_SECRET_ACCESS_KEY",
    "AWS_SESSION_TOKEN",
    "AWS_PROFILE",
    "AWS_DEFAULT_REGION",
    "AWS_REGION",
    "AWS_CONFIG_FILE",
    "AWS_SHARED_CREDENTIALS_FILE",
    "AWS_MAX_ATTEMPTS",
    "AWS_RETRY_MODE",
)


def _cached_client():
    """One client per process and AWS environment (clients must not cross a fork)."""
    env = tuple(
        hashlib.sha256(os.environ.get(k, "").encode()).hexdigest() if "SECRET" in k or "TOKEN" in k
        else os.environ.get(k, "")
        for k in _ENV_KEYS
    )
    key = (os.getpid(), env)
    client = _CLIENTS.get(key)
    if client is None:
        _CLIENTS.clear()
        client = _CLIENTS[key] = s3_client()
    return client


def _endpoint(client) -> str:
    try:
        return client.meta.endpoint_url
    except Exception:  # noqa: BLE001 - only used in messages
        return "the S3 endpoint"


def _scrub(text: str) -> str:
    """Defence in depth: no message ever carries the secret key or session token."""
    for k in ("AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN"):
        secret = os.environ.get(k)
        if secret and len(secret) >= 4:
            text = text.replace(secret, "***")
    return text


def _bucket_exists(client, bucket: str) -> bool | None:
    """True/False, or None when the answer is not a plain yes/no (auth, network)."""
    from botocore.exceptions import BotoCoreError, ClientError

    try:
        client.head_bucket(Bucket=bucket)
        return True
    except ClientError as e:
        code = str(e.response.get("Error", {}).get("Code", ""))
        return False if code in ("404", "NoSuchBucket", "NotFound") else None
    except BotoCoreError:
        return None


def _translate(exc: BaseException, url: str, client, *, probe_bucket: bool = True) -> StorageError:
    """A botocore/boto3 exception -> StorageError naming the URL and a plain reason."""
    from boto3.exceptions import S3UploadFailedError
    from botocore.exceptions import (
        ClientError,
        ConnectionClosedError,
        ConnectTimeoutError,
        EndpointConnectionError,
        NoCredentialsError,
        PartialCredentialsError,
        ReadTimeoutError,
    )

    endpoint = _endpoint(client)
    bucket = parse_s3_url(url)[0] if is_s3(url) else ""
    if isinstance(exc, NoCredentialsError | PartialCredentialsError):
        msg = (f"no S3 credentials for {url}: set AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY "
               "(or AWS_PROFILE / ~/.aws/credentials)")
    elif isinstance(exc, EndpointConnectionError | ConnectTimeoutError | ConnectionClosedError):
        msg = (f"cannot reach S3 endpoint {endpoint} for {url} (is the server running and "
               "AWS_ENDPOINT_URL right?)")
    elif isinstance(exc, ReadTimeoutError):
        msg = f"S3 endpoint {endpoint} timed out reading {url}"
    elif isinstance(exc, ClientError):
        err = exc.response.get("Error", {})
        code = str(err.get("Code", ""))
        if code in _AUTH_CODES:
            msg = (f"access denied / invalid credentials for {url} ({code}) — check "
                   "AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY")
        elif code == "NoSuchBucket":
            msg = f"bucket '{bucket}' does not exist at {endpoint} (while accessing {url})"
        elif code in _MISSING_KEY_CODES:
            if probe_bucket and bucket and _bucket_exists(client, bucket) is False:
                msg = f"bucket '{bucket}' does not exist at {endpoint} (while accessing {url})"
            else:
                msg = f"object {url} does not exist"
        else:
            msg = f"S3 error for {url}: {code} {err.get('Message', '')}".rstrip()
    elif isinstance(exc, S3UploadFailedError):
        # boto3's transfer manager flattens the ClientError into text: map it back by code.
        text = str(exc)
        if any(c in text for c in ("AccessDenied", "InvalidAccessKeyId", "SignatureDoesNotMatch",
                                   "Forbidden", "(403)")):
            msg = (f"access denied / invalid credentials for {url} — check "
                   "AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY")
        elif "NoSuchBucket" in text:
            msg = f"bucket '{bucket}' does not exist at {endpoint} (while accessing {url})"
        else:
            msg = f"upload to {url} failed: {text}"
    else:
        msg = f"S3 operation on {url} failed: {type(exc).__name__}: {exc}"
    return StorageError(_scrub(msg))


# ------------------------------------------------------------------------------------ Storage


class Storage:
    """A local folder or an s3://bucket/prefix with one API; names are relative to the root.

    multipart_threshold: S3 objects at least this large go up in parts of
    max(multipart_threshold, 5 MiB) bytes (S3's minimum part size).
    """

    def __init__(self, root: str, *, multipart_threshold: int = DEFAULT_MULTIPART_THRESHOLD):
        self.root = str(root)
        self.multipart_threshold = int(multipart_threshold)
        if is_s3(self.root):
            self.bucket, prefix = parse_s3_url(self.root)
            self.prefix = prefix.strip("/")
            self.local_root: Path | None = None
        else:
            root_path = self.root[len("file://") :] if self.root.startswith("file://") else self.root
            self.bucket, self.prefix = "", ""
            self.local_root = Path(root_path)
        self._client = None
        self._client_pid = -1

    def __repr__(self) -> str:
        return f"Storage({self.root!r})"

    @property
    def is_s3(self) -> bool:
        return self.local_root is None

    # -- helpers ---------------------------------------------------------------------------

    @property
    def client(self):
        if self._client is None or self._client_pid != os.getpid():
            self._client = s3_client()
            self._client_pid = os.getpid()
        return self._client

    def _key(self, name: str) -> str:
        return _join(self.prefix, _check_name(name))

    def _path(self, name: str) -> Path:
        assert self.local_root is not None
        return self.local_root / _check_name(name)

    def url(self, name: str) -> str:
        """Full URL (s3://bucket/prefix/name) or local path of an object under the root."""
        if self.is_s3:
            return f"s3://{self.bucket}/{self._key(name)}"
        return str(self._path(name))

    def _err(self, exc: BaseException, name: str, **kw) -> StorageError:
        return _translate(exc, self.url(name), self.client, **kw)

    def _remote_sha256(self, name: str, *, probe_bucket: bool = True
                       ) -> tuple[str | None, int | None]:
        """(sha256 metadata, size) of an existing object, or (None, None) if absent.

        A HEAD answers 404 for a missing bucket as for a missing object: probe_bucket tells
        them apart (one more request); an upload that follows may skip it, since its own
        answer names a missing bucket."""
        from botocore.exceptions import BotoCoreError, ClientError

        try:
            head = self.client.head_object(Bucket=self.bucket, Key=self._key(name))
        except ClientError as e:
            code = str(e.response.get("Error", {}).get("Code", ""))
            if code in _MISSING_KEY_CODES and (
                    not probe_bucket or _bucket_exists(self.client, self.bucket) is not False):
                return None, None
            raise self._err(e, name) from e
        except BotoCoreError as e:
            raise self._err(e, name) from e
        return head.get("Metadata", {}).get("sha256"), head.get("ContentLength")

    def _atomic_write(self, path: Path, write) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}{_TMP_MARK}", dir=path.parent)
        try:
            with os.fdopen(fd, "wb") as f:
                write(f)
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, path)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise

    # -- API -------------------------------------------------------------------------------

    def put_file(self, local: Path, name: str, *, sha256: str | None = None) -> bool:
        """Upload/copy a file; False (nothing transferred) if the target already holds it.

        sha256 (hex) is the file's checksum if the caller already knows it (e.g. from a
        manifest); it is trusted, not recomputed. On S3 it is stored as metadata 'sha256'.
        """
        local = Path(local)
        if not local.is_file():
            raise StorageError(f"cannot upload {local}: not a file (target {self.url(name)})")
        digest = sha256 or sha256_file(local)
        size = local.stat().st_size
        if not self.is_s3:
            dest = self._path(name)
            if dest.is_file() and dest.stat().st_size == size and sha256_file(dest) == digest:
                return False

            def copy(f: IO[bytes]) -> None:
                with open(local, "rb") as src:
                    while block := src.read(_HASH_BLOCK):
                        f.write(block)

            self._atomic_write(dest, copy)
            return True

        remote_sha, remote_size = self._remote_sha256(name, probe_bucket=False)
        if remote_sha == digest and remote_size == size:
            return False
        from boto3.exceptions import S3UploadFailedError
        from boto3.s3.transfer import TransferConfig
        from botocore.exceptions import BotoCoreError, ClientError

        transfer = TransferConfig(
            multipart_threshold=self.multipart_threshold,
            multipart_chunksize=max(self.multipart_threshold, MIN_PART_SIZE),
            max_concurrency=_FILE_CONCURRENCY,
        )
        try:
            self.client.upload_file(
                str(local), self.bucket, self._key(name),
                ExtraArgs={"Metadata": {"sha256": digest}}, Config=transfer,
            )
        except (ClientError, BotoCoreError, S3UploadFailedError) as e:
            raise self._err(e, name) from e
        return True

    def put_bytes(self, data: bytes, name: str) -> None:
        if not self.is_s3:
            self._atomic_write(self._path(name), lambda f: f.write(data))
            return
        from botocore.exceptions import BotoCoreError, ClientError

        try:
            self.client.put_object(
                Bucket=self.bucket, Key=self._key(name), Body=data,
                Metadata={"sha256": hashlib.sha256(data).hexdigest()},
            )
        except (ClientError, BotoCoreError) as e:
            raise self._err(e, name) from e

    def put_new(self, data: bytes, name: str) -> bool:
        """Create an object only if it is absent: True if created, False if it existed.

        Local: O_CREAT|O_EXCL, atomic. S3: a conditional put (If-None-Match: *), atomic on
        servers that honour it (AWS, SeaweedFS); one that refuses the header gets an exists
        check, then a plain put — not atomic, so callers that lock read the object back.
        """
        if not self.is_s3:
            path = self._path(name)
            path.parent.mkdir(parents=True, exist_ok=True)
            try:
                fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
            except FileExistsError:
                return False
            except OSError as e:
                raise StorageError(f"cannot create {path}: {e.strerror}") from e
            try:
                with os.fdopen(fd, "wb") as f:
                    f.write(data)
            except OSError as e:  # a disk full: no half-written object left to block others
                path.unlink(missing_ok=True)
                raise StorageError(f"cannot write {path}: {e.strerror}") from e
            return True
        from botocore.exceptions import BotoCoreError, ClientError, ParamValidationError

        try:
            self.client.put_object(Bucket=self.bucket, Key=self._key(name), Body=data,
                                   IfNoneMatch="*")
            return True
        except ClientError as e:
            code = str(e.response.get("Error", {}).get("Code", ""))
            if code in ("PreconditionFailed", "412", "ConditionalRequestConflict", "409"):
                return False
            if code not in ("NotImplemented", "501"):
                raise self._err(e, name) from e
        except ParamValidationError:  # a botocore too old to know IfNoneMatch
            pass
        except BotoCoreError as e:
            raise self._err(e, name) from e
        if self.exists(name):
            return False
        self.put_bytes(data, name)
        return True

    def delete(self, name: str) -> None:
        """Remove an object; an absent one is not an error."""
        if not self.is_s3:
            self._path(name).unlink(missing_ok=True)
            return
        from botocore.exceptions import BotoCoreError, ClientError

        try:
            self.client.delete_object(Bucket=self.bucket, Key=self._key(name))
        except (ClientError, BotoCoreError) as e:
            raise self._err(e, name) from e

    def check_bucket(self) -> None:
        """S3: the bucket exists and these credentials may use it (a cheap HEAD), else a
        StorageError naming the bucket, the endpoint and the reason; local: nothing to check."""
        if not self.is_s3:
            return
        from botocore.exceptions import BotoCoreError, ClientError

        try:
            self.client.head_bucket(Bucket=self.bucket)
        except (ClientError, BotoCoreError) as e:
            reason = str(_translate(e, f"s3://{self.bucket}", self.client))
            endpoint = _endpoint(self.client)
            raise StorageError(reason if endpoint in reason else f"{reason} (endpoint {endpoint})"
                               ) from e

    def get_bytes(self, name: str) -> bytes:
        with self.open_stream(name) as f:
            return f.read()

    def open_stream(self, name: str):
        """A readable binary file-like object streaming the object (usable as a context manager)."""
        if not self.is_s3:
            path = self._path(name)
            try:
                return open(path, "rb")
            except FileNotFoundError:
                raise StorageError(f"object {path} does not exist") from None
            except OSError as e:
                raise StorageError(f"cannot read {path}: {e.strerror}") from e
        from botocore.exceptions import BotoCoreError, ClientError

        try:
            return self.client.get_object(Bucket=self.bucket, Key=self._key(name))["Body"]
        except (ClientError, BotoCoreError) as e:
            raise self._err(e, name) from e

    def exists(self, name: str) -> bool:
        """Whether the object exists; a missing bucket or bad credentials raise StorageError."""
        if not self.is_s3:
            return self._path(name).is_file()
        return self._remote_sha256(name) != (None, None)

    def list(self, prefix: str = "") -> list[str]:
        """Sorted names (relative to the root) of all objects whose name starts with prefix."""
        if not self.is_s3:
            root = self.local_root
            assert root is not None
            if not root.is_dir():
                return []
            names = (
                p.relative_to(root).as_posix()
                for p in root.rglob("*")
                if p.is_file() and _TMP_MARK not in p.name
            )
            return sorted(n for n in names if n.startswith(prefix))
        from botocore.exceptions import BotoCoreError, ClientError

        base = f"{self.prefix}/" if self.prefix else ""
        out: list[str] = []
        try:
            pages = self.client.get_paginator("list_objects_v2").paginate(
                Bucket=self.bucket, Prefix=base + prefix
            )
            for page in pages:
                out.extend(obj["Key"][len(base) :] for obj in page.get("Contents", []))
        except (ClientError, BotoCoreError) as e:
            url = f"s3://{self.bucket}/{base}{prefix}"
            raise _translate(e, url, self.client) from e
        return sorted(out)

    def sync_dir(self, local_dir: Path, *, prefix: str = "", threads: int = SYNC_THREADS) -> dict:
        """Upload every file under local_dir (as prefix/relative/path), skipping identical ones,
        `threads` objects at a time.

        Returns {"transferred": n, "skipped": m, "bytes": bytes transferred}. The first upload
        to fail stops the sync: uploads under way finish, the others never start, and its
        StorageError (naming the object and the cause) is raised.
        """
        local_dir = Path(local_dir)
        if not local_dir.is_dir():
            raise StorageError(f"cannot sync {local_dir}: not a directory")
        files = [(path, _join(prefix, path.relative_to(local_dir).as_posix()))
                 for path in sorted(p for p in local_dir.rglob("*") if p.is_file())
                 if _TMP_MARK not in path.name]
        stats = {"transferred": 0, "skipped": 0, "bytes": 0}
        if not files:
            return stats
        if self.is_s3:
            _ = self.client  # made once here: the upload threads share it (clients are thread-safe)
        with ThreadPoolExecutor(max_workers=max(1, min(threads, len(files))),
                                thread_name_prefix="geco-upload") as pool:
            uploads = {pool.submit(self.put_file, path, name): path for path, name in files}
            try:
                for done in as_completed(uploads):
                    if done.result():
                        stats["transferred"] += 1
                        stats["bytes"] += uploads[done].stat().st_size
                    else:
                        stats["skipped"] += 1
            except BaseException:
                pool.shutdown(wait=True, cancel_futures=True)
                raise
        return stats


# ------------------------------------------------------------------------------- WebDataset


def _gopen_s3(url: str, mode: str = "rb", bufsize: int = 8192, **kw):
    """webdataset.gopen handler for s3:// URLs: a boto3 streaming body."""
    if not mode.startswith("r"):
        raise StorageError(f"cannot open {url} for writing through webdataset: use Storage.put_file")
    from botocore.exceptions import BotoCoreError, ClientError

    bucket, key = parse_s3_url(url)
    client = _cached_client()
    try:
        return client.get_object(Bucket=bucket, Key=key)["Body"]
    except (ClientError, BotoCoreError) as e:
        raise _translate(e, url, client) from e


def register_webdataset_s3() -> None:
    """Make webdataset open s3:// URLs through boto3 (idempotent)."""
    from webdataset.gopen import gopen_schemes  # the module's dispatch table, not the function

    gopen_schemes["s3"] = _gopen_s3
