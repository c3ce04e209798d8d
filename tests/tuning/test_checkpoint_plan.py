"""Which epochs of a one-worker trial carry a checkpoint: where something resumes from one."""

from ray.tune.schedulers import FIFOScheduler, PopulationBasedTraining

from kiln.tuning.asha import PromotingASHA
from kiln.tuning.config import SweepConfig
from kiln.tuning.space import SearchSpace
from kiln.tuning.trainable import TrialContext
from kiln.tuning.tuner import CHECKPOINT_EVERY, checkpoint_plan, make_trial_scheduler


def context_for(scheduler) -> TrialContext:
    context = TrialContext(train={}, spec={}, shards=[], val_shards=[], num_train_rows=1)
    context.checkpoint_every, context.checkpoint_at = checkpoint_plan(scheduler)
    return context


def checkpointed(context: TrialContext, epochs: int) -> list[int]:
    """Training iterations (1-based) whose report carries a checkpoint."""
    return [i for i in range(1, epochs + 1) if context.wants_checkpoint(i, last=i == epochs)]


def test_promoting_asha_checkpoints_at_every_rung_it_may_pause_and_at_the_end():
    cfg = SweepConfig(space=SearchSpace.from_dict({"lr": "1e-3:1e-1"}), max_epochs=18)
    scheduler = make_trial_scheduler(cfg)
    assert isinstance(scheduler, PromotingASHA)
    found = checkpointed(context_for(scheduler), 18)
    assert set(scheduler.milestones) <= set(found)  # a paused trial resumes from its rung
    assert 18 in found and CHECKPOINT_EVERY in found
    assert len(found) < 18  # and not every epoch


def test_a_grid_without_scheduler_checkpoints_every_few_epochs_and_at_the_end():
    found = checkpointed(context_for(FIFOScheduler()), 12)
    assert found == [i for i in range(1, 13) if i % CHECKPOINT_EVERY == 0] + [12]


def test_pbt_clones_any_trial_so_every_epoch_checkpoints():
    pbt = PopulationBasedTraining(perturbation_interval=2, hyperparam_mutations={"lr": [0.1]})
    assert checkpointed(context_for(pbt), 7) == list(range(1, 8))
