"""The SLO-aware choice of `kiln serve NAME --slo-p99-ms X --min-accuracy Y [--target-rps R]`,
and the accuracy/latency Pareto front `kiln models compare` marks.

Among a model's profiled versions (one candidate per version and backend), pick the cheapest
whose accuracy (R² for a regressor) is at least Y and whose predicted p99 at R requests/s fits
X, with the fewest replicas that carry R. Pure: candidates and their latency profiles in, a
verdict for every candidate (with the reasons it was rejected) and the choice out.

The model, per replica (times in ms; λ = R / replicas, in requests per ms):

- **Forward cost** of a batch of b rows, `c(b) = a + s·b`, is the line through the profile's
  batch-1 and batch-64 times (p50 for cost and load, p99 for the tail): `s = (t64 − t1)/63`,
  `a = t1 − s`.
- **HTTP** adds `o` ms to every request's latency (the p99 of Kiln's HTTP path with nothing
  queued, `--http-overhead-ms`) and `h` ms of the replica's CPU per request (parsing, JSON,
  the response); both measured, see the constants.
- **Batching**: the server batches whatever is queued (`max_batch_size` 64), so while one
  batch computes the next one fills. A cycle serving b requests takes `T(b) = a + (h + s)·b`,
  and b requests arrive during it: `b = λ·T(b)`, i.e. `b = λa / (1 − λ(h + s))`, between 1
  and 64.
- **Cost** = CPU-seconds per 1,000 predictions = replica CPUs × `c(b)/b` ms per row (a
  forward's time per row at the batch the load implies; batch 1 without `--target-rps`). The
  HTTP handling costs every candidate the same `h` per request, so it is left out.
- **Utilisation** `ρ = λ·(h + c(64)/64)`: the load over what a replica carries with full
  batches. Replicas are the fewest that keep ρ ≤ `max_utilisation` (0.7) and the p99 within X.
- **p99 latency** is the smaller of two estimates (the server is in one regime or the other):
  requests served one at a time as an M/D/1 queue with service `D = h + t1`, `ρ1 = λD`: its
  waiting time has an approximately exponential tail (Kingman), `P(W > t) ≈ ρ1·exp(−t/θ)`,
  `θ = D / (2(1 − ρ1))`, so `p99 = o + t1_p99 + θ·ln(100·ρ1)` (no wait when ρ1 ≤ 0.01); and
  batched, a request waits for the cycle in progress and then its own: `p99 = o + T(b) +
  T_p99(b)`, where `T_p99` uses the p99 forward line. Both grow with λ, so more replicas never
  predict a higher p99.

Without `--target-rps` the load is taken as light: one replica, requests one at a time
(`p99 = o + t1_p99`). The model is deliberately simple: Poisson arrivals spread evenly over
the replicas, each replica on its own CPUs, the profile's machine the serving one.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass, field
from typing import Any

logger = logging.getLogger(__name__)

HTTP_OVERHEAD_MS = 7.3
"""p99 of the latency Kiln's HTTP path adds to a request with nothing queued (ms).

