"""PromotingASHA's rules without Ray: pause below the top 1/η, promote later, settle a rung."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from ray.tune.experiment import Trial
from ray.tune.schedulers import TrialScheduler

from kiln.tuning.asha import PromotingASHA, rung_milestones


@dataclass
class FakeTrial:
    trial_id: str
    status: str = Trial.PENDING
    last_result: dict[str, Any] = field(default_factory=dict)


class FakeController:
    """What the scheduler asks of Tune's controller: the trials, and stopping one."""

    def __init__(self, scheduler: PromotingASHA, num_trials: int) -> None:
        self.scheduler = scheduler
        self.trials = [FakeTrial(f"t{i}") for i in range(num_trials)]
        for trial in self.trials:
            scheduler.on_trial_add(self, trial)

    def get_trials(self) -> list[FakeTrial]:
        return self.trials

    def stop_trial(self, trial: FakeTrial) -> None:
        self.scheduler.on_trial_remove(self, trial)
        trial.status = Trial.TERMINATED

    def report(self, trial: FakeTrial, epoch: int, accuracy: float) -> str:
        """One result, and the status Tune would give the trial for the decision."""
        trial.status = Trial.RUNNING
        result = {"training_iteration": epoch, "val_accuracy": accuracy}
        trial.last_result = result
        decision = self.scheduler.on_trial_result(self, trial, result)
        trial.status = {
            TrialScheduler.PAUSE: Trial.PAUSED,
            TrialScheduler.STOP: Trial.TERMINATED,
        }.get(decision, Trial.RUNNING)
        return decision


def make_asha(num_trials: int) -> PromotingASHA:
    asha = PromotingASHA(max_t=18, grace_period=2, reduction_factor=3, num_trials=num_trials)
    assert asha.set_search_properties("val_accuracy", "max")
    return asha


def test_rungs_are_grace_times_powers_of_eta_below_max_t():
    assert rung_milestones(2, 18, 3) == [2, 6]
    assert rung_milestones(1, 12, 3) == [1, 3, 9]
    assert rung_milestones(4, 4, 3) == []


def test_trials_wait_at_a_rung_until_they_rank_in_its_top_third():
    asha = make_asha(num_trials=10)  # one more than reported: the rung never settles here
    tune = FakeController(asha, 10)
    scores = [0.5, 0.1, 0.9, 0.3, 0.7, 0.2, 0.8, 0.4, 0.6]
    decisions = [tune.report(t, 2, s) for t, s in zip(tune.trials, scores, strict=False)]
    # Ray's stopping ASHA lets the first arrival on an empty rung go on; here it waits.
    assert decisions[:2] == [TrialScheduler.PAUSE, TrialScheduler.PAUSE]
    # 0.9 is the top ⌊3/3⌋ = 1 of the rung when it arrives; 0.8 the top 2 of 7.
    assert decisions[2] == decisions[6] == TrialScheduler.CONTINUE
    assert decisions.count(TrialScheduler.CONTINUE) == 2
    # With 6 at the rung, 0.7 (paused when it arrived 5th) entered the top 2: it is resumed.
    resumed = tune.trials[4]
    assert asha.choose_trial_to_run(tune) is resumed and resumed.trial_id in asha.promoted[0]
    resumed.status = Trial.RUNNING
    # No other paused trial is in the top ⌊9/3⌋ = 3 (0.9, 0.8, 0.7), so the pending one runs.
    assert asha.choose_trial_to_run(tune) is tune.trials[9]
    assert not any(t.status == Trial.TERMINATED for t in tune.trials)


def test_a_settled_rung_stops_its_paused_losers_and_keeps_its_top_ceil_third():
    asha = make_asha(num_trials=7)
    tune = FakeController(asha, 7)
    scores = [0.1, 0.2, 0.3, 0.4, 0.5, 0.6]
    decisions = [tune.report(t, 2, s) for t, s in zip(tune.trials, scores, strict=False)]
    # Rising scores: from the third on, each new best is in the top ⌊n/3⌋ (why grids shuffle).
    assert decisions == [TrialScheduler.PAUSE] * 2 + [TrialScheduler.CONTINUE] * 4
    assert asha.choose_trial_to_run(tune) is tune.trials[6]  # the last trial may still arrive
    assert all(t.status != Trial.TERMINATED for t in tune.trials)
    # The last trial arrives: the rung is settled; 0.35 is outside its top ⌈7/3⌉ = 3: stop.
    assert tune.report(tune.trials[6], 2, 0.35) == TrialScheduler.STOP
    assert asha.choose_trial_to_run(tune) is None
    stopped = [t.trial_id for t in tune.trials if t.status == Trial.TERMINATED]
    assert stopped == ["t0", "t1", "t6"]  # the paused losers, stopped once nothing can come


def test_a_rung_waits_for_trials_still_below_it():
    asha = make_asha(num_trials=3)
    tune = FakeController(asha, 3)
    assert tune.report(tune.trials[0], 2, 0.9) == TrialScheduler.PAUSE
    assert tune.report(tune.trials[1], 2, 0.8) == TrialScheduler.PAUSE
    tune.trials[2].status = Trial.RUNNING
    tune.trials[2].last_result = {"training_iteration": 1, "val_accuracy": 0.1}
    assert asha.choose_trial_to_run(tune) is None  # t2 may still beat them at epoch 2
    assert tune.report(tune.trials[2], 2, 0.1) == TrialScheduler.STOP  # settled, not top 1
    assert asha.choose_trial_to_run(tune) is tune.trials[0]  # the rung's best goes on
    assert tune.trials[1].status == Trial.TERMINATED


def test_trials_stop_at_max_t_and_finished_trials_never_block_a_rung():
    asha = make_asha(num_trials=2)
    tune = FakeController(asha, 2)
    assert tune.report(tune.trials[0], 18, 0.5) == TrialScheduler.STOP
    assert tune.report(tune.trials[1], 2, 0.4) == TrialScheduler.CONTINUE  # the rung's only one
