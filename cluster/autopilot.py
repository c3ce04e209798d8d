"""`kiln autopilot NAME`: feedback → retrain → canary → promote or roll back, unattended.

A detached Ray actor per model (`kiln-autopilot-<name>`, restarted when it dies) checks every
`check_every_s`:

1. *watching*: labelled feedback since the last cut-off. With at least `--min-feedback` rows
   (or, with `--on-drift`, as soon as an input drifts and half of them are there) it runs
   `kiln retrain` over the rows since the cut-off, which deploys a canary.
2. *canary*: the canary and the production version are compared on the labelled feedback each
   answered since the canary went live. A classifier's accuracies by a two-proportion z-test:
   promote when the one-sided 95% lower bound of (canary − production) is at least
   `--min-gain`, roll back when the upper bound is below 0 (worse with 95% confidence). A
   regressor's R² by a percentile bootstrap of the difference (2,000 resamples), with the same
   rules. Past `--max-canary-s` without a verdict: roll back.

Every decision goes to the registry's audit with its figures, and the state is a JSON file
under `$KILN_STORAGE/monitoring/<name>/autopilot.json`, written after each transition, so a
restarted actor (or a new `kiln autopilot` after a cluster restart) resumes where it was.
"""

from __future__ import annotations

import json
import logging
import math
import threading
import time
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np
import pyarrow as pa
import ray
from scipy import stats

from kiln.actors.feedback import MONITORING_DIR, read_window
from kiln.actors.monitor import quality
from kiln.actors.registry import NAMESPACE
from kiln.actors.storage import ArtifactStore
from kiln.training.errors import KilnError, check_options

logger = logging.getLogger(__name__)

CONFIDENCE = 0.95
BOOTSTRAP_RESAMPLES = 2000
MAX_DECISIONS_KEPT = 50


@dataclass(kw_only=True)
class AutopilotConfig:
    name: str
    min_feedback: int = 500
    min_gain: float = 0.01
    max_canary_s: float = 900.0
    on_drift: bool = False
    canary_weight: int = 10
    check_every_s: float = 30.0
    epochs: int = 5
    key: str | None = None

    def __post_init__(self) -> None:
        checks = [
            (self.min_feedback >= 2, "--min-feedback", self.min_feedback, "at least 2"),
            (-1 < self.min_gain < 1, "--min-gain", self.min_gain, "between -1 and 1"),
            (self.max_canary_s > 0, "--max-canary-s", self.max_canary_s, "above 0"),
            (1 <= self.canary_weight <= 99, "--canary-weight", self.canary_weight, "1 to 99"),
            (self.check_every_s > 0, "--check-every-s", self.check_every_s, "above 0"),
        ]
        check_options(checks)


@dataclass
class AutopilotState:
    phase: str = "watching"  # watching | canary | stopped
    cutoff_ts: float = 0.0
    """Feedback on predictions before this was used already (by the last retrain)."""
    canary_ref: str | None = None
    production_ref: str | None = None
    canary_since_ts: float = 0.0
    decisions: list[dict[str, Any]] = field(default_factory=list)


# ----------------------------------------------------------------------------- the verdicts


def compare_accuracy(
    hits_canary: int, n_canary: int, hits_production: int, n_production: int, min_gain: float
) -> dict[str, Any]:
    """Two-proportion comparison: the gain and its one-sided 95% bounds, and the verdict."""
    p_c, p_p = hits_canary / n_canary, hits_production / n_production
    se = math.sqrt(p_c * (1 - p_c) / n_canary + p_p * (1 - p_p) / n_production)
    z = float(stats.norm.ppf(CONFIDENCE))
    gain = p_c - p_p
    lower, upper = gain - z * se, gain + z * se
    return {
        "metric": "accuracy",
        "canary": p_c,
        "production": p_p,
        "n_canary": n_canary,
        "n_production": n_production,
        "gain": gain,
        "lower": lower,
        "upper": upper,
        "verdict": verdict(lower, upper, min_gain),
    }


def compare_r2(
    canary: tuple[np.ndarray, np.ndarray],
    production: tuple[np.ndarray, np.ndarray],
    min_gain: float,
    seed: int = 0,
) -> dict[str, Any]:
    """Bootstrap of R²(canary) − R²(production), each (y, ŷ), with the same verdict rules."""
    rng = np.random.default_rng(seed)

    def r2(y: np.ndarray, pred: np.ndarray) -> float:
        total = float(((y - y.mean()) ** 2).sum())
        return 1 - float(((y - pred) ** 2).sum()) / total if total > 0 else 0.0

    diffs = []
    for _ in range(BOOTSTRAP_RESAMPLES):
        i = rng.integers(0, len(canary[0]), len(canary[0]))
        j = rng.integers(0, len(production[0]), len(production[0]))
        diffs.append(r2(canary[0][i], canary[1][i]) - r2(production[0][j], production[1][j]))
    lower, upper = np.quantile(diffs, [1 - CONFIDENCE, CONFIDENCE]).tolist()
    gain = r2(*canary) - r2(*production)
    return {
        "metric": "r2",
        "canary": r2(*canary),
        "production": r2(*production),
        "n_canary": len(canary[0]),
        "n_production": len(production[0]),
        "gain": gain,
        "lower": lower,
        "upper": upper,
        "verdict": verdict(lower, upper, min_gain),
    }