`kiln serve` of the light model (MLP 64->256->10, one 1-CPU replica, HAProxy ingress), one
wrk connection, on this project's 2-core machine with nothing else running:
benchmarks/results/serve_throughput.out, `light_batched_kiln` c1: p99 7.46 ms (p50 3.16 ms),
less that model's batch-1 forward (p50 0.19 ms, its profile; subtracting the p50 rather than
the p99 keeps the constant on the safe side). `benchmarks/http_overhead.py` measures the same
(docs/commands.md, "SLO-aware serving", has its runs). Override with `--http-overhead-ms`.
"""
HTTP_CPU_MS = 1.48
"""Replica CPU per request spent on HTTP, JSON and the response (ms): 1 s over the 672
requests/s one 1-CPU replica served of the light model at 64 connections, less its batched
forward (0.0045 ms a row) (benchmarks/results/serve_throughput.out, `light_batched_kiln`
c64)."""
MAX_UTILISATION = 0.7
MAX_REPLICAS = 64
MAX_BATCH = 64
TAIL_QUANTILE = 0.99


@dataclass(frozen=True)
class Latency:
    """The figures of a latency profile the model uses (ms)."""

    b1_p50_ms: float
    b1_p99_ms: float
    b64_p50_ms: float
    b64_p99_ms: float

    @classmethod
    def from_profile(cls, profile: dict[str, Any]) -> Latency:
        return cls(
            float(profile["b1_p50_ms"]),
            float(profile["b1_p99_ms"]),
            float(profile["b64_p50_ms"]),
            float(profile["b64_p99_ms"]),
        )

    def line(self, tail: bool = False) -> tuple[float, float]:
        """(a, s) of the forward cost `c(b) = a + s·b` (p99 figures when `tail`)."""
        t1, t64 = (self.b1_p99_ms, self.b64_p99_ms) if tail else (self.b1_p50_ms, self.b64_p50_ms)
        slope = max(0.0, (t64 - t1) / (MAX_BATCH - 1))
        return max(0.0, t1 - slope), slope

    def forward_ms(self, batch: float, tail: bool = False) -> float:
        a, s = self.line(tail)
        return a + s * batch


@dataclass(frozen=True)
class Candidate:
    """One way to serve a version: its ref, backend, test score and latency profile."""

    ref: str
    backend: str
    score: float | None
    """Test accuracy (classification) or R² (regression); None when its metrics lack it."""
    metric: str
    profile: dict[str, Any]

    @property
    def version(self) -> int:
        return int(self.ref.rpartition("@")[2])

    @property
    def latency(self) -> Latency:
        return Latency.from_profile(self.profile)


@dataclass(frozen=True, kw_only=True)
class SLO:
    """What the deployment must meet, and the constants of the model."""

    p99_ms: float
    min_accuracy: float
    target_rps: float | None = None
    http_overhead_ms: float = HTTP_OVERHEAD_MS
    http_cpu_ms: float = HTTP_CPU_MS
    num_cpus: float = 1.0
    """CPUs per replica (`--num-cpus`): what the cost counts."""
    max_utilisation: float = MAX_UTILISATION
    max_replicas: int = MAX_REPLICAS

    def __post_init__(self) -> None:
        checks = (
            (self.p99_ms > 0, f'Got "{self.p99_ms}" for --slo-p99-ms. Use a positive number.'),
            (
                self.min_accuracy <= 1,
                f'Got "{self.min_accuracy}" for --min-accuracy. Use a share up to 1, e.g. 0.95.',
            ),
            (
                self.target_rps is None or self.target_rps > 0,
                f'Got "{self.target_rps}" for --target-rps. Use a positive rate (requests/s).',
            ),
            (
                self.http_overhead_ms >= 0,
                f'Got "{self.http_overhead_ms}" for --http-overhead-ms. Use 0 or more.',
            ),
            (self.num_cpus > 0, f'Got "{self.num_cpus}" for --num-cpus. Use a positive number.'),
            (0 < self.max_utilisation < 1, "max_utilisation must lie in (0, 1)"),
            (self.max_replicas >= 1, "max_replicas must be at least 1"),
        )
        for ok, message in checks:
            if not ok:
                raise ValueError(message)

    @property
    def load(self) -> str:
        return f"{self.target_rps:g} rps" if self.target_rps else "light load"


@dataclass(frozen=True)
class Prediction:
    """What the model predicts for one candidate on a number of replicas."""

    replicas: int
    p99_ms: float
    utilisation: float
    batch: float
    cost: float
    """CPU-seconds per 1,000 predictions."""


@dataclass(frozen=True)
class Verdict:
    candidate: Candidate
    prediction: Prediction
    """At the replicas chosen, or (when none fits) at the most replicas allowed."""
    reasons: list[str] = field(default_factory=list)
    """Why it was rejected; empty when it qualifies."""

    @property
    def ok(self) -> bool:
        return not self.reasons

    def to_dict(self) -> dict[str, Any]:
        p = self.prediction
        return {
            "ref": self.candidate.ref,
            "backend": self.candidate.backend,
            self.candidate.metric: self.candidate.score,
            "p99_ms": round(p.p99_ms, 3) if math.isfinite(p.p99_ms) else None,
            "cost_cpu_s_per_1k": round(p.cost, 5),
            "replicas": p.replicas,
            "utilisation": round(p.utilisation, 3),
            "batch": round(p.batch, 2),
            "ok": self.ok,
            "reasons": self.reasons,
        }


@dataclass(frozen=True)
class Choice:
    verdicts: list[Verdict]
    chosen: Verdict | None
    message: str
    """One line: what was chosen and why, or which constraint failed and the closest one."""


# ----------------------------------------------------------------------------- Pareto front


def pareto_front(points: list[tuple[float, float]]) -> list[bool]:
    """For (score, latency) points: whether each is on the front, i.e. no other point is at
    least as accurate and at least as fast and strictly better in one of the two."""

    def dominated(i: int) -> bool:
        score, latency = points[i]
        return any(
            other_score >= score
            and other_latency <= latency
            and (other_score > score or other_latency < latency)
            for j, (other_score, other_latency) in enumerate(points)
            if j != i
        )

    return [not dominated(i) for i in range(len(points))]


# ----------------------------------------------------------------------------- the model


def batch_size(latency: Latency, rate_per_ms: float, http_cpu_ms: float) -> float:
    """Rows per batch the load implies: `b = λa / (1 − λ(h + s))`, within [1, 64]."""
    a, s = latency.line()
    room = 1.0 - rate_per_ms * (http_cpu_ms + s)
    if room <= 0:
        return float(MAX_BATCH)
    return min(float(MAX_BATCH), max(1.0, rate_per_ms * a / room))


def queued_p99_ms(latency: Latency, rate_per_ms: float, slo: SLO) -> float:
    """p99 with requests served one at a time (M/D/1, exponential tail); inf when overloaded."""
    service_ms = slo.http_cpu_ms + latency.b1_p50_ms
    busy = rate_per_ms * service_ms
    if busy >= 1:
        return math.inf
    wait_ms = 0.0
    if busy > 1 - TAIL_QUANTILE:
        wait_ms = service_ms / (2 * (1 - busy)) * math.log(busy / (1 - TAIL_QUANTILE))
    return slo.http_overhead_ms + latency.b1_p99_ms + wait_ms


def batched_p99_ms(latency: Latency, rate_per_ms: float, slo: SLO) -> float:
    """p99 with batching: the cycle in progress, then the request's own; inf when overloaded."""
    _, s = latency.line()
    if rate_per_ms * (slo.http_cpu_ms + s) >= 1:
        return math.inf
    b = batch_size(latency, rate_per_ms, slo.http_cpu_ms)
    cycle_ms = latency.forward_ms(b) + slo.http_cpu_ms * b
    tail_cycle_ms = latency.forward_ms(b, tail=True) + slo.http_cpu_ms * b
    return slo.http_overhead_ms + cycle_ms + tail_cycle_ms


