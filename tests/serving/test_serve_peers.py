"""benchmarks/serve_peers.py's pure parts: wrk's report, an arm's validity, the best peer and
Kiln's ratio, pip's dry run (no Ray, no servers)."""

from __future__ import annotations

from typing import Any

import pytest

from benchmarks.serve_peers import (
    best_of,
    compare,
    figure,
    flatten,
    foreign_torch,
    grpc_figures,
    invalid_reason,
    lua,
    parse_wrk,
    summary,
)

WRK_OK = """Running 2s test @ http://127.0.0.1:8500
  1 threads and 64 connections
  Thread Stats   Avg      Stdev     Max   +/- Stdev
    Latency    27.10ms    5.02ms  80.11ms   90.00%
    Req/Sec     2.30k   120.00     2.50k    70.00%
  Latency Distribution
     50%   26.03ms
     75%   28.00ms
     90%   31.00ms
     99%  583.89ms
  4568 requests in 2.01s, 1.02MB read
Requests/sec:   2273.93
Transfer/sec:    509.12KB
"""

WRK_BAD = """Running 2s test @ http://127.0.0.1:8500
  1 threads and 64 connections
  Latency Distribution
     50%  412.00us
     75%  500.00us
     90%  700.00us
     99%    1.20s
  1000 requests in 2.00s, 100.00KB read
  Socket errors: connect 0, read 12, write 0, timeout 3
  Non-2xx or 3xx responses: 7
Requests/sec:    500.00
"""


def test_parse_wrk_reads_throughput_latency_and_counts():
    got = parse_wrk(WRK_OK)
    assert got == {
        "rps": 2273.93,
        "p50_ms": 26.03,
        "p99_ms": 583.89,
        "requests": 4568,
        "socket_errors": 0,
        "non_2xx": 0,
    }
    bad = parse_wrk(WRK_BAD)
    assert bad["p50_ms"] == pytest.approx(0.412)
    assert bad["p99_ms"] == pytest.approx(1200.0)
    assert (bad["socket_errors"], bad["non_2xx"], bad["requests"]) == (15, 7, 1000)


def test_parse_wrk_of_nothing_is_zero_and_invalid():
    got = parse_wrk("unable to connect to 127.0.0.1:8500 Connection refused\n")
    assert got["rps"] == 0.0 and got["p50_ms"] is None
    assert invalid_reason(got) == "no request answered"


def point(rps: float, p50: float, requests: int = 1000, **extra: Any) -> dict[str, Any]:
    return {
        "rps": rps,
        "p50_ms": p50,
        "p99_ms": p50 * 3,
        "requests": requests,
        "socket_errors": 0,
        "non_2xx": 0,
        **extra,
    }


def test_invalid_reason():
    assert invalid_reason(point(100, 1.0)) is None
    assert "non-2xx" in str(invalid_reason(point(100, 1.0, non_2xx=1)))
    assert invalid_reason(point(100, 1.0, socket_errors=10)) is None  # 1% of 1,000
    assert "socket errors" in str(invalid_reason(point(100, 1.0, socket_errors=11)))
    assert invalid_reason(point(0, 1.0)) == "no request answered"
    assert invalid_reason(point(100, 1.0, error="wrk exited 1")) == "wrk exited 1"


def arm(c1_p50: float, c64_rps: float, invalid: str | None = None) -> dict[str, Any]:
    return {
        "c1": {**point(900, c1_p50), "invalid": invalid},
        "c64": {**point(c64_rps, 30.0), "invalid": invalid},
    }


ARMS = {
    "fastapi-1/light": arm(0.40, 2200),
    "fastapi-2/light": arm(0.45, 4400),
    "pytriton-2/light": arm(3.9, 9000, invalid="3 non-2xx answers"),  # never the best
    "kserve-1/light": arm(0.36, 2600),
    "kserve-2/medium": arm(5.0, 400),
    "kiln/light": arm(0.72, 2200),
    "kiln-2-replicas/light": arm(0.80, 4840),
    "kiln/medium": arm(4.0, 900),
}


def test_compare_picks_the_best_valid_peer_and_divides():
    c64 = compare(ARMS, "kiln", "light", 64)
    assert c64 == {"kiln": 2200, "best_peer": "fastapi-2", "best": 4400, "ratio": 0.5}
    c1 = compare(ARMS, "kiln", "light", 1)  # the lowest p50; Kiln's ratio > 1 is slower
    assert c1 == {"kiln": 0.72, "best_peer": "kserve-1", "best": 0.36, "ratio": 2.0}
    medium = compare(ARMS, "kiln", "medium", 64)
    assert medium["best_peer"] == "kserve-2" and medium["ratio"] == pytest.approx(2.25)


def test_summary_reports_both_kiln_topologies_and_skips_invalid_kiln():
    out = summary(ARMS, ["light"])
    assert out["light_c64_rps"]["ratio_2_replicas"] == pytest.approx(1.1)
    arms = {**ARMS, "kiln/light": arm(0.72, 2200, invalid="no request answered")}
    broken = summary(arms, ["light"])["light_c64_rps"]
    assert broken["kiln"] is None and broken["ratio"] is None
    assert broken["best_peer"] == "fastapi-2"


def test_no_valid_peer_gives_no_ratio():
    only_kiln = {"kiln/light": arm(0.7, 2000), "fastapi-2/light": {"skipped": "pip failed"}}
    assert compare(only_kiln, "kiln", "light", 64) == {
        "kiln": 2000,
        "best_peer": None,
        "best": None,
        "ratio": None,
    }


