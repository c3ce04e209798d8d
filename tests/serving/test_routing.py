"""Router: names, versions, aliases and canary splits, sticky or random. No Ray."""

import pytest

from kiln.serving.routing import Router, bucket


@pytest.fixture
def router() -> Router:
    routes = Router()
    routes.add("m@1", "previous")
    routes.add("m@2", "production", "staging", default=True)
    routes.add("other@7")
    return routes


def test_names_versions_and_aliases_resolve(router):
    assert router.pick("m") == "m@2"  # the default, though m@1 was added first
    assert (router.pick("m@1"), router.pick("m@previous"), router.pick("m@staging")) == (
        "m@1",
        "m@1",
        "m@2",
    )
    assert router.pick("other") == "other@7"
    assert router.pick("m@3") is None and router.pick("ghost") is None
    assert router.served() == [
        "m",
        "m@1",
        "m@2",
        "m@previous",
        "m@production",
        "m@staging",
        "other",
        "other@7",
    ]
    assert router.aliases_of("m@2") == ["production", "staging"]
    assert router.aliases_of("other@7") == []


def test_a_non_default_version_does_not_take_the_bare_name(router):
    router.add("m@3", "canary", default=False)
    assert router.pick("m") == "m@2" and router.pick("m@canary") == "m@3"


def test_a_sticky_caller_stays_on_one_side_and_the_share_follows_the_weight(router):
    router.add("m@3", "canary", default=False)
    router.split("m", "m@3", 30)
    sides = [router.pick("m", f"session-{i}") for i in range(2000)]
    share = sides.count("m@3") / len(sides)
    assert 0.26 < share < 0.34, share
    assert set(sides) == {"m@2", "m@3"}
    for i in range(50):  # the same key lands on the same side every time
        assert router.pick("m", f"session-{i}") == sides[i]
    # Only the bare name is split: a version or an alias names its target exactly.
    assert {router.pick("m@2", f"session-{i}") for i in range(50)} == {"m@2"}
    assert router.pick("m@canary") == "m@3"


def test_the_bucket_decides_the_side(router, monkeypatch):
    router.add("m@3", default=False)
    router.split("m", "m@3", 30)
    monkeypatch.setattr("kiln.serving.routing.random.random", lambda: 0.2999)
    assert router.pick("m") == "m@3"  # bucket 29.99 < 30
    monkeypatch.setattr("kiln.serving.routing.random.random", lambda: 0.30)
    assert router.pick("m") == "m@2"
    key = next(f"k{i}" for i in range(1000) if bucket(f"k{i}") < 30)
    assert router.pick("m", key) == "m@3"


@pytest.mark.parametrize("weight,expected", [(0, {"m@2"}), (100, {"m@3"})])
def test_weights_0_and_100_send_everything_one_way(router, weight, expected):
    router.add("m@3", default=False)
    router.split("m", "m@3", weight)
    assert {router.pick("m", f"s{i}") for i in range(200)} | {router.pick("m")} == expected


@pytest.mark.parametrize("weight", [-1, 101])
def test_a_weight_outside_0_to_100_is_refused(router, weight):
    with pytest.raises(ValueError, match=f"canary weight {weight} is outside 0-100"):
        router.split("m", "m@1", weight)
    assert router.splits == {}


def test_bucket_is_stable_per_key_and_within_range():
    values = [bucket(f"user-{i}") for i in range(500)]
    assert values == [bucket(f"user-{i}") for i in range(500)]
    assert all(0 <= v < 100 for v in values) and len(set(values)) == 500
    assert min(values) < 5 and max(values) > 95  # spread over the whole range