def verdict(lower: float, upper: float, min_gain: float) -> str:
    if lower >= min_gain:
        return "promote"
    if upper < 0:
        return "rollback"
    return "wait"


def live_comparison(
    table: pa.Table, spec: dict[str, Any], canary: int, production: int, min_gain: float
) -> dict[str, Any] | None:
    """The canary against production on the labelled rows each served (None: too few)."""
    labelled = table.filter(table.column("label").is_valid())
    parts = {}
    for version in (canary, production):
        rows = labelled.filter(pa.array(labelled.column("version").to_numpy() == version))
        if rows.num_rows < 10:
            return None
        parts[version] = rows
    if spec["task"] == "classification":
        found = {}
        for version, rows in parts.items():
            q = quality(
                spec, rows.column("prediction").to_numpy(), rows.column("label").to_pylist()
            )
            found[version] = (round(q["accuracy"] * q["labelled_rows"]), q["labelled_rows"])
        return compare_accuracy(*found[canary], *found[production], min_gain)
    pairs = {
        v: (
            np.array([float(json.loads(t)) for t in rows.column("label").to_pylist()]),
            rows.column("prediction").to_numpy(),
        )
        for v, rows in parts.items()
    }
    return compare_r2(pairs[canary], pairs[production], min_gain)


# ----------------------------------------------------------------------------- the actor


def actor_name(name: str) -> str:
    return f"kiln-autopilot-{name}"


def state_path(name: str) -> str:
    return f"{MONITORING_DIR}/{name}/autopilot.json"