def test_foreign_torch_finds_another_torch_or_a_cuda_wheel():
    ours = "Would install fastapi-0.165.0 torch-2.13.0 uvicorn-0.55.0"
    assert foreign_torch(ours) == []
    theirs = "Would install torch-2.5.1 nvidia-cublas-cu12-12.4.5.8 nvidia-pytriton-0.7.0"
    assert foreign_torch(theirs) == ["torch-2.5.1", "nvidia-cublas-cu12-12.4.5.8"]


def test_lua_and_labels():
    script = lua("/v1/models/m:predict", '{"instances": [[1.5]]}', {"Authorization": "Bearer k"})
    assert 'wrk.path = "/v1/models/m:predict"' in script
    assert 'wrk.body = "{\\"instances\\": [[1.5]]}"' in script
    assert 'wrk.headers["Authorization"] = "Bearer k"' in script
    assert flatten([[3]]) == flatten([3]) == flatten(3) == [3]


def test_grpc_arms_compare_among_themselves():
    arms = {
        **ARMS,
        "grpc:pytriton-2/light": arm(0.9, 3000),
        "grpc:pytriton-1/light": arm(0.8, 2500),
        "grpc:kiln/light": arm(1.0, 3300),
    }
    got = compare(arms, "kiln", "light", 64, "grpc:")
    assert got == {"kiln": 3300, "best_peer": "pytriton-2", "best": 3000, "ratio": 1.1}
    # gRPC arms never enter the HTTP comparison
    assert compare(arms, "kiln", "light", 64)["best_peer"] == "fastapi-2"
    out = summary(arms, ["light"])
    assert out["grpc_light_c1_p50_ms"]["best_peer"] == "pytriton-1"
    assert "grpc_light_c64_rps" not in summary(ARMS, ["light"])


def test_grpc_figures_count_failed_calls_as_non_2xx():
    result = {"req_s": 3000.0, "p50_ms": 20.0, "p99_ms": 50.0, "requests": 24000, "errors": 2}
    figures = grpc_figures(result)
    assert figures["rps"] == 3000.0 and figures["non_2xx"] == 2
    assert "non-2xx" in str(invalid_reason(figures))
    assert invalid_reason(grpc_figures({**result, "errors": 0})) is None
    assert invalid_reason(grpc_figures({})) == "no request answered"


def test_best_of_rounds_keeps_each_levels_best_valid_point():
    first = {**arm(0.5, 4000, invalid="3 non-2xx answers"), "load_before": 9.0, "load_after": 8.0}
    second = {**arm(0.7, 2000), "load_before": 2.0, "load_after": 3.0}
    third = {**arm(0.6, 2500), "load_before": 4.0, "load_after": 5.0}
    best = best_of([first, second, {"skipped": "did not start"}, third])
    assert best["c1"]["p50_ms"] == 0.6 and best["c64"]["rps"] == 2500  # never the invalid one
    assert (best["load_before"], best["load_after"]) == (2.0, 8.0)
    assert [r["c64_rps"] for r in best["rounds"]] == [4000, 2000, 2500]
    assert best["skipped_rounds"] == ["did not start"]
    assert best_of([second]) is second
    only_bad = best_of([first, {**first}])
    assert only_bad["c64"]["invalid"] and figure(only_bad, 64) is None
    assert best_of([{"skipped": "a"}, {"skipped": "b"}]) == {"skipped": "b"}


def test_a_runs_json_line_draws_every_server_and_leaves_invalid_arms_out(tmp_path):
    import json

    from PIL import Image

    from benchmarks.serve_peers import panel_bars, plot_result

    def point(rps: float, p50: float, invalid: str | None = None) -> dict[str, Any]:
        return {"rps": rps, "p50_ms": p50, "invalid": invalid}

    arms = {
        "fastapi-1/light": {"c1": point(1, 0.3), "c64": point(3000, 9)},
        "fastapi-2/light": {"c1": point(1, 0.4), "c64": point(6000, 9)},
        "pytriton-2/light": {"c1": point(1, 2.0), "c64": point(0, 9, "no answers")},
        "pytriton-2/medium": {"c1": point(1, 6.0), "c64": point(1300, 40)},
        "grpc:pytriton-2/light": {"c1": point(1, 2.2), "c64": point(2300, 20)},
        "kiln/light": {"c1": point(1, 0.22), "c64": point(10000, 5)},
        "kiln-2-replicas/light": {"c1": point(1, 0.24), "c64": point(12000, 4)},
        "grpc:kiln-2-replicas/light": {"c1": point(1, 0.8), "c64": point(2800, 20)},
    }
    light_c64, light_c1, medium_c64, grpc_c64 = panel_bars(arms)
    assert light_c64 == [("fastapi", [3000, 6000]), ("kiln", [10000, 12000])]  # invalid: out
    assert light_c1 == [("fastapi", [0.3, 0.4]), ("pytriton", [None, 2.0]), ("kiln", [0.22, 0.24])]
    assert medium_c64 == [("pytriton", [None, 1300])]
    assert grpc_c64 == [("pytriton", [None, 2300]), ("kiln", [None, 2800])]
    result = tmp_path / "run.out"
    result.write_text("a table line\n" + json.dumps({"arms": arms, "cpu": "X", "cores": 2}) + "\n")
    png = tmp_path / "run.png"
    plot_result(result, png)
    assert Image.open(png).size == (1100, 650)
