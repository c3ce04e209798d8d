"""ASHA that promotes: trials wait at a rung until they rank in its top 1/η.

Ray's `ASHAScheduler` is the stopping variant of asynchronous successive halving: a trial that
reaches a rung continues unless it is below the rung's (1 - 1/η) quantile *so far*. The first
trials at a rung meet an empty or nearly empty rung and all continue. On a sweep of 16-20
trials that is most of them: measured on the digits grid of benchmarks/tune_efficiency.py,
Ray's ASHA ran 79% of the full grid's trial-epochs. This scheduler is the promotion variant
of the ASHA paper (Li et al., 2020, algorithm 2): a trial reaching a rung continues only if it
ranks in the top ⌊n/η⌋ of the n trials recorded there; otherwise it is paused (its checkpoint
is kept) and resumed later if enough worse trials arrive behind it. Once no trial can reach a
rung any more (every planned trial has been added and none is still below it), the rung is
settled: its top ⌈n/η⌉ (at least one) go on, the other paused trials stop.

Pausing needs a trial checkpoint to resume from: the one-worker trial attaches one to its
report at every rung milestone (tuning/sweep.py `checkpoint_plan`).
The scheduler's bookkeeping is not part of Tune's saved experiment state, so after
`kiln tune --resume` the unfinished trials simply continue and are judged at their next rung.
"""

from __future__ import annotations

import logging
import math
from typing import Any

from ray.tune.experiment import Trial
from ray.tune.schedulers import FIFOScheduler, TrialScheduler

logger = logging.getLogger(__name__)


def rung_milestones(grace_period: int, max_t: int, reduction_factor: float) -> list[int]:
    """Epochs at which trials are compared: grace, grace·η, grace·η², ... below max_t."""
    milestones: list[int] = []
    milestone = float(grace_period)
    while milestone < max_t:
        milestones.append(int(milestone))
        milestone *= reduction_factor
    return milestones


