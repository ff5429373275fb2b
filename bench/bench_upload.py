"""S3 upload of the synthetic shards: a fresh `Storage.sync_dir` and a no-op re-upload.

Draws the demo's synthetic dataset (the `data.synth` of --config, as `geco data synth`),
writes its shards at --image-size px (as `geco data shard`), starts a throwaway SeaweedFS S3
server on 127.0.0.1 (infra/local/s3.sh, auth on, the way tests/s3_server.py does) and, for
each of --repeats fresh prefixes, times what `geco data shard --out s3://…` does after
rendering: `sync_dir` of the shards, then the manifest last; then the same again, which
transfers nothing (every object's sha256 already matches).

Loopback has no network latency, so on a small machine the upload is bound by the CPU (geco and
SeaweedFS share it); `--latency-ms MS` adds that much before every S3 request (a botocore
`before-send` hook that sleeps), as a distant endpoint would.

`--storage FILE` times another version of geco/data/storage.py (e.g. HEAD's:
`git show HEAD:geco/data/storage.py > /tmp/storage_head.py`) on the same shards.

    .venv/bin/python bench/bench_upload.py
    .venv/bin/python bench/bench_upload.py --samples-per-shard 100   # more, smaller shards
    .venv/bin/python bench/bench_upload.py --latency-ms 20            # a distant endpoint
    .venv/bin/python bench/bench_upload.py --storage /tmp/storage_head.py
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from geco.config import load_config  # noqa: E402
from geco.data.images import ImageFolder  # noqa: E402
from geco.data.shards import MANIFEST, ShardSpec, write_shards  # noqa: E402
from geco.data.splits import load_splits, resolve_layout  # noqa: E402
from geco.data.synth import generate  # noqa: E402
from tests.s3_server import local_s3  # noqa: E402


def _storage_class(path: str | None):
    """geco's Storage, or the one defined in another copy of storage.py."""
    if path is None:
        from geco.data.storage import Storage

        return Storage
    spec = importlib.util.spec_from_file_location("bench_storage", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.Storage


def _shards(tmp: Path, config: str, image_size: int, per_shard: int) -> Path:
    """The demo's dataset as shards in tmp/shards, the manifest held aside in tmp."""
    data = tmp / "data"
    generate(data, load_config(config).data.synth)
    layout = resolve_layout(data)
    out = tmp / "shards"
    write_shards(load_splits(layout), ImageFolder(layout.img_dir), out,
                 ShardSpec(image_size=image_size, samples_per_shard=per_shard), source="bench")
    (out / MANIFEST).replace(tmp / MANIFEST)  # uploaded last, as cmd_shard does
    return out


def _delay(store, latency_ms: float) -> None:
    """Every request of the store's client waits latency_ms before it is sent."""
    if latency_ms > 0:
        store.client.meta.events.register(
            "before-send.s3", lambda **kw: time.sleep(latency_ms / 1000))


def _upload(store, shards: Path, manifest: Path) -> tuple[float, dict]:
    t0 = time.perf_counter()
    stats = store.sync_dir(shards)
    stats["transferred" if store.put_file(manifest, MANIFEST) else "skipped"] += 1
    return time.perf_counter() - t0, stats


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--config", default=str(REPO / "configs" / "synthetic-cpu.yaml"),
                   help="its data.synth draws the dataset (default: the demo's)")
    p.add_argument("--image-size", type=int, default=64, help="shard image size (demo: 64)")
    p.add_argument("--samples-per-shard", type=int, default=ShardSpec.samples_per_shard)
    p.add_argument("--repeats", type=int, default=3, help="fresh prefixes to upload to")
    p.add_argument("--latency-ms", type=float, default=0.0,
                   help="added before every S3 request (loopback has none)")
    p.add_argument("--storage", help="a storage.py to time instead of geco.data.storage")
    args = p.parse_args()
    Storage = _storage_class(args.storage)

    with tempfile.TemporaryDirectory(prefix="geco-bench-upload-") as tmp:
        tmp = Path(tmp)
        shards = _shards(tmp, args.config, args.image_size, args.samples_per_shard)
        files = sorted(p for p in shards.iterdir() if p.is_file())
        size = sum(p.stat().st_size for p in files) + (tmp / MANIFEST).stat().st_size
        with local_s3(tmp / "stack", bucket="bench") as server:
            os.environ.update(server.env)
            os.environ["AWS_CONFIG_FILE"] = str(tmp / "no-aws-config")  # no developer profile
            os.environ["AWS_SHARED_CREDENTIALS_FILE"] = str(tmp / "no-aws-credentials")
            fresh, noop = [], []
            for r in range(args.repeats):
                store = Storage(f"s3://{server.bucket}/run-{r}")
                _delay(store, args.latency_ms)
                seconds, stats = _upload(store, shards, tmp / MANIFEST)
                assert stats["transferred"] == len(files) + 1, stats
                fresh.append(seconds)
                seconds, stats = _upload(store, shards, tmp / MANIFEST)
                assert stats["transferred"] == 0, stats
                noop.append(seconds)

    mb = size / 1e6
    report = {
        "storage": args.storage or "geco.data.storage",
        "objects": len(files) + 1, "MB": round(mb, 2), "repeats": args.repeats,
        "latency_ms": args.latency_ms,
        "fresh_s": {"best": round(min(fresh), 3), "median": round(statistics.median(fresh), 3)},
        "fresh_MB_per_s": round(mb / min(fresh), 1),
        "noop_s": {"best": round(min(noop), 3), "median": round(statistics.median(noop), 3)},
        "cpus": os.cpu_count(),
    }
    print(json.dumps(report, indent=1))


if __name__ == "__main__":
    main()
