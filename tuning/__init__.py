"""Hyperparameter sweeps with Ray Tune over resident shards: spaces, trials, reports."""