class PromotingASHA(FIFOScheduler):
    """Asynchronous successive halving by promotion; `metric`/`mode` come from TuneConfig."""

    def __init__(
        self,
        *,
        max_t: int,
        grace_period: int,
        reduction_factor: float,
        num_trials: int,
        time_attr: str = "training_iteration",
    ) -> None:
        if not 1 <= grace_period <= max_t or reduction_factor <= 1:
            raise ValueError("need 1 <= grace_period <= max_t and reduction_factor > 1")
        super().__init__()
        self.max_t, self.eta, self.time_attr = max_t, reduction_factor, time_attr
        self.num_trials = num_trials
        """Trials the sweep will add in all: a rung is settled only once all were added."""
        self.milestones = rung_milestones(grace_period, max_t, reduction_factor)
        self.scores: list[dict[str, float]] = [{} for _ in self.milestones]
        """Per rung: trial id -> its metric there, signed so that higher is better."""
        self.promoted: list[set[str]] = [set() for _ in self.milestones]
        self.waiting: dict[str, int] = {}
        """Paused trial id -> the rung it waits at."""
        self.added: set[str] = set()
        self._mode: str | None = None

    def set_search_properties(self, metric: str | None, mode: str | None, **spec: Any) -> bool:
        if (self._metric and metric) or (self._mode and mode):
            return False
        self._metric = metric or self._metric
        self._mode = mode or self._mode
        return True

    # ------------------------------------------------------------------ Tune's callbacks

    def on_trial_add(self, tune_controller: Any, trial: Trial) -> None:
        self.added.add(trial.trial_id)

    def on_trial_result(self, tune_controller: Any, trial: Trial, result: dict) -> str:
        progress, value = result.get(self.time_attr), result.get(str(self._metric))
        if progress is None or value is None:
            return TrialScheduler.CONTINUE
        if progress >= self.max_t:
            return TrialScheduler.STOP
        rung = self._rung_at(progress)
        if rung is None or trial.trial_id in self.scores[rung]:
            return TrialScheduler.CONTINUE
        self.scores[rung][trial.trial_id] = value if self._mode == "max" else -value
        settled = self._settled(tune_controller, rung, exclude=trial)
        if trial.trial_id in self._top(rung, settled):
            self.promoted[rung].add(trial.trial_id)
            return TrialScheduler.CONTINUE
        if settled:
            return TrialScheduler.STOP
        self.waiting[trial.trial_id] = rung
        return TrialScheduler.PAUSE

    def on_trial_complete(self, tune_controller: Any, trial: Trial, result: dict) -> None:
        self.waiting.pop(trial.trial_id, None)

    def on_trial_error(self, tune_controller: Any, trial: Trial) -> None:
        self.waiting.pop(trial.trial_id, None)

    def on_trial_remove(self, tune_controller: Any, trial: Trial) -> None:
        self.waiting.pop(trial.trial_id, None)

    def choose_trial_to_run(self, tune_controller: Any) -> Trial | None:
        """Settle the rungs nothing can reach any more, then resume the best promotable
        paused trial (highest rung first, as ASHA promotes), else start a pending one."""
        trials = tune_controller.get_trials()
        self._settle_rungs(tune_controller, trials)
        best: tuple[int, float, Trial] | None = None
        for trial in trials:
            if trial.status != Trial.PAUSED:
                continue
            rung = self.waiting.get(trial.trial_id)
            if rung is None:  # paused before a driver restart: let it go on
                return trial
            settled = self._settled(tune_controller, rung)
            if trial.trial_id in self._top(rung, settled):
                score = self.scores[rung][trial.trial_id]
                if best is None or (rung, score) > best[:2]:
                    best = (rung, score, trial)
        if best is not None:
            rung, _, trial = best
            self.promoted[rung].add(trial.trial_id)
            del self.waiting[trial.trial_id]
            return trial
        return next((t for t in trials if t.status == Trial.PENDING), None)

    def debug_string(self) -> str:
        rungs = ", ".join(
            f"{m}: {len(s)} seen, {len(p)} promoted"
            for m, s, p in zip(self.milestones, self.scores, self.promoted, strict=True)
        )
        return f"PromotingASHA (rungs {rungs}; {len(self.waiting)} paused)"

    # ------------------------------------------------------------------ the rules

    def _rung_at(self, progress: float) -> int | None:
        """The highest rung whose milestone this trial has reached."""
        reached = [i for i, m in enumerate(self.milestones) if progress >= m]
        return reached[-1] if reached else None

    def _top(self, rung: int, settled: bool) -> set[str]:
        """Trials of the rung that may go on: the top ⌊n/η⌋, or ⌈n/η⌉ (at least 1) once
        settled."""
        scores = self.scores[rung]
        n = len(scores)
        count = max(1, math.ceil(n / self.eta)) if settled else math.floor(n / self.eta)
        return set(sorted(scores, key=lambda t: scores[t], reverse=True)[:count])

    def _settled(self, tune_controller: Any, rung: int, exclude: Trial | None = None) -> bool:
        """True when no trial can reach this rung any more."""
        if len(self.added) < self.num_trials:
            return False
        milestone = self.milestones[rung]
        for trial in tune_controller.get_trials():
            if trial is exclude or trial.status in (Trial.TERMINATED, Trial.ERROR):
                continue
            if trial.trial_id in self.scores[rung]:
                continue
            waiting_at = self.waiting.get(trial.trial_id)
            if waiting_at is not None and waiting_at > rung:
                continue
            progress = (trial.last_result or {}).get(self.time_attr, 0)
            if progress < milestone:
                return False  # pending, running below it, or paused at a lower rung
        return True

    def _settle_rungs(self, tune_controller: Any, trials: list[Trial]) -> None:
        """Stop the paused trials of settled rungs that are not in the rung's top ⌈n/η⌉."""
        for trial in trials:
            rung = self.waiting.get(trial.trial_id)
            if trial.status != Trial.PAUSED or rung is None:
                continue
            if not self._settled(tune_controller, rung):
                continue
            if trial.trial_id not in self._top(rung, settled=True):
                logger.debug("rung %d settled: stopping %s", self.milestones[rung], trial)
                tune_controller.stop_trial(trial)