def predict(latency: Latency, replicas: int, slo: SLO) -> Prediction:
    """p99, utilisation, batch and cost of serving `slo.target_rps` on `replicas` replicas."""
    rate_per_ms = (slo.target_rps or 0.0) / replicas / 1000.0
    b = batch_size(latency, rate_per_ms, slo.http_cpu_ms)
    per_request_ms = slo.http_cpu_ms + latency.forward_ms(MAX_BATCH) / MAX_BATCH
    if rate_per_ms == 0:
        p99 = slo.http_overhead_ms + latency.b1_p99_ms
    else:
        p99 = min(
            queued_p99_ms(latency, rate_per_ms, slo), batched_p99_ms(latency, rate_per_ms, slo)
        )
    return Prediction(
        replicas=replicas,
        p99_ms=p99,
        utilisation=rate_per_ms * per_request_ms,
        batch=b,
        cost=slo.num_cpus * latency.forward_ms(b) / b,
    )


# ----------------------------------------------------------------------------- the choice


def judge(candidate: Candidate, slo: SLO) -> Verdict:
    """The fewest replicas meeting the SLO for `candidate`, or why there are none."""
    reasons: list[str] = []
    if candidate.score is None:
        reasons.append(f"no {candidate.metric} in its metrics")
    elif candidate.score < slo.min_accuracy:
        reasons.append(f"{candidate.metric} {candidate.score:.4g} < {slo.min_accuracy:g}")
    latency = candidate.latency
    most = slo.max_replicas if slo.target_rps else 1
    for replicas in range(1, most + 1):
        found = predict(latency, replicas, slo)
        if found.utilisation <= slo.max_utilisation and found.p99_ms <= slo.p99_ms:
            return Verdict(candidate, found, reasons)
    found = predict(latency, most, slo)
    if slo.p99_ms < found.p99_ms < math.inf:  # inf: overloaded, which the next reason says
        reasons.append(f"p99 {found.p99_ms:.1f} ms > {slo.p99_ms:g} ms at {slo.load}")
    if found.utilisation > slo.max_utilisation:
        reasons.append(
            f"needs more than {most} replicas for {slo.load} at utilisation "
            f"<= {slo.max_utilisation:g}"
        )
    return Verdict(candidate, found, reasons)