class AutopilotService:
    """The loop's logic; the actor below runs `step` on a thread every `check_every_s`."""

    def __init__(self, config: dict[str, Any], settings: dict[str, Any]) -> None:
        from kiln.settings import Settings

        self.config = AutopilotConfig(**config)
        self.settings = Settings(**settings)
        self.store = ArtifactStore(self.settings.storage_uri)
        self.state = self.load_state()
        self.state.phase = "canary" if self.state.canary_ref else "watching"
        self.last_error: str | None = None

    def load_state(self) -> AutopilotState:
        try:
            return AutopilotState(**json.loads(self.store.read(state_path(self.config.name))))
        except KilnError:  # no file yet: start from now
            return AutopilotState(cutoff_ts=time.time())

    def save_state(self) -> None:
        self.state.decisions = self.state.decisions[-MAX_DECISIONS_KEPT:]
        self.store.publish(state_path(self.config.name), json.dumps(asdict(self.state)).encode())

    def decide(self, action: str, target: str, detail: dict[str, Any]) -> None:
        """Record a decision in the state and the registry's audit."""
        from kiln.runtime import registry_for

        entry = {"at": time.time(), "action": action, "target": target, **detail}
        self.state.decisions.append(entry)
        self.save_state()
        registry = registry_for(self.settings)
        ray.get(
            registry.record_event.remote(f"autopilot-{action}", target, detail, self.config.key)
        )
        logger.info("autopilot %s: %s %s", self.config.name, action, detail)

    def step(self) -> str:
        """One check; returns what it did."""
        if self.state.phase == "canary":
            return self.judge_canary()
        return self.maybe_retrain()

    def maybe_retrain(self) -> str:
        from kiln.retrain import RetrainRequest, retrain_and_register
        from kiln.runtime import registry_for

        table = read_window(
            self.settings.storage_uri, self.config.name, self.state.cutoff_ts, with_inputs=False
        )
        labelled = int(table.column("label").is_valid().to_numpy(zero_copy_only=False).sum())
        enough = labelled >= self.config.min_feedback
        half = labelled >= max(2, self.config.min_feedback // 2)
        # Drift is looked at once half the feedback is there (it reads every logged input).
        drifted = self.drifted() if self.config.on_drift and half else []
        drift_trigger = bool(drifted)
        if not (enough or drift_trigger):
            return f"watching: {labelled} labelled rows since the cut-off"
        window_s = max(60.0, time.time() - self.state.cutoff_ts + 60)
        request = RetrainRequest(
            name=self.config.name,
            since=f"{math.ceil(window_s)}s",
            canary_weight=self.config.canary_weight,
            epochs=self.config.epochs,
            min_feedback=2,
            key=self.config.key,
        )
        done = retrain_and_register(self.settings, request, registry_for(self.settings))
        if done["canary"] is None:
            self.decide("retrain", f"{done['model']}@{done['version']}", {"deployed": False})
            self.state.cutoff_ts = time.time()
            self.save_state()
            return "retrained; not served, so no canary"
        self.state.phase = "canary"
        self.state.canary_ref = done["canary"]["ref"]
        self.state.production_ref = done["parent"]
        self.state.canary_since_ts = time.time()
        self.state.cutoff_ts = time.time()
        self.decide(
            "retrain",
            self.state.canary_ref,
            {
                "trigger": "drift" if drift_trigger and not enough else "feedback",
                "drifted_features": drifted[:20],
                "labelled_rows": labelled,
                "heldout_before": done["heldout_before"],
                "heldout_after": done["heldout_after"],
                "canary_weight": self.config.canary_weight,
            },
        )
        return f"canary {self.state.canary_ref} deployed"

    def drifted(self) -> list[str]:
        from kiln.actors.monitor import build_report

        records = self.records()
        since_s = max(60.0, time.time() - self.state.cutoff_ts)
        report = build_report(self.settings.storage_uri, self.config.name, records, since_s)
        names: list[str] = []
        for entry in report["versions"]:
            names += (entry.get("drift") or {}).get("drifted_features") or []
        return sorted(set(names))

    def records(self) -> dict[int, Any]:
        from kiln.runtime import registry_for

        registry = registry_for(self.settings)
        return {r.version: r for r in ray.get(registry.list_versions.remote(self.config.name))}

    def judge_canary(self) -> str:
        from kiln.serving_control import promote, rollback

        assert self.state.canary_ref and self.state.production_ref
        canary = int(self.state.canary_ref.rpartition("@")[2])
        production = int(self.state.production_ref.rpartition("@")[2])
        records = self.records()
        table = read_window(
            self.settings.storage_uri,
            self.config.name,
            self.state.canary_since_ts,
            with_inputs=False,
        )
        found = live_comparison(
            table, records[canary].spec, canary, production, self.config.min_gain
        )
        waited_s = time.time() - self.state.canary_since_ts
        action = found["verdict"] if found else "wait"
        if action == "wait" and waited_s > self.config.max_canary_s:
            action = "rollback"
        if action == "wait":
            return f"canary {self.state.canary_ref}: no verdict yet ({found})"
        if action == "promote":
            promote(self.settings, self.config.name, self.config.key)
        else:
            rollback(self.settings, self.config.name, self.config.key)
        detail: dict[str, Any] = {
            "comparison": found,
            "canary_s": waited_s,
            "min_gain": self.config.min_gain,
        }
        if found is None or found["verdict"] == "wait":
            detail["reason"] = f"no verdict within --max-canary-s {self.config.max_canary_s:g}"
        target = self.state.canary_ref
        self.state.phase, self.state.canary_ref = "watching", None
        self.state.cutoff_ts = time.time()
        self.decide(action, target, detail)
        return f"{action} {target}"

    def status(self) -> dict[str, Any]:
        return {
            "model": self.config.name,
            "config": asdict(self.config) | {"key": None},
            "state": asdict(self.state),
            "last_error": self.last_error,
        }


@ray.remote(num_cpus=0, max_restarts=-1)
class Autopilot(AutopilotService):
    """The autopilot of one model as a detached actor: a thread runs `step` periodically."""

    def __init__(self, config: dict[str, Any], settings: dict[str, Any]) -> None:
        super().__init__(config, settings)
        self._stop = threading.Event()
        self._lock = threading.Lock()
        threading.Thread(target=self._loop, daemon=True, name="autopilot").start()

    def _loop(self) -> None:
        while not self._stop.wait(self.config.check_every_s):
            with self._lock:
                try:
                    logger.info("autopilot %s: %s", self.config.name, self.step())
                    self.last_error = None
                except Exception as exc:  # keep watching: the next check tries again
                    self.last_error = f"{type(exc).__name__}: {exc}"
                    logger.exception("autopilot %s step failed", self.config.name)

    def get_status(self) -> dict[str, Any]:
        with self._lock:
            return self.status()

    def stop(self) -> dict[str, Any]:
        self._stop.set()
        with self._lock:
            self.state.phase = "stopped"
            self.save_state()
            return self.status()


def start_autopilot(config: AutopilotConfig, settings: Any) -> Any:
    """The model's autopilot actor (an existing one is replaced by one with this config)."""
    name = actor_name(config.name)
    try:
        old = ray.get_actor(name, namespace=NAMESPACE)
        ray.get(old.stop.remote())
        ray.kill(old, no_restart=True)
    except ValueError:
        pass
    options: dict[str, Any] = {"name": name, "namespace": NAMESPACE, "lifetime": "detached"}
    handle = Autopilot.options(**options).remote(  # type: ignore[attr-defined]
        asdict(config), settings.model_dump(mode="json")
    )
    ray.get(handle.get_status.remote())  # constructed: a bad state file fails here
    return handle


def find_autopilot(name: str) -> Any:
    try:
        return ray.get_actor(actor_name(name), namespace=NAMESPACE)
    except ValueError:
        raise KilnError(
            f"no autopilot runs for {name}; start one with kiln autopilot {name} --min-feedback N"
        ) from None
