"""Ray: `driver` (what ray_jobs/ run: Ray Train pipelines, Tune sweeps, comparisons) and
`worker` (what runs inside Ray: the training worker, the evaluation and compare tasks)."""
