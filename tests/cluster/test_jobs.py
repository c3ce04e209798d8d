"""Ray Jobs: `kiln submit`, `kiln jobs ...` and the client against a real `ray start --head`.

The head runs with token authentication (its own token file) as Ray 2.60 clusters do by
default; the jobs train on iris and register into a KILN_HOME that this test then reads.
"""

from __future__ import annotations

import json
import subprocess
import sys
import time
from collections.abc import Iterator

import httpx
import pytest

from kiln.client import Kiln, command_args
from kiln.jobs import jobs_address, last_json_line, new_job_id, parse_env, resolve_token
from kiln.training.errors import KilnError
from tests.cluster.headnode import Head, ray_head
from tests.conftest import free_port, wait_for

TRAIN = [
    "kiln",
    "train",
    "--data",
    "sklearn:iris",
    "--model",
    "logistic",
    "--solver",
    "adam",
    "--workers",
    "1",
    "--epochs",
    "3",
    "--lr",
    "0.1",
    "--json",
]


@pytest.fixture(scope="module")
def head() -> Iterator[Head]:
    with ray_head() as started:
        yield started


@pytest.fixture(scope="module")
def kiln_env(tmp_path_factory: pytest.TempPathFactory) -> dict[str, str]:
    """Where jobs keep the registry and artifacts (one machine: the test reads them back).

    One per head: the cluster's Registry actor is detached, and the first job fixes its home.
    """
    root = tmp_path_factory.mktemp("jobs")
    return {"KILN_HOME": str(root / "home"), "KILN_STORAGE": str(root / "storage")}


@pytest.fixture
def client(head: Head, monkeypatch: pytest.MonkeyPatch) -> Kiln:
    """The Python client on the head's Jobs API, finding the token as users' clients do."""
    monkeypatch.setenv("RAY_AUTH_TOKEN_PATH", str(head.token_path))
    return Kiln(head.address)


def kiln(head: Head, *args: str, timeout_s: float = 180) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "kiln.cli", *args],
        capture_output=True,
        text=True,
        timeout=timeout_s,
        env={**head.env, "RAY_AUTH_MODE": ""},  # Kiln sends the token itself, whatever the mode
    )


def registered(home: str, name: str) -> list[dict]:
    with Kiln(home=home, use_ray=False) as client:
        return client.versions(name)


# ----------------------------------------------------------------------------- no cluster


def test_addresses_tokens_and_options_resolve_without_a_cluster(tmp_path, monkeypatch):
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    assert jobs_address() == "http://127.0.0.1:8265"
    assert jobs_address("10.0.0.5:8265/") == "http://10.0.0.5:8265"
    monkeypatch.setenv("RAY_ADDRESS", "10.0.0.5:6379")  # a GCS address is not the Jobs API
    assert jobs_address() == "http://127.0.0.1:8265"
    with pytest.raises(KilnError, match='Got "auto" for --address'):
        jobs_address("auto")
    monkeypatch.setenv("RAY_AUTH_TOKEN", "")
    monkeypatch.setenv("RAY_AUTH_TOKEN_PATH", str(tmp_path / "nope"))
    with pytest.raises(KilnError, match="RAY_AUTH_TOKEN_PATH, which is not a file"):
        resolve_token()
    (tmp_path / "tok").write_text("abc\n")
    monkeypatch.setenv("RAY_AUTH_TOKEN_PATH", str(tmp_path / "tok"))
    assert resolve_token() == "abc" and resolve_token("explicit") == "explicit"
    assert parse_env(["A=1", "B=x=y"]) == {"A": "1", "B": "x=y"}
    with pytest.raises(KilnError, match='Got "A" for --env'):
        parse_env(["A"])
    assert new_job_id(["kiln", "train", "--data", "x"]).startswith("kiln-train-")
    assert command_args("train", {"data": "sklearn:iris", "epochs": 3, "gpu": None}) == [
        "--data",
        "sklearn:iris",
        "--epochs",
        "3",
    ]
    assert command_args("serve", {"auth": False}) == ["--no-auth"]
    with pytest.raises(KilnError, match='Got "epoch" for kiln train'):
        command_args("train", {"epoch": 3})
    assert last_json_line('noise\n{"version": 2}\nbye\n') == {"version": 2}


def test_registry_calls_on_a_jobs_address_say_what_to_use():
    client = Kiln("http://127.0.0.1:8265")
    with pytest.raises(KilnError, match="talks to the Jobs API only"):
        client.models()


# ----------------------------------------------------------------------------- real head


@pytest.mark.slow
def test_submit_wait_trains_on_the_cluster_and_registers(head, kiln_env):
    started = time.perf_counter()
    # OMP_NUM_THREADS is also one of the env vars Kiln's own ray.init asks for: Ray refuses
    # a key set twice, so Kiln must leave it to the job.
    job_env = {**kiln_env, "OMP_NUM_THREADS": "1"}
    env_args = [a for k, v in job_env.items() for a in ("--env", f"{k}={v}")]
    args = ["submit", "--address", head.address, "--wait", *env_args, "--", *TRAIN]
    result = kiln(head, *args, "--register", "iris-job")
    elapsed_s = time.perf_counter() - started
    assert result.returncode == 0, result.stderr[-3000:] + result.stdout[-3000:]
    # --wait streamed the job's own output: the train summary the job printed is here.
    summary = last_json_line(result.stdout)
    assert summary is not None and summary["model"] == "iris-job" and summary["version"] == 1
    assert "SUCCEEDED" in result.stderr
    (version,) = registered(kiln_env["KILN_HOME"], "iris-job")
    assert version["metrics"]["accuracy"] >= 0.6
    assert version["lineage"]["train_config"]["epochs"] == 3
    print(f"submit --wait to SUCCEEDED: {elapsed_s:.1f} s (train {summary['elapsed_s']:.1f} s)")


