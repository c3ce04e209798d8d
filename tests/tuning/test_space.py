"""Search spaces without Ray: parsing, validation messages, grids and the λ = 0 encoding."""

import math

import pytest

from kiln.training.errors import KilnError
from kiln.tuning.config import SweepConfig
from kiln.tuning.space import (
    L2_LOG10_KEY,
    SearchSpace,
    decode_l2,
    grid_configs,
    grid_size,
    param_space,
    parse_log_range,
)


def test_ranges_parse_with_and_without_zero():
    assert parse_log_range("1e-4:1e-1", "--lr", allow_zero=False).high == pytest.approx(0.1)
    with_zero = parse_log_range("0,1e-6:1e-1", "--l2", allow_zero=True)
    assert with_zero.include_zero and with_zero.low == pytest.approx(1e-6)
    assert with_zero.grid(3) == pytest.approx([0.0, 1e-6, math.sqrt(1e-7), 1e-1])
    assert parse_log_range("3e-3", "--lr", allow_zero=False).fixed


@pytest.mark.parametrize(
    "text,option,fragment",
    [
        ("1e-1:1e-4", "--lr", 'Got "1e-1:1e-4" for --lr. LOW must not exceed HIGH'),
        ("-1e-3:1e-1", "--lr", "Both ends must be greater than 0"),
        ("0:1e-1", "--lr", "Both ends must be greater than 0"),
        ("0,1e-4:1e-1", "--lr", "--lr cannot include 0"),
        ("abc", "--l2", "Give LOW:HIGH as numbers"),
        ("1:0.1", "--l2", "LOW must not exceed HIGH, e.g. --l2 0,1e-6:1e-1"),
        ("1e-4:20", "--lr", "below 10"),
    ],
)
def test_bad_ranges_name_the_value_and_the_fix(text, option, fragment):
    with pytest.raises(KilnError, match="e.g.") as raised:
        parse_log_range(text, option, allow_zero=option == "--l2")
    assert fragment in str(raised.value)


def test_zero_band_decodes_to_exactly_zero_below_low():
    space = SearchSpace.from_dict({"lr": "1e-3:1e-1", "l2": "0,1e-4:1"})
    params = param_space(space, "random", 4)
    assert L2_LOG10_KEY in params and "l2" not in params
    assert decode_l2({L2_LOG10_KEY: -4.5, "l2_low": 1e-4}) == 0.0
    assert decode_l2({L2_LOG10_KEY: -2.0, "l2_low": 1e-4}) == pytest.approx(1e-2)


def test_grid_covers_every_point_and_choice():
    space = SearchSpace.from_dict({"lr": "1e-3:1e-1", "l2": "0,1e-4:1", "optimizer": "adam,sgd"})
    assert grid_size(space, 3) == 3 * 4 * 2
    points = grid_configs(space, 3, seed=0)
    as_tuples = [(p["lr"], p["l2"], p["optimizer"]) for p in points]
    assert len(set(as_tuples)) == len(points) == 3 * 4 * 2  # each point exactly once
    assert {p["l2"] for p in points} == {0.0, *space.l2.grid(3)[1:]}
    assert {p["optimizer"] for p in points} == {"adam", "sgd"}
    assert as_tuples != sorted(as_tuples)  # not in axis order: ASHA would meet the worst first
    assert points == grid_configs(space, 3, seed=0) and points != grid_configs(space, 3, seed=1)
    choices = param_space(space, "grid", 3)  # the same values, as Tune domains
    assert sorted(choices["lr"].categories) == sorted(space.lr.grid(3))


def test_space_rejects_unknown_keys_and_optimisers():
    with pytest.raises(KilnError, match='unknown key "momentum"'):
        SearchSpace.from_dict({"momentum": "0.9"})
    with pytest.raises(KilnError, match='Got "rmsprop" for --optimizer'):
        SearchSpace.from_dict({"optimizer": "adam,rmsprop"})


def test_sweep_config_rejects_unknown_scheduler_and_pbt_with_optuna():
    with pytest.raises(KilnError, match='Got "median" for --scheduler. Choose one of: asha'):
        SweepConfig(space=SearchSpace(), scheduler="median")
    with pytest.raises(KilnError, match="PBT picks its own"):
        SweepConfig(space=SearchSpace(), scheduler="pbt", search="optuna")


LAUGHS = 'a: &a ["lol", "lol", "lol", "lol", "lol", "lol", "lol", "lol", "lol"]\n' + "".join(
    f"{chr(98 + i)}: &{chr(98 + i)} [{', '.join(['*' + chr(97 + i)] * 9)}]\n" for i in range(8)
) + "lr: *i\n"  # fmt: skip


@pytest.mark.timeout(30)
@pytest.mark.parametrize(
    "text,fragment",
    [
        (LAUGHS, "uses YAML anchors or aliases"),  # 9**9 nodes once expanded
        ("lr: " + "[" * 20000 + "]" * 20000 + "\n", "nested deeper than 16 levels"),
        ("lr: 1e-4:1e-1\n" + "# padding\n" * 10000, "a search space is a few lines"),
        ("lr: [1, 2\n", "not valid YAML"),
        ("lr: &x 1e-4:1e-1\n", "anchors or aliases"),
    ],
)
def test_a_hostile_space_file_gets_one_clear_error_and_no_hang(tmp_path, text, fragment):
    from kiln.tuning.space import load_space_file

    path = tmp_path / "space.yaml"
    path.write_text(text)
    with pytest.raises(KilnError, match=fragment):
        load_space_file(str(path))
