"""geco: GECo complementary-item retrieval (CIGM template generator + ResNet-18 retriever).

Library code: pure PyTorch and data handling. Ray and MLflow are imported only inside
`ray_jobs/` or lazily inside functions, never at module level here.
"""

__version__ = "0.1.0"


def setup_logging(rank: int | None = None, *, force: bool = False) -> None:
    """geco's log lines on stdout for every entry point (CLI, Ray jobs, Ray workers): rank 0
    at INFO, other ranks at WARNING, AWS clients quiet. `force` replaces handlers a host
    process installed (Ray workers)."""
    import logging
    import os
    import sys

    if rank is None:
        rank = int(os.environ.get("RANK", "0"))
    logging.basicConfig(level=logging.INFO if rank == 0 else logging.WARNING,
                        format="%(asctime)s %(message)s", datefmt="%H:%M:%S", stream=sys.stdout,
                        force=force)
    for noisy in ("botocore", "boto3", "s3transfer", "urllib3"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
