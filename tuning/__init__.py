"""Ray Tune sweeps over the resident shards: search spaces, schedulers, reports."""
