"""Gradient accumulation: N micro-batches make the step one batch of all their rows makes."""

import numpy as np
import pytest
import torch

from kiln.training.config import TrainConfig
from kiln.training.errors import KilnError
from kiln.training.loop import LoopConfig, make_optimizer, run_epoch
from kiln.training.models import build_model

SPEC = {"kind": "mlp", "task": "classification", "num_features": 6, "classes": [0, 1, 2]}


def one_epoch(batches, grad_accum: int, l2: float, optimizer: str = "sgd") -> torch.nn.Module:
    torch.manual_seed(0)
    model = build_model({**SPEC, "hidden": [16, 8]})
    cfg = TrainConfig(
        model="mlp", hidden=[16, 8], lr=0.1, optimizer=optimizer, l2=l2, grad_accum=grad_accum
    )
    loop_cfg = LoopConfig(train=cfg, spec={**SPEC, "hidden": [16, 8]}, shards=[], num_train_rows=90)
    run_epoch(model, make_optimizer(model, cfg), iter(batches), loop_cfg, torch.device("cpu"))
    return model


def micro_batches(sizes: list[int]) -> list[tuple[torch.Tensor, torch.Tensor]]:
    generator = torch.Generator().manual_seed(1)
    return [
        (torch.randn(n, 6, generator=generator), torch.randint(0, 3, (n,), generator=generator))
        for n in sizes
    ]


def joined(batches):
    return [(torch.cat([x for x, _ in batches]), torch.cat([y for _, y in batches]))]


@pytest.mark.parametrize("optimizer", ["sgd", "adam"])
@pytest.mark.parametrize("sizes", [[8, 8, 8, 8], [10, 7, 3]])  # equal, and uneven micro-batches
def test_accumulated_micro_batches_step_like_one_big_batch(sizes, optimizer):
    batches = micro_batches(sizes)
    accumulated = one_epoch(batches, grad_accum=len(sizes), l2=0.5, optimizer=optimizer)
    whole = one_epoch(joined(batches), grad_accum=1, l2=0.5, optimizer=optimizer)
    for (name, a), b in zip(
        accumulated.state_dict().items(), whole.state_dict().values(), strict=True
    ):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6, msg=name)
    torch.manual_seed(0)
    untouched = build_model({**SPEC, "hidden": [16, 8]})
    assert not torch.allclose(accumulated.body[0].weight, untouched.body[0].weight)  # it stepped


def test_groups_step_once_per_group_including_a_short_last_one():
    batches = micro_batches([5, 5, 5, 5, 5])
    grouped = one_epoch(batches, grad_accum=2, l2=0.0)  # steps over [b0 b1] [b2 b3] [b4]
    by_hand = one_epoch(
        joined(batches[0:2]) + joined(batches[2:4]) + joined(batches[4:]), grad_accum=1, l2=0.0
    )
    for a, b in zip(grouped.parameters(), by_hand.parameters(), strict=True):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
    plain = one_epoch(batches, grad_accum=1, l2=0.0)
    pairs = zip(grouped.parameters(), plain.parameters(), strict=True)
    assert any(not torch.allclose(a, b) for a, b in pairs)  # grouping changed the steps


@pytest.mark.parametrize(
    ("field", "value", "option"),
    [("grad_accum", 0, "--grad-accum"), ("cpus_per_worker", 0, "--cpus-per-worker")],
)
def test_counts_below_one_are_refused_naming_the_option(field, value, option):
    with pytest.raises(KilnError, match=f'Got "{value}" for {option}'):
        TrainConfig(**{field: value})


def test_equal_steps_cut_every_rank_into_the_same_number_of_batches_each_row_once():
    from kiln.training.loop import shard_batches, steps_per_epoch

    cpu = torch.device("cpu")
    sizes = {0: 1000, 1: 300, 2: 2}
    steps = steps_per_epoch(list(sizes.values()), batch_size=256)
    assert steps == 4  # the largest rank's 1000 rows in batches of at most 256
    for rank, n in sizes.items():
        x = np.arange(n, dtype=np.float32)[:, None]
        y = np.arange(n)
        batches = list(shard_batches(x, y, 256, (0, 1, rank), cpu, steps))
        assert len(batches) == steps
        lengths = [len(yb) for _, yb in batches]
        assert max(lengths) - min(lengths) <= 1 and max(lengths) <= 256
        seen = np.sort(np.concatenate([yb.numpy() for _, yb in batches]))
        np.testing.assert_array_equal(seen, y)  # every row once, however few
    assert 0 in [len(yb) for _, yb in shard_batches(x, y, 256, (0, 1, 2), cpu, steps)]


def test_an_empty_micro_batch_adds_nothing_and_an_empty_epoch_leaves_the_model_alone():
    batches = micro_batches([10, 7])
    empty = (torch.zeros(0, 6), torch.zeros(0, dtype=torch.int64))
    with_empty = one_epoch([batches[0], empty, batches[1]], grad_accum=3, l2=0.5)
    without = one_epoch(batches, grad_accum=2, l2=0.5)
    for a, b in zip(with_empty.parameters(), without.parameters(), strict=True):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
    torch.manual_seed(0)
    untouched = build_model({**SPEC, "hidden": [16, 8]})
    idle = one_epoch([empty, empty], grad_accum=1, l2=0.5, optimizer="adam")
    for a, b in zip(idle.parameters(), untouched.parameters(), strict=True):
        assert torch.isfinite(a).all()
        torch.testing.assert_close(a, b)  # zero gradients: Adam does not move
