"""The SLO choice and the Pareto front (serving/slo.py): pure, on candidates with known profiles."""

import math

import pytest

from kiln.serving.slo import (
    SLO,
    Candidate,
    Latency,
    batch_size,
    choose,
    pareto_front,
    predict,
    queued_p99_ms,
)


def profile(b1: float, b64: float, tail: float = 1.5) -> dict:
    return {
        "b1_p50_ms": b1,
        "b1_p99_ms": b1 * tail,
        "b64_p50_ms": b64,
        "b64_p99_ms": b64 * tail,
    }


def candidate(version: int, score: float | None, b1: float, b64: float, backend: str = "torch"):
    return Candidate(f"m@{version}", backend, score, "accuracy", profile(b1, b64))


# The wide MLP's shape of trade-off: fp32, its int8 variant, a distilled student that lost
# accuracy, and a pruned one as fast as int8 at batch 1 but dearer per row.
FP32 = candidate(1, 0.97, b1=1.9, b64=25.0)
INT8 = candidate(2, 0.968, b1=0.68, b64=19.0)
STUDENT = candidate(3, 0.91, b1=0.2, b64=2.0)
PRUNED = candidate(4, 0.965, b1=0.68, b64=30.0)
ALL = [FP32, INT8, STUDENT, PRUNED]


def test_the_cheapest_accurate_enough_version_that_fits_is_chosen():
    choice = choose("m", ALL, SLO(p99_ms=20, min_accuracy=0.95, target_rps=200))
    assert choice.chosen is not None and choice.chosen.candidate is INT8
    verdicts = {v.candidate.ref: v for v in choice.verdicts}
    assert verdicts["m@3"].reasons == ["accuracy 0.91 < 0.95"]
    assert verdicts["m@1"].ok and verdicts["m@4"].ok  # they fit, but cost more
    assert verdicts["m@2"].prediction.cost < verdicts["m@1"].prediction.cost
    assert "m@2 (torch) on 1 replica(s)" in choice.message


def test_a_tighter_accuracy_floor_moves_the_choice_to_the_only_version_above_it():
    choice = choose("m", ALL, SLO(p99_ms=20, min_accuracy=0.969, target_rps=200))
    assert choice.chosen is not None and choice.chosen.candidate is FP32


def test_nothing_accurate_enough_is_refused_naming_the_closest_version():
    choice = choose("m", ALL, SLO(p99_ms=20, min_accuracy=0.99))
    assert choice.chosen is None
    assert choice.message == (
        "no version of m reaches accuracy 0.99 (--min-accuracy); closest: m@1 with 0.97"
    )


def test_a_latency_budget_nothing_fits_is_refused_with_the_predicted_p99():
    slo = SLO(p99_ms=8, min_accuracy=0.95, target_rps=200)
    choice = choose("m", ALL, slo)
    assert choice.chosen is None
    # The floor of every candidate is the HTTP overhead plus its batch-1 p99: more replicas
    # cannot go below it. The closest is the fastest accurate one (int8 and pruned tie at
    # batch 1; int8 is cheaper).
    assert choice.message.startswith(
        "no version of m with accuracy >= 0.95 meets --slo-p99-ms 8 at 200 rps; closest: m@2"
    )
    reasons = {v.candidate.ref: v.reasons for v in choice.verdicts}
    assert reasons["m@3"][0] == "accuracy 0.91 < 0.95"
    assert reasons["m@2"][0].startswith("p99 ") and reasons["m@2"][0].endswith(
        "ms > 8 ms at 200 rps"
    )
    best = min(v.prediction.p99_ms for v in choice.verdicts if v.candidate is INT8)
    assert best >= slo.http_overhead_ms + INT8.latency.b1_p99_ms


def test_between_two_that_fit_with_equal_accuracy_the_cheaper_wins_whatever_the_order():
    cheap = candidate(5, 0.96, b1=0.5, b64=5.0)
    dear = candidate(6, 0.96, b1=0.9, b64=9.0)
    slo = SLO(p99_ms=30, min_accuracy=0.95, target_rps=100)
    for order in ([cheap, dear], [dear, cheap]):
        assert choose("m", order, slo).chosen.candidate is cheap


def test_at_equal_cost_the_more_accurate_wins_then_the_newer():
    low = candidate(7, 0.95, b1=0.5, b64=5.0)
    high = candidate(8, 0.97, b1=0.5, b64=5.0)
    twin = candidate(9, 0.97, b1=0.5, b64=5.0)
    slo = SLO(p99_ms=30, min_accuracy=0.9)
    assert choose("m", [high, low], slo).chosen.candidate is high
    assert choose("m", [twin, high, low], slo).chosen.candidate is twin


def test_a_backend_is_a_candidate_of_its_own():
    onnx = candidate(1, 0.97, b1=1.0, b64=10.0, backend="onnxruntime")
    choice = choose("m", [FP32, onnx], SLO(p99_ms=20, min_accuracy=0.95, target_rps=50))
    assert (choice.chosen.candidate.ref, choice.chosen.candidate.backend) == ("m@1", "onnxruntime")


def test_no_profiled_version_says_how_to_profile_one():
    choice = choose("m", [], SLO(p99_ms=20, min_accuracy=0.9))
    assert choice.chosen is None and "kiln models profile m@N" in choice.message