@pytest.mark.slow
def test_submit_wait_exits_non_zero_when_the_job_fails(head):
    failing = [sys.executable, "-c", "import sys; print('about to fail'); sys.exit(3)"]
    result = kiln(head, "submit", "--address", head.address, "--wait", "--", *failing)
    assert result.returncode == 1, (result.returncode, result.stdout, result.stderr[-2000:])
    assert "about to fail" in result.stdout and "FAILED" in result.stderr


@pytest.mark.slow
def test_client_submits_train_and_reads_the_result(client, kiln_env):
    job_id = client.submit_train(
        env_vars=kiln_env, data="sklearn:iris", model="logistic", solver="adam", workers=1,
        epochs=2, register="iris-client",
    )  # fmt: skip
    assert client.wait(job_id, timeout_s=120) == "SUCCEEDED", client.job_logs(job_id)[-2000:]
    result = client.job_result(job_id)
    assert result["model"] == "iris-client" and result["epochs_run"] == 2
    assert [v["version"] for v in registered(kiln_env["KILN_HOME"], "iris-client")] == [1]


@pytest.mark.slow
def test_jobs_list_logs_and_stop(head):
    sleeper = ["python", "-c", "import time; print('sleeping', flush=True); time.sleep(120)"]
    submitted = kiln(head, "submit", "--address", head.address, "--json", "--", *sleeper)
    assert submitted.returncode == 0, submitted.stderr
    job_id = json.loads(submitted.stdout.strip().splitlines()[-1])["job_id"]
    from kiln.jobs import JobsClient

    jobs = JobsClient(head.address, head.token_path.read_text())
    assert wait_for(lambda: "sleeping" in jobs.logs(job_id), timeout_s=60, interval_s=0.3)
    logs = kiln(head, "jobs", "logs", job_id, "--address", head.address)
    assert "sleeping" in logs.stdout
    listed = kiln(head, "jobs", "list", "--json", "--address", head.address)
    (mine,) = [j for j in json.loads(listed.stdout) if j["job_id"] == job_id]
    assert mine["status"] == "RUNNING"
    stopped = kiln(head, "jobs", "stop", job_id, "--address", head.address)
    assert stopped.returncode == 0, stopped.stderr
    assert jobs.wait(job_id, timeout_s=30).status == "STOPPED"
    again = kiln(head, "jobs", "stop", job_id, "--address", head.address)
    assert again.returncode == 2 and "already ended (STOPPED)" in again.stderr
    unknown = kiln(head, "jobs", "logs", "kiln-nope", "--address", head.address)
    assert unknown.returncode == 2 and "kiln jobs list" in unknown.stderr


@pytest.mark.slow
def test_a_wrong_or_missing_token_is_one_clear_line(head, tmp_path):
    wrong = kiln(head, "jobs", "list", "--address", head.address, "--token", "not-the-token")
    assert wrong.returncode == 2
    assert wrong.stderr.count("\n") == 1 and "refused this token" in wrong.stderr
    env = {**head.env, "RAY_AUTH_TOKEN_PATH": "", "HOME": str(tmp_path)}  # no token anywhere
    missing = subprocess.run(
        [sys.executable, "-m", "kiln.cli", "jobs", "list", "--address", head.address],
        capture_output=True,
        text=True,
        env=env,
        timeout=60,
    )
    assert missing.returncode == 2 and missing.stderr.count("\n") == 1
    assert "requires a token and none was found" in missing.stderr


@pytest.mark.slow
def test_client_tunes_then_deploys_and_the_cluster_serves_it(client, kiln_env):
    sweep = client.submit_tune(
        env_vars=kiln_env, data="sklearn:iris", model="logistic", solver="adam", trials=2, epochs=3,
        scheduler="none", register="iris-tuned",
    )  # fmt: skip
    assert client.wait(sweep, timeout_s=300) == "SUCCEEDED", client.job_logs(sweep)[-3000:]
    tuned = client.job_result(sweep)
    assert tuned["model"] == "iris-tuned" and tuned["num_trials"] == 2, tuned
    assert tuned["trial_epochs"] == 2 * 3 and set(tuned["best_config"]) >= {"lr", "l2"}, tuned

    port = free_port()
    deployed = client.deploy(["iris-tuned"], env_vars=kiln_env, port=port, auth=False)
    assert client.wait(deployed, timeout_s=300) == "SUCCEEDED", client.job_logs(deployed)[-3000:]
    # The job has ended; the application it deployed keeps answering on the cluster.
    url = f"http://127.0.0.1:{port}/v1/models/iris-tuned:predict"
    body = {"instances": [[5.1, 3.5, 1.4, 0.2], [6.7, 3.0, 5.2, 2.3]]}

    def answered() -> bool:
        try:
            return httpx.post(url, json=body, timeout=5).status_code == 200
        except httpx.HTTPError:
            return False

    assert wait_for(answered, timeout_s=60, interval_s=0.5)
    reply = httpx.post(url, json=body, timeout=5).json()
    assert reply["model_version"] == tuned["version"] and len(reply["predictions"]) == 2, reply
