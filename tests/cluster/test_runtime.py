"""Pure logic of cluster/runtime.py: no Ray."""

import json

from cluster.runtime import WORKER_ENV, worker_env_vars


def test_worker_env_leaves_out_keys_the_job_runtime_env_sets(monkeypatch):
    monkeypatch.delenv("RAY_JOB_CONFIG_JSON_ENV_VAR", raising=False)
    assert worker_env_vars() == WORKER_ENV
    job = {"runtime_env": {"working_dir": "gcs://x.zip", "env_vars": {"OMP_NUM_THREADS": "2"}}}
    monkeypatch.setenv("RAY_JOB_CONFIG_JSON_ENV_VAR", json.dumps(job))
    got = worker_env_vars()
    assert "OMP_NUM_THREADS" not in got and got["MKL_NUM_THREADS"] == "1"
    monkeypatch.setenv("RAY_JOB_CONFIG_JSON_ENV_VAR", json.dumps({"runtime_env": None}))
    assert worker_env_vars() == WORKER_ENV
    monkeypatch.setenv("RAY_JOB_CONFIG_JSON_ENV_VAR", "not json")
    assert worker_env_vars() == WORKER_ENV
