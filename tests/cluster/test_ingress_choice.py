"""Which HTTP ingress `kiln serve` takes (cluster/serving_control.py direct_ingress): pure."""

from __future__ import annotations

import pytest

from kiln.serving_control import direct_ingress
from kiln.settings import Settings
from kiln.training.errors import KilnError


def settings(ingress: str, address: str | None = None) -> Settings:
    return Settings(kiln_ingress=ingress, ray_address=address)


@pytest.mark.parametrize(
    ("ingress", "address", "args", "direct"),
    [
        ("auto", None, {}, True),  # a laptop, fixed replicas: the replicas answer
        ("auto", None, {"num_replicas": 2}, True),
        ("auto", None, {"max_replicas": 3}, False),  # autoscaling needs Serve's ingress
        ("auto", None, {"min_replicas": 0}, False),
        ("auto", "ray://head:10001", {}, False),  # a cluster: Serve answers on every node
        ("serve", None, {}, False),
        ("direct", "ray://head:10001", {}, True),
    ],
)
def test_the_choice(ingress: str, address: str | None, args: dict, direct: bool) -> None:
    assert direct_ingress(settings(ingress, address), args, tls=False) is direct


def test_direct_refuses_autoscaling_and_cluster_tls() -> None:
    with pytest.raises(KilnError, match="give --num-replicas N, or --ingress serve"):
        direct_ingress(settings("direct"), {"max_replicas": 2}, tls=False)
    with pytest.raises(KilnError, match="on a cluster use --ingress serve"):
        direct_ingress(settings("direct", "ray://head:10001"), {}, tls=True)
    assert direct_ingress(settings("direct"), {}, tls=True) is True  # embedded: behind TLS