def rank_key(verdict: Verdict) -> tuple[float, float, int, float, int]:
    """Cheapest first; then more accurate, fewer replicas, faster, newer."""
    p = verdict.prediction
    score = verdict.candidate.score if verdict.candidate.score is not None else -math.inf
    return (p.cost, -score, p.replicas, p.p99_ms, -verdict.candidate.version)


def choose(name: str, candidates: list[Candidate], slo: SLO) -> Choice:
    """Judge every candidate and pick the cheapest that qualifies (see the module docstring)."""
    verdicts = [judge(c, slo) for c in candidates]
    if not verdicts:
        return Choice(
            [],
            None,
            f"no active version of {name} has a latency profile; measure one with "
            f"kiln models profile {name}@N",
        )
    passing = [v for v in verdicts if v.ok]
    if passing:
        chosen = min(passing, key=rank_key)
        p = chosen.prediction
        return Choice(
            verdicts,
            chosen,
            f"{chosen.candidate.ref} ({chosen.candidate.backend}) on {p.replicas} replica(s): "
            f"p99 {p.p99_ms:.1f} ms at {slo.load}, {p.cost:.4g} CPU-s per 1,000 predictions",
        )
    return Choice(verdicts, None, refusal(name, verdicts, slo))


def refusal(name: str, verdicts: list[Verdict], slo: SLO) -> str:
    """Which constraint failed, and the candidate that came closest to it."""
    metric = verdicts[0].candidate.metric
    accurate = [v for v in verdicts if not any(r.startswith(metric) for r in v.reasons)]
    accurate = [v for v in accurate if v.candidate.score is not None]
    if not accurate:
        scored = [v for v in verdicts if v.candidate.score is not None]
        if not scored:
            return f"no version of {name} records its {metric}; none can meet --min-accuracy"
        best = max(scored, key=lambda v: v.candidate.score or -math.inf)
        return (
            f"no version of {name} reaches {metric} {slo.min_accuracy:g} (--min-accuracy); "
            f"closest: {best.candidate.ref} with {best.candidate.score:.4g}"
        )
    best = min(accurate, key=lambda v: (v.prediction.p99_ms, v.prediction.cost))
    return (
        f"no version of {name} with {metric} >= {slo.min_accuracy:g} meets --slo-p99-ms "
        f"{slo.p99_ms:g} at {slo.load}; closest: {best.candidate.ref} ({best.candidate.backend}), "
        f"{'; '.join(best.reasons)}"
    )
