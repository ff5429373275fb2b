"""geco: GECo complementary-item retrieval (CIGM template generator + ResNet-18 retriever).

Library code: pure PyTorch and data handling. Ray and MLflow are imported only inside
`ray_jobs/` or lazily inside functions, never at module level here.
"""

__version__ = "0.1.0"


def setup_logging(rank: int | None = None) -> None:
    """geco's log lines for every entry point (CLI, Ray jobs, Ray workers and tasks), on the
    "geco" logger: rank 0 at INFO, other ranks at WARNING, AWS clients quiet.

    Handlers a host process installed are kept: in a Ray Train worker the root logger writes
    to Ray's console and to logs/train/ray-train-app-worker-*.log, and geco's lines reach both
    through it. Only a process with no root handler (the CLI, a job's driver script, a plain
    Ray task) gets one: stdout, "HH:MM:SS message"."""
    import logging
    import os
    import sys

    if rank is None:
        rank = int(os.environ.get("RANK", "0"))
    logging.getLogger("geco").setLevel(logging.INFO if rank == 0 else logging.WARNING)
    root = logging.getLogger()
    if not root.handlers:
        handler = logging.StreamHandler(sys.stdout)
        handler.setFormatter(logging.Formatter("%(asctime)s %(message)s", datefmt="%H:%M:%S"))
        root.addHandler(handler)
    for noisy in ("botocore", "boto3", "s3transfer", "urllib3"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