def test_a_version_without_a_score_is_rejected_for_it():
    choice = choose("m", [candidate(1, None, 0.5, 5.0)], SLO(p99_ms=20, min_accuracy=0.5))
    assert choice.verdicts[0].reasons[0] == "no accuracy in its metrics"
    assert choice.chosen is None and "records its accuracy" in choice.message


def test_replicas_are_the_fewest_that_keep_utilisation_under_the_bound():
    fast = candidate(1, 0.97, b1=0.1, b64=6.4)  # 0.1 ms a row at batch 64
    slo = SLO(p99_ms=1000, min_accuracy=0.9, target_rps=1000)
    verdict = choose("m", [fast], slo).chosen
    per_request_ms = slo.http_cpu_ms + 6.4 / 64
    expected = math.ceil(1000 * per_request_ms / 1000 / slo.max_utilisation)
    assert verdict.prediction.replicas == expected == 3
    assert verdict.prediction.utilisation <= slo.max_utilisation
    fewer = predict(fast.latency, expected - 1, slo)
    assert fewer.utilisation > slo.max_utilisation


def test_a_load_beyond_the_most_replicas_is_rejected_for_it():
    slo = SLO(p99_ms=1000, min_accuracy=0.9, target_rps=1e6, max_replicas=8)
    reasons = choose("m", [INT8], slo).verdicts[0].reasons
    assert reasons == ["needs more than 8 replicas for 1e+06 rps at utilisation <= 0.7"]


def test_predicted_p99_never_rises_with_more_replicas_and_rises_with_load():
    latency = FP32.latency
    slo = SLO(p99_ms=50, min_accuracy=0.9, target_rps=600)
    by_replicas = [predict(latency, k, slo).p99_ms for k in range(1, 12)]
    assert all(a >= b for a, b in zip(by_replicas, by_replicas[1:], strict=False))
    by_load = [
        predict(latency, 1, SLO(p99_ms=50, min_accuracy=0.9, target_rps=r)).p99_ms
        for r in (1, 50, 200, 400)
    ]
    assert all(a <= b for a, b in zip(by_load, by_load[1:], strict=False))


def test_light_load_is_one_replica_at_batch_1_and_its_figures_are_the_profiles():
    slo = SLO(p99_ms=50, min_accuracy=0.9, num_cpus=2.0, http_overhead_ms=3.0)
    found = predict(FP32.latency, 1, slo)
    assert found.p99_ms == pytest.approx(3.0 + 1.9 * 1.5)
    assert (found.batch, found.utilisation) == (1.0, 0.0)
    assert found.cost == pytest.approx(2.0 * 1.9)  # 2 CPUs x 1.9 ms a row = CPU-s per 1,000


def test_the_one_at_a_time_wait_is_the_md1_exponential_tail():
    latency = Latency(1.0, 2.0, 10.0, 20.0)
    slo = SLO(p99_ms=50, min_accuracy=0.9, http_overhead_ms=3.0, http_cpu_ms=1.0)
    rate_per_ms = 0.25  # service 2 ms: 50 % busy
    theta = 2.0 / (2 * (1 - 0.5))
    assert queued_p99_ms(latency, rate_per_ms, slo) == pytest.approx(
        3.0 + 2.0 + theta * math.log(0.5 / 0.01)
    )
    assert queued_p99_ms(latency, 0.5, slo) == math.inf  # fully busy: it never drains


def test_batches_grow_with_load_and_cut_the_cost_per_row():
    latency = FP32.latency
    light = batch_size(latency, 0.05, http_cpu_ms=0.1)
    heavy = batch_size(latency, 1.0, http_cpu_ms=0.1)
    assert light == 1.0 and 1.0 < heavy <= 64.0
    slo = SLO(p99_ms=1000, min_accuracy=0.9, target_rps=2000, http_cpu_ms=0.1)
    assert predict(latency, 1, slo).cost < latency.b1_p50_ms


@pytest.mark.parametrize(
    "kwargs,fragment",
    [
        ({"p99_ms": 0, "min_accuracy": 0.9}, "--slo-p99-ms"),
        ({"p99_ms": 10, "min_accuracy": 1.5}, "--min-accuracy"),
        ({"p99_ms": 10, "min_accuracy": 0.9, "target_rps": -5}, "--target-rps"),
        ({"p99_ms": 10, "min_accuracy": 0.9, "http_overhead_ms": -1}, "--http-overhead-ms"),
    ],
)
def test_a_bad_slo_names_the_option(kwargs, fragment):
    with pytest.raises(ValueError, match=fragment):
        SLO(**kwargs)


def test_the_pareto_front_keeps_what_nothing_beats_on_both():
    points = [
        (0.97, 1.9),  # most accurate: on the front
        (0.968, 0.68),  # faster, a little less accurate: on the front
        (0.965, 0.68),  # as fast as the one above, less accurate: dominated
        (0.91, 0.2),  # fastest: on the front
        (0.90, 0.5),  # slower and less accurate than the one above: dominated
        (0.91, 0.2),  # a twin of a front point: neither beats the other
    ]
    assert pareto_front(points) == [True, True, False, True, False, True]
    assert pareto_front([]) == []
